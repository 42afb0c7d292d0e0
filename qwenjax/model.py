"""Qwen2.5 (HF `Qwen2ForCausalLM`) in Flax NNX, readable top to bottom.

Shapes are suffixes: B batch, T query length, S key length, D hidden, F intermediate (MLP), V vocab,
N query heads, K kv heads, R = N // K (query heads per kv head), H head_dim.

The modules hold parameters under HF-like names; the functional entry points below (`init_params`,
`apply`, `logits`, `count_params`) work on a plain nested dict of arrays so that jit, vmap (LR populations),
sharding and checkpoints see an ordinary pytree.

The attention kernel (qwenjax.attention) is a runtime choice, `attention_impl`, passed at call time: it is not a
property of the checkpoint, so it stays out of ModelConfig and HF's config.json.

Two parameter layouts (`config.scanned`): `layers/<i>/...` (a Python loop over layers) or `layers/...` with a
leading `layers` axis on every leaf (one `lax.scan`: compile time and program size no longer grow with depth).
`apply` runs whichever layout it is given; `stack_layers` / `unstack_layers` convert at the boundaries (HF
files and model directories hold the per-layer layout). `config.remat` wraps the layer body in
`jax.checkpoint` with the named policy (the run config's `train.remat`).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import dca
from qwenjax.config import ModelConfig
from qwenjax.context_parallel import attend  # attention.attend, split along a context mesh axis
from qwenjax.rope import apply_rope, rope_cos_sin

Params = dict[str, Any]

# Logical axes of every parameter, by the last two path components. sharding.py maps logical axes to
# mesh axes in one table; the model never names a mesh axis.
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "q_proj/kernel": ("embed", "heads"),
    "q_proj/bias": ("heads",),
    "k_proj/kernel": ("embed", "kv_heads"),
    "k_proj/bias": ("kv_heads",),
    "v_proj/kernel": ("embed", "kv_heads"),
    "v_proj/bias": ("kv_heads",),
    "o_proj/kernel": ("heads", "embed"),
    "gate_proj/kernel": ("embed", "mlp"),
    "up_proj/kernel": ("embed", "mlp"),
    "down_proj/kernel": ("mlp", "embed"),
    "input_layernorm/weight": ("norm",),
    "post_attention_layernorm/weight": ("norm",),
    "norm/weight": ("norm",),
    "lm_head/kernel": ("embed", "vocab"),
    "score/kernel": ("embed", None),
}

# train.remat (run_sections.REMAT_POLICIES but "none"; tests/test_scan_remat.py keeps them equal) -> what
# the backward pass may keep from the forward (None: only the layer's inputs).
CHECKPOINT_POLICIES: dict[str, Any] = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


# The activation-sharding hook: a callable (x, logical axes) -> x set by `qwenjax.train.sharding.activation_sharding`
# (which maps the names through its one rules table under a mesh); unset, `constrain` does nothing.
ACTIVATION_CONSTRAINT: contextvars.ContextVar = contextvars.ContextVar("activation_constraint", default=None)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by the logical names of its axes (e.g. ("batch", "length", "embed")).
    Without it XLA's propagation may pick a parameter's layout for an activation and then have to undo it
    (an "involuntary full rematerialization"). A no-op outside a mesh (single device, decoding, tests)."""
    fn = ACTIVATION_CONSTRAINT.get()
    return x if fn is None else fn(x, axes)


# logical axes of the activations (the rules table maps them to mesh axes, as for the parameters)
_BTD = ("batch", "length", "embed")
_BTF = ("batch", "length", "mlp")
_BTV = ("batch", "length", "vocab")
_BTNH = ("batch", "length", "heads", None)
_BTKH = ("batch", "length", "kv_heads", None)


def _normal(config: ModelConfig):
    return jax.nn.initializers.normal(stddev=config.initializer_range)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out]. Tokens are flattened to 2-D before the matmul because
    XLA's CPU backward of batched (3-D) dot_generals is about 2x slower than the 2-D one."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, config: ModelConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(config)(rngs.params(), (d_in, d_out), config.param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), config.param_dtype)) if bias else None

    def __call__(self, x_BTI: jax.Array) -> jax.Array:
        x_MI = x_BTI.reshape(-1, x_BTI.shape[-1])
        # Accumulate and add the bias in float32, then round once (as torch does in bf16).
        y_MO = jnp.dot(x_MI, self.kernel[...].astype(x_BTI.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y_MO = y_MO + self.bias[...].astype(jnp.float32)
        return y_MO.astype(x_BTI.dtype).reshape(*x_BTI.shape[:-1], y_MO.shape[-1])


class RMSNorm(nnx.Module):
    """Statistics in float32, cast back to the input dtype, then times the weight (HF's order, bf16 parity)."""

    def __init__(self, dim: int, *, config: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), config.param_dtype))
        self.eps = config.rms_norm_eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32_BTD = x_BTD.astype(jnp.float32)
        var_BT1 = jnp.mean(x32_BTD * x32_BTD, axis=-1, keepdims=True)
        normed_BTD = (x32_BTD * jax.lax.rsqrt(var_BT1 + self.eps)).astype(x_BTD.dtype)
        return self.weight[...].astype(x_BTD.dtype) * normed_BTD


class Attention(nnx.Module):
    """Grouped-query attention: bias on q/k/v, none on o; query head n uses kv head n // R. `window`: on
    sliding-window layers, a query sees only the last `window` key slots (None = all)."""

    def __init__(self, config: ModelConfig, *, window: int | None, rngs: nnx.Rngs):
        D, H = config.hidden_size, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, H
        self.window = window
        self.dca = config if config.dual_chunk_attention_config is not None else None  # qwenjax/dca.py
        self.q_proj = Linear(D, self.num_heads * H, bias=True, config=config, rngs=rngs)
        self.k_proj = Linear(D, self.num_kv_heads * H, bias=True, config=config, rngs=rngs)
        self.v_proj = Linear(D, self.num_kv_heads * H, bias=True, config=config, rngs=rngs)
        self.o_proj = Linear(self.num_heads * H, D, bias=False, config=config, rngs=rngs)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, attention_impl, kv_cache=None, cache_index=None):
        B, T, _ = x_BTD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        S = T if kv_cache is None else kv_cache[0].shape[1]
        use_dca = self.dca is not None and not dca.fits_one_chunk(self.dca, S)  # one chunk: plain attention
        q_raw_BTNH = self.q_proj(x_BTD).reshape(B, T, N, H)
        if use_dca:  # keys at slot mod chunk_len; the query is rotated three ways in dca.attend
            cos_BTH, sin_BTH = dca.key_cos_sin(self.dca, B, T, cache_index, cos_BTH.dtype)
        q_BTNH = constrain(apply_rope(q_raw_BTNH, cos_BTH, sin_BTH), _BTNH)
        k_BTKH = constrain(apply_rope(self.k_proj(x_BTD).reshape(B, T, K, H), cos_BTH, sin_BTH), _BTKH)
        v_BTKH = constrain(self.v_proj(x_BTD).reshape(B, T, K, H), _BTKH)
        if kv_cache is not None:  # write this chunk at cache_index, attend over the whole (masked) cache
            k_BSKH = jax.lax.dynamic_update_slice(kv_cache[0], k_BTKH.astype(kv_cache[0].dtype), (0, cache_index, 0, 0))
            v_BSKH = jax.lax.dynamic_update_slice(kv_cache[1], v_BTKH.astype(kv_cache[1].dtype), (0, cache_index, 0, 0))
            kv_cache = (k_BSKH, v_BSKH)
        else:
            k_BSKH, v_BSKH = k_BTKH, v_BTKH
        if use_dca:
            out_BTNH = dca.attend(self.dca, q_raw_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype),
                                  q_offset=cache_index, segment_ids_BT=segment_ids_BT)
        else:
            out_BTNH = attend(q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), impl=attention_impl,
                              segment_ids_BT=segment_ids_BT, window=self.window, q_offset=cache_index)
        out_BTNH = constrain(out_BTNH, _BTNH)
        return self.o_proj(out_BTNH.reshape(B, T, N * H)), kv_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, F = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(D, F, bias=False, config=config, rngs=rngs)
        self.up_proj = Linear(D, F, bias=False, config=config, rngs=rngs)
        self.down_proj = Linear(F, D, bias=False, config=config, rngs=rngs)

    def __call__(self, x_BTD):
        gate_BTF = jax.nn.silu(self.gate_proj(x_BTD).astype(jnp.float32)).astype(x_BTD.dtype)  # torch: f32 silu
        return self.down_proj(constrain(gate_BTF * self.up_proj(x_BTD), _BTF))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, index: int, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config=config)
        window = config.sliding_window if config.uses_sliding_window(index) else None
        self.self_attn = Attention(config, window=window, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h_BTD, cos_BTH, sin_BTH, segment_ids_BT, attention_impl, kv_cache=None, cache_index=None):
        attn_BTD, kv_cache = self.self_attn(self.input_layernorm(h_BTD), cos_BTH, sin_BTH, segment_ids_BT,
                                            attention_impl, kv_cache, cache_index)
        h_BTD = constrain(h_BTD + attn_BTD, _BTD)
        h_BTD = constrain(h_BTD + self.mlp(self.post_attention_layernorm(h_BTD)), _BTD)
        return h_BTD, kv_cache


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose parameters carry a leading `layers` axis (every layer alike: config.scanned)."""

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return DecoderLayer(config, 0, rngs=rngs)

    return make(rngs)


def _layer_fn(layer: DecoderLayer, attention_impl: str, remat: str):
    """(layer params, h, kv, cos, sin, segment ids, cache index) -> (h, kv): the layer body, under
    jax.checkpoint when `remat` names a policy."""
    graphdef, _ = nnx.split(layer)

    def run(state, h_BTD, kv, cos_BTH, sin_BTH, segment_ids_BT, cache_index):
        return nnx.merge(graphdef, state)(h_BTD, cos_BTH, sin_BTH, segment_ids_BT, attention_impl, kv, cache_index)

    if remat != "none" and remat not in CHECKPOINT_POLICIES:  # run configs validate it first (train.remat)
        raise ValueError(f"unknown remat policy {remat!r}: none or one of {', '.join(CHECKPOINT_POLICIES)}")
    return run if remat == "none" else jax.checkpoint(run, policy=CHECKPOINT_POLICIES[remat])


class Qwen2(nnx.Module):
    """The decoder: embed, pre-norm layers, final norm, (tied or separate) unembedding; or, with
    `config.num_labels`, a `score` head [D, num_labels] instead of the unembedding (HF's
    Qwen2ForSequenceClassification: per-token scores, pooled by the caller, e.g. qwenjax.train.reward)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        V, D = config.vocab_size, config.hidden_size
        self.embed_tokens = nnx.Param(_normal(config)(rngs.params(), (V, D), config.param_dtype))
        if config.scanned:
            self.layers = _stacked_layers(config, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(D, config=config)
        headless = config.tie_word_embeddings or config.num_labels is not None
        self.lm_head = None if headless else Linear(D, V, bias=False, config=config, rngs=rngs)
        self.score = None if config.num_labels is None else Linear(D, config.num_labels, bias=False, config=config,
                                                                    rngs=rngs)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, attention_impl="auto"):
        """Logits [B, T, V] (with `config.num_labels`: scores [B, T, num_labels]) in the compute dtype, and the
        updated KV cache (None without one).

        Without a cache: causal attention within each segment (packed documents never see each other;
        None = one segment). With a cache (decoding): positions default to cache['index'] + arange(T); keys
        at slots <= the query's slot are visible, and segment ids are ignored.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        B, T = tokens_BT.shape
        cache_index = None if cache is None else cache["index"]
        if positions_BT is None:
            q_slot_T = jnp.arange(T) if cache is None else cache_index + jnp.arange(T)
            positions_BT = jnp.broadcast_to(q_slot_T, (B, T))
        if cache is not None:
            segment_ids_BT = None
        cos_BTH, sin_BTH = rope_cos_sin(c, positions_BT, dtype)

        # the lookup reads the table whole along embed (the fsdp all-gather) so rows stay split by batch
        table_VD = constrain(self.embed_tokens[...], ("vocab", None))
        h_BTD = constrain(jnp.take(table_VD, tokens_BT, axis=0).astype(dtype), _BTD)
        remat = "none" if cache is not None else c.remat  # decoding keeps no activations for a backward pass
        kv_L = None if cache is None else (cache["k"], cache["v"])
        context = (cos_BTH, sin_BTH, segment_ids_BT, cache_index)
        if c.scanned:  # one layer body, scanned over the stacked params (and the cache's layer axis)
            run = _layer_fn(self.layers, attention_impl, remat)

            def body(h_BTD, layer):
                state, kv = layer
                return run(state, h_BTD, kv, *context)

            h_BTD, kv_L = jax.lax.scan(body, h_BTD, (nnx.state(self.layers), kv_L))
        else:
            new_kv = []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                h_BTD, kv = _layer_fn(layer, attention_impl, remat)(nnx.state(layer), h_BTD, kv, *context)
                new_kv.append(kv)
            kv_L = None if cache is None else tuple(jnp.stack(x) for x in zip(*new_kv, strict=True))
        h_BTD = self.norm(h_BTD)
        if self.score is not None:
            logits_BTV = self.score(h_BTD)
        elif self.lm_head is None:
            logits_BTV = (h_BTD.reshape(B * T, -1) @ self.embed_tokens[...].astype(dtype).T).reshape(B, T, -1)
        else:
            logits_BTV = self.lm_head(h_BTD)
        logits_BTV = constrain(logits_BTV, _BTV if self.score is None else (*_BTD[:2], None))
        if cache is None:
            return logits_BTV, None
        return logits_BTV, {"k": kv_L[0], "v": kv_L[1], "index": cache["index"] + T}


# ---------------------------------------------------------------------------------------------------------
# Functional entry points over a plain nested dict of parameters.


@functools.lru_cache(maxsize=64)
def _graphdef(config: ModelConfig):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
    return graphdef


def _module(config: ModelConfig, params: Params) -> Qwen2:
    graphdef = _graphdef(config)
    state = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))[1]
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def init_params(config: ModelConfig, rng: jax.Array | int = 0) -> Params:
    """Fresh parameters: normal(initializer_range) matrices and embedding, ones for norms, zeros for biases."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    model = Qwen2(config, rngs=nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.lru_cache(maxsize=64)
def abstract_params(config: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), computed without allocating."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def apply(config: ModelConfig, params: Params, tokens_BT, *, positions=None, segment_ids=None, cache=None,
          attention_impl: str = "auto"):
    """(logits [B, T, V], new cache) — the pure function that training and decoding jit. `attention_impl`:
    a kernel name of qwenjax.attention (the run config's `attention.impl`); jit it as a static argument.
    The params may be in either layout (stacked or per layer): the model runs the one it is given."""
    if is_stacked(params) != config.scanned:
        config = config.replace(scan_layers=is_stacked(params))
    return _module(config, params)(tokens_BT, positions, segment_ids, cache, attention_impl)


def logits(config: ModelConfig, params: Params, tokens, *, positions=None, segment_ids=None,
           attention_impl: str = "auto") -> jax.Array:
    """Logits [B, T, vocab] for token ids [B, T]; `segment_ids` isolates packed documents."""
    return apply(config, params, jnp.asarray(tokens), positions=positions, segment_ids=segment_ids,
                 attention_impl=attention_impl)[0]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """A preallocated KV cache: k, v [layers, B, max_len, kv_heads, head_dim] and the next write index."""
    shape = (config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads, config.resolved_head_dim)
    dtype = dtype or config.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def is_stacked(params: Params) -> bool:
    """Whether `params` (or any pytree shaped like them) hold the layers stacked on a leading axis."""
    return not all(isinstance(k, int) for k in params["layers"])


def stack_layers(params: Params) -> Params:
    """Per-layer params (`layers/<i>/...`) -> one pytree with a leading `layers` axis (scan layout)."""
    if is_stacked(params):
        return params
    layers = [params["layers"][i] for i in range(len(params["layers"]))]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: Params) -> Params:
    """The inverse of `stack_layers`: integer layer keys, as HF files and model directories hold them."""
    if not is_stacked(params):
        return params
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n)}}


def to_layout(params: Params, config: ModelConfig) -> Params:
    """`params` in the layout `config.scanned` asks for."""
    return stack_layers(params) if config.scanned else unstack_layers(params)


def param_paths(params: Params) -> list[tuple[str, ...]]:
    return [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def logical_axes(path: tuple[str, ...]) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (a tuple of dict keys); stacked layers lead with `layers`."""
    if path[-1] == "embed_tokens":
        return ("vocab", "embed")
    axes = LOGICAL_AXES["/".join(path[-2:])]
    return ("layers", *axes) if is_stacked_path(path) else axes


def is_stacked_path(path: tuple) -> bool:
    """Whether the param at `path` (dict keys, as str or int) is a layer parameter of the stacked layout."""
    return len(path) > 2 and str(path[0]) == "layers" and not str(path[1]).isdigit()


def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts. Non-embedding = decoder layers + final norm (the N of the
    scaling laws); total adds the embedding and, when untied, the lm_head (or the score head). Computed abstractly."""
    shapes = abstract_params(config)
    total = sum(x.size for x in jax.tree.leaves(shapes))
    embedding = shapes["embed_tokens"].size + sum(shapes[k]["kernel"].size for k in ("lm_head", "score") if k in shapes)
    return int(total), int(total - embedding)
