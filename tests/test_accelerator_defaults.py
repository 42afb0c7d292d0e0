"""Accelerator defaults that CPU can check: the peak-FLOP/s row each chip's device_kind picks (MFU), and the
compute dtype `model.dtype: auto` resolves to per platform (bfloat16 on GPU/TPU, float32 on CPU)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from qwenjax.run_config import config_to_dict, load_config, model_config
from qwenjax.train.metrics import PEAK_FLOPS, peak_flops, table_peak
from qwenjax.train.setup import resolve_dtype


@pytest.mark.parametrize("kind, key, bf16, fp32", [
    ("TPU v4", "tpu v4", 275e12, 275e12),
    ("TPU v5 lite", "tpu v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5p", "tpu v5p", 459e12, 459e12),
    ("TPU v5", "tpu v5", 459e12, 459e12),
    ("TPU v6 lite", "tpu v6", 918e12, 918e12),  # v6e
    ("NVIDIA H100 80GB HBM3", "h100", 989e12, 494e12),
    ("NVIDIA H100 PCIe", "h100 pcie", 756e12, 378e12),
    ("NVIDIA H200", "h200", 989e12, 494e12),
    ("NVIDIA GH200 480GB", "gh200", 989e12, 494e12),
    ("NVIDIA A100-SXM4-80GB", "a100", 312e12, 156e12),
    ("NVIDIA A10G", "a10", 125e12, 62.5e12),
    ("NVIDIA L4", "l4", 121e12, 60e12),
    ("NVIDIA L40S", "l40s", 362e12, 183e12),
])
def test_peak_table_picks_the_chip(kind, key, bf16, fp32):
    assert table_peak(kind) == (key, bf16)
    assert table_peak(kind, "bfloat16") == (key, bf16)
    assert table_peak(kind, "float32") == (key, fp32)


def test_peak_fallbacks(monkeypatch):
    monkeypatch.delenv("QWENJAX_PEAK_FLOPS", raising=False)
    assert table_peak("Some Future Chip") is None
    gpu = SimpleNamespace(platform="gpu", device_kind="Some Future Chip", process_index=0)
    peak, source = peak_flops([gpu, gpu])
    assert math.isnan(peak) and "QWENJAX_PEAK_FLOPS" in source  # MFU null, and the line says what to set
    h100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", process_index=0)
    assert peak_flops([h100] * 8, "bfloat16")[0] == 8 * 989e12
    assert peak_flops([h100] * 8, "float32")[0] == 8 * 494e12
    monkeypatch.setenv("QWENJAX_PEAK_FLOPS", "1e12")
    assert peak_flops([gpu, gpu]) == (2e12, "QWENJAX_PEAK_FLOPS")
    # the bf16 column as `qwenjax plan` reads it
    assert dict(PEAK_FLOPS)["tpu v5p"] == 459e12 and dict(PEAK_FLOPS)["tpu v6"] == 918e12


def test_model_dtype_auto_resolves_per_platform():
    cfg = load_config(None, ["model.hidden_size=64", "model.num_attention_heads=4"])
    auto = load_config(None, ["model.dtype=auto", "model.hidden_size=64", "model.num_attention_heads=4"])
    assert cfg.model.dtype is None and auto.model.dtype is None  # unset and "auto" are the same
    assert model_config(cfg, vocab_size=8).dtype == "float32"  # unresolved: float32 (CPU behaviour)
    for platform, dtype in (("gpu", "bfloat16"), ("tpu", "bfloat16"), ("cpu", "float32")):
        resolved = resolve_dtype(auto, platform)
        assert resolved.model.dtype == dtype and config_to_dict(resolved)["model"]["dtype"] == dtype
        mc = model_config(resolved, vocab_size=8)
        assert mc.dtype == dtype and mc.param_dtype == "float32"  # master weights stay float32
    explicit = load_config(None, ["model.dtype=float32"])
    assert resolve_dtype(explicit, "tpu").model.dtype == "float32"  # an explicit choice is kept
    assert resolve_dtype(cfg).model.dtype == "float32"  # this test process runs on CPU
