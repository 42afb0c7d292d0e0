"""Preference pairs the Qwen2.5 report's offline-RL way (docs/post-training.md, "Pairs and the sandbox"): sample
K answers per prompt from the current model, label each one by answer matching (math) or execution feedback
(code), and pair a correct answer (chosen) with an incorrect one (rejected). A prompt whose answers are all
correct or all wrong gives no pair; it is skipped and counted.

Prompts are JSONL, one per line: `prompt` (a string, or a ChatML messages list) and either `answer` (the final
number expected) or `tests` (Python code, a string or a list of strings, that raises, usually by `assert`,
when the candidate is wrong). The output lines are the pairs `train.objective dpo` reads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qwenjax.data.chat import jsonl_lines, parse_record, prompt_messages
from qwenjax.errors import UserError
from qwenjax.jsonl import atomic_write_text
from qwenjax.post import sandbox

#: (prompt messages, k) -> k sampled answers (text, without <|im_end|>)
Sampler = Callable[[list[dict[str, str]], int], list[str]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def read_prompts(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, {"prompt": original, "messages", and "answer" or "tests"}) per non-blank line, validated
    (one UserError line naming file:line)."""
    for where, line in jsonl_lines([path], "prompts"):
        rec = parse_record(line, where)
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise UserError(f"{where}: expected an object with \"prompt\" and \"answer\" or \"tests\"")
        prompt = rec["prompt"]
        messages = prompt_messages(prompt, where)
        if ("answer" in rec) == ("tests" in rec):
            raise UserError(f"{where}: give exactly one of \"answer\" (math) or \"tests\" (code)")
        out: dict[str, Any] = {"prompt": prompt, "messages": messages}
        if "answer" in rec:
            if parse_number(str(rec["answer"])) is None:
                raise UserError(f"{where}: \"answer\" {rec['answer']!r} is not a number")
            out["answer"] = str(rec["answer"])
        else:
            tests = rec["tests"]
            if isinstance(tests, str):
                tests = [tests]
            if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
                raise UserError(f"{where}: \"tests\" must be Python code: a non-empty string or list of strings")
            out["tests"] = list(tests)
        yield where, out


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def final_number(completion: str) -> float | None:
    """The answer a completion ends on: the last \\boxed{...} if any, else the last number in the text."""
    boxed = _BOXED.findall(completion)
    candidates = _NUMBER.findall(boxed[-1]) if boxed else []
    candidates = candidates or _NUMBER.findall(completion)
    return parse_number(candidates[-1]) if candidates else None


def answer_matches(completion: str, answer: str) -> bool:
    got, want = final_number(completion), parse_number(answer)
    return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


def extract_code(completion: str) -> str:
    """The code of a completion: its last ```python (or unlabelled) fenced block, else the whole text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    for lang, body in reversed(blocks):
        if lang in ("python", "py", "python3", ""):
            return body
    return completion


def label(record: dict[str, Any], completion: str, **limits) -> bool:
    """Whether `completion` is correct: its final number equals `answer`, or its code passes `tests` in the
    sandbox (`limits`: qwenjax.post.sandbox.run_python's timeout_s and memory_bytes)."""
    if "answer" in record:
        return answer_matches(completion, record["answer"])
    program = extract_code(completion) + "\n\n" + "\n".join(record["tests"]) + "\n"
    return sandbox.run_python(program, **limits).passed


def build_pairs(prompts: Sequence[tuple[str, dict[str, Any]]], sampler: Sampler, k: int,
                **limits) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(pairs, counts): for each prompt, K answers labelled; the first correct one is chosen, the first wrong
    one rejected. counts: prompts, pairs, all_correct, all_wrong (the skipped prompts), answers, correct."""
    if k < 2:
        raise UserError(f"--k must be at least 2 (a pair needs a correct and a wrong answer), got {k}")
    counts = {"prompts": 0, "pairs": 0, "all_correct": 0, "all_wrong": 0, "answers": 0, "correct": 0}
    pairs = []
    for where, rec in prompts:
        counts["prompts"] += 1
        answers = sampler(rec["messages"], k)
        ok = [label(rec, a, **limits) for a in answers]
        counts["answers"] += len(answers)
        counts["correct"] += sum(ok)
        good = [a for a, o in zip(answers, ok, strict=True) if o and a.strip()]
        bad = [a for a, o in zip(answers, ok, strict=True) if not o and a.strip()]
        if not good:
            counts["all_wrong"] += 1
        elif not bad:
            counts["all_correct"] += 1
        else:
            pairs.append({"prompt": rec["prompt"], "chosen": good[0], "rejected": bad[0], "source": where})
            counts["pairs"] += 1
    return pairs, counts


def write_pairs(pairs: Sequence[dict[str, Any]], out: str | Path) -> None:
    atomic_write_text(Path(out), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
