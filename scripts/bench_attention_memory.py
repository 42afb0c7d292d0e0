"""Peak memory and forward+backward time of the attention kernels against sequence length (docs/long-context.md).

Memory: XLA's compiled memory analysis of jit(grad(sum(attention(q, k, v) * w))), temporaries only (the
inputs and gradients, 4 x T x heads x head_dim floats, are the same for every kernel); nothing is run for it,
so it is given even where the program would not fit. Time: the median of --repeats runs after one warm-up,
only where the temporaries are under --max-run-gib and the previous length took under --max-seconds.

    python scripts/bench_attention_memory.py                       # B=1, 2 heads, head_dim 64, float32
    python scripts/bench_attention_memory.py --kernels flash --blocks 128 256 512 1024 --seq-lens 4096 16384
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from qwenjax import attention


def _step(kernel):
    def loss(q, k, v, w):
        return jnp.sum(kernel(q, k, v) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--kernels", nargs="+", default=["reference", "blockwise", "flash"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128], help="flash block sizes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-run-gib", type=float, default=6.0, help="do not run above these temporaries")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop a kernel after a slower length")
    args = parser.parse_args()

    variants = [(name, attention.KERNELS[name]) for name in args.kernels if name != "flash"]
    if "flash" in args.kernels:
        variants += [(f"flash (block {b})", functools.partial(attention.KERNELS["flash"], block=b))
                     for b in args.blocks]
    print(f"# {jax.devices()[0].device_kind}, B={args.batch}, heads {args.heads} (kv {args.kv_heads}), "
          f"head_dim {args.head_dim}, float32, forward+backward")
    print("| kernel | T | temp memory (MiB) | fwd+bwd time (s) |")
    print("|---|---:|---:|---:|")
    for name, kernel in variants:
        slow = False
        for T in args.seq_lens:
            q = jax.ShapeDtypeStruct((args.batch, T, args.heads, args.head_dim), jnp.float32)
            kv = jax.ShapeDtypeStruct((args.batch, T, args.kv_heads, args.head_dim), jnp.float32)
            compiled = _step(kernel).lower(q, kv, kv, q).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            seconds = "not run (too slow at the previous T)" if slow else "not run (over --max-run-gib)"
            if not slow and temp <= args.max_run_gib * 2**30:
                keys = jax.random.split(jax.random.key(T), 4)
                inputs = [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, (q, kv, kv, q), strict=True)]
                jax.block_until_ready(compiled(*inputs))
                runs = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(*inputs))
                    runs.append(time.perf_counter() - start)
                seconds = f"{statistics.median(runs):.3f}"
                slow = statistics.median(runs) > args.max_seconds
            print(f"| {name} | {T} | {temp / 2**20:,.1f} | {seconds} |", flush=True)


if __name__ == "__main__":
    main()
