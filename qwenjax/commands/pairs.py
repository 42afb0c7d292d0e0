"""`qwenjax pairs --checkpoint DIR --prompts FILE --out FILE`: preference pairs from K sampled answers per
prompt, labelled by answer matching or by running tests in the sandbox (qwenjax.post.pairs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenjax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("pairs", help="build DPO pairs: sample K answers per prompt, label, pair",
                              description="Sample K answers per prompt (ChatML, the model's chat turn), label "
                                          "them by the final number (prompts with \"answer\") or by running "
                                          "\"tests\" in a sandbox, and write {prompt, chosen, rejected} lines "
                                          "for train.objective dpo. Prompts without mixed outcomes are skipped.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a qwenjax model dir or a HF folder")
    p.add_argument("--prompts", required=True, metavar="FILE", help="JSONL: prompt + answer, or prompt + tests")
    p.add_argument("--out", required=True, metavar="FILE", help="the pairs JSONL to write")
    p.add_argument("--k", type=int, default=8, metavar="K", help="answers per prompt (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="default: %(default)s")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH", help="default: the one in DIR")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="wall-time limit per test run, seconds (default: %(default)s)")
    p.add_argument("--memory-mb", type=int, default=1024, metavar="MB",
                   help="address-space limit per test run (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    from qwenjax.commands.generate import load_checkpoint
    from qwenjax.data.chat import encode_chat, special_ids
    from qwenjax.data.tokenizer import load_tokenizer
    from qwenjax.generate import generate
    from qwenjax.post.pairs import build_pairs, read_prompts, write_pairs

    if args.k < 2:
        raise UserError(f"--k must be at least 2 (a pair needs a correct and a wrong answer), got {args.k}")
    if args.max_new_tokens < 1 or not args.temperature > 0 or args.timeout <= 0 or args.memory_mb < 16:
        raise UserError("--max-new-tokens must be >= 1, --temperature > 0 (sampling), --timeout > 0, "
                        "--memory-mb >= 16")
    prompts = list(read_prompts(args.prompts))  # validated before the model is loaded
    directory = Path(args.checkpoint).expanduser()
    if not directory.is_dir():
        raise UserError(f"--checkpoint {directory} is not a folder")
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else directory)
    im_end = special_ids(tokenizer)["<|im_end|>"]
    config, params = load_checkpoint(directory)
    calls = [0]

    def sampler(messages, k):
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
        out = []
        for _ in range(k):
            calls[0] += 1
            toks = generate(config, params, ids.tolist(), max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, eos_id=im_end,
                            rng=args.seed * 1_000_003 + calls[0])
            out.append(tokenizer.decode([t for t in toks if t != im_end and t < tokenizer.vocab_size]))
        return out

    pairs, counts = build_pairs(prompts, sampler, args.k, timeout_s=args.timeout,
                                memory_bytes=args.memory_mb << 20)
    write_pairs(pairs, args.out)
    sys.stdout.write(json.dumps(counts) + "\n")
    return 0
