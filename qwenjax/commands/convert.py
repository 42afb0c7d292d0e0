"""`qwenjax convert`: HF checkpoint <-> qwenjax model checkpoint (Orbax params + model_config.json).

    qwenjax convert --from-hf HF_DIR --to MODEL_DIR [--dtype D]
    qwenjax convert --from MODEL_DIR --to-hf HF_DIR [--dtype D]

Tokenizer files found beside the source weights (tokenizer.json, *.model, generation_config.json, ...) are
copied to the destination so `qwenjax generate --checkpoint DEST` finds them. A reward model (num_labels) goes
to HF as Qwen2ForSequenceClassification, with `pad_token_id` = that tokenizer's end-of-text id (the padding of
qwenjax's batches), which transformers needs to find each row's last token.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from qwenjax.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "generation_config.json")
DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert between Hugging Face and qwenjax model checkpoints",
        description="Convert a Hugging Face Qwen2 checkpoint (config.json + safetensors) to a qwenjax model "
                    "checkpoint (--from-hf DIR --to DIR), or back (--from DIR --to-hf DIR).")
    p.add_argument("--from-hf", metavar="DIR", help="source: a Hugging Face checkpoint folder")
    p.add_argument("--to", metavar="DIR", help="destination: a qwenjax model checkpoint folder (new)")
    p.add_argument("--from", dest="from_model", metavar="DIR",
                   help="source: a qwenjax model checkpoint folder")
    p.add_argument("--to-hf", metavar="DIR", help="destination: a Hugging Face checkpoint folder (new)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="parameter dtype of the result (default: float32 from HF; the stored dtype to HF)")
    p.set_defaults(func=run)


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in [*(src / name for name in TOKENIZER_FILES), *sorted(src.glob("*.model"))]:
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _pad_token_id(src: Path) -> int | None:
    from qwenjax.data.tokenizer import load_tokenizer  # on use, as the other imports of this command

    try:
        return load_tokenizer(src).eos_id
    except UserError:  # no tokenizer beside the weights: transformers then scores batches of one row
        return None


def _check_destination(path: Path, flag: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{flag} {path} already exists and is not empty; choose a new folder")


def run(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    from qwenjax import hf, model_io
    from qwenjax.model import count_params

    to_model = args.from_hf is not None or args.to is not None
    to_hf = args.from_model is not None or args.to_hf is not None
    if to_model == to_hf:
        raise UserError("convert: give either --from-hf DIR --to DIR, or --from DIR --to-hf DIR")
    if to_model and (args.from_hf is None or args.to is None):
        raise UserError("convert: --from-hf and --to go together")
    if to_hf and (args.from_model is None or args.to_hf is None):
        raise UserError("convert: --from and --to-hf go together")
    t0 = time.time()
    if to_model:
        src, dst = Path(args.from_hf).expanduser(), Path(args.to).expanduser()
        _check_destination(dst, "--to")
        config, params = hf.load_hf(src, dtype=args.dtype)
        model_io.save_model(dst, config, params)
        written = config.param_dtype
    else:
        src, dst = Path(args.from_model).expanduser(), Path(args.to_hf).expanduser()
        _check_destination(dst, "--to-hf")
        config, params = model_io.load_model(src)
        pad = _pad_token_id(src) if config.num_labels is not None else None
        hf.save_hf(dst, config, params, dtype=args.dtype, extra_config=None if pad is None else {"pad_token_id": pad})
        written = args.dtype or config.param_dtype
    copied = _copy_tokenizer_files(src, dst)
    total, _ = count_params(config)
    extra = f", copied {', '.join(copied)}" if copied else ""
    print(f"wrote {dst} ({total:,} parameters, {written}, {time.time() - t0:.1f} s{extra})")
    return 0
