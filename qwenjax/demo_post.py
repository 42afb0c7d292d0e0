"""The post-training study on one machine: pre-train -> SFT -> pairs + DPO -> GRPO (two seeds) -> report.

`run_post_demo(out)` builds a synthetic arithmetic task ("12+35=" -> "47") and splits its problems three ways:
held out (never trained on), GRPO's own (`rl_pool`: prompts the earlier stages never saw, so GRPO is rewarded
for answering new problems, not for recalling memorised ones) and the rest, for pre-training, SFT and pairs. It
pre-trains a tiny model on plain text, fine-tunes it briefly on a ChatML version (`train.objective sft`; short,
so its answers are often a little off and GRPO has room), samples K answers per prompt from the SFT model and
pairs a right one with a wrong one by answer matching (`qwenjax.post.pairs`), trains DPO on those pairs, then
runs GRPO (`qwenjax.post.rl_loop`, 8 answers per prompt, the exact-answer verifier) from the DPO model with two
seeds. After each stage the model is scored on one fixed set of held-out problems (greedy decoding, exact final
number), and `out/report.md` shows the accuracies, GRPO's reward curves and a plain verdict: does GRPO's gain
exceed its seed-to-seed spread?

Every stage writes its result to disk before the next starts (data files, run directories with summary.json,
`<stage>/heldout.json`, pairs.jsonl), so a rerun reuses what is done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from qwenjax import model_io
from qwenjax.data.chat import encode_chat, heldout_hash, special_ids
from qwenjax.data.pair_batches import read_pairs
from qwenjax.data.tokenizer import load_tokenizer
from qwenjax.demo_post_report import write_report
from qwenjax.generate import generate
from qwenjax.jsonl import atomic_write_text
from qwenjax.post.pairs import answer_matches, build_pairs, read_prompts, write_pairs
from qwenjax.post.rl_loop import run_rl
from qwenjax.post.rollout import sample_group
from qwenjax.run_config import load_config
from qwenjax.train.loop import train

__all__ = ["PLANS", "SYSTEM", "PostPlan", "heldout_accuracy", "problems", "run_post_demo"]

SYSTEM = "Add."  # a short system turn: the default Qwen one would triple every prompt's length


@dataclasses.dataclass(frozen=True)
class PostPlan:
    """Sizes of the study. `full`: the measured plan of docs/post-training.md; `mini`: the test."""

    max_operand: int  # a, b drawn from [0, max_operand)
    heldout: int  # fixed held-out problems, never trained on
    hidden: int
    layers: int
    heads: int
    vocab_size: int
    pre_docs: int  # plain-text problems of pre-training
    pre_steps: int
    pre_batch: int
    pre_lr: float
    sft_convs: int
    sft_steps: int
    sft_lr: float
    pair_prompts: int
    pair_k: int  # answers sampled per prompt for the pairs
    dpo_steps: int
    dpo_lr: float
    rl_prompts: int
    rl_steps: int
    rl_prompts_per_step: int
    rl_lr: float
    rl_temperature: float = 1.0  # rollout sampling temperature
    batch_size: int = 16
    group_size: int = 8
    seeds: tuple[int, ...] = (0, 1)
    rl_pool: int = 0  # problems kept for GRPO's prompts only (never pre-trained, SFT'd or paired); 0: none


PLANS = {
    "full": PostPlan(max_operand=40, heldout=400, hidden=128, layers=2, heads=4, vocab_size=340, pre_docs=20000,
                     pre_steps=1000, pre_batch=32, pre_lr=3e-3, sft_convs=4000, sft_steps=50, sft_lr=1e-3,
                     pair_prompts=128, pair_k=8, dpo_steps=30, dpo_lr=1e-5, rl_prompts=512, rl_steps=300,
                     rl_prompts_per_step=8, rl_lr=1e-4, rl_temperature=1.0, rl_pool=400),
    "mini": PostPlan(max_operand=5, heldout=5, hidden=32, layers=1, heads=2, vocab_size=340, pre_docs=400,
                     pre_steps=20, pre_batch=8, pre_lr=3e-3, sft_convs=100, sft_steps=20, sft_lr=3e-3,
                     pair_prompts=24, pair_k=4, dpo_steps=2, dpo_lr=1e-4, rl_prompts=16, rl_steps=2,
                     rl_prompts_per_step=2, rl_lr=1e-4, batch_size=8, group_size=4, rl_pool=5),
}
SEQ_LEN = 48  # a ChatML prompt of this task is about 30 tokens, its answer at most 4 with <|im_end|>
MAX_NEW = 6


def _say(stage: int, text: str) -> None:
    print(f"[{stage}/7] {text}", file=sys.stderr, flush=True)


def problems(plan: PostPlan) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """(training problems, GRPO's own problems, held-out problems): a fixed seeded split of every (a, b) pair."""
    allp = [(a, b) for a in range(plan.max_operand) for b in range(plan.max_operand)]
    random.Random(1234).shuffle(allp)
    cut = plan.heldout + plan.rl_pool
    return allp[cut:], allp[plan.heldout:cut], allp[:plan.heldout]


def _messages(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{a}+{b}="}]


_FORMS = ("{a}+{b}={c}", "{a} plus {b} is {c}.", "The sum of {a} and {b} is {c}.", "What is {a} plus {b}? It is {c}.",
          "Adding {a} to {b} gives {c}.", "If you add {a} and {b}, you get {c}.", "Question: {a}+{b}. Answer: {c}",
          "The system says the user asked for {a}+{b}; the assistant answered {c}.", "Total of {a} and {b}: {c}")


def _plain_doc(a: int, b: int, rng: random.Random) -> str:
    """A pre-training document: mostly `a+b=c`, a fifth in words (which give the tokenizer its pieces)."""
    return (_FORMS[0] if rng.random() < 0.8 else rng.choice(_FORMS[1:])).format(a=a, b=b, c=a + b)


def _write_jsonl(path: Path, records) -> Path:
    if not path.is_file():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_data(out: Path, plan: PostPlan) -> dict[str, Path]:
    """The task's files, written once: pre-training text, SFT chats, prompts for pairs / GRPO, held-out prompts."""
    train_p, rl_p, held = problems(plan)
    rng = random.Random(0)
    draw = lambda n, pool=train_p: [pool[rng.randrange(len(pool))] for _ in range(n)]  # noqa: E731
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    prompt = lambda a, b: {"prompt": _messages(a, b), "answer": a + b}  # noqa: E731
    return {
        "pretrain": _write_jsonl(data / "pretrain.jsonl", ({"text": _plain_doc(a, b, rng)} for a, b in
                                                           draw(plan.pre_docs))),
        "sft": _write_jsonl(data / "sft.jsonl", ({"messages": _messages(a, b) + [
            {"role": "assistant", "content": str(a + b)}]} for a, b in draw(plan.sft_convs))),
        "pair_prompts": _write_jsonl(data / "pair_prompts.jsonl", (prompt(a, b) for a, b in draw(plan.pair_prompts))),
        "rl_prompts": _write_jsonl(data / "rl_prompts.jsonl", (prompt(a, b) for a, b in
                                                              draw(plan.rl_prompts, rl_p or train_p))),
        "heldout": _write_jsonl(data / "heldout.jsonl", (prompt(a, b) for a, b in held)),
    }


def _base(out: Path, plan: PostPlan) -> dict[str, Any]:
    """Dotted keys every stage shares: the model shape, the sequence length, no checkpoints, a quiet eval."""
    return {"model.hidden_size": plan.hidden, "model.intermediate_size": 3 * plan.hidden,
            "model.num_hidden_layers": plan.layers, "model.num_attention_heads": plan.heads,
            "model.num_key_value_heads": max(1, plan.heads // 2), "model.max_position_embeddings": 256,
            "model.rope_theta": 10000.0, "model.tie_word_embeddings": True, "model.dtype": "float32",
            "train.seq_len": SEQ_LEN, "train.batch_size": plan.batch_size, "train.log_every": 10,
            "optim.warmup_steps": 0, "optim.weight_decay": 0.0, "optim.clip_norm": 1.0,
            "checkpoint.every_steps": 0, "checkpoint.keep": 1, "data.cache_dir": str(out / "cache"),
            "data.heldout_fraction": 0.05, "eval.every_steps": 0, "eval.batches": 1}


def _cfg(out: Path, name: str, overrides: dict[str, Any]):
    """Load (and save beside the run, for the reader) a stage's run config."""
    cfg = load_config(None, {**overrides, "run_dir": str(out / name)})
    atomic_write_text(out / f"{name}.yaml", yaml.safe_dump(overrides, sort_keys=True))
    return cfg


def heldout_accuracy(model_dir: Path, prompts: list[tuple[str, dict]], *, chat: bool = True) -> dict[str, Any]:
    """Greedy answers to the held-out prompts and the share whose final number is the right sum. `chat`: the
    ChatML prompt, stopping at <|im_end|>; else the plain text "a+b=" of pre-training, stopping at eos."""
    config, params = model_io.load_model(model_dir)
    tok = load_tokenizer(model_dir)
    stop = special_ids(tok)["<|im_end|>"] if chat else tok.eos_id
    right, examples = 0, []
    for _, rec in prompts:
        ids = (encode_chat(tok, rec["messages"], add_generation_prompt=True)[0].tolist() if chat
               else tok.encode(rec["messages"][-1]["content"]))
        out = generate(config, params, ids, max_new_tokens=MAX_NEW, temperature=0.0, eos_id=stop)
        text = tok.decode([t for t in out if t != stop and t < tok.vocab_size])
        ok = answer_matches(text, rec["answer"])
        right += ok
        if len(examples) < 6:
            examples.append({"prompt": rec["messages"][-1]["content"], "answer": text, "correct": bool(ok)})
    return {"accuracy": right / len(prompts), "correct": right, "n": len(prompts), "examples": examples}


def _evaluated(stage_dir: Path, prompts, *, chat: bool = True, name: str = "heldout.json") -> dict[str, Any]:
    """The stage's held-out accuracy, computed once (stage_dir/name)."""
    path = stage_dir / name
    if not path.is_file():
        atomic_write_text(path, json.dumps(heldout_accuracy(stage_dir / "model", prompts, chat=chat), indent=2))
    return json.loads(path.read_text())


def _pairs(out: Path, sft_dir: Path, prompts_file: Path, plan: PostPlan) -> dict[str, Any]:
    """Stage 4: K answers per prompt from the SFT model (one batched decode each), labelled by the final number;
    pairs.jsonl and pairs-counts.json written once."""
    counts_path = out / "pairs-counts.json"
    if counts_path.is_file():
        return json.loads(counts_path.read_text())
    config, params = model_io.load_model(sft_dir / "model")
    tok = load_tokenizer(sft_dir / "model")
    im_end = special_ids(tok)["<|im_end|>"]
    calls = [0]

    def sampler(messages, k):
        calls[0] += 1
        ids = encode_chat(tok, messages, add_generation_prompt=True)[0].tolist()
        rows = sample_group(config, params, ids, k, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0,
                            eos_id=im_end, rng=jax.random.key(calls[0]))
        return [tok.decode([t for t in a if t != im_end and t < tok.vocab_size]) for a, _ in rows]

    pairs, counts = build_pairs(list(read_prompts(prompts_file)), sampler, plan.pair_k)
    write_pairs(pairs, out / "pairs.jsonl")
    atomic_write_text(counts_path, json.dumps(counts, indent=2))
    return counts


def dpo_heldout_fraction(pairs_file: Path, share: float = 0.25) -> float:
    """`data.heldout_fraction` for the DPO stage: `share`, raised just enough to hold out at least one pair
    when none of the file's lines hashes below it (few pairs, as in the mini plan), so its eval_loss exists."""
    hashes = sorted(heldout_hash(line) for _, line, *_ in read_pairs([pairs_file]))  # the cache's own lines
    if len(hashes) < 2 or hashes[0] < share:
        return share
    return math.nextafter(hashes[0], 1.0)  # holds out the lowest-hashing line(s) only


def run_post_demo(out: str | Path = "runs/post-demo", *, plan: str | PostPlan = "full") -> dict[str, Any]:
    """Run (or resume) the study into `out`; returns what the report shows."""
    plan = PLANS[plan] if isinstance(plan, str) else plan
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}
    files = _write_data(out, plan)
    held = list(read_prompts(files["heldout"]))
    base = _base(out, plan)
    _say(1, f"task: a+b with a, b < {plan.max_operand}; {plan.heldout} held-out problems, {plan.rl_pool} for GRPO; "
            f"{plan.pre_docs} pre-training documents, {plan.sft_convs} SFT conversations")

    t0 = time.perf_counter()
    pre = out / "pretrain"
    train(_cfg(out, "pretrain", {**base, "data.path": str(files["pretrain"]), "data.format": "text",
                                 "data.vocab_size": plan.vocab_size, "train.steps": plan.pre_steps,
                                 "train.batch_size": plan.pre_batch,
                                 "optim.lr": plan.pre_lr, "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1}))
    acc = {"pretrained (plain a+b=)": _evaluated(pre, held, chat=False)}
    acc["pretrained"] = _evaluated(pre, held, name="heldout-chat.json")  # ChatML, which it never saw
    stage_s["pretrain"] = time.perf_counter() - t0
    _say(2, f"pre-training: held-out accuracy {acc['pretrained (plain a+b=)']['accuracy']:.3f} in its own format, "
            f"{acc['pretrained']['accuracy']:.3f} in ChatML")

    t0 = time.perf_counter()
    tok = str(pre / "model" / "tokenizer.model")
    sft = out / "sft"
    train(_cfg(out, "sft", {**base, "train.objective": "sft", "data.path": str(files["sft"]), "data.format": "chat",
                            "data.tokenizer": tok, "model.init_from": str(pre), "train.steps": plan.sft_steps,
                            "optim.lr": plan.sft_lr, "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1}))
    acc["SFT"] = _evaluated(sft, held)
    stage_s["sft"] = time.perf_counter() - t0
    _say(3, f"SFT: held-out accuracy {acc['SFT']['accuracy']:.3f}")

    t0 = time.perf_counter()
    counts = _pairs(out, sft, files["pair_prompts"], plan)
    stage_s["pairs"] = time.perf_counter() - t0
    _say(4, f"pairs: {counts['pairs']} from {counts['prompts']} prompts x {plan.pair_k} answers "
            f"({counts['correct']} of {counts['answers']} answers right)")

    t0 = time.perf_counter()
    dpo = out / "dpo"
    if counts["pairs"]:
        train(_cfg(out, "dpo", {**base, "train.objective": "dpo", "data.path": str(out / "pairs.jsonl"),
                                "data.tokenizer": tok, "model.init_from": str(sft), "train.steps": plan.dpo_steps,
                                "optim.lr": plan.dpo_lr, "optim.schedule": "constant", "dpo.beta": 0.1,
                                "data.heldout_fraction": dpo_heldout_fraction(out / "pairs.jsonl")}))
        acc["DPO"] = _evaluated(dpo, held)
    start = dpo if counts["pairs"] else sft
    stage_s["dpo"] = time.perf_counter() - t0
    _say(5, f"DPO: held-out accuracy {acc['DPO']['accuracy']:.3f}" if "DPO" in acc else "DPO: no pairs, skipped")

    grpo = {}
    for seed in plan.seeds:
        t0 = time.perf_counter()
        name = f"grpo-seed{seed}"
        run_rl(_cfg(out, name, {**base, "model.init_from": str(start), "data.tokenizer": tok, "seed": seed,
                                "rl.prompts": str(files["rl_prompts"]), "rl.verifier": "answer",
                                "rl.group_size": plan.group_size, "rl.prompts_per_step": plan.rl_prompts_per_step,
                                "rl.max_new_tokens": MAX_NEW, "rl.temperature": plan.rl_temperature,
                                "train.steps": plan.rl_steps,
                                "optim.lr": plan.rl_lr, "optim.schedule": "constant"}))
        grpo[seed] = _evaluated(out / name, held)
        stage_s[name] = time.perf_counter() - t0
        _say(6, f"GRPO seed {seed}: held-out accuracy {grpo[seed]['accuracy']:.3f}")

    report = write_report(out, plan=dataclasses.asdict(plan), accuracy=acc, grpo=grpo, pairs=counts,
                          start_stage="DPO" if counts["pairs"] else "SFT", stage_s=stage_s,
                          wall_s=time.perf_counter() - t_start)
    _say(7, f"report: {report['path']}")
    return report

