"""Reward model on preference pairs (Bradley-Terry): an objective of the `train/objectives.py` seam
(docs/post-training.md, "Reward model").

The model is HF's `Qwen2ForSequenceClassification` with num_labels = 1: the Qwen2 backbone (no lm_head) and a
`score` kernel [D, 1] applied to the final-normed hidden states (`ModelConfig.num_labels`; `qwenjax.model`
returns per-token scores [B, T, 1]). The params are one dict, the backbone's keys with `score` beside them, so
sharding, checkpoints, model directories and HF files follow from the config alone.

A sequence's reward is its score at one token. HF's rule (`hf_rewards`) is the rightmost token that is not
`pad_token_id`. Training reads the pair batches of qwenjax.data.pair_batches (one row per pair and side, the
DPO schema) and scores each side at its closing `<|im_end|>`, the last completion token: the batch's
`inputs` are ids[:-1], so that token (targets at the mask's last index l) is written back at slot l + 1
(`score_tokens`). A side of exactly seq_len + 1 tokens has no slot for it and is scored at its last answer
token. In packed rows (segment ids), each sequence's reward is the score at its segment's last token
(`segment_ends`); the pair batches are not packed.

    loss = -log sigmoid(r_chosen - r_rejected), mean over pairs
    metrics: accuracy (r_chosen > r_rejected; ties count as wrong), margin (r_chosen - r_rejected), both rewards
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.train.dpo import PAIR_BATCH

Params = qmodel.Params


def check_config(model_cfg: ModelConfig) -> None:
    if model_cfg.num_labels != 1:
        raise UserError(f"a reward model has one score (model num_labels 1), this model has {model_cfg.num_labels}")


def token_scores(params, tokens_BT, model_cfg: ModelConfig, *, positions=None, segment_ids=None,
                 attention_impl: str = "auto") -> jax.Array:
    """The score of every token [B, T] (float32): the head over each final-normed hidden state."""
    scores_BT1, _ = qmodel.apply(model_cfg, params, tokens_BT, positions=positions, segment_ids=segment_ids,
                                 attention_impl=attention_impl)
    return scores_BT1[..., 0].astype(jnp.float32)


def last_non_pad(tokens_BT, pad_token_id: int) -> jax.Array:
    """HF's pooling index [B]: the rightmost token that is not `pad_token_id` (0 for a row of padding)."""
    T = tokens_BT.shape[1]
    return jnp.argmax(jnp.arange(T) * (tokens_BT != pad_token_id), axis=-1)


def hf_rewards(params, tokens_BT, model_cfg: ModelConfig, pad_token_id: int, attention_impl: str = "auto"):
    """Rewards [B] as `Qwen2ForSequenceClassification(input_ids).logits[:, 0]` computes them (one sequence per
    row, positions from 0, padding anywhere after it)."""
    scores_BT = token_scores(params, jnp.asarray(tokens_BT), model_cfg, attention_impl=attention_impl)
    idx_B = last_non_pad(jnp.asarray(tokens_BT), pad_token_id)
    return jnp.take_along_axis(scores_BT, idx_B[:, None], axis=1)[:, 0]


def segment_ends(segment_ids_BT) -> jax.Array:
    """[B, T] bool: the last token of each segment (where the next id differs, and the row's last slot)."""
    ids_BT = jnp.asarray(segment_ids_BT)
    return jnp.concatenate([ids_BT[:, :-1] != ids_BT[:, 1:], jnp.ones_like(ids_BT[:, :1], bool)], axis=1)


def score_tokens(inputs_BT, targets_BT, mask_BT):
    """(tokens [B, T], score index [B], valid [B]) for pair-batch rows: the closing token written back at
    slot l + 1 after the mask's last index l (when it fits), read there; `valid` is False on padding rows."""
    T = inputs_BT.shape[1]
    t_T = jnp.arange(T)
    last_B = jnp.max(jnp.where(mask_BT > 0, t_T, -1), axis=-1)
    closing_B = jnp.take_along_axis(targets_BT, jnp.maximum(last_B, 0)[:, None], axis=1)[:, 0]
    tokens_BT = jnp.where(t_T[None, :] == (last_B + 1)[:, None], closing_B[:, None], inputs_BT)
    return tokens_BT, jnp.clip(last_B + 1, 0, T - 1), last_B >= 0


def pair_rewards(params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
    """(chosen rewards [B], rejected rewards [B], valid [B]) from one forward pass over the 2B sequences."""
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("inputs", "targets", "mask")}
    tokens_NT, idx_N, valid_N = score_tokens(cat["inputs"], cat["targets"], cat["mask"])
    N, T = tokens_NT.shape
    scores_NT = token_scores(params, tokens_NT, model_cfg, positions=jnp.broadcast_to(jnp.arange(T), (N, T)),
                             segment_ids=jnp.ones_like(tokens_NT), attention_impl=attention_impl)
    r_N = jnp.take_along_axis(scores_NT, idx_N[:, None], axis=1)[:, 0]
    B = N // 2
    return r_N[:B], r_N[B:], valid_N[:B] & valid_N[B:]


def bradley_terry(r_chosen, r_rejected):
    """Per-pair loss -log sigmoid(r_chosen - r_rejected) [B]."""
    return -jax.nn.log_sigmoid(r_chosen - r_rejected)


@dataclasses.dataclass(frozen=True)
class RewardLoss:
    """Mean Bradley-Terry loss over the pairs of a step; metrics are means over the same pairs."""

    name: str = "reward"
    batch_dtypes: tuple[tuple[str, np.dtype], ...] = tuple(PAIR_BATCH.items())
    metrics: tuple[str, ...] = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected")
    needs_reference: bool = False

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.batch_dtypes)

    @staticmethod
    def make_hp(run_cfg=None) -> dict[str, jax.Array]:
        return {}

    def sums(self, params, ref_params, batch, hp, model_cfg: ModelConfig, attention_impl: str = "auto"):
        del ref_params, hp
        r_c, r_r, valid = pair_rewards(params, batch, model_cfg, attention_impl)
        w = valid.astype(jnp.float32)
        total = jnp.sum(bradley_terry(r_c, r_r) * w)
        return total, {"loss": total, "count": jnp.sum(w),
                       "accuracy": jnp.sum((r_c > r_r).astype(jnp.float32) * w),
                       "margin": jnp.sum((r_c - r_r) * w),
                       "reward_chosen": jnp.sum(r_c * w), "reward_rejected": jnp.sum(r_r * w)}

    def eval_sums(self, params, batch, model_cfg: ModelConfig, attention_impl: str = "auto"):
        """Held-out: (sum of the Bradley-Terry losses, number of pairs); padding rows count for nothing."""
        r_c, r_r, valid = pair_rewards(params, batch, model_cfg, attention_impl)
        w = valid.astype(jnp.float32)
        return jnp.sum(bradley_terry(r_c, r_r) * w), jnp.sum(w)


def from_lm(lm_params: Params, model_cfg: ModelConfig) -> Params:
    """A reward model's params from a language model's (`model.init_from` an LM stage): the backbone as it is,
    the lm_head dropped, the score head zeros (every reward starts at 0: the loss at log 2, and the first
    step's gradient reaches the head, the next ones the backbone too)."""
    check_config(model_cfg)
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    embed = params["embed_tokens"]
    params["score"] = {"kernel": jnp.zeros((model_cfg.hidden_size, 1), embed.dtype)}
    return params

