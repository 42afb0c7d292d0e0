"""Preference pairs for DPO (docs/post-training.md, "DPO"): JSONL `{"prompt", "chosen", "rejected"}` ->
tokenised once -> batches of the pair schema (`qwenjax.train.dpo.PAIR_BATCH`: one row per pair and side).

`prompt` is a string (one user turn) or a ChatML messages list; `chosen` and `rejected` are the assistant's
answers. Each side is rendered as `prompt + [{"role": "assistant", "content": answer}]` in Qwen2.5's ChatML
(qwenjax.data.chat), so the model sees the prompt, then `<|im_start|>assistant\\n` (the generation prompt),
and is scored on the answer and its `<|im_end|>`: the mask is the chat loss mask restricted to that last turn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qwenjax.data.chat import heldout_hash, jsonl_lines, parse_record, prompt_messages, render, special_ids
from qwenjax.data.step_iterator import StepIterator
from qwenjax.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from qwenjax.errors import UserError

PAIR_STATE_FORMAT = "qwenjax.data.pair_iterator/1"
PAIR_CACHE_VERSION = 1
SIDES = ("chosen", "rejected")


def read_pairs(files: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str, list[dict[str, str]], str, str]]:
    """(`file:line`, the raw line, prompt messages, chosen, rejected) per non-blank line, validated (UserError
    naming file:line: not JSON, a missing key, an empty answer, a prompt that is neither text nor messages)."""
    for where, line in jsonl_lines(files, "pairs"):
        yield parse_pair(line, where)


def parse_pair(line: str, where: str) -> tuple[str, str, list[dict[str, str]], str, str]:
    rec = parse_record(line, where)
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object with \"prompt\", \"chosen\" and \"rejected\"")
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise UserError(f"{where}: no \"{key}\" (a pair has \"prompt\", \"chosen\" and \"rejected\")")
    prompt = rec["prompt"]
    messages = prompt_messages(prompt, where)
    for key in SIDES:
        if not isinstance(rec[key], str):
            raise UserError(f"{where}: \"{key}\" must be a string (the assistant's answer), "
                            f"got {type(rec[key]).__name__}")
        if not rec[key].strip():
            raise UserError(f"{where}: \"{key}\" is empty")
    return where, line.strip(), messages, rec["chosen"], rec["rejected"]


def encode_completion(tokenizer, messages: list[dict[str, str]], answer: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, mask uint8): the conversation with `answer` as the last assistant turn; mask 1 on the tokens
    that start inside that answer or its <|im_end|> (the chat mask's rule, earlier assistant turns excluded)."""
    text, spans = render([*messages, {"role": "assistant", "content": answer}])
    ids, starts = tokenizer.encode_with_offsets(text)
    lo, hi = spans[-1]
    starts_T = np.asarray(starts, dtype=np.int64)
    return np.asarray(ids, dtype=np.int32), ((starts_T >= lo) & (starts_T < hi)).astype(np.uint8)



class PairCache:
    """Tokenised pairs per split ("train", "heldout"): each side's ids and masks (concatenated, with offsets)
    and each pair's `file:line`, in one .npz per split under `<cache_root>/<key>/`."""

    def __init__(self, folder: Path, key: str, files: Sequence[Path], vocab_size: int, eos_id: int,
                 tokenizer_fingerprint: str):
        self.folder, self.key, self.files = Path(folder), key, list(files)
        self.vocab_size, self.eos_id, self.tokenizer_fingerprint = vocab_size, eos_id, tokenizer_fingerprint
        self._splits = {s: dict(np.load(self.folder / f"{s}.npz")) for s in ("train", "heldout")}
        self._ref: dict[str, dict[str, np.ndarray]] = {}  # split -> side -> log p(ids[j] | ids[:j]), per id

    def attach_reference(self, split: str, logps: dict[str, np.ndarray]) -> None:
        """dpo.reference cached: the reference's per-token log-probs (aligned with each side's ids); the
        split's batches then carry `ref_{side}_logp` (qwenjax.train.dpo_reference)."""
        for side in SIDES:
            if logps[side].shape != self._splits[split][f"{side}_ids"].shape:
                raise ValueError(f"reference log-probs for {split}/{side} do not match the pair cache")
        self._ref[split] = {side: np.asarray(logps[side], np.float32) for side in SIDES}

    def token_count(self, split: str, side: str) -> int:
        return len(self._splits[split][f"{side}_ids"])

    def offsets(self, split: str, side: str) -> np.ndarray:
        """Where each pair's ids start in the split's flat array (one more entry: the end)."""
        return self._splits[split][f"{side}_offsets"]

    def num(self, split: str) -> int:
        return len(self._splits[split]["where"])

    def where(self, split: str, i: int) -> str:
        return str(self._splits[split]["where"][i])

    def side(self, split: str, i: int, side: str) -> tuple[np.ndarray, np.ndarray]:
        d = self._splits[split]
        lo, hi = d[f"{side}_offsets"][i], d[f"{side}_offsets"][i + 1]
        return d[f"{side}_ids"][lo:hi], d[f"{side}_mask"][lo:hi]

    def check_lengths(self, seq_len: int, truncate: bool) -> None:
        """Each side must fit seq_len + 1 tokens, unless truncated (then its answer must keep a token)."""
        for split in ("train", "heldout"):
            for side in SIDES:
                offsets = self._splits[split][f"{side}_offsets"]
                long = np.flatnonzero(np.diff(offsets) > seq_len + 1)
                if len(long) and not truncate:
                    raise UserError(f"{self.where(split, int(long[0]))}: prompt + {side} is "
                                    f"{int(np.diff(offsets)[long[0]])} tokens, more than train.seq_len + 1 = "
                                    f"{seq_len + 1} ({len(long)} such pairs in {split}); set data.truncate: true "
                                    "to cut them or raise train.seq_len")
                for i in long:
                    if not self.side(split, int(i), side)[1][1:seq_len + 1].any():
                        raise UserError(f"{self.where(split, int(i))}: the prompt alone fills train.seq_len "
                                        f"({seq_len}); nothing of the {side} answer is left after truncation")

    def unigram_entropy(self, split: str = "heldout") -> float:
        """Entropy (nats) of the chosen answers' tokens, the tokens the held-out loss is measured on."""
        d = self._splits[split]
        ids = d["chosen_ids"][d["chosen_mask"].astype(bool)]
        if len(ids) == 0:
            return float("nan")
        p = np.bincount(ids).astype(np.float64)
        p = p[p > 0] / len(ids)
        return float(-(p * np.log(p)).sum())

    def rows_batch(self, split: str, indices: Sequence[int | None], seq_len: int) -> dict[str, np.ndarray]:
        """The pair schema for these pairs (None: a padding row, mask 0): inputs = ids[:-1], targets = ids[1:]
        and the mask of each target, cut to seq_len, padded with eos."""
        out: dict[str, np.ndarray] = {}
        for side in SIDES:
            inputs = np.full((len(indices), seq_len), self.eos_id, np.int32)
            targets = inputs.copy()
            mask = np.zeros((len(indices), seq_len), np.float32)
            for r, i in enumerate(indices):
                if i is None:
                    continue
                ids, m = self.side(split, i, side)
                n = min(len(ids) - 1, seq_len)
                inputs[r, :n], targets[r, :n], mask[r, :n] = ids[:n], ids[1:n + 1], m[1:n + 1]
            out.update({f"{side}_inputs": inputs, f"{side}_targets": targets, f"{side}_mask": mask})
            if split in self._ref:  # the reference's log-prob of each target: entry j + 1 of the flat array
                ref = np.zeros((len(indices), seq_len), np.float32)
                offsets = self._splits[split][f"{side}_offsets"]
                for r, i in enumerate(indices):
                    if i is not None:
                        lo, n = offsets[i], min(offsets[i + 1] - offsets[i] - 1, seq_len)
                        ref[r, :n] = self._ref[split][side][lo + 1:lo + n + 1]
                out[f"ref_{side}_logp"] = ref
        return out

    def train_iterator(self, *, seq_len: int, global_batch_size: int, seed: int, truncate: bool = False,
                       process_index: int = 0, process_count: int = 1) -> PairTrainIterator:
        return PairTrainIterator(self, seq_len, global_batch_size, seed, truncate, process_index, process_count)

    def eval_batches(self, *, seq_len: int, batch_size: int, num_batches: int, truncate: bool = False,
                     process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
        """Held-out pairs in file order, `batch_size` per batch (the last padded), this process's rows."""
        self.check_lengths(seq_len, truncate)
        n = self.num("heldout")
        if n == 0:
            raise UserError(f"the pairs {[str(f) for f in self.files]} hold no held-out pair; raise "
                            "data.heldout_fraction or add pairs")
        local = batch_size // process_count
        out = []
        for b in range(min(num_batches, -(-n // batch_size))):
            idx = [i if i < n else None for i in range(b * batch_size, (b + 1) * batch_size)]
            out.append(self.rows_batch("heldout", idx[process_index * local:(process_index + 1) * local], seq_len))
        return out


class PairTrainIterator(StepIterator):
    """Pairs in a new seeded order each epoch, B per step; checkpointable by its step (the interface of
    qwenjax.data.TrainIterator: next, batch_at, get_state, set_state, close)."""

    STATE_FORMAT, KIND = PAIR_STATE_FORMAT, "pair"
    FINGERPRINT_OF = "pairs, tokenizer, seq_len, batch size, seed or truncation"

    def __init__(self, cache: PairCache, seq_len: int, global_batch_size: int, seed: int, truncate: bool,
                 process_index: int, process_count: int):
        self._start(cache, seq_len, global_batch_size, seed, truncate, process_index, process_count,
                    empty=f"the pairs {[str(f) for f in cache.files]} hold no training pair")
        self.B = self.global_batch_size
        self.fingerprint = hashlib.sha256(json.dumps([cache.key, self.seq_len, self.B, self.seed, bool(truncate)]
                                                     ).encode()).hexdigest()[:16]

    def _pair(self, g: int) -> int:
        n = self.cache.num("train")
        epoch, i = divmod(g, n)
        return int(np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(n)[i])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        base = int(step) * self.B + self.first
        return self.cache.rows_batch("train", [self._pair(base + r) for r in range(self.local)], self.seq_len)


def build_pair_cache(files: Sequence[Path], tokenizer_path: str | os.PathLike, cache_root: str | os.PathLike, *,
                     heldout_fraction: float) -> PairCache:
    """Validate and tokenise every pair once (a pair is held out when its line's hash < heldout_fraction)."""
    files = [Path(f) for f in files]
    fp = tokenizer_fingerprint(tokenizer_path)
    key = hashlib.sha256(json.dumps([[[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                                     fp, float(heldout_fraction), PAIR_CACHE_VERSION]).encode()).hexdigest()[:20]
    folder = Path(cache_root) / key
    tok = load_tokenizer(tokenizer_path)
    special_ids(tok)  # ChatML's control tokens must be single ids
    if not (folder / "heldout.npz").is_file():
        splits: dict[str, dict[str, list]] = {s: {"where": [], **{f"{side}_{k}": [] for side in SIDES
                                                                   for k in ("ids", "mask")}}
                                              for s in ("train", "heldout")}
        for where, line, messages, chosen, rejected in read_pairs(files):
            d = splits["heldout" if heldout_hash(line) < heldout_fraction else "train"]
            d["where"].append(where)
            for side, answer in zip(SIDES, (chosen, rejected), strict=True):
                ids, mask = encode_completion(tok, messages, answer)
                d[f"{side}_ids"].append(ids)
                d[f"{side}_mask"].append(mask)
        if not splits["train"]["where"] and not splits["heldout"]["where"]:
            raise UserError(f"the pairs files {[str(f) for f in files]} hold no pair")
        folder.mkdir(parents=True, exist_ok=True)
        for s, d in splits.items():
            arrays: dict[str, np.ndarray] = {"where": np.asarray(d["where"], dtype=str)}
            for side in SIDES:
                lengths = [len(x) for x in d[f"{side}_ids"]]
                arrays[f"{side}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                arrays[f"{side}_ids"] = np.concatenate(d[f"{side}_ids"] or [np.zeros(0, np.int32)])
                arrays[f"{side}_mask"] = np.concatenate(d[f"{side}_mask"] or [np.zeros(0, np.uint8)])
            tmp = folder / f"{s}.tmp-{os.getpid()}.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, folder / f"{s}.npz")  # heldout last: its presence marks a complete cache
    return PairCache(folder, key, files, tok.vocab_size, tok.eos_id, fp)
