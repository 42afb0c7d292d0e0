"""Context-parallel attention, ring against all-gather, and one device's kernels (docs/long-context.md).

Forward + backward of causal GQA attention (B=1, 8 query heads, 2 kv heads, head_dim 64, float32, packed
documents of ~512 tokens) on a mesh of `--devices` simulated CPU devices, all on the context axis. Prints
per kernel the fastest of 3 timed runs after a warm-up (seconds) and XLA's compiled temporary memory
(bytes per device). On a CPU the simulated devices share the cores, so the time is the total work of all of
them, not the wall time of a real slice (where the slowest device sets it).

    python scripts/bench_context_parallel.py --seq-len 2048 --kernels reference,flash,allgather,ring
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--kernels", default="flash,allgather,ring",
                   help="comma-separated: kernels of qwenjax.attention (one device) and/or allgather, ring")
    args = p.parse_args()
    if f"device_count={args.devices}" not in os.environ.get("XLA_FLAGS", ""):  # must be set before JAX starts
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
               "JAX_PLATFORMS": "cpu"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenjax import attention
    from qwenjax import context_parallel as cp
    from qwenjax.train import sharding

    B, T, N, K, H = 1, args.seq_len, 8, 2, 64
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(np.cumsum(r.random((B, T)) < 1 / 512, axis=1) + 1, jnp.int32)
    mesh = sharding.make_mesh(1, 1, 1, context=args.devices)

    def grad_of(f):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, segment_ids_BT=seg) ** 2), argnums=(0, 1, 2))

    def split(strategy):
        def f(q, k, v):
            with cp.context_mesh(mesh, lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh), strategy):
                return grad_of(cp.attend)(q, k, v)
        return f

    out = {"seq_len": T, "devices": args.devices}
    for name in args.kernels.split(","):
        fn = split(name) if name in cp.STRATEGIES else grad_of(attention.KERNELS[name])
        compiled = jax.jit(fn).lower(q, k, v).compile()
        jax.block_until_ready(compiled(q, k, v))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v))
            times.append(time.perf_counter() - t0)
        out[name] = {"s": round(min(times), 3), "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
