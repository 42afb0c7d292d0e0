"""`qwenjax.scaling` without JAX: the fitter and `predict` run where JAX cannot be imported (a notebook, a laptop),
because N comes from the analytic `config.param_counts`, which must equal the model's own count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwenjax.config import PRESETS, ModelConfig, param_counts

# Make JAX and everything built on it unimportable (`import jax` raises ImportError), then fit and predict.
_NO_JAX = """
import sys
for name in ("jax", "jaxlib", "flax", "optax", "orbax", "orbax.checkpoint"):
    sys.modules[name] = None
import json
import qwenjax.scaling as scaling
import qwenjax.hparams as hparams
from qwenjax.scaling.synthetic import synthetic_results, write_results
rows = synthetic_results(n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=2, batch_span=1)
path = write_results(sys.argv[1], rows)
fit = scaling.make_fit(scaling.load_results(path), bootstrap=10, loss_law=False)
n = scaling.preset_n_params("qwen2.5-0.5b")
p = hparams.predict_hparams(fit, n, "18T", seq_len=4096, multiple_of=8)
steps = hparams.steps_for_tokens(18e12, p["batch_size"], 4096)
loaded = [m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax")
          and sys.modules[m] is not None]
print(json.dumps({"n": n, "batch_size": p["batch_size"], "lr": p["lr"], "steps": steps, "loaded": loaded}))
"""


def test_scaling_imports_and_fits_without_jax(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_JAX, str(tmp_path / "results.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["loaded"] == [] and out["n"] == 357_898_112
    assert out["batch_size"] >= 8 and out["batch_size"] % 8 == 0 and out["lr"] > 0 and out["steps"] >= 1


def _model_counts(config: ModelConfig) -> tuple[int, int]:
    model = pytest.importorskip("qwenjax.model")
    return model.count_params(config)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tied", [True, False])
def test_param_counts_equal_the_model_for_every_preset(name, tied):
    """Exact equality at 1 and 2 layers (the count is linear in depth, and tracing the 80-layer preset takes
    seconds), and for the full 0.5B preset as released."""
    config = PRESETS[name].replace(tie_word_embeddings=tied)
    for layers in (1, 2):
        shallow = config.replace(num_hidden_layers=layers, max_window_layers=layers)
        assert param_counts(shallow) == _model_counts(shallow)
    if name == "qwen2.5-0.5b":
        assert param_counts(config) == _model_counts(config)


@pytest.mark.parametrize("kwargs", [
    dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
         num_key_value_heads=2),
    dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
         num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
    dict(vocab_size=33, hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=8,
         num_key_value_heads=8, use_sliding_window=True, sliding_window=4, max_window_layers=1),
])
def test_param_counts_equal_the_model_for_tiny_shapes(kwargs):
    config = ModelConfig(**kwargs)
    assert param_counts(config) == _model_counts(config)
