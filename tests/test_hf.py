"""HF checkpoints <-> qwenjax (`qwenjax.hf`), params-only checkpoints (`qwenjax.model_io`), `convert`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import hf, model_io
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.model import init_params, is_stacked, logits, unstack_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 61, (2, 12))
_forward = jax.jit(logits, static_argnums=0)


pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def hf_model(seed: int = 0, **overrides):
    """A random-weight HF Qwen2 (float32, eager) with O(1) logits."""
    kw = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e4, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(attn_implementation="eager", **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def load_transformers(path, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(HF model, its save_pretrained folder), untied, with YaRN scaling so the RoPE config must survive."""
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    model = hf_model(rope_scaling=yarn)
    path = tmp_path_factory.mktemp("hf") / "untied"
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_round_trip_through_qwenjax(untied, tmp_path, scan):
    model, path = untied
    ref = torch_logits(model)
    config, params = hf.load_hf(path, scan_layers=scan)
    assert is_stacked(params) == scan == config.scanned
    assert config.rope_scaling_dict["factor"] == 2.0 and not config.tie_word_embeddings
    assert np.abs(np.asarray(_forward(config, params, TOKENS)) - ref).max() < TOL
    out = hf.save_hf(tmp_path / "out", config, params)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = load_transformers(out)
    rope = again.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0 and rope["rope_theta"] == 1e4
    assert np.abs(torch_logits(again) - ref).max() < TOL
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_fresh_init_params_load_in_transformers(tmp_path):
    config = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                         initializer_range=0.2, rope_theta=1e6, rms_norm_eps=1e-5)
    params = init_params(config, 7)
    ours = np.asarray(_forward(config, params, TOKENS))
    hf.save_hf(tmp_path / "fresh", config, params)
    model = load_transformers(tmp_path / "fresh")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 1
    assert np.abs(torch_logits(model) - ours).max() < TOL
    assert np.abs(ours).max() > 1.0


def test_sharded_checkpoints_with_index(untied, tmp_path):
    model, path = untied
    ref = torch_logits(model)
    config, params = hf.load_hf(path)
    out = hf.save_hf(tmp_path / "sharded", config, params, max_shard_bytes=64 * 1024)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert np.abs(torch_logits(load_transformers(out)) - ref).max() < TOL
    # and a checkpoint sharded by transformers itself
    model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="50KB")
    assert (tmp_path / "hf_sharded" / hf.INDEX_FILE).is_file()
    config2, params2 = hf.load_hf(tmp_path / "hf_sharded")
    assert np.abs(np.asarray(_forward(config2, params2, TOKENS)) - ref).max() < TOL


def test_tied_checkpoint_without_lm_head(tmp_path):
    model = hf_model(1, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    from safetensors import safe_open

    with safe_open(tmp_path / "tied" / "model.safetensors", "numpy") as f:
        assert "lm_head.weight" not in f.keys()
    config, params = hf.load_hf(tmp_path / "tied")
    assert config.tie_word_embeddings and "lm_head" not in params
    assert np.abs(np.asarray(_forward(config, params, TOKENS)) - torch_logits(model)).max() < TOL


def test_bfloat16_checkpoint(untied, tmp_path):
    model, _ = untied
    model16 = hf_model(rope_scaling=model.config.rope_parameters).to(torch.bfloat16)
    model16.save_pretrained(tmp_path / "bf16")
    expected = model16.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    config, params = hf.load_hf(tmp_path / "bf16")  # default: float32 params holding the bf16 values
    assert config.param_dtype == "float32" and params["embed_tokens"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["self_attn"]["q_proj"]["kernel"]), expected)
    config16, params16 = hf.load_hf(tmp_path / "bf16", dtype="auto")
    assert config16.param_dtype == config16.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    # and back out as bf16: transformers reads the same values
    out = hf.save_hf(tmp_path / "bf16_out", config16, params16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_transformers(out, dtype=torch.bfloat16)
    for a, b in zip(again.state_dict().values(), model16.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_load_hf_places_each_tensor_on_its_sharding(untied):
    _, path = untied
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    seen = []

    def sharding(param_path):
        seen.append(param_path)
        spec = ("fsdp", None) if param_path[-1] == "kernel" else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    config, params = hf.load_hf(path, shardings=sharding)
    assert ("layers", "1", "mlp", "down_proj", "kernel") in seen
    kernel = params["layers"][1]["mlp"]["down_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_model_io_either_layout(untied, tmp_path):
    """Model directories hold one entry per layer: a stacked save loads in both layouts, equal to the HF file."""
    _, path = untied
    config, params = hf.load_hf(path)
    stacked_cfg, stacked = hf.load_hf(path, scan_layers=True)
    model_io.save_model(tmp_path / "m", stacked_cfg, stacked)
    for scan in (False, True):
        config2, params2 = model_io.load_model(tmp_path / "m", scan_layers=scan)
        assert config2.scanned == scan == is_stacked(params2)
        for a, b in zip(jax.tree.leaves(unstack_layers(params2)), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "scan_layers" not in json.loads((tmp_path / "m" / "model_config.json").read_text())


def test_model_io_round_trip(untied, tmp_path):
    _, path = untied
    config, params = hf.load_hf(path)
    model_io.save_model(tmp_path / "m", config, params)
    assert model_io.is_model_dir(tmp_path / "m")
    config2, params2 = model_io.load_model(tmp_path / "m")
    assert config2 == config
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert 0 in params2["layers"] and 1 in params2["layers"]  # integer layer keys, as init_params makes them
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="already holds"):
        model_io.save_model(tmp_path / "m", config, params)
    with pytest.raises(UserError, match="param_dtype"):
        model_io.save_model(tmp_path / "m16", config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    with pytest.raises(UserError, match="no model_config.json"):
        model_io.load_model(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------
# The CLI


def test_convert_both_ways(untied, tmp_path, run_cli):
    model, path = untied
    (path / "tokenizer.json").write_text("{}")  # tokenizer files travel with the weights
    try:
        status, out, err = run_cli("convert", "--from-hf", path, "--to", tmp_path / "m")
    finally:
        (path / "tokenizer.json").unlink()
    assert status == 0 and "wrote" in out and err == ""
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    config, params = model_io.load_model(tmp_path / "m")
    assert config.param_dtype == "float32"
    status, out, err = run_cli("convert", "--from", tmp_path / "m", "--to-hf", tmp_path / "back",
                               "--dtype", "bfloat16")
    assert status == 0, err
    back = load_transformers(tmp_path / "back")
    assert back.dtype == torch.bfloat16 and (tmp_path / "back" / "tokenizer.json").is_file()
    assert np.abs(torch_logits(back.float()) - torch_logits(model)).max() < 0.2  # bf16 weights
    status, _, err = run_cli("convert", "--from", tmp_path / "m", "--to-hf", tmp_path / "back")
    assert status == 2 and "already exists" in err


def _expect_error(run_cli, argv, fragment):
    status, out, err = run_cli(*argv)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenjax: error:"), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def _broken_copy(src, dst, *, config=None, drop=None, shrink=None):
    """A copy of the HF folder `src` with another config.json, one tensor dropped or one tensor shortened."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    dst.mkdir()
    (dst / "config.json").write_text(config if config is not None else (src / "config.json").read_text())
    with safe_open(src / "model.safetensors", "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    if shrink:
        tensors[shrink] = tensors[shrink][:-1]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_input_is_one_line(untied, tmp_path, run_cli):
    _, src = untied
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    _expect_error(run_cli, ["convert", "--from-hf", tmp_path / "empty", "--to", out], "no config.json")
    _expect_error(run_cli, ["convert", "--from-hf", tmp_path / "missing", "--to", out], "does not exist")
    bad = _broken_copy(src, tmp_path / "malformed", config="{not json")
    _expect_error(run_cli, ["convert", "--from-hf", bad, "--to", out], "malformed config.json")
    llama = json.loads((src / "config.json").read_text()) | {"model_type": "llama"}
    bad = _broken_copy(src, tmp_path / "llama", config=json.dumps(llama))
    _expect_error(run_cli, ["convert", "--from-hf", bad, "--to", out], "unsupported model_type 'llama'")
    bad = _broken_copy(src, tmp_path / "drop", drop="model.layers.1.mlp.up_proj.weight")
    _expect_error(run_cli, ["convert", "--from-hf", bad, "--to", out],
                  "missing tensor model.layers.1.mlp.up_proj.weight")
    bad = _broken_copy(src, tmp_path / "nohead", drop="lm_head.weight")
    _expect_error(run_cli, ["convert", "--from-hf", bad, "--to", out], "missing tensor lm_head.weight")
    bad = _broken_copy(src, tmp_path / "shape", shrink="model.layers.0.self_attn.k_proj.bias")
    _expect_error(run_cli, ["convert", "--from-hf", bad, "--to", out],
                  "tensor model.layers.0.self_attn.k_proj.bias has shape [31], expected [32]")
    nofiles = tmp_path / "nofiles"
    nofiles.mkdir()
    (nofiles / "config.json").write_text((src / "config.json").read_text())
    _expect_error(run_cli, ["convert", "--from-hf", nofiles, "--to", out], "no safetensors files")
    _expect_error(run_cli, ["convert", "--from-hf", src], "--from-hf and --to go together")
    _expect_error(run_cli, ["convert", "--from-hf", src, "--to-hf", out], "either --from-hf DIR --to DIR")
    _expect_error(run_cli, ["convert", "--from", tmp_path / "empty", "--to-hf", out], "no model_config.json")
    assert not out.exists()

