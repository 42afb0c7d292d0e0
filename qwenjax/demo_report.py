"""The demo's `report.md`: tables of the sweep, the fitted laws, the prediction and the check run, with plots.

Plain Markdown with relative PNG links, so it reads in any viewer (GitHub, an editor preview, a notebook).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qwenjax.run_config import atomic_write_text  # noqa: E402


def _rows(path: Path) -> list[dict]:
    from qwenjax.sweep.results import read_lines

    return list({r["run_id"]: r for r in read_lines(path)[0]}.values())  # the last line of a retried run


def _loss(row: dict) -> float:
    value = row.get("eval_loss")
    if value is None or not math.isfinite(value):
        value = row.get("final_loss")
    return value if value is not None and math.isfinite(value) and row.get("status") == "ok" else math.inf


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plot_main_curves(out: Path, main_rows: list[dict], predicted_lr: float) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in sorted(main_rows, key=lambda r: r["lr"]):
        metrics = [m for m in _metrics(out / "main" / "runs" / row["run_id"]) if m.get("loss") is not None]
        if not metrics:
            continue
        tag = "predicted" if math.isclose(row["lr"], predicted_lr, rel_tol=1e-6) else \
            f"{row['lr'] / predicted_lr:.3g}x predicted"
        ax.plot([m["tokens"] for m in metrics], [m["loss"] for m in metrics], label=f"lr {row['lr']:.3g} ({tag})")
    ax.set_xlabel("tokens")
    ax.set_ylabel("train loss")
    ax.set_title("Main run: the predicted learning rate and its 0.5x / 2x neighbours")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "plots" / "main_loss_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                 main_shape: dict, sweep_results: Path, main_results: Path, sweep_summary: dict,
                 plots: list[str], wall_s: float) -> dict[str, Any]:
    from qwenjax.demo import check_verdict
    from qwenjax.scaling import format_law

    sweep_rows, main_rows = _rows(sweep_results), _rows(main_results)
    losses = {r["lr"]: _loss(r) for r in main_rows}
    predicted = min(losses, key=lambda lr: abs(math.log(lr / prediction["lr"])))
    ok, verdict = check_verdict(losses, predicted)
    curves = _plot_main_curves(out, main_rows, predicted)

    md = ["# qwenjax demo report", "",
          "Small Qwen2.5-shaped models were swept over learning rate x batch size at several model sizes N and "
          "token budgets D; power laws were fitted to the optima; the laws predicted the learning rate and "
          "batch size of a larger model trained on more tokens; that model was trained with the prediction "
          "and, as a check, with half and twice the predicted learning rate.", "",
          f"Wall time of this invocation: {wall_s / 60:.1f} min (stages already done on disk are reused).", "",
          "## Corpus and tokenizer", "",
          "| files | MB | vocabulary | train tokens | held-out tokens | unigram entropy (nats/token) |",
          "|---:|---:|---:|---:|---:|---:|",
          f"| {corpus['files']} | {corpus['bytes'] / 1e6:.1f} | {corpus['vocab_size']} | {corpus['train_tokens']:,} | "
          f"{corpus['heldout_tokens']:,} | {corpus['unigram_entropy']:.3f} |", "",
          "## Sweep", "",
          f"{len(sweep_rows)} runs; loss = held-out loss at the end of each run.", ""]
    md += _cell_table(sweep_rows)
    compile_share = sweep_summary.get("compile_share")
    if compile_share is not None:
        md += ["", f"Compile share of the sweep's wall time: {compile_share:.1%}."]
    method = fit.get("method", {})
    md += ["", "## Fitted laws", "", f"Cell optimum: {method.get('optimum')} (runs within "
           f"{method.get('tolerance', 0.0025):.2%} of the cell's best loss); batch law in "
           f"{method.get('batch_law')}; {method.get('ci_level', 0.95):.0%} intervals from {method.get('bootstrap')} "
           "bootstrap resamples of the cells.", ""]
    for name, law in fit["laws"].items():
        md.append(f"- **{name}**: `{format_law(law)}`")
    if fit.get("loss_law"):
        md.append(f"- **loss**: `{format_law(fit['loss_law'])}`")
    regret = fit["regret"]
    if regret.get("mean") is not None:
        md += ["", f"Leave-one-cell-out regret (loss of the sweep run nearest the held-out prediction over the "
               f"cell's best, minus 1): mean {regret['mean']:.2%}, median {regret['median']:.2%}, "
               f"max {regret['max']:.2%}."]
    md += ["", "## Prediction", "",
           f"Model: {main_shape} — N = {n_main:,} non-embedding parameters (largest swept: "
           f"{max(r['n_params'] for r in sweep_rows):,}); D = {d_main:,.0f} tokens.", "",
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
    md += ["", "## Check run", "", "| learning rate | vs predicted | held-out loss | status |", "|---:|---:|---:|---|"]
    for r in sorted(main_rows, key=lambda r: r["lr"]):
        loss = _loss(r)
        md.append(f"| {r['lr']:.4g} | {r['lr'] / predicted:.3g}x | {loss:.4f} | {r['status']} |"
                  if math.isfinite(loss) else f"| {r['lr']:.4g} | {r['lr'] / predicted:.3g}x | - | {r['status']} |")
    md += ["", f"**Verdict:** {verdict}.", "", "## Plots", "",
           f"![main run loss curves]({curves.relative_to(out)})", ""]
    for p in plots:
        rel = Path(p).resolve().relative_to(out)
        md += [f"![{Path(p).stem}]({rel})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return {"path": str(path), "verdict_ok": ok, "verdict": verdict, "losses": losses, "prediction": prediction,
            "n_main": n_main, "d_main": d_main, "plots": [str(curves), *plots]}
