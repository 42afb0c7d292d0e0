"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on preference pairs: an objective of the
`train/objectives.py` seam (docs/post-training.md, "DPO").

A batch holds B pairs as six [B, T] arrays: `{chosen,rejected}_{inputs,targets,mask}` (qwenjax.data.pair_batches);
`mask` is 1 on the completion's target tokens (the assistant turn and its <|im_end|>). The policy's and the
frozen reference's log-probability of each completion is the sum of its token log-probs over that mask, so with
z = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):

    sigmoid:  -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)   (eps = label smoothing, cDPO)
    ipo:      (z - 1 / (2 beta))^2

The reference is the stage's starting model (`model.init_from`, else the fresh init), frozen. `dpo.reference`:
`step` keeps it as `ref_params` in the train state (`needs_reference`) and runs it in every step; `cached`
computes its per-token log-probs once before training (qwenjax.train.dpo_reference) and the batches carry them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("step", "cached")
SIDES = ("chosen", "rejected")
#: the pair batch schema: every array is [pairs, seq_len]
PAIR_BATCH = {f"{side}_{k}": np.dtype(dt) for side in SIDES
              for k, dt in (("inputs", np.int32), ("targets", np.int32), ("mask", np.float32))}
#: with dpo.reference cached: the reference's log-prob of each target token, computed once before training
REF_BATCH = {f"ref_{side}_logp": np.dtype(np.float32) for side in SIDES}


def token_logps(params, inputs_BT, targets_BT, model_cfg: ModelConfig, attention_impl: str = "auto"):
    """log p(target) [B, T] (float32); one sequence per row, positions from 0."""
    B, T = inputs_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, _ = qmodel.apply(model_cfg, params, inputs_BT, positions=positions_BT,
                                 segment_ids=jnp.ones_like(inputs_BT), attention_impl=attention_impl)
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def completion_logps(params, inputs_BT, targets_BT, mask_BT, model_cfg: ModelConfig, attention_impl: str = "auto"):
    """(sum over the mask of log p(target) [B], number of masked tokens [B]); one sequence per row, from 0."""
    logp_BT = token_logps(params, inputs_BT, targets_BT, model_cfg, attention_impl)
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(logp_BT * mask_BT, axis=-1), jnp.sum(mask_BT, axis=-1)


def pair_logps(params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
    """(chosen log-probs [B], rejected log-probs [B]) from one forward pass over the 2B sequences."""
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("inputs", "targets", "mask")}
    logp_2B, _ = completion_logps(params, cat["inputs"], cat["targets"], cat["mask"], model_cfg, attention_impl)
    B = batch["chosen_inputs"].shape[0]
    return logp_2B[:B], logp_2B[B:]


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss: str = "sigmoid",
             label_smoothing=0.0):
    """(per-pair loss [B], chosen reward [B], rejected reward [B]); rewards = beta x (policy - ref) log-probs."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    z = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * z))
    elif loss == "ipo":
        per_pair = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} (one of {', '.join(LOSSES)})")
    return per_pair, beta * jax.lax.stop_gradient(chosen_ratio), beta * jax.lax.stop_gradient(rejected_ratio)


@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """Mean DPO/IPO loss over pairs (`loss` is static: it changes the program; beta and label smoothing are
    traced, from the run config's `dpo` section). Every metric is a mean over the pairs of the step."""

    name: str = "dpo"
    loss: str = "sigmoid"
    reference: str = "step"  # step: ref_params run in the step; cached: REF_BATCH arrays in the batch
    metrics: tuple[str, ...] = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")

    @property
    def needs_reference(self) -> bool:
        return self.reference == "step"

    @property
    def batch_dtypes(self) -> tuple[tuple[str, np.dtype], ...]:
        return tuple(PAIR_BATCH.items()) + (tuple(REF_BATCH.items()) if self.reference == "cached" else ())

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.batch_dtypes)

    @staticmethod
    def make_hp(run_cfg=None, *, beta: float | None = None, label_smoothing: float | None = None):
        """{"beta", "label_smoothing"}: given, else the run config's `dpo` section (0.1 and 0 without one)."""
        section = getattr(run_cfg, "dpo", None)
        b = beta if beta is not None else (section.beta if section is not None else 0.1)
        eps = label_smoothing if label_smoothing is not None else (
            section.label_smoothing if section is not None else 0.0)
        return {"beta": jnp.asarray(b, jnp.float32), "label_smoothing": jnp.asarray(eps, jnp.float32)}

    def sums(self, params, ref_params, batch, hp, model_cfg: ModelConfig, attention_impl: str = "auto"):
        policy_c, policy_r = pair_logps(params, batch, model_cfg, attention_impl)
        if self.reference == "cached":
            ref_c, ref_r = (jnp.sum(batch[f"ref_{s}_logp"] * batch[f"{s}_mask"], axis=-1) for s in SIDES)
        else:
            ref_c, ref_r = jax.lax.stop_gradient(pair_logps(ref_params, batch, model_cfg, attention_impl))
        per_pair, reward_c, reward_r = dpo_loss(policy_c, policy_r, ref_c, ref_r, hp["beta"], self.loss,
                                                hp["label_smoothing"])
        total = jnp.sum(per_pair)
        return total, {"loss": total, "count": jnp.float32(per_pair.shape[0]),
                       "reward_accuracy": jnp.sum((reward_c > reward_r).astype(jnp.float32)),
                       "reward_margin": jnp.sum(reward_c - reward_r),
                       "reward_chosen": jnp.sum(reward_c), "reward_rejected": jnp.sum(reward_r)}

    def eval_sums(self, params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
        """Held-out: the policy's next-token loss on the chosen completions (sum, token count); the held-out
        step has no reference model."""
        logp_B, count_B = completion_logps(params, batch["chosen_inputs"], batch["chosen_targets"],
                                           batch["chosen_mask"], model_cfg, attention_impl)
        return -jnp.sum(logp_B), jnp.sum(count_B)
