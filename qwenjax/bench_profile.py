"""`qwenjax bench train --profile`: where a train step's time goes, the same parts timed on both sides.

A trace of one framework cannot be compared with a trace of the other (XLA fuses across what torch runs as
separate kernels), so each side runs the same five parts of the step as separate programs at the step's
shapes, forward and backward with fixed cotangents, all layers included:

- `dots`: the seven projections of every layer (q, k, v, o, gate, up, down), as 2-D matmuls;
- `attention`: the attention kernel (qwenjax: the configured `attention.impl`; torch: SDPA as HF calls it);
- `elementwise`: the two RMSNorms, RoPE on q and k, the q/k/v biases, SwiGLU's silu x up, the residuals;
- `loss`: final norm, unembedding (tied) and float32 cross-entropy, with the embedding lookup's backward;
- `optimizer`: global-norm clip and AdamW over every parameter.

`rest` is the full step minus the parts: what the step pays beyond them (dispatch, copies, layout changes
between fused regions), or gains by fusing them (negative). Rounds alternate between the sides like the
throughput benchmark, and the figures are medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qwenjax.config import ModelConfig

PARTS = ("dots", "attention", "elementwise", "loss", "optimizer")


def _shapes(c: ModelConfig, B: int, T: int) -> dict[str, int]:
    return {"B": B, "T": T, "M": B * T, "D": c.hidden_size, "N": c.num_attention_heads,
            "K": c.num_key_value_heads, "H": c.resolved_head_dim, "F": c.intermediate_size, "V": c.vocab_size,
            "L": c.num_hidden_layers}


def _projections(s: dict[str, int]) -> list[tuple[str, int, int]]:
    """(input name, d_in, d_out) of one layer's seven matmuls; inputs: x (normed hidden), a (attention out),
    g (the gated MLP activation)."""
    D, N, K, H, F = s["D"], s["N"], s["K"], s["H"], s["F"]
    return [("x", D, N * H), ("x", D, K * H), ("x", D, K * H), ("a", N * H, D),
            ("x", D, F), ("x", D, F), ("g", F, D)]


def _timer(run: Callable[[], Any]) -> Callable[[int], float]:
    def timed(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        return (time.perf_counter() - t0) / steps
    run()  # compile / warm up
    return timed


def _jax_parts(c: ModelConfig, s: dict[str, int], attention_impl: str, optim_static, hp, state) -> dict:
    import jax
    import jax.numpy as jnp

    from qwenjax.attention import attend
    from qwenjax.rope import apply_rope, rope_cos_sin
    from qwenjax.train.optim import apply_updates

    rng = np.random.default_rng(0)
    f32 = jnp.float32
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
    B, T, M, D, N, K, H, F, V, L = (s[k] for k in "BTMDNKHFVL")

    def fwd_bwd(fn, primals):
        """jit(vjp of fn at primals, with a fixed random cotangent); returns a thunk that blocks."""
        out = jax.eval_shape(fn, *primals)
        cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape, np.float32)).astype(o.dtype), out)
        step = jax.jit(lambda p, ct: jax.vjp(fn, *p)[1](ct))
        return _timer(lambda: jax.block_until_ready(step(primals, cot)))

    proj = _projections(s)
    weights = [[arr(i, o) for _, i, o in proj] for _ in range(L)]
    acts = {"x": arr(M, D), "a": arr(M, N * H), "g": arr(M, F)}

    def dots(acts, weights):
        return [[jnp.dot(acts[name], w, preferred_element_type=f32) for (name, _, _), w in zip(proj, ws, strict=True)]
                for ws in weights]

    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    segments = jnp.ones((B, T), jnp.int32)
    qkv = [(arr(B, T, N, H), arr(B, T, K, H), arr(B, T, K, H)) for _ in range(L)]

    def attention(qkv):
        return [attend(q, k, v, impl=attention_impl, segment_ids_BT=segments) for q, k, v in qkv]

    cos, sin = rope_cos_sin(c, positions, f32)

    def rms(x, w):
        return w * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps))

    def elementwise(h, q, k, gate, up, norms, biases):
        outs = []
        for (w1, w2), (bq, bk) in zip(norms, biases, strict=True):
            outs += [rms(h, w1), rms(h + h, w2),  # the two norms and the residual adds they follow
                     apply_rope(q + bq, cos, sin), apply_rope(k + bk, cos, sin), jax.nn.silu(gate) * up]
        return outs

    elem_primals = (arr(B, T, D), arr(B, T, N, H), arr(B, T, K, H), arr(B, T, F), arr(B, T, F),
                    [(arr(D), arr(D)) for _ in range(L)], [(arr(N, H), arr(K, H)) for _ in range(L)])
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)

    def loss(h, norm_w, table):
        x = table[tokens]  # the lookup's backward is a scatter-add into the table, as in the step
        logits = jnp.dot(rms(h + x, norm_w).reshape(M, D), table.T, preferred_element_type=f32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(lse - jnp.take_along_axis(logits, targets.reshape(M, 1), axis=-1)[:, 0]) / M

    params = state["params"]
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * 1e-3, p.dtype), params)
    update = jax.jit(lambda p, g, o, step, hp: apply_updates(p, g, o, step, hp, optim_static)[:2],
                     donate_argnums=(0, 2))
    # copies: the benchmark's own step donates `state` on every call
    holder = {"params": jax.tree.map(jnp.copy, params), "opt": jax.tree.map(jnp.copy, state["opt_state"])}
    step0 = jnp.copy(state["step"])

    def optimizer():
        holder["params"], holder["opt"] = update(holder["params"], grads, holder["opt"], step0, hp)
        jax.block_until_ready(holder["params"])

    return {"dots": fwd_bwd(dots, (acts, weights)), "attention": fwd_bwd(attention, (qkv,)),
            "elementwise": fwd_bwd(elementwise, elem_primals),
            "loss": fwd_bwd(loss, (arr(B, T, D), arr(D), arr(V, D))), "optimizer": _timer(optimizer)}


def _torch_parts(c: ModelConfig, s: dict[str, int], model, opt, clip: float) -> dict:
    import torch
    import torch.nn.functional as F_
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

    gen = torch.Generator().manual_seed(0)
    arr = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).requires_grad_(True)
    B, T, M, D, N, K, H, F, V, L = (s[k] for k in "BTMDNKHFVL")

    def fwd_bwd(fn, primals):
        outs = fn(*primals)
        cots = [torch.randn(o.shape, generator=gen) for o in outs]

        def run():
            for p in primals:
                p.grad = None
            torch.autograd.backward(fn(*primals), cots)
        return _timer(run)

    proj = _projections(s)
    flat_w = [arr(o, i) for _ in range(L) for _, i, o in proj]  # torch Linear weights are [out, in]
    acts = {"x": arr(M, D), "a": arr(M, N * H), "g": arr(M, F)}
    names = [name for _ in range(L) for name, _, _ in proj]

    def dots(x, a, g, *ws):
        inputs = {"x": x, "a": a, "g": g}
        return [F_.linear(inputs[n], w) for n, w in zip(names, ws, strict=True)]

    def attention(*qkv):
        outs = []
        for i in range(L):
            q, k, v = qkv[3 * i:3 * i + 3]
            k, v = repeat_kv(k, N // K), repeat_kv(v, N // K)  # HF's SDPA path
            outs.append(F_.scaled_dot_product_attention(q, k, v, is_causal=True))
        return outs

    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, H, 2, dtype=torch.float32) / H))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)[None].expand(B, T, H)
    cos, sin = emb.cos(), emb.sin()

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def elementwise(h, q, k, gate, up, *per_layer):
        outs = []
        for i in range(L):
            w1, w2, bq, bk = per_layer[4 * i:4 * i + 4]
            qr, kr = apply_rotary_pos_emb(q + bq[:, None, :], k + bk[:, None, :], cos, sin)
            outs += [rms(h, w1), rms(h + h, w2), qr, kr, F_.silu(gate) * up]
        return outs

    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (M,), generator=gen)

    def loss(h, norm_w, table):
        logits = F_.linear(rms(h + F_.embedding(tokens, table), norm_w).reshape(M, D), table)
        return [F_.cross_entropy(logits.float(), targets)]

    params = [p for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]

    def optimizer():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    per_layer = [t for _ in range(L) for t in (arr(D), arr(D), arr(N, H), arr(K, H))]
    qkv = [t for _ in range(L) for t in (arr(B, N, T, H), arr(B, K, T, H), arr(B, K, T, H))]
    return {"dots": fwd_bwd(dots, (acts["x"], acts["a"], acts["g"], *flat_w)),
            "attention": fwd_bwd(attention, qkv),
            "elementwise": fwd_bwd(elementwise, (arr(B, T, D), arr(B, N, T, H), arr(B, K, T, H), arr(B, T, F),
                                                 arr(B, T, F), *per_layer)),
            "loss": fwd_bwd(loss, (arr(B, T, D), arr(D), arr(V, D))), "optimizer": _timer(optimizer)}


def profile_parts(sides: dict, cfg, model_cfg: ModelConfig, steps: int, rounds: int) -> dict[str, Any]:
    """Median ms per part and side, each part's share of its side's full step, and torch/qwenjax per part.

    `sides` are the throughput benchmark's (`qwenjax`, optionally `torch`), reused for the full step.
    """
    from qwenjax.train import step as qstep

    s = _shapes(model_cfg, cfg.train.batch_size, cfg.train.seq_len)
    jax_side = sides["qwenjax"]
    timers = {"qwenjax": _jax_parts(model_cfg, s, cfg.attention.kernel, qstep.make_optim_static(cfg), jax_side.hp,
                                    jax_side.state)}
    if "torch" in sides:
        t = sides["torch"]
        timers["torch"] = _torch_parts(model_cfg, s, t.model, t.opt, t.clip)
    for name, part_timers in timers.items():
        part_timers["step"] = lambda steps, side=sides[name]: side.run(steps) / steps
    times = {name: {part: [] for part in part_timers} for name, part_timers in timers.items()}
    for _ in range(rounds):
        for name, part_timers in timers.items():
            for part, timed in part_timers.items():
                times[name][part].append(timed(steps))
    out: dict[str, Any] = {"parts": list(PARTS), "method": __doc__.split("\n\n")[1].replace("\n", " ")}
    for name, by_part in times.items():
        ms = {part: statistics.median(ts) * 1e3 for part, ts in by_part.items()}
        ms["rest"] = ms["step"] - sum(ms[p] for p in PARTS)
        out[name] = {part: {"ms": round(v, 2), "share": round(v / ms["step"], 3)} for part, v in ms.items()}
    if "torch" in out:
        out["torch_over_qwenjax"] = {p: round(out["torch"][p]["ms"] / out["qwenjax"][p]["ms"], 3)
                                     for p in (*PARTS, "step") if out["qwenjax"][p]["ms"] > 0}
    return out
