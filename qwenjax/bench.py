"""Training-step throughput: qwenjax against transformers Qwen2 + torch.optim.AdamW, side by side.

Both sides train the same shapes (model, batch, sequence length) on random token ids with AdamW (betas
0.9/0.95, weight decay 0.1, global-norm clip 1.0) on the same CPU threads. Timings alternate between the
two in one process (rounds of `steps` steps each), so machine noise hits both alike; the figures are the
medians over rounds and the ratio is qwenjax / torch tokens per second.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from qwenjax.config import ModelConfig, flops_per_token, param_counts
from qwenjax.run_config import RunConfig, model_config

BENCH_OVERRIDES = {  # the reference point of docs/performance-notes: a 12.6M-parameter Qwen2 shape
    "model.vocab_size": 8192, "model.hidden_size": 384, "model.intermediate_size": 1024,
    "model.num_hidden_layers": 6, "model.num_attention_heads": 6, "model.num_key_value_heads": 2,
    "model.tie_word_embeddings": True, "model.dtype": "float32",
    "train.batch_size": 8, "train.seq_len": 512, "mesh.fsdp": 1,
}


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids in the trainer's batch schema (benchmarks and probes: only the shapes matter)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch_size, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
            "loss_mask": np.ones((batch_size, seq_len), np.float32)}


class _JaxSide:
    def __init__(self, cfg: RunConfig, model_cfg: ModelConfig, batch):
        import jax  # JAX and the trainer load on use: `qwenjax bench --help` stays fast

        from qwenjax.train import sharding, step  # JAX (above)

        self.mesh = sharding.mesh_from_config(cfg.mesh)
        static = step.make_step_static(cfg)
        self.step_fn, self.compile_s = step.compiled_train_step(
            model_cfg, static, self.mesh, cfg.train.batch_size, cfg.train.seq_len)
        self.state = step.init_state_sharded(model_cfg, jax.random.key(cfg.seed), self.mesh)
        self.hp = jax.device_put(step.make_hparams(cfg), sharding.replicated(self.mesh))
        self.batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
        self.run(1)

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step_fn(self.state, self.batch, self.hp)
        metrics["loss"].block_until_ready()
        return time.perf_counter() - t0


class _TorchSide:
    def __init__(self, cfg: RunConfig, model_cfg: ModelConfig, batch, threads: int):
        import torch  # optional dependency (the hf extra)
        from transformers import Qwen2Config, Qwen2ForCausalLM  # optional dependency (the hf extra)

        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        hf_cfg = Qwen2Config(**{k: v for k, v in model_cfg.to_hf_dict().items()
                                if k not in ("architectures", "model_type", "torch_dtype")},
                             attn_implementation="sdpa")
        self.torch = torch
        self.model = Qwen2ForCausalLM(hf_cfg).train()
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.clip = o.clip_norm
        self.inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64))
        self.run(1)

    def run(self, steps: int) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = self.model(self.inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def bench_train(cfg: RunConfig, *, steps: int = 3, rounds: int = 3, with_torch: bool = True,
                profile: bool = False) -> dict[str, Any]:
    """Tokens/s and MFU of qwenjax's jitted train step (and of torch when `with_torch` and installed);
    `profile` adds the step's time split into parts on both sides (`qwenjax.bench_profile`)."""
    from qwenjax.train.metrics import peak_flops  # JAX (see _JaxSide)

    model_cfg = model_config(cfg, vocab_size=cfg.model.vocab_size or 8192)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    batch = random_batch(model_cfg.vocab_size, B, T, cfg.seed)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sides = {"qwenjax": _JaxSide(cfg, model_cfg, batch)}
    torch_note = None
    if with_torch:
        try:
            sides["torch"] = _TorchSide(cfg, model_cfg, batch, threads)
        except ImportError as e:
            torch_note = f"torch comparison skipped: {e} (install the hf extra)"
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            times[name].append(side.run(steps) / steps)
    peak, peak_source = peak_flops(dtype=model_cfg.dtype)
    flops_tok = flops_per_token(model_cfg, T)
    out: dict[str, Any] = {
        "bench": "train", "n_params_total": None, "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.hidden_size, "num_hidden_layers": model_cfg.num_hidden_layers,
        "batch_size": B, "seq_len": T, "dtype": model_cfg.dtype, "threads": threads,
        "steps_per_round": steps, "rounds": rounds, "compile_s": round(sides["qwenjax"].compile_s, 2),
        "peak_flops": peak, "peak_source": peak_source,
    }
    out["n_params_total"] = param_counts(model_cfg)[0]
    for name, ts in times.items():
        tok_s = B * T / statistics.median(ts)
        prefix = "" if name == "qwenjax" else "torch_"
        out[f"{prefix}tokens_per_s"] = round(tok_s, 1)
        out[f"{prefix}mfu"] = round(tok_s * flops_tok / peak, 4)
    if "torch" in sides:
        out["ratio"] = round(out["tokens_per_s"] / out["torch_tokens_per_s"], 3)
    if torch_note:
        out["note"] = torch_note
    if profile:
        from qwenjax.bench_profile import profile_parts  # JAX (see _JaxSide)

        out["profile"] = profile_parts(sides, cfg, model_cfg, steps, rounds)
    return out
