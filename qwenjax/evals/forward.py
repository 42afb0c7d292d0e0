"""Long prompts through the model in chunks: a prefill into a KV cache whose logits never exceed
[B, chunk, V], then greedy decoding, or the loss of every next token.

Why chunks: `model.apply` returns logits for every position, and [B, L, V] float32 at L = 32k and Qwen's
152k vocabulary is 20 GB per sequence. Feeding C tokens at a time into the cache (each chunk attends to the
cache slots at or before its own, the decode path of `model.apply`) keeps logits at [B, C, V] and attention
scores at [B, N, C, S]. A prompt of L tokens is a head of L % C tokens then L // C chunks under one
`lax.scan`, so each (batch, length) compiles once, whatever the number of trials or documents.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from qwenjax.config import ModelConfig
from qwenjax.model import Params, apply, init_cache

#: how often each jitted function was traced (one trace = one compile); tests pin one per shape
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def _nll(logits_BTV, targets_BT):
    """-log p(target) [B, T] in float32."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def _prefill(config, params, tokens_BL, targets_BL, cache, chunk: int, impl: str):
    """(logits of the last position [B, V] float32, per-token nll [B, L] or None, cache after L tokens)."""
    B, L = tokens_BL.shape
    head, n = L % chunk, L // chunk
    nll_parts = []
    last_BV = jnp.zeros((B, config.vocab_size), jnp.float32)
    if head:
        logits_BTV, cache = apply(config, params, tokens_BL[:, :head], cache=cache, attention_impl=impl)
        last_BV = logits_BTV[:, -1].astype(jnp.float32)
        if targets_BL is not None:
            nll_parts.append(_nll(logits_BTV, targets_BL[:, :head]))
    if n:
        def body(carry, xs):
            cache, _ = carry
            tokens_BC, targets_BC = xs
            logits_BCV, cache = apply(config, params, tokens_BC, cache=cache, attention_impl=impl)
            nll_BC = None if targets_BC is None else _nll(logits_BCV, targets_BC)
            return (cache, logits_BCV[:, -1].astype(jnp.float32)), nll_BC

        def chunks(x_BL):
            return None if x_BL is None else x_BL[:, head:].reshape(B, n, chunk).transpose(1, 0, 2)

        (cache, last_BV), nll_nBC = jax.lax.scan(body, (cache, last_BV), (chunks(tokens_BL), chunks(targets_BL)))
        if targets_BL is not None:
            nll_parts.append(nll_nBC.transpose(1, 0, 2).reshape(B, n * chunk))
    nll_BL = jnp.concatenate(nll_parts, axis=1) if nll_parts else None
    return last_BV, nll_BL, cache


@functools.partial(jax.jit, static_argnames=("config", "new_tokens", "chunk", "impl"))
def greedy_continuations(config: ModelConfig, params: Params, tokens_BL: jax.Array, *, new_tokens: int,
                         chunk: int = 512, impl: str = "auto") -> jax.Array:
    """The greedy continuation [B, new_tokens] (int32) of each of B prompts of exactly L tokens."""
    TRACE_COUNTS["greedy"] += 1
    B, L = tokens_BL.shape
    cache = init_cache(config, B, L + new_tokens)
    last_BV, _, cache = _prefill(config, params, tokens_BL, None, cache, chunk, impl)
    first_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)

    def step(carry, _):
        token_B, cache = carry
        logits_B1V, cache = apply(config, params, token_B[:, None], cache=cache, attention_impl=impl)
        nxt_B = jnp.argmax(logits_B1V[:, 0].astype(jnp.float32), axis=-1).astype(jnp.int32)
        return (nxt_B, cache), nxt_B

    _, rest_NB = jax.lax.scan(step, (first_B, cache), length=new_tokens - 1)
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "chunk", "impl"))
def token_losses(config: ModelConfig, params: Params, seq_BL1: jax.Array, *, chunk: int = 512,
                 impl: str = "auto") -> jax.Array:
    """Next-token loss [B, L] (nats, float32) of sequences of L + 1 tokens: entry t is -log p(x[t+1] | x[:t+1])."""
    TRACE_COUNTS["losses"] += 1
    B, L1 = seq_BL1.shape
    cache = init_cache(config, B, L1 - 1)
    _, nll_BL, _ = _prefill(config, params, seq_BL1[:, :-1], seq_BL1[:, 1:], cache, chunk, impl)
    return nll_BL
