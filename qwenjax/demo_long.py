"""The long-context study on one machine: train short, then judge four ways to read 4x further.

`run_long_demo(out)` trains a tokenizer and a tiny model at `seq_len` tokens on synthetic passkey documents
(filler sentences with " The pass key is NNNNN. Remember it." at a random depth and the question with its
answer at the end, built from `qwenjax.evals.passkey`'s own pieces, so the model learns to retrieve within
its trained length), then evaluates, at 1x, 2x and 4x that length, passkey accuracy (length x depth) and
loss by position for:

- `base`: the model unchanged (the baseline);
- `abf`: a second stage through the staged-training machinery (`stages:`, `model.init_from` = the base run):
  a few steps at 4x the length on documents up to 4x long with `rope_theta` raised (Qwen2.5's ABF);
- `yarn`: the base weights with `model.rope_scaling = {rope_type: yarn, factor: 4}`, no training;
- `dca`: the base weights with `model.dual_chunk_attention_config`, chunk_size = the trained length, no training.

Every stage writes its result to disk before the next starts (tokenizer, corpora, run directories, one JSON
per method's evals), so a rerun reuses what is done. `qwenjax demo --long` runs it; `make long-demo` too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qwenjax.data.tokenizer import load_tokenizer, train_tokenizer
from qwenjax.demo_long_report import write_long_report
from qwenjax.errors import UserError
from qwenjax.evals.checkpoint import load_for_eval
from qwenjax.evals.passkey import FILLER, HEAD, KEY_SENTENCE, QUESTION, model_decoder, run_passkey
from qwenjax.evals.ppl_position import model_losses, run_ppl_by_position
from qwenjax.jsonl import atomic_write_text
from qwenjax.run_config import load_config
from qwenjax.train import train

__all__ = ["METHODS", "PLANS", "LongPlan", "make_document", "make_drill", "method_overrides", "run_long_demo"]

#: the four ways to read past the trained length, in report order
METHODS = ("base", "abf", "yarn", "dca")
#: the eval's filler sentences (its fixed order is half of the training documents) and some more for variety
EVAL_SENTENCES = tuple(" " + s.strip() + "." for s in FILLER.split(".") if s.strip())
EXTRA_SENTENCES = (" The river is wide.", " Birds sing in the morning.", " The road is long.",
                   " Snow falls in winter.", " The cat sleeps on the mat.", " Rain falls on the hills.",
                   " The tea is warm.", " Leaves turn red in autumn.", " The night is quiet.",
                   " A ship sails on the sea.")


@dataclasses.dataclass(frozen=True)
class LongPlan:
    """Sizes of the study. `full` aims at under 20 minutes on 2 idle CPU cores; `mini` is the test's."""

    seq_len: int  # the trained length (1x)
    factor: int  # how far to read: factor x seq_len (YaRN's factor too)
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    steps: int  # base run
    batch_size: int
    lr: float
    abf_steps: int  # the second (ABF) stage at factor x seq_len
    abf_batch_size: int
    abf_lr: float
    abf_theta: float  # rope_theta of the ABF stage (the base trains at 1e4)
    dca_local_size: int
    depths: tuple[float, ...]
    trials: int
    ppl_sequences: int
    eval_batch: int
    multiples: tuple[int, ...] = (1, 2, 4)  # passkey lengths, in units of seq_len
    fixed_filler: float = 0.5  # share of training documents whose filler is the eval's, in its order
    short_docs: float = 0.0  # share of training documents drawn up to seq_len / 2 tokens (more keys per token)
    # share of training documents that are copy drills (`make_drill`: a short random span of words and numbers
    # four times over). A passkey document has 5 copy targets in ~150 tokens, too few for the copying circuit
    # (induction heads) to form in this budget: without drills the base never retrieved (docs/long-context.md)
    drill: float = 0.0


PLANS = {
    "full": LongPlan(seq_len=256, factor=4, hidden_size=128, intermediate_size=384, layers=2, heads=4, kv_heads=2,
                     vocab_size=512, steps=1200, batch_size=16, lr=3e-3, abf_steps=40, abf_batch_size=4,
                     abf_lr=1e-3, abf_theta=1e6, dca_local_size=32, depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=8,
                     ppl_sequences=8, eval_batch=8, drill=0.5),
    "mini": LongPlan(seq_len=128, factor=4, hidden_size=32, intermediate_size=64, layers=2, heads=2, kv_heads=1,
                     vocab_size=512, steps=6, batch_size=4, lr=3e-3, abf_steps=2, abf_batch_size=2, abf_lr=1e-3,
                     abf_theta=1e6, dca_local_size=16, depths=(0.0, 1.0), trials=2, ppl_sequences=2,
                     eval_batch=4, multiples=(1, 4), drill=0.5),
}
BASE_THETA = 10000.0
TRAIN_SEED, EVAL_SEED = 0, 1234


def _say(stage: int, text: str) -> None:
    print(f"[{stage}/6] {text}", file=sys.stderr, flush=True)


def _filler(rng: np.random.Generator, n_sentences: int, fixed: float = 0.5) -> list[str]:
    """A share `fixed` of the documents: the eval's filler sentences in their order from a random start; the
    others: a random draw from all sentences."""
    if rng.random() < fixed:
        start = int(rng.integers(len(EVAL_SENTENCES)))
        return [EVAL_SENTENCES[(start + i) % len(EVAL_SENTENCES)] for i in range(n_sentences)]
    pool = EVAL_SENTENCES + EXTRA_SENTENCES
    return [pool[i] for i in rng.integers(len(pool), size=n_sentences)]


def make_document(rng: np.random.Generator, filler_tokens: int, sentence_tokens: float, fixed: float = 0.5) -> str:
    """One training document: HEAD, filler with the key sentence at a random depth, the question and its
    answer; about `filler_tokens` tokens of filler (sentences of `sentence_tokens` tokens on average)."""
    key = str(int(rng.integers(10_000, 100_000)))
    sentences = _filler(rng, max(0, round(filler_tokens / sentence_tokens)), fixed)
    cut = int(rng.integers(len(sentences) + 1))
    return (HEAD + "".join(sentences[:cut]) + KEY_SENTENCE.format(key=key) + "".join(sentences[cut:])
            + QUESTION + f" {key}.")


DRILL_WORD_SHARE = 0.8  # a drill item is a word this often, else a 5-digit number like the keys
DRILL_ITEMS = (4, 13)  # items per span: [low, high)
DRILL_REPEATS = 4  # 2 repeats with filler between: no copying in 12M tokens; 4 back to back: in under 1M
#: the words of the filler sentences: a drill's span draws from them and from numbers like the keys
DRILL_WORDS = tuple(sorted({" " + w.strip(".?") for s in (HEAD, QUESTION, *EVAL_SENTENCES, *EXTRA_SENTENCES)
                            for w in s.split()}))


def make_drill(rng: np.random.Generator) -> str:
    """One copy drill: a span of 4 to 12 random items (a filler word or a 5-digit number) `DRILL_REPEATS`
    times: every token after the first span is a copy target, found by matching the tokens before it, as
    the key's digits are when the question asks for them."""
    items = [DRILL_WORDS[rng.integers(len(DRILL_WORDS))] if rng.random() < DRILL_WORD_SHARE else
             f" {int(rng.integers(10_000, 100_000))}" for _ in range(int(rng.integers(*DRILL_ITEMS)))]
    return "".join(items) * DRILL_REPEATS + "."


def _write_corpus(path: Path, rng: np.random.Generator, n_docs: int, max_tokens: int, fixed_tokens: int,
                  sentence_tokens: float, plan: LongPlan) -> Path:
    """`n_docs` documents: a share `plan.drill` of copy drills, the others passkey documents of uniformly drawn
    lengths up to `max_tokens`, a share `plan.short_docs` of them up to half that (JSONL, one `text` per line)."""
    if not path.is_file():
        top = lambda: int(0.95 * max_tokens) // (2 if rng.random() < plan.short_docs else 1)
        def doc() -> str:
            if plan.drill > 0 and rng.random() < plan.drill:  # no draw without drills: the same corpus as before
                return make_drill(rng)
            return make_document(rng, int(rng.integers(0, max(1, top() - fixed_tokens))), sentence_tokens,
                                 plan.fixed_filler)
        lines = [json.dumps({"text": doc()}) for _ in range(n_docs)]
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _tokenizer(out: Path, plan: LongPlan) -> Path:
    """Stage 1: a sentencepiece tokenizer trained on a sample of the synthetic documents (digits split)."""
    path = out / "tokenizer" / "long.model"
    if not path.is_file():
        sample = out / "tokenizer" / "sample.txt"
        sample.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(TRAIN_SEED + 7)
        atomic_write_text(sample, "\n".join(make_document(rng, int(rng.integers(0, 400)), 4.0)
                                            for _ in range(400)) + "\n")
        train_tokenizer([sample], path.with_suffix(""), plan.vocab_size)
    return path


def _run_config(out: Path, plan: LongPlan, tok: Path, corpus: Path, name: str, extra: dict) -> Any:
    tree = {
        "model": {"hidden_size": plan.hidden_size, "intermediate_size": plan.intermediate_size,
                  "num_hidden_layers": plan.layers, "num_attention_heads": plan.heads,
                  "num_key_value_heads": plan.kv_heads, "max_position_embeddings": plan.seq_len,
                  "rope_theta": BASE_THETA, "tie_word_embeddings": True, "dtype": "float32"},
        "train": {"steps": plan.steps, "batch_size": plan.batch_size, "seq_len": plan.seq_len, "log_every": 50},
        "optim": {"lr": plan.lr, "schedule": "cosine", "warmup_steps": max(1, plan.steps // 20)},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "data": {"path": str(corpus), "tokenizer": str(tok), "cache_dir": str(out / "cache"),
                 "heldout_fraction": 0.05},
        "eval": {"every_steps": 0, "batches": 1},
        "run_dir": str(out / name),
    }
    for dotted, value in extra.items():
        section, key = dotted.split(".", 1) if "." in dotted else (dotted, None)
        if key is None:
            tree[section] = value
        else:
            tree.setdefault(section, {})[key] = value
    path = out / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
    return load_config(path)


def method_overrides(method: str, plan: LongPlan) -> dict[str, Any]:
    """The eval-time `model.*` overrides of each training-free method (none for base and abf)."""
    if method == "yarn":
        return {"model.rope_scaling": {"rope_type": "yarn", "factor": float(plan.factor),
                                       "original_max_position_embeddings": plan.seq_len}}
    if method == "dca":
        return {"model.dual_chunk_attention_config": {"chunk_size": plan.seq_len, "local_size": plan.dca_local_size}}
    return {}


def _ppl_per_document(losses, tokenizer, docs: list[str], length: int, bucket: int, mpe: int) -> dict:
    """Loss by position over the first `length` tokens of each document, averaged: every window is one
    document from its start (packed windows would cross document boundaries, which the model never saw)."""
    tables = [run_ppl_by_position(losses, tokenizer, [doc], length=length, bucket=bucket, sequences=1,
                                  max_position_embeddings=mpe) for doc in docs]
    buckets = [{**b, "loss": float(np.mean([t["buckets"][i]["loss"] for t in tables]))}
               for i, b in enumerate(tables[0]["buckets"])]
    for b in buckets:
        b["ppl"] = float(np.exp(min(b["loss"], 700.0)))
    return {**tables[0], "sequences": len(tables), "tokens": sum(t["tokens"] for t in tables),
            "mean_loss": float(np.mean([t["mean_loss"] for t in tables])), "buckets": buckets}


def _evaluate(out: Path, method: str, checkpoint: Path, tok: Path, plan: LongPlan, docs: list[str]) -> dict:
    """Passkey (every length x depth) and loss by position (1x and 4x) of one method, saved to evals/."""
    path = out / "evals" / f"{method}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    config, params, tokenizer = load_for_eval(checkpoint, method_overrides(method, plan), tokenizer=tok)
    lengths = [plan.seq_len * k for k in plan.multiples]
    mpe = config.max_position_embeddings
    passkey = run_passkey(model_decoder(config, params), tokenizer, lengths=lengths, depths=list(plan.depths),
                          trials=plan.trials, seed=EVAL_SEED, batch_size=plan.eval_batch, max_position_embeddings=mpe)
    losses = model_losses(config, params)
    ppl = {str(n): _ppl_per_document(losses, tokenizer, docs, n, plan.seq_len // 4, mpe)
           for n in (plan.seq_len, plan.seq_len * plan.factor)}
    result = {"method": method, "checkpoint": str(checkpoint), "overrides": method_overrides(method, plan),
              "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling_dict,
              "dual_chunk_attention_config": config.dca_dict, "passkey": passkey, "ppl": ppl,
              "wall_s": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def run_long_demo(out: str | Path = "runs/long-demo", *, plan: str | LongPlan = "full") -> dict[str, Any]:
    """Run (or resume) the study into `out`; returns what the report shows (its `path` and `verdict`)."""
    plan_name = plan if isinstance(plan, str) else "custom"
    plan = PLANS[plan] if isinstance(plan, str) else plan
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    long_len = plan.seq_len * plan.factor

    # 1. Tokenizer, then corpora sized in its tokens: the base's documents fit its length, the ABF stage's 4x.
    tok_path = _tokenizer(out, plan)
    tok = load_tokenizer(tok_path)
    fixed = len(tok.encode(HEAD + KEY_SENTENCE.format(key="12345") + QUESTION + " 12345."))
    sentence = float(np.mean([len(tok.encode(s)) for s in EVAL_SENTENCES + EXTRA_SENTENCES]))
    if fixed + 8 > plan.seq_len:
        raise UserError(f"plan seq_len {plan.seq_len} is too short for a passkey document ({fixed} tokens)")
    rng = np.random.default_rng(TRAIN_SEED)
    mean_short = (fixed + plan.seq_len) / 2  # of a passkey document: drills, shorter, make the corpus repeat
    n_short = int(1.3 * plan.steps * plan.batch_size * plan.seq_len / mean_short) + 40
    short = _write_corpus(out / "corpus-short.jsonl", rng, n_short, plan.seq_len, fixed, sentence, plan)
    n_long = int(1.3 * plan.abf_steps * plan.abf_batch_size * long_len / ((fixed + long_len) / 2)) + 40
    long = _write_corpus(out / "corpus-long.jsonl", rng, n_long, long_len, fixed, sentence, plan)
    eval_rng = np.random.default_rng(EVAL_SEED + 1)  # held-out documents over 4x long for the loss by position
    docs = [make_document(eval_rng, int(1.25 * long_len), sentence) for _ in range(plan.ppl_sequences)]
    _say(1, f"tokenizer: {tok.vocab_size} tokens; passkey document without filler: {fixed} tokens; corpora: "
            f"{n_short} documents up to {plan.seq_len} tokens, {n_long} up to {long_len}")

    # 2. The base model at seq_len.
    t0 = time.perf_counter()
    base_cfg = _run_config(out, plan, tok_path, short, "base", {})
    base = train(base_cfg)
    _say(2, f"base: {plan.steps} steps at {plan.seq_len} tokens, rope_theta {BASE_THETA:g}: held-out loss "
            f"{base.get('eval_loss')} ({time.perf_counter() - t0:.0f} s)")

    # 3. ABF: one more stage at 4x the length with a larger RoPE base, from the base run's model.
    t0 = time.perf_counter()
    stage = {"name": "abf", "seq_len": long_len, "steps": plan.abf_steps, "batch_size": plan.abf_batch_size,
             "rope_theta": plan.abf_theta, "max_position_embeddings": long_len, "lr": plan.abf_lr,
             "warmup_steps": max(1, plan.abf_steps // 10), "length_mix": {"full": 1.0}, "reset_optimizer": True}
    abf_cfg = _run_config(out, plan, tok_path, long, "abf", {
        "model.init_from": str(out / "base"), "model.max_position_embeddings": long_len,
        "checkpoint": {"every_steps": max(1, plan.abf_steps // 2), "keep": 1}, "stages": [stage]})
    abf = train(abf_cfg)
    _say(3, f"abf: {plan.abf_steps} steps at {long_len} tokens, rope_theta {plan.abf_theta:g}: held-out loss "
            f"{abf.get('eval_loss')} ({time.perf_counter() - t0:.0f} s)")

    # 4-5. Evals: each method's passkey table and loss by position, one JSON each.
    results = {}
    for method in METHODS:
        checkpoint = out / ("abf" if method == "abf" else "base") / "model"
        results[method] = _evaluate(out, method, checkpoint, tok_path, plan, docs)
        pk = results[method]["passkey"]
        _say(4, f"eval {method}: passkey accuracy " + ", ".join(
            f"{n}: {np.mean([c['accuracy'] for c in pk['cells'] if c['length'] == n]):.2f}" for n in pk["lengths"])
            + f" ({results[method]['wall_s']:.0f} s)")

    report = write_long_report(out, plan=plan, plan_name=plan_name, results=results, base=base, abf=abf,
                               fixed_tokens=fixed, wall_s=time.perf_counter() - t_start)
    _say(6, f"report: {report['path']}")
    return report
