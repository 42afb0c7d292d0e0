"""G answers to one prompt in one batched decode with the KV cache, each token's log-prob recorded as sampled.

The prompt runs once (one row, padded to a multiple of `qwenjax.generate.BUCKET`); its cache is repeated to
the N rows and every row then samples on its own key. The rows share the prompt, so they share the cache index
(the model's cache has one). Sampling follows `qwenjax.generate.sample_token` (temperature, top-p); the
recorded log-prob is the policy's own, log_softmax(logits) at temperature 1, which is what GRPO's ratio
compares against. Shapes are bucketed (prompt, cache length), so a run compiles the prefill and the step once
per bucket. `params` is read as given: the train state's params, no copy or reload.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.generate import BUCKET, sample_token
from qwenjax.model import Params, apply, init_cache


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _sample(logits_NV, keys_N, temperature, top_p):
    """(token [N], its log-prob under the untempered policy [N], next keys [N])."""
    logits_NV = logits_NV.astype(jnp.float32)
    split_N2 = jax.vmap(jax.random.split)(keys_N)
    tok_N = jax.vmap(lambda lg, k: sample_token(lg, k, temperature, top_p, greedy=False))(logits_NV, split_N2[:, 1])
    logp_N = jnp.take_along_axis(jax.nn.log_softmax(logits_NV, axis=-1), tok_N[:, None], axis=-1)[:, 0]
    return tok_N, logp_N, split_N2[:, 0]


@functools.partial(jax.jit, static_argnames=("config", "n", "max_len"))
def _prefill(config: ModelConfig, params: Params, tokens_1P, length, keys_N, temperature, top_p, *, n, max_len):
    cache = init_cache(config, 1, max_len)
    logits_1PV, cache = apply(config, params, tokens_1P, cache=cache)
    logits_V = jax.lax.dynamic_index_in_dim(logits_1PV[0], length - 1, keepdims=False)
    cache = {"k": jnp.repeat(cache["k"], n, axis=1), "v": jnp.repeat(cache["v"], n, axis=1),
             "index": jnp.asarray(length, jnp.int32)}
    tok_N, logp_N, keys_N = _sample(jnp.broadcast_to(logits_V, (n, logits_V.shape[-1])), keys_N, temperature, top_p)
    return tok_N, logp_N, keys_N, cache


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _decode(config: ModelConfig, params: Params, tok_N, cache, keys_N, temperature, top_p):
    logits_N1V, cache = apply(config, params, tok_N[:, None], cache=cache)
    tok_N, logp_N, keys_N = _sample(logits_N1V[:, 0], keys_N, temperature, top_p)
    return tok_N, logp_N, keys_N, cache


def sample_group(config: ModelConfig, params: Params, prompt_ids: Sequence[int], n: int, *, max_new_tokens: int,
                 temperature: float, top_p: float, eos_id: int, rng: jax.Array) -> list[tuple[list[int], list[float]]]:
    """n answers to one prompt: (token ids, their log-probs) per answer, ending after `eos_id` or at
    `max_new_tokens` tokens. Stops early once every row has produced `eos_id`."""
    P = len(prompt_ids)
    padded = _round_up(P, BUCKET)
    max_len = _round_up(max(padded, P + max_new_tokens), BUCKET)
    tokens_1P = jnp.asarray([list(prompt_ids) + [0] * (padded - P)], jnp.int32)
    keys_N = jax.random.split(rng, n)
    temp, top = jnp.float32(temperature), jnp.float32(top_p)
    tok_N, logp_N, keys_N, cache = _prefill(config, params, tokens_1P, jnp.int32(P), keys_N, temp, top, n=n,
                                            max_len=max_len)
    toks, logps = [tok_N], [logp_N]
    done_N = tok_N == eos_id
    for _ in range(max_new_tokens - 1):
        if bool(jnp.all(done_N)):
            break
        tok_N, logp_N, keys_N, cache = _decode(config, params, tok_N, cache, keys_N, temp, top)
        toks.append(tok_N)
        logps.append(logp_N)
        done_N = done_N | (tok_N == eos_id)
    tok_NS, logp_NS = np.asarray(jnp.stack(toks, axis=1)), np.asarray(jnp.stack(logps, axis=1))
    out = []
    for row, lp in zip(tok_NS.tolist(), logp_NS.tolist(), strict=True):
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append((row[:end], lp[:end]))
    return out
