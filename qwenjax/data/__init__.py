"""Corpus -> tokenizer -> token cache -> packed, shuffled, sharded, checkpointable batches.

The pipeline (see docs/data.md), one module per stage; each imports only the stages before it:

- `corpus`: `resolve_files(path)` (a file, a glob or a folder) and `iter_documents(files)`.
- `tokenizer`: train a sentencepiece BPE tokenizer on a corpus, or load one (imports only `corpus`).
- `cache`: `build_token_cache(files, tokenizer, cache_root)` tokenises ONCE into a shared cache.
- `batches`: the batch schema (`BATCH_DTYPES`, `Batch`), `make_train_iterator` (checkpointable) and
  `make_eval_batches`.
- `prepare`: `prepare_data(run_config)`, the data side of a run. It imports JAX (a multi-process
  check), so it is not re-exported here: `import qwenjax.data` stays JAX-free for the CLI and the
  sweep planner (grain, which imports JAX, is imported on first use).
"""

from qwenjax.data.batches import (
    BATCH_DTYPES,
    BATCH_KEYS,
    STATE_FORMAT,
    Batch,
    TrainIterator,
    batch_shapes,
    check_batch,
    make_eval_batches,
    make_train_iterator,
    pack_windows,
)
from qwenjax.data.cache import CACHE_VERSION, TokenCache, build_token_cache, cache_key, token_dtype
from qwenjax.data.corpus import (
    RECORD_SUFFIXES,
    TEXT_SUFFIXES,
    default_corpus_files,
    is_binary_file,
    iter_documents,
    iter_file_documents,
    resolve_files,
    stdlib_corpus,
)
from qwenjax.data.tokenizer import (
    CONTROL_TOKENS,
    EOS_PIECE,
    MIN_VOCAB_SIZE,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    resolve_tokenizer_file,
    tokenizer_fingerprint,
    train_tokenizer,
)

__all__ = [
    "BATCH_DTYPES", "BATCH_KEYS", "CACHE_VERSION", "CONTROL_TOKENS", "EOS_PIECE", "MIN_VOCAB_SIZE",
    "RECORD_SUFFIXES", "STATE_FORMAT", "TEXT_SUFFIXES", "Batch", "HFTokenizer", "SentencePieceTokenizer",
    "TokenCache", "Tokenizer", "TrainIterator", "batch_shapes", "build_token_cache", "cache_key",
    "check_batch", "default_corpus_files", "is_binary_file", "iter_documents", "iter_file_documents",
    "load_tokenizer", "make_eval_batches", "make_train_iterator", "pack_windows", "resolve_files",
    "resolve_tokenizer_file", "stdlib_corpus", "token_dtype", "tokenizer_fingerprint", "train_tokenizer",
]
