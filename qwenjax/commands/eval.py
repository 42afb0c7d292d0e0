"""`qwenjax eval passkey|ppl-by-position --checkpoint DIR ...`: long-context evals of a model.

DIR is a model directory, a run directory (its model/, else its newest checkpoint) or a Hugging Face
folder; trailing `model.KEY=VALUE` overrides (rope_theta, rope_scaling, max_position_embeddings, ...) run
the same weights differently, e.g. with YaRN; `attention.KEY=VALUE` ones pick the kernel (`attention.impl=sparse`
with its `attention.sparse_*` budgets). Each prints a JSON table on stdout and writes a PNG (--out,
default in the current directory). See docs/long-context.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenjax.errors import UserError


def _common(p: argparse.ArgumentParser, out: str, batch_size: int) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a model directory, a run directory or a Hugging Face checkpoint folder")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a sentencepiece .model or a folder with tokenizer.json (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, metavar="B", default=batch_size,
                   help="sequences per compiled call (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=512, metavar="C",
                   help="prefill chunk in tokens: logits are at most [B, C, vocab] (default: %(default)s)")
    p.add_argument("--out", default=out, metavar="PNG", help="plot path (default: ./%(default)s)")
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE",
                   help="model overrides, e.g. model.rope_scaling='{rope_type: yarn, factor: 4}', and the "
                        "attention kernel, e.g. attention.impl=sparse attention.sparse_vertical=0.1")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="long-context evals: passkey retrieval, loss by position",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    sub = p.add_subparsers(dest="eval", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy per context length x key depth",
                        description="Hide a random number at each depth of filler text of each length and "
                                    "ask for it back; greedy decoding must reproduce its digits.")
    _common(pk, "passkey.png", 8)
    pk.add_argument("--lengths", default="1k,2k,4k", metavar="LIST",
                    help="prompt lengths in tokens, e.g. 1k,2k,32k,1M (k = 1024; default: %(default)s)")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", metavar="LIST",
                    help="key positions as fractions of the filler, in [0, 1] (default: %(default)s)")
    pk.add_argument("--trials", type=int, default=5, metavar="N", help="keys per cell (default: %(default)s)")
    pk.add_argument("--digits", type=int, default=5, metavar="N", help="digits per key (default: %(default)s)")
    pk.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the keys (default: %(default)s)")
    pk.add_argument("--filler", metavar="PATH", help="filler text from this corpus (file, folder or glob) "
                    "instead of the repeated neutral sentences")
    pk.set_defaults(func=run_passkey)
    pp = sub.add_parser("ppl-by-position", help="mean next-token loss per position bucket on long windows",
                        description="Pack documents of --data into windows of --length tokens and report "
                                    "the mean loss per bucket of positions.")
    _common(pp, "ppl-by-position.png", 1)
    pp.add_argument("--data", required=True, metavar="PATH", help="text/JSONL/Parquet file, folder or glob")
    pp.add_argument("--length", required=True, metavar="L", help="window length in tokens (e.g. 4096, 32k)")
    pp.add_argument("--bucket", type=int, default=256, metavar="N", help="positions per bucket "
                    "(default: %(default)s)")
    pp.add_argument("--sequences", type=int, default=8, metavar="N", help="windows to average "
                    "(default: %(default)s)")
    pp.set_defaults(func=run_ppl)


def _load(args, check=None):
    """(config, params, tokenizer) after the cheap checks and `check(tokenizer)`; imports JAX."""
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1, got {args.chunk}")
    if not Path(args.checkpoint).expanduser().is_dir():
        raise UserError(f"--checkpoint {args.checkpoint} is not a folder")
    # on use: `qwenjax --help` and the other commands start without loading JAX or the evals
    from qwenjax.evals.checkpoint import load_for_eval

    return load_for_eval(args.checkpoint, args.overrides, args.tokenizer, check=check)


def _attention(args):
    """The run config's attention section from the `attention.*` overrides, which it takes out of
    args.overrides (the rest are the model's)."""
    import dataclasses  # on use, as in _load

    from qwenjax.run_config import parse_overrides
    from qwenjax.run_sections import AttentionSection

    mine = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith("attention.")]
    args.overrides = [o for o in args.overrides if o not in mine]
    values = parse_overrides(mine).get("attention", {})
    fields = {f.name for f in dataclasses.fields(AttentionSection)}
    bad = sorted(set(values) - fields) if isinstance(values, dict) else ["attention"]
    if bad:
        raise UserError(f"attention.{bad[0]} is not an attention key; allowed: {', '.join(sorted(fields))}")
    return AttentionSection(**values)


def _attention_fields(attention) -> dict:
    """The kernel, and for sparse the share of attention pairs it computed (qwenjax.attention_sparse)."""
    if attention.impl != "sparse":
        return {"attention_impl": attention.kernel}
    from qwenjax import attention_sparse  # on use, as in _load

    return {"attention_impl": attention.kernel, "sparse": attention_sparse.stats_fraction()}


def _model_fields(config) -> dict:
    return {"max_position_embeddings": config.max_position_embeddings, "rope_theta": config.rope_theta,
            "rope_scaling": config.rope_scaling_dict}


def _print(table: dict) -> None:
    sys.stdout.write(json.dumps(table, indent=1) + "\n")
    sys.stdout.flush()


def _filler_text(path: str, chars: int) -> str:
    """The corpus's documents joined until `chars` characters (enough tokens; the filler repeats if short)."""
    from qwenjax.evals.ppl_position import read_documents  # on use, as in _load

    parts, total = [], 0
    for text in read_documents(path):
        parts.append(" " + " ".join(text.split()))
        total += len(parts[-1])
        if total >= chars:
            break
    return "".join(parts)


def run_passkey(args: argparse.Namespace) -> int:
    from qwenjax.evals import passkey  # on use, as in _load

    lengths, depths = passkey.parse_lengths(args.lengths), passkey.parse_depths(args.depths)
    filler = passkey.FILLER if args.filler is None else _filler_text(args.filler, 16 * max(lengths))
    options = dict(lengths=lengths, depths=depths, trials=args.trials, digits=args.digits, seed=args.seed,
                   batch_size=args.batch_size, filler_text=filler)
    attention = _attention(args)
    config, params, tokenizer = _load(args, check=lambda tok: passkey.check_inputs(tok, **options))
    decode = passkey.model_decoder(config, params, chunk=args.chunk, impl=attention.kernel)
    table = passkey.run_passkey(decode, tokenizer, max_position_embeddings=config.max_position_embeddings,
                                **options)
    from qwenjax.evals.plots import plot_passkey  # matplotlib on use

    plot_passkey(table, args.out)
    _print({"checkpoint": str(args.checkpoint), "overrides": list(args.overrides), **_model_fields(config),
            **_attention_fields(attention), **table, "plot": str(args.out)})
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from qwenjax.evals import passkey, ppl_position  # on use, as in _load

    lengths = passkey.parse_lengths(args.length)
    if len(lengths) != 1:
        raise UserError(f"--length takes one length, got {args.length!r}")
    documents = ppl_position.read_documents(args.data)  # resolves the files now: a bad path fails early
    attention = _attention(args)
    config, params, tokenizer = _load(args)
    losses = ppl_position.model_losses(config, params, chunk=args.chunk, impl=attention.kernel)
    table = ppl_position.run_ppl_by_position(losses, tokenizer, documents, length=lengths[0],
                                             bucket=args.bucket, sequences=args.sequences,
                                             batch_size=args.batch_size,
                                             max_position_embeddings=config.max_position_embeddings)
    from qwenjax.evals.plots import plot_ppl_by_position  # matplotlib on use

    plot_ppl_by_position(table, args.out)
    _print({"checkpoint": str(args.checkpoint), "overrides": list(args.overrides), **_model_fields(config),
            **_attention_fields(attention), **table, "plot": str(args.out)})
    return 0
