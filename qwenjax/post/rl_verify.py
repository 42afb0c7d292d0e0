"""Rewards for `qwenjax rl`: pluggable verifiers, chosen by `rl.verifier` (docs/post-training.md, "GRPO").

A verifier maps (prompt record, its answers' texts, their token ids) to (rewards, correct), one entry per
answer; `correct` is the exact check (None where there is none), which the loop reports as `accuracy`.

    answer        1.0 when the final number equals the prompt's "answer" (qwenjax.post.pairs.answer_matches)
    tests         1.0 when the code passes the prompt's "tests" in the sandbox (qwenjax.post.sandbox)
    auto          answer or tests, whichever the prompt has
    reward_model  the score of a reward model (train.objective reward, qwenjax.train.reward) at the answer's
                  last token, over the same ChatML ids the policy read and wrote; correct from the answer
                  match where the prompt has an "answer", else None

To add one: a function with the `Verifier` signature, its name in `VERIFIERS` (and in
`qwenjax.run_sections.RL_VERIFIERS`), and its branch in `make_verifier`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model_io
from qwenjax.errors import UserError
from qwenjax.generate import BUCKET
from qwenjax.post.pairs import answer_matches, label
from qwenjax.train.reward import token_scores

#: (record, answer texts, [(prompt ids, answer ids)]) -> (rewards, correct or None per answer)
Verifier = Callable[[dict[str, Any], Sequence[str], Sequence[tuple[Sequence[int], Sequence[int]]]],
                    tuple[list[float], list[bool | None]]]
VERIFIERS = ("auto", "answer", "tests", "reward_model")


def check_prompts(verifier: str, prompts: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """One UserError line when a prompt lacks what the verifier reads (before any model is loaded)."""
    need = {"answer": "answer", "tests": "tests"}.get(verifier)
    for where, rec in prompts:
        if need is not None and need not in rec:
            raise UserError(f"{where}: rl.verifier {verifier} needs \"{need}\" in every prompt")


def _exact(limits: dict[str, Any]) -> Verifier:
    def verify(rec, texts, ids):
        ok = [label(rec, t, **limits) for t in texts]
        return [float(o) for o in ok], list(ok)
    return verify


def _reward_model(directory: str, vocab_size: int) -> Verifier:
    folder = Path(directory).expanduser()
    if not model_io.is_model_dir(folder):
        raise UserError(f"rl.reward_model {folder} is not a model directory ({model_io.CONFIG_FILE})")
    cfg, params = model_io.load_model(folder)
    if cfg.num_labels != 1:
        raise UserError(f"rl.reward_model {folder} is not a reward model (num_labels {cfg.num_labels}, needs 1)")
    if cfg.vocab_size < vocab_size:
        raise UserError(f"rl.reward_model {folder} has a vocabulary of {cfg.vocab_size}, the policy's tokenizer "
                        f"{vocab_size}: they must share the tokenizer")
    scores = jax.jit(lambda p, t: token_scores(p, t, cfg))

    def verify(rec, texts, ids):
        rows = [list(p) + list(a) for p, a in ids]
        T = max(BUCKET, -(-max(map(len, rows)) // BUCKET) * BUCKET)
        tokens_NT = np.zeros((len(rows), T), np.int32)
        for i, r in enumerate(rows):
            tokens_NT[i, :len(r)] = r
        s_NT = np.asarray(scores(params, jnp.asarray(tokens_NT)))
        rewards = [float(s_NT[i, len(r) - 1]) for i, r in enumerate(rows)]
        correct = [answer_matches(t, rec["answer"]) if "answer" in rec else None for t in texts]
        return rewards, correct
    return verify


def make_verifier(rl_section, vocab_size: int) -> Verifier:
    if rl_section.verifier == "reward_model":
        return _reward_model(rl_section.reward_model, vocab_size)
    return _exact({"timeout_s": rl_section.timeout_s, "memory_bytes": rl_section.memory_mb << 20})
