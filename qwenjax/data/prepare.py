"""Preparation: a run config's data section -> tokenizer and token caches, each built once and shared.

`prepare_data(cfg)` resolves every weighted corpus path (the stdlib's code without one), trains a
tokenizer when none is given (`ensure_tokenizer`, cached and file-locked so concurrent runs train it
once) and builds one token cache per source. In a multi-process run it checks that every process
prepared the same data. This is the only data module that imports JAX (for that check), which is why
`qwenjax/data/__init__.py` does not re-export it: import it as `qwenjax.data.prepare`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwenjax.data.cache import TokenCache, build_token_cache
from qwenjax.data.chat import is_chat_file, read_conversations, render
from qwenjax.data.chat_batches import ChatCache, build_chat_cache
from qwenjax.data.corpus import default_corpus_files, resolve_files
from qwenjax.data.pair_batches import PairCache, build_pair_cache, read_pairs
from qwenjax.data.tokenizer import train_tokenizer
from qwenjax.errors import UserError
from qwenjax.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSetup:
    """What a run needs from its data: the tokenizer, one token cache per source and their weights."""

    tokenizer_path: Path
    caches: list[TokenCache]
    weights: list[float]
    vocab_size: int
    eos_id: int
    chat: ChatCache | None = None  # chat data (docs/post-training.md): caches == [chat], batches from it
    pairs: PairCache | None = None  # preference pairs (train.objective dpo): caches == [pairs]


def limit_files(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The first files whose sizes add up to max_bytes (all files without a limit)."""
    if max_bytes is None:
        return files
    out, total = [], 0
    for f in files:
        out.append(f)
        total += f.stat().st_size
        if total >= max_bytes:
            break
    return out


def ensure_tokenizer(files: list[Path], vocab_size: int, cache_root: Path) -> Path:
    """A sentencepiece tokenizer trained once on `files` with `vocab_size`, cached under
    `cache_root/tokenizers/<key>/` (key: file paths, sizes, mtimes and vocab size), file-locked so that
    concurrent runs train it once."""
    entries = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps([entries, int(vocab_size)]).encode()).hexdigest()[:20]
    folder = cache_root / "tokenizers" / key
    model = folder / "tokenizer.model"
    if model.is_file():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.is_file():
            log.info("training a %d-token tokenizer on %d files (cached in %s)", vocab_size, len(files),
                     folder)
            train_tokenizer(files, folder / "tokenizer", vocab_size)
    return model


def prepare_data(cfg: RunConfig) -> DataSetup:
    """Resolve the corpus, the tokenizer (trained once if not given) and the token caches (built once)."""
    d = cfg.data
    cache_root = d.resolved_cache_dir()
    sources = []
    for path, weight in d.weighted_paths():
        if path is None:
            files = default_corpus_files(d.max_bytes)
        else:
            files = limit_files(resolve_files(path), d.max_bytes)
        if not files:
            raise UserError(f"data path {path} holds no files")
        sources.append((path, files, weight))
    if cfg.train.objective in ("dpo", "reward"):  # preference pairs
        return prepare_pairs(cfg, sources)
    if is_chat(cfg, [f for _, files, _ in sources for f in files]):
        return prepare_chat(cfg, sources)
    if d.tokenizer:
        tok_path = Path(d.tokenizer).expanduser()
    else:
        all_files = list(dict.fromkeys(f for _, files, _ in sources for f in files))
        tok_path = ensure_tokenizer(all_files, d.vocab_size, cache_root)
    caches = []
    for path, files, _ in sources:
        cache = build_token_cache(files, tok_path, cache_root / "tokens", heldout_fraction=d.heldout_fraction,
                                  max_bytes=d.max_bytes)
        if len(cache.train_tokens) == 0:
            raise UserError(f"the corpus {path or 'stdlib'} holds no text (0 training tokens)")
        caches.append(cache)
    assert_same_everywhere(caches[0].tokenizer_fingerprint + "".join(c.key for c in caches),
                           "tokenizer / token cache")
    return DataSetup(tok_path, caches, [w for _, _, w in sources], caches[0].vocab_size, caches[0].eos_id)


def is_chat(cfg: RunConfig, files: list[Path]) -> bool:
    """data.format chat, or auto with train.objective sft or every file a JSONL of {"messages": [...]}."""
    fmt = cfg.data.format
    if fmt == "auto":
        fmt = "chat" if cfg.train.objective == "sft" or (files and all(map(is_chat_file, files))) else "text"
    if cfg.train.objective == "sft" and fmt != "chat":
        raise UserError("train.objective sft trains on chat data: set data.format to chat (or auto) and give "
                        "JSONL files of {\"messages\": [...]}")
    return fmt == "chat"


def _tokenizer_for(d, files: list[Path], cache_root: Path, kind: str, texts) -> Path:
    """`data.tokenizer`, or one trained (once, cached) on the rendered records `texts()` yields: what the
    model will see, special tokens included."""
    if d.tokenizer:
        return Path(d.tokenizer).expanduser()
    key = hashlib.sha256(json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                                     for f in files]).encode()).hexdigest()[:20]
    text = cache_root / kind / f"{key}.txt"
    if not text.is_file():
        text.parent.mkdir(parents=True, exist_ok=True)
        tmp = text.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(texts()), encoding="utf-8")
        os.replace(tmp, text)
    return ensure_tokenizer([text], d.vocab_size, cache_root)


def prepare_chat(cfg: RunConfig, sources: list) -> DataSetup:
    """Chat data: one source; the tokenizer (when not given) is trained on the rendered conversations."""
    d = cfg.data
    if len(sources) != 1:
        raise UserError("chat data takes one data.path (a JSONL file, glob or folder), not data.sources")
    files = sources[0][1]
    cache_root = d.resolved_cache_dir()
    tok_path = _tokenizer_for(d, files, cache_root, "chat-text",
                              lambda: (render(m)[0] for _, _, m in read_conversations(files)))
    chat = build_chat_cache(files, tok_path, cache_root / "chat", heldout_fraction=d.heldout_fraction)
    chat.check_lengths(cfg.train.seq_len, d.truncate)
    log.info("chat data: %d training conversations, %d held out; %d packed rows of %d tokens per epoch",
             chat.num("train"), chat.num("heldout"),
             len(chat.train_iterator(seq_len=cfg.train.seq_len, global_batch_size=1, seed=cfg.seed,
                                     truncate=d.truncate).rows_of_epoch(0)), cfg.train.seq_len)
    assert_same_everywhere(chat.tokenizer_fingerprint + chat.key, "tokenizer / chat cache")
    return DataSetup(tok_path, [chat], [1.0], chat.vocab_size, chat.eos_id, chat)


def prepare_pairs(cfg: RunConfig, sources: list) -> DataSetup:
    """Preference pairs (docs/post-training.md, "DPO"): one source; the tokenizer (when not given, which a DPO
    stage after SFT should not do) is trained on the rendered prompt + answer texts."""
    d = cfg.data
    if len(sources) != 1:
        raise UserError(f"train.objective {cfg.train.objective} takes one data.path (a JSONL file of pairs), not "
                        "data.sources")
    files = sources[0][1]
    cache_root = d.resolved_cache_dir()
    tok_path = _tokenizer_for(d, files, cache_root, "pairs-text",
                              lambda: (render([*m, {"role": "assistant", "content": a}])[0]
                                       for _, _, m, c, r in read_pairs(files) for a in (c, r)))
    pairs = build_pair_cache(files, tok_path, cache_root / "pairs", heldout_fraction=d.heldout_fraction)
    pairs.check_lengths(cfg.train.seq_len, d.truncate)
    log.info("pairs: %d training, %d held out", pairs.num("train"), pairs.num("heldout"))
    assert_same_everywhere(pairs.tokenizer_fingerprint + pairs.key, "tokenizer / pair cache")
    return DataSetup(tok_path, [pairs], [1.0], pairs.vocab_size, pairs.eos_id, pairs=pairs)


def assert_same_everywhere(text: str, what: str) -> None:
    """Multi-process: every process must have tokenised the data identically."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.uint32)
    first = multihost_utils.broadcast_one_to_all(digest)
    if not np.array_equal(np.asarray(first), digest):
        raise UserError(f"the {what} differs between processes; give data.tokenizer explicitly and "
                        "put data.cache_dir on a shared filesystem")
