"""The long-context study's `report.md`: one table of the four methods at 1x, 2x and 4x the trained length,
their passkey heatmaps side by side, loss by position of all four in one plot, and a plain verdict.

A method "extends" to a length when its passkey accuracy there is at least half the base model's accuracy at
its own trained length (the base's 1x is the reference: what the model can retrieve at all); the loss beyond
the trained length is reported against the same method's loss inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qwenjax.evals.plots import plot_passkey
from qwenjax.jsonl import atomic_write_text

#: a method extends to a length where its passkey accuracy is at least this share of the base's at 1x
EXTENDS_SHARE = 0.5
LABELS = {"base": "base (unchanged)", "abf": "ABF stage (trained)", "yarn": "YaRN (no training)",
          "dca": "DCA (no training)"}


def passkey_by_length(result: dict) -> dict[int, float]:
    pk = result["passkey"]
    return {n: float(np.mean([c["accuracy"] for c in pk["cells"] if c["length"] == n])) for n in pk["lengths"]}


def loss_split(result: dict, seq_len: int, long_len: int) -> dict[str, float]:
    """Mean loss of the 1x window, and of the 4x window inside and beyond the trained length (token-weighted)."""
    buckets = result["ppl"][str(long_len)]["buckets"]

    def mean(bs):
        n = sum(b["end"] - b["start"] for b in bs)
        return sum(b["loss"] * (b["end"] - b["start"]) for b in bs) / n if n else float("nan")
    return {"1x": result["ppl"][str(seq_len)]["mean_loss"],
            "inside": mean([b for b in buckets if b["end"] <= seq_len]),
            "beyond": mean([b for b in buckets if b["start"] >= seq_len])}


def verdict_lines(results: dict[str, dict], seq_len: int) -> list[str]:
    """One plain sentence per method: how far it extends and what it costs at the trained length."""
    base_acc = passkey_by_length(results["base"])
    ref = base_acc[seq_len]
    long_len = max(base_acc)
    lines = []
    if ref == 0:
        lines.append(f"The base model answers no passkey at its own length ({seq_len} tokens), so passkey accuracy "
                     "cannot tell the methods apart here; only the loss by position can.")
    for method, result in results.items():
        acc = passkey_by_length(result)
        loss = loss_split(result, seq_len, long_len)
        reach = [n for n, a in sorted(acc.items()) if ref > 0 and a >= EXTENDS_SHARE * ref]
        far = max(reach) if reach else None
        if far is None:
            how = "does not reach even the trained length" if ref > 0 else "cannot be judged by passkey"
        elif far >= long_len:
            how = f"**extends to {long_len // seq_len}x** ({long_len} tokens)"
        else:
            how = f"reaches {far // seq_len}x ({far} tokens), not {long_len // seq_len}x"
        lines.append(
            f"- **{LABELS[method]}** {how}: passkey {acc[seq_len]:.2f} at 1x, {acc[long_len]:.2f} at "
            f"{long_len // seq_len}x (base at 1x: {ref:.2f}); loss beyond {seq_len} tokens {loss['beyond']:.3f} "
            f"nats against {loss['inside']:.3f} inside ({loss['beyond'] - loss['inside']:+.3f}); "
            f"loss at 1x {loss['1x']:.3f}.")
    return lines


def _plot_losses(out: Path, results: dict[str, dict], length: int, seq_len: int) -> Path:
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, result in results.items():
        buckets = result["ppl"][str(length)]["buckets"]
        ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o", ms=3,
                label=LABELS[method])
    if length > seq_len:
        ax.axvline(seq_len, color="k", ls="--", lw=1, label="trained length")
    ax.set_xlabel("position (tokens of context)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"loss by position, windows of {length} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "plots" / f"loss-by-position-{length}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_long_report(out: Path, *, plan, plan_name: str, results: dict[str, dict], base: dict, abf: dict,
                      fixed_tokens: int, wall_s: float) -> dict[str, Any]:
    """Write OUT/report.md (and its PNGs under OUT/plots); returns its path, verdict lines and table rows."""
    seq_len, long_len = plan.seq_len, plan.seq_len * plan.factor
    heatmaps = {}
    for method, result in results.items():
        heatmaps[method] = out / "plots" / f"passkey-{method}.png"
        plot_passkey(result["passkey"], heatmaps[method], title=f"{LABELS[method]}: passkey accuracy")
    loss_plots = [_plot_losses(out, results, n, seq_len) for n in (long_len, seq_len)]
    lengths = results["base"]["passkey"]["lengths"]
    rows = []
    for method, result in results.items():
        acc, loss = passkey_by_length(result), loss_split(result, seq_len, long_len)
        rows.append({"method": method, **{f"passkey_{n}": acc[n] for n in lengths}, "loss_1x": loss["1x"],
                     "loss_inside": loss["inside"], "loss_beyond": loss["beyond"]})
    verdict = verdict_lines(results, seq_len)
    rel = lambda p: str(Path(p).relative_to(out))
    md = [
        "# Long-context study", "",
        f"Plan `{plan_name}`: a {plan.layers}-layer, {plan.hidden_size}-wide model ({plan.heads} heads, "
        f"{plan.kv_heads} kv heads) trained {plan.steps} steps x {plan.batch_size} sequences of {seq_len} tokens "
        f"(rope_theta 1e4) on synthetic passkey documents"
        + (f" and copy drills ({plan.drill:.0%} of the documents)" if plan.drill else "")
        + f" (held-out loss {base.get('eval_loss'):.3f}), then judged "
        f"at {', '.join(map(str, lengths))} tokens. Wall time {wall_s:.0f} s (this invocation; a rerun reuses "
        "finished stages).", "",
        "Methods: **base** the model unchanged; **ABF** a second stage through `stages:` "
        f"({plan.abf_steps} steps x {plan.abf_batch_size} sequences of {long_len} tokens, rope_theta "
        f"{plan.abf_theta:g}, held-out loss {abf.get('eval_loss'):.3f}); **YaRN** `model.rope_scaling` "
        f"{{rope_type: yarn, factor: {plan.factor}, original_max_position_embeddings: {seq_len}}}, no training; "
        f"**DCA** `model.dual_chunk_attention_config` {{chunk_size: {seq_len}, local_size: {plan.dca_local_size}}}, "
        "no training.", "",
        "## Verdict", "",
        f"(Extends to a length: passkey accuracy there at least {EXTENDS_SHARE:.0%} of the base model's at "
        f"{seq_len} tokens.)", "", *verdict, "",
        "## Table", "",
        f"Passkey: {plan.trials} keys x {len(plan.depths)} depths per length (a prompt without filler is "
        f"{fixed_tokens} tokens). Loss: mean next-token loss (nats) over the first {long_len} (or {seq_len}) tokens "
        f"of {plan.ppl_sequences} held-out documents, each window one document from its start; 'inside' / "
        f"'beyond' are the positions below / from {seq_len} of the {long_len}-token windows.", "",
        "| method | " + " | ".join(f"passkey @{n}" for n in lengths) + f" | loss @{seq_len} | loss inside | "
        "loss beyond |",
        "|---|" + "---:|" * (len(lengths) + 3),
        *(f"| {LABELS[r['method']]} | " + " | ".join(f"{r[f'passkey_{n}']:.2f}" for n in lengths)
          + f" | {r['loss_1x']:.3f} | {r['loss_inside']:.3f} | {r['loss_beyond']:.3f} |" for r in rows), "",
        "## Passkey heatmaps (depth x length)", "",
        "| " + " | ".join(LABELS[m] for m in heatmaps) + " |", "|" + "---|" * len(heatmaps),
        "| " + " | ".join(f"![{m}]({rel(p)})" for m, p in heatmaps.items()) + " |", "",
        "## Loss by position", "",
        *(f"![loss by position]({rel(p)})" for p in loss_plots), "",
        "Per-method tables: `evals/<method>.json`; runs: `base/`, `abf/` (`abf/stages/0`).", "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return {"path": str(path), "verdict": "\n".join(verdict), "rows": rows, "plots": [*map(str, heatmaps.values()),
                                                                                       *map(str, loss_plots)]}
