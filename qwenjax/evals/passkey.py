"""Passkey retrieval: can the model copy a random number it read `depth` of the way into `length` tokens?

A prompt of exactly `length` tokens of the model's tokenizer:

    HEAD + filler[:before] + " The pass key is 68461. Remember it." + filler[:after] + QUESTION

where QUESTION is " What is the pass key? The pass key is" and before = round(depth x filler), filler being
whatever the other pieces leave (depth 0: the key right after HEAD; depth 1: right before the question).
The filler is a neutral paragraph repeated (or the text of `--filler`), cut mid-sentence where the count
requires. A trial is correct when the greedy continuation, up to EOS, starts with the key's digits and no
more digits. Keys are `digits`-digit numbers drawn once per table from `seed`, the same keys in every cell,
so cells differ only in length and depth. All depth x trial prompts of one length run as fixed-size
batches through one compiled prefill + decode (`forward.greedy_continuations`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.data.tokenizer import Tokenizer
from qwenjax.errors import UserError
from qwenjax.model import Params

HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
KEY_SENTENCE = " The pass key is {key}. Remember it."
QUESTION = " What is the pass key? The pass key is"
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_ANSWER = re.compile(r"\s*(\d+)")

#: (tokens [B, L] int32 numpy, new_tokens) -> continuations [B, new_tokens]; tests swap in an oracle
Decoder = Callable[[np.ndarray, int], np.ndarray]


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096,1M' -> [1024, 2048, 4096, 1048576] (k = 1024 tokens, M = 1024^2), sorted, deduplicated."""
    out = []
    for item in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", item)
        value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0
        if not m or value < 1 or value != int(value):
            raise UserError(f"--lengths: {item.strip()!r} is not a token count like 4096, 4k, 32k or 1M")
        out.append(int(value))
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]: fractions of the filler before the key, each in [0, 1]."""
    out = []
    for item in str(text).split(","):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--depths: {item.strip()!r} is not a number in [0, 1]") from None
        if not 0 <= value <= 1:
            raise UserError(f"--depths: {item.strip()} is outside [0, 1] (0 = start of the text, 1 = end)")
        out.append(value)
    return sorted(set(out))


def format_length(n: int) -> str:
    """1024 -> '1k', 1048576 -> '1M', 1000 -> '1000'."""
    for suffix, unit in (("M", 1024**2), ("k", 1024)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def answer_of(text: str) -> str | None:
    """The digits a continuation starts with (after spaces), or None."""
    m = _ANSWER.match(text)
    return m.group(1) if m else None


class PromptBuilder:
    """Token ids of passkey prompts; the fixed pieces are tokenized once."""

    def __init__(self, tokenizer: Tokenizer, filler_text: str = FILLER):
        self.tokenizer = tokenizer
        self.head = tokenizer.encode(HEAD)
        self.question = tokenizer.encode(QUESTION)
        self.filler = tokenizer.encode(filler_text)
        if not self.filler:
            raise UserError("the filler text is empty")

    def key_ids(self, key: str) -> list[int]:
        return self.tokenizer.encode(KEY_SENTENCE.format(key=key))

    def fixed_tokens(self, keys: Sequence[str]) -> int:
        """Tokens that are not filler, for the longest key sentence: the shortest possible prompt."""
        return len(self.head) + len(self.question) + max(len(self.key_ids(k)) for k in keys)

    def _filler(self, n: int) -> list[int]:
        reps = -(-n // len(self.filler))
        return (self.filler * reps)[:n]

    def build(self, length: int, depth: float, key: str) -> list[int]:
        key_ids = self.key_ids(key)
        n = length - len(self.head) - len(key_ids) - len(self.question)
        if n < 0:
            raise UserError(f"length {length} is shorter than the passkey prompt itself "
                            f"({length - n} tokens without filler)")
        before = round(depth * n)
        tokens = self.head + self._filler(before) + key_ids + self._filler(n - before) + self.question
        assert len(tokens) == length
        return tokens


def draw_keys(trials: int, digits: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(k) for k in rng.integers(10 ** (digits - 1), 10**digits, size=trials)]


def model_decoder(config: ModelConfig, params: Params, *, chunk: int = 512, impl: str = "auto") -> Decoder:
    """The greedy decoder of a model (one compile per prompt length and batch)."""
    # JAX is loaded with the model's code only: this module's prompt logic stays importable without it
    import jax.numpy as jnp

    from qwenjax.evals.forward import greedy_continuations

    def decode(tokens_BL: np.ndarray, new_tokens: int) -> np.ndarray:
        return np.asarray(greedy_continuations(config, params, jnp.asarray(tokens_BL, jnp.int32),
                                               new_tokens=new_tokens, chunk=min(chunk, tokens_BL.shape[1]),
                                               impl=impl))
    return decode


def _text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    out = []
    for t in ids:
        if t == tokenizer.eos_id:
            break
        if t < tokenizer.vocab_size:  # embedding rows past the tokenizer (padding) have no text
            out.append(int(t))
    return tokenizer.decode(out)


def check_inputs(tokenizer: Tokenizer, *, lengths: Sequence[int], depths: Sequence[float], trials: int = 5,
                 digits: int = 5, seed: int = 0, batch_size: int = 8, filler_text: str = FILLER
                 ) -> tuple[PromptBuilder, list[str], int]:
    """(prompt builder, keys, shortest prompt) after checking every option; UserError on bad input."""
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if not 1 <= digits <= 18:
        raise UserError(f"--digits must be in [1, 18], got {digits}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not lengths or not depths:
        raise UserError("give at least one length and one depth")
    builder = PromptBuilder(tokenizer, filler_text)
    keys = draw_keys(trials, digits, seed)
    shortest = builder.fixed_tokens(keys)
    if min(lengths) < shortest:
        raise UserError(f"--lengths: {min(lengths)} tokens is shorter than the passkey prompt itself "
                        f"({shortest} tokens without filler)")
    return builder, keys, shortest


def run_passkey(decode: Decoder, tokenizer: Tokenizer, *, lengths: Sequence[int], depths: Sequence[float],
                trials: int = 5, digits: int = 5, seed: int = 0, batch_size: int = 8,
                max_position_embeddings: int | None = None, filler_text: str = FILLER) -> dict:
    """The passkey table: one cell per (length, depth) with accuracy over `trials` keys (see module doc)."""
    builder, keys, shortest = check_inputs(tokenizer, lengths=lengths, depths=depths, trials=trials,
                                           digits=digits, seed=seed, batch_size=batch_size,
                                           filler_text=filler_text)
    new_tokens = max(len(tokenizer.encode(" " + k)) for k in keys) + 2  # room to see a wrong extra digit
    rows = [(d, k) for d in depths for k in keys]
    B = min(batch_size, len(rows))
    cells = []
    for length in lengths:
        prompts = np.asarray([builder.build(length, d, k) for d, k in rows], np.int32)
        padded = np.concatenate([prompts, np.repeat(prompts[-1:], -len(rows) % B, axis=0)])
        outs = np.concatenate([decode(padded[i:i + B], new_tokens) for i in range(0, len(padded), B)])
        texts = [_text(tokenizer, o) for o in outs[:len(rows)]]
        answers = [answer_of(t) for t in texts]
        beyond = max_position_embeddings is not None and length > max_position_embeddings
        for i, depth in enumerate(depths):
            got = answers[i * trials:(i + 1) * trials]
            correct = sum(a == k for a, k in zip(got, keys, strict=True))
            cells.append({"length": length, "depth": depth, "accuracy": correct / trials, "correct": correct,
                          "trials": trials, "answers": got, "example": texts[i * trials],
                          "beyond_max_position_embeddings": beyond})
    table = {"eval": "passkey", "lengths": list(lengths), "depths": list(depths), "trials": trials,
             "digits": digits, "seed": seed, "keys": keys, "prompt_min_tokens": shortest,
             "max_position_embeddings": max_position_embeddings,
             "accuracy": sum(c["correct"] for c in cells) / (trials * len(cells)), "cells": cells}
    beyond = [n for n in lengths if max_position_embeddings is not None and n > max_position_embeddings]
    table["beyond_max_position_embeddings"] = beyond
    if beyond:
        table["note"] = (f"lengths {', '.join(map(format_length, beyond))} exceed the model's "
                         f"max_position_embeddings ({max_position_embeddings}): extrapolation")
    return table


def accuracy_grid(table: dict) -> np.ndarray:
    """[depths, lengths] accuracies of a passkey table (NaN for a missing cell)."""
    grid = np.full((len(table["depths"]), len(table["lengths"])), math.nan)
    for c in table["cells"]:
        grid[table["depths"].index(c["depth"]), table["lengths"].index(c["length"])] = c["accuracy"]
    return grid
