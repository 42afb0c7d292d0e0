"""`qwenjax predict`: lr, batch size (and loss) for a model size and token budget from a FIT.json."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict lr and batch size for (N, D) from a FIT.json",
        description="Print one JSON object: lr, batch_tokens and batch_size (with 95%% CIs), loss if fitted, "
        "and a warning when N or D lies outside the fitted data.",
    )
    p.add_argument("fit", metavar="FIT.json", help="a fit written by `qwenjax fit`")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", metavar="N", help="non-embedding parameters, e.g. 494M, 7B, 1.5e9")
    size.add_argument("--preset", metavar="NAME", help="take N from a model preset, e.g. qwen2.5-0.5b")
    p.add_argument("--tokens", required=True, metavar="D", help="training tokens, e.g. 18T")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for batch_size (default 4096)")
    p.add_argument(
        "--multiple-of",
        type=int,
        default=1,
        metavar="K",
        help="round batch_size (sequences) to a positive multiple of K, e.g. the data-parallel size",
    )
    p.add_argument("--force", action="store_true",
                   help="predict even from a law the fit's quality flags as unusable (see FIT.json quality)")
    p.set_defaults(func=run)


def run(args) -> int:
    # imported on use: the fitter (numpy, scipy, matplotlib) would slow every other command's start-up
    from qwenjax.config import preset
    from qwenjax.hparams import predict_hparams
    from qwenjax.scaling import load_fit
    from qwenjax.scaling.quality import check_usable, interval_warning

    fit = load_fit(args.fit)  # before the preset: a bad fit file is reported first
    model = preset(args.preset) if args.preset else args.params
    result = predict_hparams(fit, model, args.tokens, seq_len=args.seq_len, multiple_of=args.multiple_of)
    # after the inputs are checked (their errors come first), before anything is printed
    warning = check_usable(fit, force=args.force, source=args.fit)
    here = interval_warning(result)
    if warning or here:
        print(f"qwenjax: warning: {'; '.join(w for w in (warning, here) if w)}", file=sys.stderr)
    if args.preset:
        result = {"preset": args.preset, **result}
    print(json.dumps(result))
    return 0
