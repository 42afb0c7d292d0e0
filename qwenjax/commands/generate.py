"""`qwenjax generate --checkpoint DIR --prompt TEXT`: decode a continuation with a KV cache.

DIR is a qwenjax model checkpoint (`qwenjax convert --from-hf`) or a Hugging Face checkpoint folder. The
tokenizer is `--tokenizer PATH` when given, else the one in DIR (a `tokenizer.json`, else one `*.model`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenjax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (greedy or top-p sampling)",
                              description="Generate a continuation of --prompt with a KV cache.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a qwenjax model checkpoint or a Hugging Face checkpoint folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 for greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a sentencepiece .model or a folder with tokenizer.json (default: the one in DIR)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute and parameter dtype (default: the checkpoint's, float32 for HF folders)")
    p.set_defaults(func=run)


def load_checkpoint(path: str | Path, dtype: str | None = None):
    """(config, params) from a qwenjax model checkpoint or a HF folder, optionally cast to `dtype`."""
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    import jax
    import jax.numpy as jnp

    from qwenjax import hf, model_io

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"--checkpoint {directory} is not a folder")
    if model_io.is_model_dir(directory):
        config, params = model_io.load_model(directory)
        if dtype is not None:
            config = config.replace(dtype=dtype, param_dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
        return config, params
    if (directory / "config.json").is_file():
        return hf.load_hf(directory, dtype=dtype)
    raise UserError(f"--checkpoint {directory} holds neither a qwenjax model (model_config.json) nor a "
                    "Hugging Face checkpoint (config.json)")


def run(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    from qwenjax.data.tokenizer import load_tokenizer
    from qwenjax.generate import stream

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    directory = Path(args.checkpoint).expanduser()
    if args.tokenizer is None and not directory.is_dir():
        raise UserError(f"--checkpoint {directory} is not a folder")
    has_tokenizer = (directory / "tokenizer.json").is_file() or any(directory.glob("*.model"))
    if args.tokenizer is None and not has_tokenizer:
        raise UserError(f"no tokenizer in {directory} (tokenizer.json or *.model); pass --tokenizer PATH")
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else directory)
    config, params = load_checkpoint(directory, args.dtype)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{config.vocab_size}; is it the right tokenizer?")
    prompt = tokenizer.encode(args.prompt)
    steps = stream(config, params, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_id=tokenizer.eos_id, rng=args.seed)
    ids = []
    for step in steps:
        if step.token == tokenizer.eos_id:
            break
        if step.token < tokenizer.vocab_size:  # embedding rows past the tokenizer (padding) have no text
            ids.append(step.token)
    sys.stdout.write(tokenizer.decode(ids) + "\n")
    sys.stdout.flush()
    return 0
