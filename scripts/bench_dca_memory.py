"""Memory (and time) of dual chunk attention's forward against sequence length (docs/long-context.md).

Memory: XLA's compiled memory analysis of jit(dca.attend) (and of the reference kernel's forward, for
comparison), temporaries only; nothing is run for it. Time: the median of --repeats runs after a warm-up.

    python scripts/bench_dca_memory.py        # B=1, 2 heads, head_dim 64, float32, chunk 256, local 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from qwenjax import attention, dca
from qwenjax.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--local-size", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = ModelConfig(num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.head_dim,
                         dual_chunk_attention_config={"chunk_size": args.chunk_size, "local_size": args.local_size})
    kernels = {"dca": jax.jit(lambda q, k, v: dca.attend(config, q, k, v)),
               "reference": jax.jit(lambda q, k, v: attention.reference(q, k, v))}
    print(f"| T | dca: temp MiB | time s | reference: temp MiB | time s |  (query block {dca.QUERY_BLOCK})")
    for T in args.seq_lens:
        q, k, v = (jax.random.normal(jax.random.key(i), (1, T, args.heads, args.head_dim)) for i in range(3))
        row = [f"{T:,}"]
        for fn in kernels.values():
            compiled = fn.lower(q, k, v).compile()
            row.append(f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:,.1f}")
            jax.block_until_ready(compiled(q, k, v))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                times.append(time.perf_counter() - start)
            row.append(f"{statistics.median(times):.3f}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
