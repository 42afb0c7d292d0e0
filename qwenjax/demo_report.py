"""The demo's `report.md`: tables of the sweep, the fitted laws, the prediction and the check run, with plots.

Plain Markdown with relative PNG links, so it reads in any viewer (GitHub, an editor preview, a notebook).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qwenjax import jsonl  # noqa: E402
from qwenjax.scaling import format_law  # noqa: E402
from qwenjax.scaling.landscape import ladder_message  # noqa: E402
from qwenjax.sweep.results import read_lines  # noqa: E402
from qwenjax.sweep.results import row_loss as _loss  # noqa: E402

#: the predicted point passes when the mean of its seeds is within this of the best grid point's mean
CHECK_TOLERANCE = 0.005


def _rows(path: Path) -> list[dict]:
    return list({r["run_id"]: r for r in read_lines(path)[0]}.values())  # the last line of a retried run


def grid_means(rows: list[dict]) -> dict[tuple[float, int], float]:
    """(lr, batch) -> mean loss over that point's seeds (inf if any seed diverged or failed)."""
    by_point: dict[tuple[float, int], list[float]] = {}
    for r in rows:
        by_point.setdefault((r["lr"], r["batch_size"]), []).append(_loss(r))
    return {p: (sum(v) / len(v) if all(map(math.isfinite, v)) else math.inf) for p, v in by_point.items()}


def check_verdict(grid: dict[tuple[float, int], float], predicted: tuple[float, int],
                  predicted_losses: list[float], noise: float | None = None) -> tuple[bool, str]:
    """Is the predicted point's mean loss over its seeds within CHECK_TOLERANCE of the best point of the grid?

    `grid` holds each point's mean over the same seeds as `predicted_losses` (`grid_means`)."""
    finite = {p: v for p, v in grid.items() if math.isfinite(v)}
    seeds = [v for v in predicted_losses if math.isfinite(v)]
    floor = f"; seed noise floor {noise:.2%}" if noise is not None else ""
    if not seeds or len(seeds) < len(predicted_losses):
        return False, (f"the prediction MISSED: {len(predicted_losses) - len(seeds)} of its "
                       f"{len(predicted_losses)} seeds diverged or failed")
    ours = sum(seeds) / len(seeds)
    best_point = min(finite, key=finite.get)
    best = finite[best_point]
    ok = ours <= best * (1 + CHECK_TOLERANCE)
    where = f"lr {best_point[0]:.3g}, batch {best_point[1]}"
    if not ok:
        text = (f"the prediction MISSED: its mean loss over {len(seeds)} seeds, {ours:.4f}, is "
                f"{ours / best - 1:.2%} above the best grid point ({where}: {best:.4f}; tolerance "
                f"{CHECK_TOLERANCE:.1%}{floor})")
    elif best_point == predicted:
        text = (f"PASSED: the predicted point is the best of the grid (mean loss {ours:.4f} over {len(seeds)} "
                f"seeds{floor})")
    else:
        text = (f"PASSED: the predicted point's mean loss over {len(seeds)} seeds, {ours:.4f}, is within "
                f"{ours / best - 1:.2%} of the best grid point ({where}: {best:.4f}; tolerance "
                f"{CHECK_TOLERANCE:.1%}{floor})")
    return ok, text


def _plot_main_curves(out: Path, main_rows: list[dict], predicted: tuple[float, int]) -> Path:
    """Training loss against tokens for the check runs at the predicted batch (every lr, every seed)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    at_batch = [r for r in main_rows if r["batch_size"] == predicted[1]]
    for row in sorted(at_batch, key=lambda r: (r["lr"], r.get("seed", 0))):
        folder = out / ("main" if row.get("seed", 0) == 0 else "main-seeds") / "runs" / row["run_id"]
        metrics = [m for m in jsonl.read(folder / "metrics.jsonl") if m.get("loss") is not None]
        if not metrics:
            continue
        tag = "predicted" if math.isclose(row["lr"], predicted[0], rel_tol=1e-6) else \
            f"{row['lr'] / predicted[0]:.3g}x predicted"
        ax.plot([m["tokens"] for m in metrics], [m["loss"] for m in metrics],
                label=f"lr {row['lr']:.3g} ({tag}), seed {row.get('seed', 0)}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("train loss")
    ax.set_title(f"Check runs at the predicted batch ({predicted[1]} sequences)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "plots" / "main_loss_curves.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_check_grid(out: Path, grid: dict[tuple[float, int], float], predicted: tuple[float, int],
                     predicted_mean: float, noise: float | None, ok: bool) -> Path:
    """The check as a picture: loss over the 3 x 3 grid relative to its best point, the prediction outlined."""
    lrs = sorted({p[0] for p in grid})
    batches = sorted({p[1] for p in grid})
    best = min(v for v in grid.values() if math.isfinite(v))
    rel = np.full((len(batches), len(lrs)), np.nan)
    for (lr, b), v in grid.items():
        rel[batches.index(b), lrs.index(lr)] = 100 * (v / best - 1)
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    im = ax.imshow(rel, origin="lower", cmap="viridis_r", aspect="auto")
    for i, b in enumerate(batches):
        for j, lr in enumerate(lrs):
            value = grid.get((lr, b), math.nan)
            text = f"{value:.4f}\n+{rel[i, j]:.2f}%" if math.isfinite(value) else "diverged"
            if (lr, b) == predicted:
                text = f"{predicted_mean:.4f}\npredicted"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(rel[i, j]) and rel[i, j] > np.nanmax(rel) / 2 else "black")
    pj, pi = lrs.index(predicted[0]), batches.index(predicted[1])
    ax.add_patch(plt.Rectangle((pj - 0.5, pi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(lrs)), [f"{x:.3g}" for x in lrs])
    ax.set_yticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("batch (sequences)")
    floor = f", noise floor {noise:.2%}" if noise is not None else ""
    verdict = "PASSED" if ok else "MISSED"
    ax.set_title(f"Check at the target: {verdict}\n(mean over seeds; prediction outlined; tolerance 0.5%{floor})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="% above the best grid point")
    return _save(fig, out / "plots" / "check_grid.png")


def _cell_table(rows: list[dict]) -> list[str]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["n_params"], r["tokens"]), []).append(r)
    lines = ["| N (non-embedding) | D (tokens) | runs | diverged | best loss | best lr | best batch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for (n, d), rs in sorted(cells.items()):
        best = min(rs, key=_loss)
        diverged = sum(r.get("status") == "diverged" for r in rs)
        loss = _loss(best)
        lines.append(f"| {n:,} | {d:,.0f} | {len(rs)} | {diverged} | "
                     f"{loss:.4f} | {best['lr']:.3g} | {best['batch_size']} |" if math.isfinite(loss) else
                     f"| {n:,} | {d:,.0f} | {len(rs)} | {diverged} | - | - | - |")
    return lines


def write_report(out: Path, *, corpus: dict, plan, fit: dict, prediction: dict, n_main: int, d_main: float,
                 main_shape: dict, sweep_results: Path, main_results: list[Path], sweep_summary: dict,
                 plots: list[str], wall_s: float) -> dict[str, Any]:
    sweep_rows = _rows(sweep_results)
    main_rows = [r for path in main_results for r in _rows(path)]
    grid = grid_means(main_rows)
    predicted = (min({lr for lr, _ in grid}, key=lambda lr: abs(math.log(lr / prediction["lr"]))),
                 int(prediction["batch_size"]))
    seed_losses = [_loss(r) for r in main_rows if (r["lr"], r["batch_size"]) == predicted]
    noise = (fit.get("noise") or {}).get("relative")
    ok, verdict = check_verdict(grid, predicted, seed_losses, noise)
    finite_seeds = [v for v in seed_losses if math.isfinite(v)]
    mean = sum(finite_seeds) / len(finite_seeds) if finite_seeds else math.nan
    check_plot = _plot_check_grid(out, grid, predicted, mean, noise, ok)
    curves = _plot_main_curves(out, main_rows, predicted)

    md = ["# qwenjax demo report", "",
          "Small Qwen2.5-shaped models were swept over learning rate x batch size at several model sizes N and "
          "token budgets D; power laws were fitted to the optima; the laws predicted the learning rate and "
          "batch size of a larger model trained on more tokens; that model was trained on a grid of half, "
          "once and twice the predicted learning rate and batch size, every point with two seeds. The "
          "prediction passes when the mean loss of its seeds is within "
          f"{CHECK_TOLERANCE:.1%} of the best grid point's mean over the same seeds.", "",
          f"**Verdict:** {verdict}.", "",
          f"Wall time of this invocation: {wall_s / 60:.1f} min (stages already done on disk are reused).", "",
          "## Corpus and tokenizer", "",
          "| files | MB | vocabulary | train tokens | held-out tokens | unigram entropy (nats/token) |",
          "|---:|---:|---:|---:|---:|---:|",
          f"| {corpus['files']} | {corpus['bytes'] / 1e6:.1f} | {corpus['vocab_size']} | {corpus['train_tokens']:,} | "
          f"{corpus['heldout_tokens']:,} | {corpus['unigram_entropy']:.3f} |", "",
          "## Sweep", "",
          f"{len(sweep_rows)} runs; loss = held-out loss at the end of each run (the same "
          f"{plan.eval_sequences} held-out sequences for every run).", ""]
    md += _cell_table(sweep_rows)
    compile_share = sweep_summary.get("compile_share")
    if compile_share is not None:
        md += ["", f"Compile share of the sweep's wall time: {compile_share:.1%}."]
    forks = sweep_summary.get("forks") or {}
    if forks.get("tokens_without_forks"):
        md += [f"Cooldown forks: {forks.get('runs', 0)} runs trained only their cooldown; "
               f"{forks['tokens_trained']:,.0f} tokens trained instead of {forks['tokens_without_forks']:,.0f}."]
    if noise is not None:
        cells = fit["noise"].get("cells", [])
        md += ["", f"Noise floor: the loss at each cell's optimum varies by {noise:.2%} (relative standard deviation, "
               f"root mean square over {len(cells)} cells of {fit['noise'].get('seeds')} or more seeds)."]
    if fit.get("landscape"):
        md += ["", f"The sweep against the CPU ladder's rules (docs/sweeps.md): {ladder_message(fit['landscape'])}."]
    method = fit.get("method", {})
    prior = method.get("prior") or {}
    leaning = (f" (exponents shrunk toward the CPU ladder's, `{prior.get('source')}`: "
               + ", ".join(f"{k} {v:.3g} ± {prior['sd'][k]:.2g}" for k, v in prior["mean"].items()) + ")"
               if method.get("optimum") == "prior" and prior.get("mean") else "")
    md += ["", "## Fitted laws", "", f"Estimator: {method.get('optimum')}{leaning}; batch law in "
           f"{method.get('batch_law')}; {method.get('ci_level', 0.95):.0%} intervals from {method.get('bootstrap')} "
           "bootstrap resamples of the cells.", ""]
    for name, law in fit["laws"].items():
        md.append(f"- **{name}**: `{format_law(law)}`")
    if fit.get("loss_law"):
        md.append(f"- **loss**: `{format_law(fit['loss_law'])}`")
    regret = fit["regret"]
    if regret.get("mean") is not None:
        floor = f" (noise floor {noise:.2%})" if noise is not None else ""
        md += ["", f"Leave-one-cell-out regret (loss of the sweep run nearest the held-out prediction over the "
               f"cell's best, minus 1): mean {regret['mean']:.2%}, median {regret['median']:.2%}, "
               f"max {regret['max']:.2%}{floor}."]
    largest = max(r["n_params"] for r in sweep_rows)
    md += ["", "## Prediction", "",
           f"Model: {main_shape} — N = {n_main:,} non-embedding parameters ({n_main / largest:.1f}x the largest "
           f"swept, {largest:,}); D = {d_main:,.0f} tokens ({d_main / max(plan.tokens):.1f}x the largest swept).", "",
           "| | value | 95% interval |", "|---|---:|---:|",
           f"| learning rate | {prediction['lr']:.4g} | {prediction['lr_ci'][0]:.4g} – {prediction['lr_ci'][1]:.4g} |",
           f"| batch (tokens) | {prediction['batch_tokens']:,.0f} | {prediction['batch_tokens_ci'][0]:,.0f} – "
           f"{prediction['batch_tokens_ci'][1]:,.0f} |",
           f"| batch (sequences) | {prediction['batch_size']} | |"]
    if prediction.get("loss") is not None:
        ci = prediction.get("loss_ci") or [math.nan, math.nan]
        md.append(f"| loss (loss law) | {prediction['loss']:.4f} | {ci[0]:.4f} – {ci[1]:.4f} |")
    if prediction.get("warning"):
        md += ["", f"Note: {prediction['warning']}"]
    best = min((v for v in grid.values() if math.isfinite(v)), default=math.nan)
    md += ["", "## Check at the target", "",
           "| learning rate | vs predicted | batch | vs predicted | seed | held-out loss | vs best | status |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(main_rows, key=lambda r: (r["batch_size"], r["lr"], r.get("seed", 0))):
        loss = _loss(r)
        shown = f"{loss:.4f} | {loss / best - 1:+.2%}" if math.isfinite(loss) else "- | -"
        md.append(f"| {r['lr']:.4g} | {r['lr'] / predicted[0]:.3g}x | {r['batch_size']} | "
                  f"{r['batch_size'] / predicted[1]:.3g}x | {r.get('seed', 0)} | {shown} | {r['status']} |")
    md += ["", f"**Verdict:** {verdict}.", "", "## Plots", "",
           f"![the check at the target]({check_plot.relative_to(out)})", "",
           f"![check-run loss curves]({curves.relative_to(out)})", ""]
    for p in plots:
        rel = Path(p).resolve().relative_to(out)
        md += [f"![{Path(p).stem}]({rel})", ""]
    path = out / "report.md"
    jsonl.atomic_write_text(path, "\n".join(md) + "\n")
    return {"path": str(path), "verdict_ok": ok, "verdict": verdict, "grid": {f"{k[0]:g}/{k[1]}": v
            for k, v in grid.items()}, "predicted_losses": seed_losses, "prediction": prediction,
            "n_main": n_main, "d_main": d_main, "plots": [str(check_plot), str(curves), *plots]}
