"""`qwenjax tokenizer train --data PATH --vocab-size N --out PREFIX`: train a sentencepiece BPE tokenizer."""

from __future__ import annotations

import argparse
import time

from qwenjax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a tokenizer (sentencepiece BPE, byte fallback)",
                              description="Tokenizer tools.")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=type(p))
    t = sub.add_parser(
        "train",
        help="train a sentencepiece BPE tokenizer on a corpus",
        description="Train a sentencepiece BPE tokenizer with byte fallback and Qwen's control tokens "
                    "(<|endoftext|> is end-of-document). Writes PREFIX.model and PREFIX.vocab.",
    )
    t.add_argument("--data", required=True, metavar="PATH",
                   help="corpus: a file, a glob or a folder of text/.jsonl/.parquet files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size (>= 324)")
    t.add_argument("--out", required=True, metavar="PREFIX",
                   help="output prefix (writes PREFIX.model, PREFIX.vocab)")
    t.add_argument("--max-sentence-length", type=int, default=16384, metavar="BYTES",
                   help="longest training chunk in bytes (default: %(default)s)")
    t.add_argument("--input-sentence-size", type=int, default=200_000, metavar="N",
                   help="number of training chunks sampled from the corpus (default: %(default)s)")
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    from qwenjax.data import resolve_files
    from qwenjax.data.tokenizer import load_tokenizer, train_tokenizer

    if args.vocab_size < 1:
        raise UserError(f"--vocab-size must be positive, got {args.vocab_size}")
    files = resolve_files(args.data)
    t0 = time.time()
    model = train_tokenizer(files, args.out, args.vocab_size, max_sentence_length=args.max_sentence_length,
                            input_sentence_size=args.input_sentence_size)
    tok = load_tokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, eos {tok.eos_id}, {len(files)} files, "
          f"{time.time() - t0:.1f} s)")
    return 0
