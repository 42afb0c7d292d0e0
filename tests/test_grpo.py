"""GRPO (qwenjax.post.grpo, rl_loop, rollout): group advantages, the clipped objective with the k3 KL against
numpy written out here, its parameter gradient through the trainer's accumulation against a jnp
re-implementation, the batched sampler's recorded log-probs against a forward pass, and `qwenjax rl` on a tiny
model (metrics written and finite; group_size 1 is one error line)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig
from qwenjax.post.grpo import GRPO, group_advantages, token_terms
from qwenjax.post.rollout import sample_group
from qwenjax.train.objectives import mean_metrics

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, dtype="float32")
CLIP, BETA = 0.2, 0.04


def test_group_advantages_by_hand():
    r = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 2.0, 0.5]]
    a = group_advantages(r)
    for row, want_row in zip(r, a, strict=True):
        m = sum(row) / 4
        s = math.sqrt(sum((x - m) ** 2 for x in row) / 4)
        assert np.allclose([(x - m) / (s + 1e-4) for x in row], want_row, atol=1e-6)
    assert np.all(a[1] == 0)


def _numpy_loss_and_grad(logp, old, ref, adv, mask):
    """The objective in float64 and its derivative with respect to logp, derived by hand."""
    logp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
    r = np.exp(logp - old)
    unclipped, clipped = r * adv, np.clip(r, 1 - CLIP, 1 + CLIP) * adv
    take_unclipped = unclipped <= clipped
    d = ref - logp
    per_token = -np.minimum(unclipped, clipped) + BETA * (np.exp(d) - d - 1)
    n = mask.sum()
    # d/dlogp: -r A where the unclipped term is the min (the clipped one is constant outside the band);
    # the KL: d/dlogp (e^d - d - 1) = -e^d + 1
    g = (np.where(take_unclipped, -r * adv, 0.0) + BETA * (1 - np.exp(d))) * mask / n
    return (per_token * mask).sum() / n, g, (np.abs(r - 1) > CLIP)[mask > 0].mean()


def test_token_objective_and_its_gradient_match_numpy():
    rng = np.random.default_rng(0)
    B, T = 6, 10
    logp = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios on both sides of the clip band
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    adv = np.repeat(rng.normal(0, 1, (B, 1)), T, axis=1).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float32)

    def mean_loss(lp):
        loss, _, _ = token_terms(lp, old, ref, adv, mask, CLIP, BETA)
        return jnp.sum(loss) / jnp.sum(mask)

    want, want_g, want_clip = _numpy_loss_and_grad(logp, old, ref, adv, mask)
    got, got_g = jax.value_and_grad(mean_loss)(jnp.asarray(logp))
    _, _, clipped = token_terms(logp, old, ref, adv, mask, CLIP, BETA)
    assert abs(float(got) - want) < 1e-5 * max(1, abs(want))
    np.testing.assert_allclose(np.asarray(got_g), want_g, rtol=1e-4, atol=1e-7)
    assert 0 < want_clip < 1 and abs(float(jnp.sum(clipped) / mask.sum()) - want_clip) < 1e-6


def _fixed_batch(params, T=16, B=4):
    """A fixed rollout batch: prompt tokens then 'sampled' tokens, old log-probs off the policy, rewards."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    prompt = 5
    mask = np.zeros((B, T), np.float32)
    lengths = [T, T - 3, 8, 11]
    for i, n in enumerate(lengths):
        mask[i, prompt - 1:n] = 1.0
    adv = np.repeat(group_advantages([[1.0, 0.0, 0.0, 1.0]]).reshape(B, 1), T, axis=1)
    logp = _jnp_logps(params, ids[:, :-1], ids[:, 1:])
    old = np.asarray(logp) + rng.normal(0, 0.2, (B, T)).astype(np.float32)
    ref = np.asarray(logp) + rng.normal(0, 0.3, (B, T)).astype(np.float32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask, "old_logp": old.astype(np.float32),
            "ref_logp": ref.astype(np.float32), "advantage": adv}


def _jnp_logps(params, inputs, targets):
    logits = qmodel.logits(CFG, params, jnp.asarray(inputs)).astype(jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets)[..., None], -1)[..., 0]


def _jnp_reference(params, b):
    """The GRPO loss written again, from logits: mean over response tokens."""
    logp = _jnp_logps(params, b["inputs"], b["targets"])
    ratio = jnp.exp(logp - b["old_logp"])
    a = b["advantage"]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - CLIP, 1 + CLIP) * a)
    kl = jnp.exp(b["ref_logp"] - logp) - (b["ref_logp"] - logp) - 1
    return jnp.sum((-surrogate + BETA * kl) * b["mask"]) / jnp.sum(b["mask"])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_grpo_step_gradient_equals_a_jnp_reference(grad_accum):
    params = qmodel.init_params(CFG, jax.random.key(0))
    b = _fixed_batch(params)
    hp = GRPO.make_hp(clip_eps=CLIP, kl_beta=BETA)
    step = jax.jit(lambda p, batch: mean_metrics(p, batch, hp, model_cfg=CFG, grad_accum=grad_accum,
                                                 objective=GRPO, ref_params=None))
    grads, metrics = step(params, {k: jnp.asarray(v) for k, v in b.items()})
    want_loss, want_grads = jax.jit(jax.value_and_grad(_jnp_reference))(params, b)
    assert abs(float(metrics["loss"]) - float(want_loss)) < 1e-5
    assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["kl"]) > 0
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-3, atol=2e-6)


def test_batched_sampler_records_the_policy_log_probs():
    params = qmodel.init_params(CFG, jax.random.key(0))
    prompt = [3, 7, 9, 11, 2]
    out = sample_group(CFG, params, prompt, 4, max_new_tokens=6, temperature=1.0, top_p=1.0, eos_id=1,
                       rng=jax.random.key(3))
    assert len(out) == 4 and len({tuple(a) for a, _ in out}) > 1  # the rows sample on their own keys
    ids = np.zeros((4, len(prompt) + 6), np.int32)  # one padded forward pass over the four answers
    for i, (answer, _) in enumerate(out):
        ids[i, :len(prompt) + len(answer)] = prompt + answer
    want = np.asarray(jax.jit(_jnp_logps)(params, ids[:, :-1], ids[:, 1:]))
    for i, (answer, logps) in enumerate(out):
        np.testing.assert_allclose(logps, want[i, len(prompt) - 1:len(prompt) - 1 + len(answer)], atol=1e-4)


def test_rl_cli_on_a_tiny_model(run_cli, tiny_tokenizer_path, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+1?", "answer": a + 1}) + "\n" for a in range(3)))
    run = tmp_path / "run"
    shape = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
             "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.max_position_embeddings=256",
             "model.dtype=float32"]
    status, stdout, err = run_cli("rl", *shape, f"data.tokenizer={tiny_tokenizer_path}", f"rl.prompts={prompts}",
                                  "rl.group_size=4", "rl.prompts_per_step=2", "rl.max_new_tokens=6",
                                  "train.seq_len=128", "train.steps=2", f"run_dir={run}")
    assert status == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["steps_completed"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for k in ("loss", "kl", "clip_fraction", "reward_mean", "reward_std", "accuracy", "response_len"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
    assert (run / "model").is_dir()
    status, _, err = run_cli("rl", "rl.group_size=1", f"rl.prompts={prompts}")
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == 2 and len(lines) == 1 and "rl.group_size" in lines[0], err


def test_reward_model_verifier_scores_the_last_answer_token(tmp_path):
    from qwenjax import model_io
    from qwenjax.post.rl_verify import make_verifier
    from qwenjax.run_sections import RLSection
    from qwenjax.train.reward import hf_rewards

    rm_cfg = CFG.replace(num_labels=1)
    rm_params = qmodel.init_params(rm_cfg, jax.random.key(5))
    model_io.save_model(tmp_path / "rm", rm_cfg, rm_params)
    verify = make_verifier(RLSection(verifier="reward_model", reward_model=str(tmp_path / "rm")), CFG.vocab_size)
    prompt, answers = [3, 7, 9], [[4, 5, 1], [6, 1], [8, 8, 8, 8, 1]]
    rewards, correct = verify({"answer": "17"}, ["17", "1", "no"], [(prompt, a) for a in answers])
    for r, a in zip(rewards, answers, strict=True):
        want = float(hf_rewards(rm_params, np.asarray([prompt + a]), rm_cfg, pad_token_id=0)[0])
        assert abs(r - want) < 1e-4
    assert correct == [True, False, False]


def test_curriculum_puts_high_variance_first_and_rl_tiny_loads():
    from conftest import CONFIGS

    from qwenjax.post.rl_loop import curriculum_order
    from qwenjax.run_config import load_config

    assert curriculum_order(5, {0: 0.0, 1: 0.25, 2: 0.1, 3: 0.25, 4: 0.0}) == [1, 3, 2, 0, 4]
    assert curriculum_order(3, {1: 0.2}) == [0, 2, 1]  # not yet measured: first, in file order
    cfg = load_config(CONFIGS / "rl-tiny.yaml", ["rl.prompts=p.jsonl"])
    assert (cfg.rl.group_size, cfg.rl.prompts_per_step, cfg.train.steps) == (16, 4, 60)


def test_rl_resumes_after_a_crash_as_if_never_stopped(tiny_tokenizer_path, tmp_path, monkeypatch):
    """Rounds 1-3 run, a checkpoint at round 2, a crash in round 4; the rerun resumes from round 2 (the
    curriculum's place and variances with it), redoes round 3, and ends where a run never stopped ends."""
    from conftest import CONFIGS

    from qwenjax import model_io
    from qwenjax.errors import UserError
    from qwenjax.post import rl_loop
    from qwenjax.run_config import load_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+1?", "answer": a + 1}) + "\n" for a in range(3)))

    def cfg(run, *more):
        return load_config(CONFIGS / "rl-tiny.yaml", [*more,
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.max_position_embeddings=256",
            "model.dtype=auto", f"data.tokenizer={tiny_tokenizer_path}", f"rl.prompts={prompts}",
            "rl.group_size=4", "rl.prompts_per_step=2", "rl.max_new_tokens=6", "train.seq_len=128",
            "train.steps=4", "checkpoint.every_steps=2", f"run_dir={run}"])  # dtype resolved as saved

    straight = rl_loop.run_rl(cfg(tmp_path / "straight"))
    real, calls = rl_loop.sample_group, []

    def killed_in_round_4(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3 * 2:  # 2 prompts per round
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(rl_loop, "sample_group", killed_in_round_4)
    with pytest.raises(RuntimeError, match="killed"):
        rl_loop.run_rl(cfg(tmp_path / "stopped"))
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    monkeypatch.setattr(rl_loop, "sample_group", real)
    resumed = rl_loop.run_rl(cfg(tmp_path / "stopped"))
    assert resumed["steps_completed"] == straight["steps_completed"] == 4

    def rounds(run):
        untimed = ("sample_s", "step_s")
        return [{k: v for k, v in json.loads(line).items() if k not in untimed}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert rounds("stopped") == rounds("straight")
    assert rl_loop.run_rl(cfg(tmp_path / "stopped")) == resumed  # finished: a rerun returns its summary
    with pytest.raises(UserError, match="finished rl run with other settings"):
        rl_loop.run_rl(cfg(tmp_path / "stopped", "rl.temperature=0.5"))
    _, want = model_io.load_model(tmp_path / "straight" / "model")
    _, got = model_io.load_model(tmp_path / "stopped" / "model")
    jax.tree.map(np.testing.assert_array_equal, got, want)
