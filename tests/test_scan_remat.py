"""Layers under `lax.scan` (`model.scan_layers`) and rematerialisation (`train.remat`): the scanned model
equals the unrolled one, every remat policy gives the same losses and gradients, full remat needs less
temporary memory, and a run trains the same in both layouts (single CPU device, in-process)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, tiny_overrides
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.run_config import load_config
from qwenjax.run_sections import REMAT_POLICIES
from qwenjax.train import NEXT_TOKEN, abstract_state, init_train_state, mean_gradients, sharding, train, train_step
from qwenjax.train.optim import OptimStatic, decay_mask, make_hp

SMALL = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    use_sliding_window=True, sliding_window=5, max_window_layers=0, scan_layers=False)

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def _batch(batch: int = 2, seq: int = 16, vocab: int = 97, seed: int = 0) -> dict[str, jax.Array]:
    r = np.random.default_rng(seed)
    tokens = r.integers(0, vocab, size=(batch, seq + 1))
    segment = np.ones((batch, seq), np.int32)
    segment[:, seq // 2:] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(batch, 0)
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(segment), "positions": jnp.asarray(positions, jnp.int32),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def test_scanned_logits_equal_unrolled():
    params = qmodel.init_params(SMALL, 0)
    b = _batch()
    kw = dict(positions=b["positions"], segment_ids=b["segment_ids"])
    unrolled = qmodel.logits(SMALL, params, b["inputs"], **kw)
    stacked = qmodel.stack_layers(params)
    assert jax.tree.leaves(stacked["layers"])[0].shape[0] == 3
    scanned = qmodel.logits(SMALL.replace(scan_layers=True), stacked, b["inputs"], **kw)
    assert float(jnp.abs(unrolled).max()) > 0.1
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=1e-6, rtol=0)
    # `apply` runs the layout it is given, whatever the config says
    np.testing.assert_array_equal(np.asarray(qmodel.logits(SMALL, stacked, b["inputs"], **kw)), np.asarray(scanned))
    for a, c in zip(jax.tree.leaves(qmodel.unstack_layers(stacked)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_layout_rule_and_refusal():
    assert not ModelConfig(num_hidden_layers=4).scanned and ModelConfig(num_hidden_layers=24).scanned
    mixed = ModelConfig(num_hidden_layers=24, use_sliding_window=True, max_window_layers=12)
    assert not mixed.scanned  # layers differ: the default falls back to the loop
    with pytest.raises(UserError, match=r"scan_layers: true needs every layer alike.*max_window_layers \(12\)"):
        mixed.replace(scan_layers=True)
    assert "scan_layers" not in SMALL.to_hf_dict() and "remat" not in SMALL.to_hf_dict()


def test_stacked_params_shard_and_decay_per_layer():
    config = SMALL.replace(scan_layers=True, hidden_size=64, intermediate_size=128)
    state = abstract_state(config)
    specs = sharding.param_specs(state["params"], AbstractMesh((1, 2, 2), sharding.MESH_AXES), config)
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P(None, "fsdp", "tensor")  # `layers` replicated
    assert specs["layers"]["self_attn"]["q_proj"]["bias"] == P(None, "tensor")
    sh = sharding.state_shardings(state, AbstractMesh((1, 2, 2), sharding.MESH_AXES), config)
    assert sh["opt_state"].mu["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    mask = decay_mask(state["params"], OptimStatic())
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] and not mask["layers"]["input_layernorm"]["weight"]
    assert not mask["layers"]["self_attn"]["q_proj"]["bias"]


def _loss_and_grads(config: ModelConfig, remat: str, batch):
    hp = {**make_hp(lr=1e-2, warmup_steps=0, total_steps=10), **NEXT_TOKEN.make_hp(z_loss=1e-4)}
    params = qmodel.to_layout(qmodel.init_params(config.replace(scan_layers=False), 0), config)
    grads, loss = jax.jit(lambda p: mean_gradients(p, batch, hp, model_cfg=config.replace(remat=remat)))(params)
    return loss, qmodel.unstack_layers(grads)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_policies_give_equal_losses_and_gradients(scan):
    """Every policy (offload included: on CPU it lowers and runs) gives the loss and gradients of no remat."""
    config, batch = SMALL.replace(scan_layers=scan), _batch()
    ref_loss, ref_grads = _loss_and_grads(SMALL, "none", batch)
    for policy in REMAT_POLICIES:
        loss, grads = _loss_and_grads(config, policy, batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def _temp_bytes(config: ModelConfig, remat: str, batch) -> int:
    hp = {**make_hp(lr=1e-2, warmup_steps=0, total_steps=10), **NEXT_TOKEN.make_hp(z_loss=0.0)}
    step = jax.jit(lambda s, b, h: train_step(s, b, h, model_cfg=config, optim_static=OptimStatic(), remat=remat))
    compiled = step.lower(abstract_state(config), jax.eval_shape(lambda: batch), hp).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_full_remat_needs_less_temporary_memory(scan):
    """8 layers, 8 x 256 tokens: without remat every layer's activations are kept for the backward pass;
    with full remat only each layer's input (measured figures: docs/training.md)."""
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         scan_layers=scan)
    batch = _batch(8, 256, 128)
    none, full = _temp_bytes(config, "none", batch), _temp_bytes(config, "full", batch)
    # Under scan the backward recomputes one layer at a time (measured 252 -> 29 MiB). Unrolled, XLA:CPU's
    # scheduler is free to run every layer's recomputation early, so it saves little (205 -> 190 MiB).
    assert full < (0.5 if scan else 1.0) * none, (none, full)


def test_unknown_policy_is_one_line(run_cli):
    assert set(REMAT_POLICIES) == {"none", *qmodel.CHECKPOINT_POLICIES}
    with pytest.raises(UserError, match=r"train.remat must be one of none, full, .* \(did you mean 'full'\?\)"):
        load_config(TINY, ["train.remat=ful"])
    status, _, err = run_cli("train", str(TINY), "train.remat=dot", "--print-config")
    assert status == 2 and err.strip().count("\n") == 0 and "did you mean 'dots'" in err


def test_a_run_trains_the_same_scanned_with_remat(tiny_config, tiny_data, tmp_path):
    """The same init (a model dir), trained unrolled and scanned with full remat: equal losses; the scanned
    run's Orbax checkpoint and final model dir work, and the model dir loads in both layouts."""
    from qwenjax.model_io import load_model, save_model
    from qwenjax.run_config import model_config
    from qwenjax.train.metrics import read_metrics

    model_cfg = model_config(tiny_config, vocab_size=tiny_data.vocab_size)
    save_model(tmp_path / "init", model_cfg, init_train_state(model_cfg, jax.random.key(0))["params"])
    common = ("train.steps=3", "train.log_every=1", "eval.batches=1", "checkpoint.every_steps=2",
              f"model.init_from={tmp_path / 'init'}")
    cache = tiny_config.data.cache_dir
    runs = {"loop": (), "scan": ("model.scan_layers=true", "train.remat=full")}
    for name, extra in runs.items():
        train(load_config(TINY, tiny_overrides(cache, tmp_path / name, *common, *extra)))
    losses = {n: [r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in runs}
    assert len(losses["loop"]) == 3
    np.testing.assert_allclose(losses["scan"], losses["loop"], rtol=1e-5)
    _, loop_params = load_model(tmp_path / "loop" / "model")
    for scan in (False, True):
        _, params = load_model(tmp_path / "scan" / "model", scan_layers=scan)
        assert qmodel.is_stacked(params) == scan
        for a, b in zip(jax.tree.leaves(qmodel.unstack_layers(params)), jax.tree.leaves(loop_params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam: tiny gradients move by noise x lr
