"""`qwenjax fit`: sweep results -> FIT.json (hyperparameter laws, loss law, regret) and PNG plots."""

from __future__ import annotations

import sys

from tqdm import tqdm

from qwenjax.errors import UserError

#: qwenjax.scaling.hparams.ESTIMATORS and DEFAULT_METHOD, spelled out so that building the parser does not
#: import the fitter (pandas, scipy); tests/test_scaling_cli.py keeps them in step.
ESTIMATORS = ("nearopt", "smooth", "surface", "prior")
DEFAULT_METHOD = "smooth"


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
        choices=ESTIMATORS,
        default=DEFAULT_METHOD,
        help=f"estimator of the laws (default {DEFAULT_METHOD}, the lowest held-out regret measured): "
        "nearopt = centroid of each cell's runs within --tolerance of its best; smooth = vertex of a "
        "quadratic in log lr, log B per cell; surface = one joint fit of all runs to a bowl whose centre "
        "follows the laws; prior = nearopt with the exponents shrunk toward --prior",
    )
    p.add_argument(
        "--prior",
        metavar="JSON",
        help="for --method prior: exponent means and sds as JSON or a JSON file, keys alpha, beta, gamma, "
        'delta, sd (e.g. \'{"beta": 0.3, "sd": {"beta": 0.1}}\'); default Step Law\'s, sd 0.2',
    )
    p.add_argument(
        "--holdout",
        metavar="SPEC",
        help="also fit without some cells and report how the prediction does on them: 'largest' (every "
        "cell at the largest N or D), 'N>=X' or 'D>=Y' (counts like 2e5, 500k, 1M)",
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
    """Non-embedding N of the seven Qwen2.5 presets (counted without JAX), or None with a warning."""
    # on use (as every import of the fitter here): `qwenjax --help` and the other commands start without it
    from qwenjax.scaling import QWEN25_PRESETS, preset_n_params

    try:
        return {name: preset_n_params(name) for name in QWEN25_PRESETS}
    except UserError as e:
        _warn(f"no Qwen2.5 prediction plot: model presets unavailable ({e})")
        return None


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _print_holdout(held: dict, noise: str) -> None:
    from qwenjax.scaling.units import format_count  # on use: the package pulls in the fitter

    print(
        f"holdout {held['spec']}: fitted {held['cells_fitted']} cells, predicted {held['cells_held_out']} "
        f"held-out cells: regret mean {_percent(held['mean'])}, max {_percent(held['max'])} ({noise}); "
        f"interval covered the best lr in {held['lr_covered']}/{held['cells_held_out']}, "
        f"the best batch in {held['batch_covered']}/{held['cells_held_out']}"
    )
    mark = {True: "covered", False: "missed", None: "no interval"}
    for row in held["per_cell"]:
        cell_noise = "" if row["noise"] is None else f" (noise {row['noise']:.2%})"
        print(
            f"  N={format_count(row['n_params'])} D={format_count(row['tokens'])}: regret {row['regret']:.2%}"
            f"{cell_noise}, lr {row['lr_ratio']:.2f}x the best ({mark[row['lr_covered']]}), "
            f"batch {row['batch_ratio']:.2f}x the best ({mark[row['batch_covered']]})"
        )


def run(args) -> int:
    # on use: the fitter (numpy, scipy, pandas, matplotlib) is loaded only by the command that needs it
    from qwenjax.scaling import format_law, load_results, make_fit, make_plots, save_fit
    from qwenjax.scaling.fitfile import check_output
    from qwenjax.scaling.landscape import ladder_message
    from qwenjax.scaling.noise import format_noise
    from qwenjax.scaling.quality import format_flags
    from qwenjax.scaling.results import skipped_message

    if args.seed < 0:  # numpy's generators take no negative seed
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    check_output(args.output, "-o")  # before the fit: a bad output path must not cost its minutes
    if args.plots:
        check_output(args.plots, "--plots", directory=True)
    df = load_results(args.results, loss_column=args.loss_column, strict=args.strict)
    if message := skipped_message(df):
        _warn(message)
    bar = tqdm(total=args.bootstrap, desc="bootstrap", unit="resample", file=sys.stderr, disable=None, leave=False)
    fit = make_fit(
        df,
        progress=lambda done, total: bar.update(done - bar.n),
        tolerance=args.tolerance,
        method=args.method,
        batch_law=args.batch_law,
        loss_law=not args.no_loss_law,
        bootstrap=args.bootstrap,
        seed=args.seed,
        prior=args.prior,
        holdout=args.holdout,
    )
    bar.close()
    for note in fit["notes"]:
        _warn(note)
    path = save_fit(fit, args.output)
    data, regret, noise = fit["data"], fit["regret"], fit["noise"]
    print(
        f"fitted {data['runs_valid']} of {data['runs']} runs in {data['cells']} (N, D) cells "
        f"(loss: {data['loss_column']}, estimator: {args.method})"
    )
    weights = fit["method"]["weights"]
    if noise["relative"] is not None:
        print(
            f"noise floor: {noise['relative']:.2%} of the loss (seed std at the optimum of "
            f"{noise['cells_measured']} of {noise['cells_total']} cells, {noise['seeds']}+ seeds each)"
        )
    else:
        print(
            f"noise floor: not measured (no configuration was run with two or more seeds); cell weights "
            f"assume {weights['noise']:.2%} per run, {weights['noise_source']}"
        )
    for law in fit["laws"].values():
        print(format_law(law))
    if fit["loss_law"]:
        print(format_law(fit["loss_law"]))
    if regret["mean"] is not None:
        print(
            f"leave-one-cell-out regret: mean {regret['mean']:.3%}, median {regret['median']:.3%}, "
            f"max {regret['max']:.3%} over {regret['cells_evaluated']} cells ({format_noise(noise)})"
        )
    if fit["holdout"]:
        _print_holdout(fit["holdout"], format_noise(noise))
    print(ladder_message(fit["landscape"]))
    quality = fit["quality"]
    laws = ", ".join(f"{k} {v}" for k, v in quality["laws"].items())
    print(f"quality: {quality['status']} ({laws}); {len(quality['flags'])} flag(s)")
    for flag in quality["flags"]:
        print(f"  {format_flags([flag])}")
    print(f"wrote {path}")
    if args.plots:
        for plot in make_plots(df, fit, args.plots, sizes=_preset_sizes()):
            print(f"wrote {plot}")
    return 0
