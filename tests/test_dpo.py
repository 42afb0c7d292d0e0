"""DPO (train.objective dpo, docs/post-training.md): the loss and its gradient against the papers' formulas
written out in numpy, pair validation (one line naming file:line, exit 2 through the CLI), the completion mask,
and a short configs/dpo-tiny.yaml run whose reward accuracy and margin rise."""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, TRAIN_SCRIPT, run_python

from qwenjax.errors import UserError

DPO_TINY = CONFIGS / "dpo-tiny.yaml"


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Synthetic pairs: the right sum is chosen, a wrong one rejected; some prompts as messages lists."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        q = f"What is {a} + {b}?"
        prompt = q if i % 3 else [{"role": "system", "content": "You add."}, {"role": "user", "content": q}]
        out.append({"prompt": prompt, "chosen": f"{a + b}", "rejected": f"{a + b + rng.randrange(1, 9)} maybe"})
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_pairs(400)))
    return f


def dpo_config(pairs_file, cache, run_dir, *extra):
    from qwenjax.run_config import load_config

    return load_config(DPO_TINY, [f"data.path={pairs_file}", f"data.cache_dir={cache}", f"run_dir={run_dir}",
                                  *extra])


# ---------------------------------------------------------------------------------------------------------
# The loss against the papers' formulas


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def paper_loss(pc, pr, rc, rr, beta, loss, eps=0.0):
    """Rafailov et al. (2023) eq. 7 with cDPO's label smoothing; Azar et al. (2023) eq. 17 (IPO), in float64."""
    z = (pc - rc) - (pr - rr)
    if loss == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)
    return (z - 1 / (2 * beta)) ** 2


def paper_grad(pc, pr, rc, rr, beta, loss, eps=0.0):
    """d loss / d (policy chosen, policy rejected), derived by hand: sigmoid' = sigma(-x), IPO: 2(z - 1/2beta)."""
    z = (pc - rc) - (pr - rr)
    if loss == "sigmoid":
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        dz = -beta * ((1 - eps) * sig(-beta * z) - eps * sig(beta * z))
    else:
        dz = 2 * (z - 1 / (2 * beta))
    return dz, -dz


@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("ipo", 0.1, 0.0),
                                           ("ipo", 1.0, 0.0)])
def test_loss_and_gradient_equal_the_paper(loss, beta, eps):
    from qwenjax.train.dpo import dpo_loss

    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-30, 8, 16) for _ in range(4))
    per_pair, reward_c, reward_r = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                                            beta, loss, eps)
    np.testing.assert_allclose(per_pair, paper_loss(pc, pr, rc, rr, beta, loss, eps), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(reward_c, beta * (pc - rc), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reward_r, beta * (pr - rr), rtol=1e-5, atol=1e-5)

    grad = jax.grad(lambda c, r: jnp.sum(dpo_loss(c, r, jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32),
                                                  beta, loss, eps)[0]), argnums=(0, 1))
    gc, gr = grad(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    want_c, want_r = paper_grad(pc, pr, rc, rr, beta, loss, eps)
    np.testing.assert_allclose(gc, want_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gr, want_r, rtol=1e-4, atol=1e-5)
    # and a central finite difference of the float64 formula (an independent check of the hand derivation)
    h = 1e-5
    fd = (paper_loss(pc + h, pr, rc, rr, beta, loss, eps) - paper_loss(pc - h, pr, rc, rr, beta, loss, eps)) / (2 * h)
    np.testing.assert_allclose(want_c, fd, rtol=1e-4, atol=1e-6)


def test_objective_sums_equal_the_formula_on_model_logps():
    """The objective on a tiny model: per-pair log-probs summed over the completion mask, then the formula."""
    from qwenjax import model as qmodel
    from qwenjax.config import ModelConfig
    from qwenjax.train.dpo import DPOLoss, completion_logps

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    params = qmodel.init_params(cfg, jax.random.key(0))
    ref = qmodel.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    B, T = 4, 12
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
        mask = np.zeros((B, T), np.float32)
        mask[:, 5:T - rng.integers(0, 3)] = 1
        batch.update({f"{side}_inputs": ids[:, :-1], f"{side}_targets": ids[:, 1:], f"{side}_mask": mask})
    obj = DPOLoss()
    hp = obj.make_hp(beta=0.3, label_smoothing=0.0)
    total, sums = obj.sums(params, ref, batch, hp, cfg)
    logp = {}
    for name, p in (("policy", params), ("ref", ref)):
        for side in ("chosen", "rejected"):
            lp, _ = completion_logps(p, batch[f"{side}_inputs"], batch[f"{side}_targets"], batch[f"{side}_mask"], cfg)
            logp[name, side] = np.asarray(lp, np.float64)
    # the masked sum by hand from the logits
    logits = np.asarray(qmodel.logits(cfg, params, batch["chosen_inputs"]), np.float64)
    top = logits.max(-1, keepdims=True)
    lsm = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    by_hand = (np.take_along_axis(lsm, batch["chosen_targets"][..., None], -1)[..., 0] * batch["chosen_mask"]).sum(-1)
    np.testing.assert_allclose(logp["policy", "chosen"], by_hand, rtol=1e-4)
    want = paper_loss(logp["policy", "chosen"], logp["policy", "rejected"], logp["ref", "chosen"],
                      logp["ref", "rejected"], 0.3, "sigmoid")
    np.testing.assert_allclose(float(total), want.sum(), rtol=1e-4)
    assert float(sums["count"]) == B
    margins = 0.3 * ((logp["policy", "chosen"] - logp["ref", "chosen"])
                     - (logp["policy", "rejected"] - logp["ref", "rejected"]))
    np.testing.assert_allclose(float(sums["reward_margin"]), margins.sum(), rtol=1e-4, atol=1e-4)
    assert float(sums["reward_accuracy"]) == float((margins > 0).sum())
    # the same params as reference: every reward is 0 and the loss is log 2 per pair
    total0, sums0 = obj.sums(params, params, batch, hp, cfg)
    np.testing.assert_allclose(float(total0), B * np.log(2), rtol=1e-5)
    assert float(sums0["reward_accuracy"]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Pairs: validation and masks


@pytest.mark.parametrize("record,message", [
    ({"prompt": "hi", "chosen": "a"}, 'no "rejected"'),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, '"chosen" is empty'),
    ({"prompt": "hi", "chosen": "a", "rejected": "  "}, '"rejected" is empty'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, '"prompt" is empty'),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, 'message 0 has no "content"'),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, '"chosen" must be a string'),
    ([1, 2], "expected an object"),
])
def test_bad_pairs_name_file_and_line(tmp_path, record, message):
    from qwenjax.data.pair_batches import read_pairs

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"{f}:3: .*{message}"):
        list(read_pairs([f]))


@pytest.fixture(scope="module")
def pair_data(pairs_file, qwenjax_cache, tmp_path_factory):
    from qwenjax.data.prepare import prepare_data

    cfg = dpo_config(pairs_file, qwenjax_cache, tmp_path_factory.mktemp("run"))
    return cfg, prepare_data(cfg)


def test_completion_mask_is_the_answer(pair_data):
    """The mask of each side covers exactly the answer's tokens and its <|im_end|>; the prompt is the ChatML user
    turn + the generation prompt, the same ids for both sides."""
    from qwenjax.data.chat import encode_chat
    from qwenjax.data.tokenizer import load_tokenizer

    cfg, data = pair_data
    pairs, tok = data.pairs, load_tokenizer(data.tokenizer_path)
    assert data.caches == [pairs] and pairs.num("heldout") > 0
    recs = arithmetic_pairs(400)
    for i in range(5):
        where = pairs.where("train", i)
        rec = recs[int(where.rsplit(":", 1)[1]) - 1]
        messages = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]
        prompt_ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            ids, mask = pairs.side("train", i, side)
            np.testing.assert_array_equal(ids[:len(prompt_ids)], prompt_ids)
            assert not mask[:len(prompt_ids)].any() and mask[len(prompt_ids):-1].all() and not mask[-1]  # "\n"
            assert tok.decode(ids[mask.astype(bool)].tolist()) == rec[side] + "<|im_end|>"
    batch = pairs.train_iterator(seq_len=cfg.train.seq_len, global_batch_size=4, seed=0).batch_at(0)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("inputs", "targets", "mask")}
    inside = batch["chosen_mask"][:, :-1] > 0  # within the sequence: the next input is this target
    np.testing.assert_array_equal(batch["chosen_inputs"][:, 1:][inside], batch["chosen_targets"][:, :-1][inside])


def test_too_long_pair_is_one_line(pair_data):
    cfg, data = pair_data
    with pytest.raises(UserError, match=r"pairs\.jsonl:\d+: prompt \+ chosen is \d+ tokens, more than train.seq_len"):
        data.pairs.check_lengths(8, truncate=False)
    with pytest.raises(UserError, match="the prompt alone fills train.seq_len"):
        data.pairs.check_lengths(8, truncate=True)
    data.pairs.check_lengths(cfg.train.seq_len, truncate=False)


def test_bad_pairs_via_cli_exit_2(run_cli, pairs_file, qwenjax_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = pairs_file.read_text().splitlines()[:20]
    lines[4] = json.dumps({"prompt": "hi", "chosen": "yes"})
    bad.write_text("\n".join(lines) + "\n")
    status, out, err = run_cli("train", DPO_TINY, f"data.path={bad}", f"data.cache_dir={qwenjax_cache}",
                               f"run_dir={tmp_path / 'run'}")
    assert status == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("qwenjax: error: ") and f"{bad}:5: no \"rejected\"" in lines[-1], err
    assert sum(x.startswith("qwenjax: error") for x in lines) == 1 and "Traceback" not in err
    status, _, err = run_cli("train", DPO_TINY, f"data.path={pairs_file}", "dpo.loss=ipoo", f"run_dir={tmp_path}")
    assert status == 2 and "dpo.loss must be one of sigmoid, ipo" in err and "did you mean" in err


# ---------------------------------------------------------------------------------------------------------
# End to end


def test_dpo_tiny_run_rewards_rise(pairs_file, qwenjax_cache, tmp_path):
    """configs/dpo-tiny.yaml: from the reference (rewards 0, loss log 2) the chosen answers' reward pulls ahead."""
    from qwenjax.train import train

    run = tmp_path / "dpo"
    summary = train(dpo_config(pairs_file, qwenjax_cache, run))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "ok" and len(rows) >= 4, rows
    first, last = rows[0], rows[-1]
    for key in ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"):
        assert key in last, last
    assert last["reward_margin"] > first["reward_margin"] + 0.5, rows
    assert last["reward_accuracy"] >= 0.9 and last["loss"] < 0.5 * np.log(2), rows
    assert np.isfinite(summary["eval_loss"])


def test_cached_reference_equals_the_step_reference(pairs_file, qwenjax_cache, tmp_path):
    """dpo.reference cached (log-probs computed once, stored beside the pair cache) trains like the reference
    run in every step: the same losses and rewards, step by step."""
    from qwenjax.train import train

    rows = {}
    for ref in ("step", "cached"):
        run = tmp_path / ref
        train(dpo_config(pairs_file, qwenjax_cache, run, "train.steps=10", f"dpo.reference={ref}", "seed=3"))
        rows[ref] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["step"]) == len(rows["cached"]) >= 2
    for a, b in zip(rows["step"], rows["cached"], strict=True):
        for key in ("loss", "reward_margin", "reward_chosen", "reward_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), (key, a, b)
    files = list(qwenjax_cache.rglob("ref-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns  # a second run reuses the file
    train(dpo_config(pairs_file, qwenjax_cache, tmp_path / "again", "train.steps=1", "dpo.reference=cached", "seed=3"))
    assert files[0].stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def stage1(pairs_file, qwenjax_cache, tmp_path_factory):
    from qwenjax.train import train

    run = tmp_path_factory.mktemp("stage1") / "run"
    train(dpo_config(pairs_file, qwenjax_cache, run, "train.steps=3"))
    return run


@pytest.mark.parametrize("reference", ["step", "cached"])
def test_dpo_from_init_from_resumes_exactly(pairs_file, qwenjax_cache, tmp_path, stage1, reference, caplog):
    """A DPO stage from model.init_from: its reference is that checkpoint (loss log 2 at step 1), and 3 steps
    + 3 resumed steps (the reference reloaded, the pair iterator restored) equal 6 steps straight."""
    import logging

    from qwenjax.train import train

    common = [f"model.init_from={stage1}", f"data.tokenizer={stage1 / 'model' / 'tokenizer.model'}",
              "train.log_every=1", f"dpo.reference={reference}", "optim.warmup_steps=0"]
    train(dpo_config(pairs_file, qwenjax_cache, tmp_path / "straight", "train.steps=6", *common))
    train(dpo_config(pairs_file, qwenjax_cache, tmp_path / "split", "train.steps=3", *common))
    with caplog.at_level(logging.INFO, logger="qwenjax"):
        train(dpo_config(pairs_file, qwenjax_cache, tmp_path / "split", "train.steps=6", *common))
    assert "from step 3" in caplog.text

    def rows(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    straight, split = rows("straight"), rows("split")
    assert straight[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert [r["loss"] for r in split] == [r["loss"] for r in straight] and len(straight) == 6
    assert [r["reward_margin"] for r in split] == [r["reward_margin"] for r in straight]


def test_dpo_population_is_refused(pairs_file, tmp_path):
    from qwenjax.train.loop import train_population

    cfg = dpo_config(pairs_file, tmp_path / "cache", tmp_path / "run")
    with pytest.raises(UserError, match="train.objective dpo is not supported in a population"):
        train_population([cfg, cfg.replace(**{"optim.lr": 2e-3})])


def test_dpo_on_two_data_parallel_devices_equals_one(pairs_file, qwenjax_cache, tmp_path):
    """mesh.data=2 with train.grad_accum=2 (pairs split over devices and micro-batches): the same losses and
    rewards as one device, one batch."""
    args = [f"data.path={pairs_file}", f"data.cache_dir={qwenjax_cache}", "train.steps=5", "train.log_every=1"]
    for name, devices, extra in (("one", 1, []), ("two", 2, ["mesh.data=2", "mesh.fsdp=1", "train.grad_accum=2"])):
        proc = run_python(TRAIN_SCRIPT, str(DPO_TINY), *args, f"run_dir={tmp_path / name}", *extra, devices=devices)
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    for a, b in zip(rows["one"], rows["two"], strict=True):
        for key in ("loss", "reward_margin", "reward_chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
