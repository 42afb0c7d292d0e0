"""`qwenjax fit`: sweep results -> FIT.json (hyperparameter laws, loss law, regret) and PNG plots."""

from __future__ import annotations

import sys

from qwenjax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit lr / batch-size (and loss) scaling laws to sweep results",
        description="Fit lr*(N, D), B*(N, D) and L(N, D) to results.jsonl files and write FIT.json.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="sweep results files (merged)")
    p.add_argument("-o", "--output", required=True, metavar="FIT.json", help="where to write the fit")
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots to DIR")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0025,
        help="runs within this relative loss of the cell best count as optimal (default 0.0025)",
    )
    p.add_argument(
        "--method",
        choices=("nearopt", "smooth"),
        default="nearopt",
        help="cell optimum: near-optimal runs (default) or vertex of a quadratic in log lr, log B",
    )
    p.add_argument(
        "--batch-law",
        choices=("ND", "D"),
        default="ND",
        help="B* as a power law in N and D (default) or in D only (Step Law)",
    )
    p.add_argument(
        "--loss-column",
        choices=("eval_loss", "final_loss"),
        help="loss to compare runs by (default eval_loss if every ok run has it, else final_loss)",
    )
    p.add_argument("--no-loss-law", action="store_true", help="skip the loss law L(N, D)")
    p.add_argument(
        "--bootstrap", type=int, default=1000, metavar="K", help="bootstrap resamples (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--strict", action="store_true", help="reject malformed results lines instead of skipping them"
    )
    p.set_defaults(func=run)


def _warn(message: str) -> None:
    print(f"qwenjax: warning: {message}", file=sys.stderr)


def _preset_sizes() -> dict[str, float] | None:
    """Non-embedding N of the seven Qwen2.5 presets, or None (with a warning) if the model is unavailable."""
    from qwenjax.scaling import QWEN25_PRESETS, preset_n_params

    try:
        return {name: preset_n_params(name) for name in QWEN25_PRESETS}
    except (ImportError, UserError) as e:
        _warn(f"no Qwen2.5 prediction plot: model presets unavailable ({e})")
        return None


def run(args) -> int:
    from qwenjax.scaling import format_law, load_results, make_fit, make_plots, save_fit
    from qwenjax.scaling.results import skipped_message

    df = load_results(args.results, loss_column=args.loss_column, strict=args.strict)
    if message := skipped_message(df):
        _warn(message)
    fit = make_fit(
        df,
        tolerance=args.tolerance,
        method=args.method,
        batch_law=args.batch_law,
        loss_law=not args.no_loss_law,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    for note in fit["notes"]:
        _warn(note)
    path = save_fit(fit, args.output)
    data, regret = fit["data"], fit["regret"]
    print(
        f"fitted {data['runs_valid']} of {data['runs']} runs in {data['cells']} (N, D) cells "
        f"(loss: {data['loss_column']}, optimum: {args.method})"
    )
    for law in fit["laws"].values():
        print(format_law(law))
    if fit["loss_law"]:
        print(format_law(fit["loss_law"]))
    if regret["mean"] is not None:
        print(
            f"leave-one-cell-out regret: mean {regret['mean']:.3%}, median {regret['median']:.3%}, "
            f"max {regret['max']:.3%} over {regret['cells_evaluated']} cells"
        )
    print(f"wrote {path}")
    if args.plots:
        for plot in make_plots(df, fit, args.plots, sizes=_preset_sizes()):
            print(f"wrote {plot}")
    return 0
