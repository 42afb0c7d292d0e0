"""What a run minimises: next-token cross-entropy (+ z-loss), with gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig


def loss_terms(params, batch, model_cfg: ModelConfig):
    """(sum of token cross-entropies, sum of logsumexp^2, number of tokens), all float32, over loss_mask."""
    logits_BTV, _ = qmodel.apply(model_cfg, params, batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"])
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((lse_BT - target_BT) * mask_BT), jnp.sum(lse_BT * lse_BT * mask_BT), jnp.sum(mask_BT)


def mean_gradients(params, batch, hp, *, model_cfg: ModelConfig, grad_accum: int = 1):
    """(gradient of the mean token loss (+ z-loss), mean token loss) over a [B, T] batch, accumulated over
    `grad_accum` micro-batches with lax.scan: summed per micro-batch, divided once by the total token count,
    so the result equals that of one batch (up to float32 rounding)."""

    def objective(p, micro):
        nll, z, count = loss_terms(p, micro, model_cfg)
        return nll + hp["z_loss"] * z, (nll, count)

    grad_fn = jax.grad(objective, has_aux=True)
    k = grad_accum
    if k == 1:
        grads, (nll, count) = grad_fn(params, batch)
    else:
        # [B, T] -> [k, B/k, T]: micro-batch j = rows j, j+k, ...; each stays split evenly over the
        # data-parallel devices (a device's rows are a contiguous block whose size B/k divides).
        micro_KBT = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, micro):
            g_acc, nll_acc, n_acc = carry
            g, (nll_i, n_i) = grad_fn(params, micro)
            return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g), nll_acc + nll_i,
                    n_acc + n_i), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, nll, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro_KBT)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return grads, nll / denom
