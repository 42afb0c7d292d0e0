"""Autoregressive decoding with a preallocated KV cache: one jitted prefill, one jitted decode step.

Shapes never depend on the token count: the prompt is right-padded to a bucket (a multiple of `BUCKET`)
and the cache holds a bucketed `max_len` slots, so a whole generation compiles the prefill once and the
decode step once, and later calls with prompts and lengths in the same buckets compile nothing. Padding is
harmless: after the prefill the cache index is set to the true prompt length, and a query at slot t only
sees cache slots <= t, so the padded slots are overwritten before anything can attend to them.

Sampling: greedy (argmax) when temperature == 0, otherwise softmax(logits / temperature) restricted to
the nucleus: the smallest set of most likely tokens whose probability reaches `top_p` (the top token
always stays).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.model import Params, apply, init_cache

BUCKET = 64  # prompt lengths and cache sizes are rounded up to a multiple of this

#: How often each jitted function has been traced (a trace is a compilation); tests assert it stays flat.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class Step(NamedTuple):
    token: int  # the id chosen at this step
    logits: jax.Array  # [vocab] float32 logits it was chosen from (before temperature / top-p)


def sample_token(logits_V: jax.Array, rng: jax.Array, temperature, top_p, *, greedy: bool) -> jax.Array:
    """One token id from float logits [V]: argmax if `greedy`, else temperature + nucleus (top-p) sampling."""
    if greedy:
        return jnp.argmax(logits_V).astype(jnp.int32)
    order_V = jnp.argsort(-logits_V)
    sorted_V = logits_V[order_V] / temperature
    probs_V = jax.nn.softmax(sorted_V)
    mass_before_V = jnp.cumsum(probs_V) - probs_V
    keep_V = mass_before_V < top_p  # index 0 always kept (mass before it is 0 < top_p)
    choice = jax.random.categorical(rng, jnp.where(keep_V, sorted_V, -jnp.inf))
    return order_V[choice].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("cache",))
def _prefill(config: ModelConfig, params: Params, tokens_1P, length, cache, rng, temperature, top_p, *,
             greedy):
    """Run the padded prompt through the model, keep its keys/values, sample the first new token."""
    TRACE_COUNTS["prefill"] += 1
    logits_1PV, cache = apply(config, params, tokens_1P, cache=cache)
    logits_V = jax.lax.dynamic_index_in_dim(logits_1PV[0], length - 1, keepdims=False).astype(jnp.float32)
    cache = {**cache, "index": jnp.asarray(length, jnp.int32)}
    rng, sub = jax.random.split(rng)
    return sample_token(logits_V, sub, temperature, top_p, greedy=greedy), logits_V, cache, rng


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("cache",))
def _decode_step(config: ModelConfig, params: Params, token, cache, rng, temperature, top_p, *, greedy):
    """Feed one token at the cache index, sample the next."""
    TRACE_COUNTS["decode"] += 1
    logits_11V, cache = apply(config, params, token.reshape(1, 1), cache=cache)
    logits_V = logits_11V[0, 0].astype(jnp.float32)
    rng, sub = jax.random.split(rng)
    return sample_token(logits_V, sub, temperature, top_p, greedy=greedy), logits_V, cache, rng


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def stream(config: ModelConfig, params: Params, prompt_ids: Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
           rng: jax.Array | int | None = None) -> Iterator[Step]:
    """An iterator of one `Step` per generated token: at most `max_new_tokens`, ending after an EOS step.

    Arguments are checked here, before the first token is asked for."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise UserError("the prompt is empty: generation needs at least one token")
    if any(not 0 <= t < config.vocab_size for t in prompt):
        raise UserError(f"prompt token ids must be in [0, {config.vocab_size})")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if rng is None or isinstance(rng, int):
        rng = jax.random.key(rng or 0)
    return _run(config, params, prompt, max_new_tokens, float(temperature), float(top_p), eos_id, rng)


def _run(config, params, prompt, max_new_tokens, temperature, top_p, eos_id, rng) -> Iterator[Step]:
    if max_new_tokens == 0:
        return
    greedy = temperature == 0
    padded = _round_up(len(prompt), BUCKET)
    max_len = _round_up(max(padded, len(prompt) + max_new_tokens), BUCKET)
    cache = init_cache(config, 1, max_len)
    tokens_1P = jnp.asarray([prompt + [0] * (padded - len(prompt))], jnp.int32)
    temperature_ = jnp.float32(temperature if temperature > 0 else 1.0)
    top_p_ = jnp.float32(top_p)

    token, logits_V, cache, rng = _prefill(config, params, tokens_1P, jnp.int32(len(prompt)), cache, rng,
                                           temperature_, top_p_, greedy=greedy)
    for i in range(max_new_tokens):
        if i:
            token, logits_V, cache, rng = _decode_step(config, params, token, cache, rng, temperature_,
                                                       top_p_, greedy=greedy)
        t = int(token)
        yield Step(t, logits_V)
        if eos_id is not None and t == eos_id:
            return


def generate(config: ModelConfig, params: Params, prompt_ids: Sequence[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
             rng: jax.Array | int | None = None) -> list[int]:
    """The generated token ids (the prompt not included; a final EOS is included when one was produced).

    Greedy when `temperature == 0`; otherwise temperature + top-p sampling, reproducible for a given `rng`
    (a `jax.random.key` or an int seed; default seed 0).
    """
    return [s.token for s in stream(config, params, prompt_ids, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, eos_id=eos_id, rng=rng)]
