"""What a run minimises. An objective owns its batch schema, its hyperparameters and its metrics.

Why a seam: next-token loss, SFT and DPO differ only in what a batch holds and what is summed per batch;
the step, the optimizer, accumulation, the loop and the run directory stay the same. An objective is a
frozen (hashable) dataclass, a static argument of the jitted step:

    batch_keys                   the [B, T] arrays a batch holds (the step's input schema)
    metrics                      per-step scalars it reports (the first one judges divergence)
    needs_reference              whether the train state carries frozen reference params (`ref_params`)
    make_hp(run_cfg)             its traced hyperparameters (float32 scalars), merged into the step's `hp`
    sums(params, ref, batch, hp, model_cfg, attention_impl) -> (value to differentiate,
                                                                {"count": normaliser, metric sums})
    eval_sums(params, batch, model_cfg, attention_impl) -> (held-out loss sum, count)

The step divides the summed gradient and every metric sum by the total `count` over the micro-batches,
so k micro-batches equal one k-times-larger batch. To add DPO: an objective with `needs_reference=True`
whose `sums` reads `ref` and the chosen/rejected arrays it lists in `batch_keys`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig
from qwenjax.data import BATCH_DTYPES
from qwenjax.run_config import RunConfig
from qwenjax.train.dpo import DPOLoss
from qwenjax.train.reward import RewardLoss

#: the batch schema of packed next-token data (what qwenjax.data yields), with each array's dtype
TOKEN_BATCH = BATCH_DTYPES


def loss_terms(params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
    """(sum of token cross-entropies, sum of logsumexp^2, number of tokens), all float32, over loss_mask."""
    logits_BTV, _ = qmodel.apply(model_cfg, params, batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"], attention_impl=attention_impl)
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((lse_BT - target_BT) * mask_BT), jnp.sum(lse_BT * lse_BT * mask_BT), jnp.sum(mask_BT)


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """Mean next-token cross-entropy over the tokens with loss_mask 1 (float32), plus z_loss x
    mean(logsumexp(logits)^2) when the traced `hp["z_loss"]` is given (the run config's `optim.z_loss`)."""

    name: str = "next_token"
    batch_keys: tuple[str, ...] = tuple(TOKEN_BATCH)
    metrics: tuple[str, ...] = ("loss",)
    needs_reference: bool = False

    @staticmethod
    def make_hp(run_cfg: RunConfig | None = None, *, z_loss: float | None = None) -> dict[str, jax.Array]:
        """{"z_loss"}: from `z_loss`, else from the run config (`optim.z_loss`, kept there for users)."""
        value = z_loss if z_loss is not None else (run_cfg.optim.z_loss if run_cfg is not None else 0.0)
        return {"z_loss": jnp.asarray(value, jnp.float32)}

    def sums(self, params, ref_params, batch, hp, model_cfg: ModelConfig, attention_impl: str = "auto"):
        del ref_params  # no reference model
        nll, z, count = loss_terms(params, batch, model_cfg, attention_impl)
        value = nll + hp["z_loss"] * z if "z_loss" in hp else nll
        return value, {"loss": nll, "count": count}

    def eval_sums(self, params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
        nll, _, count = loss_terms(params, batch, model_cfg, attention_impl)
        return nll, count


NEXT_TOKEN = NextTokenLoss()
#: `train.objective` -> objective. SFT is next-token loss over the loss mask, which chat batches set to the
#: assistant tokens (qwenjax.data.chat), so it is the same objective (and the same compiled step).
OBJECTIVES = {NEXT_TOKEN.name: NEXT_TOKEN, "sft": NEXT_TOKEN, "dpo": DPOLoss(), "reward": RewardLoss()}


def objective_of(run_cfg: RunConfig, heldout: bool = False):
    """The objective a run config names (`train.objective`), with its static settings (DPO: `dpo.loss`,
    `dpo.reference`). `heldout`: the one whose `eval_sums` the held-out step runs (its batches carry no
    cached reference)."""
    if run_cfg.train.objective == "dpo":
        return DPOLoss(loss=run_cfg.dpo.loss, reference="step" if heldout else run_cfg.dpo.reference)
    return OBJECTIVES[run_cfg.train.objective]


def mean_gradients(params, batch, hp, *, model_cfg: ModelConfig, grad_accum: int = 1,
                   objective=NEXT_TOKEN, ref_params=None, attention_impl: str = "auto"):
    """(gradient of the objective's mean, its mean first metric) over a [B, T] batch, accumulated over
    `grad_accum` micro-batches with lax.scan: summed per micro-batch, divided once by the total count, so
    the result equals that of one batch (up to float32 rounding). `mean_metrics` gives every metric."""
    grads, metrics = mean_metrics(params, batch, hp, model_cfg=model_cfg, grad_accum=grad_accum,
                                  objective=objective, ref_params=ref_params, attention_impl=attention_impl)
    return grads, metrics[objective.metrics[0]]


def mean_metrics(params, batch, hp, *, model_cfg: ModelConfig, grad_accum: int, objective, ref_params,
                 attention_impl: str = "auto"):
    """(mean gradient, {metric: mean over the count}) of `objective` (see `mean_gradients`)."""

    def value(p, micro):
        return objective.sums(p, ref_params, micro, hp, model_cfg, attention_impl)

    grad_fn = jax.grad(value, has_aux=True)
    k = grad_accum
    if k == 1:
        grads, sums = grad_fn(params, batch)
    else:
        # [B, T] -> [k, B/k, T]: micro-batch j = rows j, j+k, ...; each stays split evenly over the
        # data-parallel devices (a device's rows are a contiguous block whose size B/k divides).
        micro_KBT = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, micro):
            g_acc, sums_acc = carry
            g, sums_i = grad_fn(params, micro)
            return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g),
                    jax.tree.map(jnp.add, sums_acc, sums_i)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        sums0 = {name: jnp.float32(0) for name in (*objective.metrics, "count")}
        (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), micro_KBT)
    denom = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return grads, {name: sums[name] / denom for name in objective.metrics}
