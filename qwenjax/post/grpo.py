"""GRPO (Shao et al. 2024, DeepSeekMath; the Qwen2.5 report's online RL): group-normalised advantages and a
clipped policy gradient with a k3 KL penalty to the frozen starting model, as an objective of the
`train/objectives.py` seam (docs/post-training.md, "GRPO").

A batch holds the B = prompts x G sampled sequences of one round, each row one sequence from position 0:

    inputs, targets [B, T] int32   the prompt + response ids, shifted by one (inputs = ids[:-1])
    mask            [B, T] float32 1 where the target is a response token (the sampled tokens, <|im_end|> too)
    old_logp        [B, T] float32 log pi_old(target), recorded by the sampler (the params that sampled)
    ref_logp        [B, T] float32 log pi_ref(target), the frozen reference, computed once per round
    advantage       [B, T] float32 the sequence's advantage A_i, repeated over its tokens

Per response token t of sequence i, with ratio r = exp(logp - old_logp) and d = ref_logp - logp:

    loss_t = -min(r A_i, clip(r, 1 - clip_eps, 1 + clip_eps) A_i) + kl_beta (exp(d) - d - 1)

and the step minimises the mean of loss_t over every response token of the batch (token-level: long answers
weigh by their length, as in DAPO; the GRPO paper first averages within each sequence). One update per round,
so r == 1 at the update (up to the sampler's and the trainer's float rounding) and only the KL term and
A_i shape the gradient; the general form is kept for more updates per round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.train.dpo import token_logps

#: the rollout batch schema: every array is [sequences, seq_len]
GRPO_BATCH = {"inputs": np.dtype(np.int32), "targets": np.dtype(np.int32), "mask": np.dtype(np.float32),
              "old_logp": np.dtype(np.float32), "ref_logp": np.dtype(np.float32),
              "advantage": np.dtype(np.float32)}
ADVANTAGE_EPS = 1e-4  # A = (r - mean) / (std + eps): a group of equal rewards gets A = 0, not 0 / 0


def group_advantages(rewards_PG, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """A [P, G] (float32) from rewards [P, G] (one row per prompt's group): (r - mean) / (std + eps), with the
    population std (ddof 0) of each group."""
    r = np.asarray(rewards_PG, np.float64)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    return ((r - mean) / (std + eps)).astype(np.float32)


def token_terms(logp_BT, old_BT, ref_BT, adv_BT, mask_BT, clip_eps, kl_beta):
    """Per-token (loss, k3 KL, clipped?) [B, T] of the objective above; zero where mask is 0."""
    ratio = jnp.exp(logp_BT - old_BT)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = jnp.minimum(ratio * adv_BT, clipped * adv_BT)
    d = ref_BT - logp_BT
    kl = jnp.exp(d) - d - 1.0
    mask = mask_BT.astype(jnp.float32)
    is_clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    return (-surrogate + kl_beta * kl) * mask, kl * mask, is_clipped * mask


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """Mean GRPO loss over the response tokens of a step (clip_eps and kl_beta traced, from `rl:`). Metrics
    are means over the same tokens: `loss`, `kl` (k3), `clip_fraction` (tokens with |r - 1| > clip_eps)."""

    name: str = "grpo"
    batch_dtypes: tuple[tuple[str, np.dtype], ...] = tuple(GRPO_BATCH.items())
    metrics: tuple[str, ...] = ("loss", "kl", "clip_fraction")
    needs_reference: bool = False  # ref_logp arrives in the batch (one reference pass per round)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.batch_dtypes)

    @staticmethod
    def make_hp(run_cfg=None, *, clip_eps: float | None = None, kl_beta: float | None = None):
        """{"clip_eps", "kl_beta"}: given, else the run config's `rl` section (0.2 and 0.04 without one)."""
        section = getattr(run_cfg, "rl", None)
        c = clip_eps if clip_eps is not None else (section.clip_eps if section is not None else 0.2)
        b = kl_beta if kl_beta is not None else (section.kl_beta if section is not None else 0.04)
        return {"clip_eps": jnp.asarray(c, jnp.float32), "kl_beta": jnp.asarray(b, jnp.float32)}

    def sums(self, params, ref_params, batch, hp, model_cfg: ModelConfig, attention_impl: str = "auto"):
        del ref_params
        logp_BT = token_logps(params, batch["inputs"], batch["targets"], model_cfg, attention_impl)
        loss, kl, clipped = token_terms(logp_BT, batch["old_logp"], batch["ref_logp"], batch["advantage"],
                                        batch["mask"], hp["clip_eps"], hp["kl_beta"])
        total = jnp.sum(loss)
        return total, {"loss": total, "kl": jnp.sum(kl), "clip_fraction": jnp.sum(clipped),
                       "count": jnp.sum(batch["mask"].astype(jnp.float32))}

    def eval_sums(self, params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
        """The policy's negative log-likelihood of the response tokens (sum, count)."""
        logp_BT = token_logps(params, batch["inputs"], batch["targets"], model_cfg, attention_impl)
        mask = batch["mask"].astype(jnp.float32)
        return -jnp.sum(logp_BT * mask), jnp.sum(mask)


GRPO = GRPOLoss()


def reference_logps(model_cfg: ModelConfig, attention_impl: str = "auto"):
    """jit((params, inputs, targets) -> log p(target) [B, T]): the frozen reference's pass over a round."""
    return jax.jit(lambda p, i, t: token_logps(p, i, t, model_cfg, attention_impl))
