"""The post-training study's `report.md`: held-out accuracy per stage and GRPO seed, the verdict, reward curves.

Plain Markdown with a relative PNG link, like the scaling demo's report (qwenjax/demo_report.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qwenjax import jsonl  # noqa: E402
from qwenjax.jsonl import atomic_write_text  # noqa: E402


def grpo_verdict(start: float, seeds: dict[int, float]) -> tuple[bool, float, float, str]:
    """(passed, gain, spread, sentence): GRPO's mean held-out accuracy over its seeds minus its starting
    point's, against the seed-to-seed spread (max - min over the seeds). Passed when gain > spread."""
    values = list(seeds.values())
    mean = sum(values) / len(values)
    gain, spread = mean - start, max(values) - min(values)
    passed = gain > spread
    text = (f"GRPO {'RAISED' if passed else 'did NOT raise'} held-out accuracy by more than the seed-to-seed "
            f"spread: mean over seeds {mean:.3f} against {start:.3f} at its start, a gain of {gain:+.3f}, "
            f"spread {spread:.3f} ({', '.join(f'seed {s}: {v:.3f}' for s, v in seeds.items())})")
    return passed, gain, spread, text


def reward_plot(out: Path, seeds: list[int]) -> Path:
    """GRPO's mean reward per round for each seed (faint) and its trailing mean, from metrics.jsonl."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, s in enumerate(seeds):
        recs = jsonl.read(out / f"grpo-seed{s}" / "metrics.jsonl")
        steps, reward = [r["step"] for r in recs], [r["reward_mean"] for r in recs]
        ax.plot(steps, reward, color=f"C{i}", alpha=0.25, lw=0.8)
        w = max(1, min(10, len(reward) // 5))  # a trailing mean over w rounds: one round is 64 coin flips
        smooth = [sum(reward[max(0, j - w + 1):j + 1]) / len(reward[max(0, j - w + 1):j + 1])
                  for j in range(len(reward))]
        ax.plot(steps, smooth, color=f"C{i}", lw=1.8, label=f"seed {s} (mean of the last {w} rounds)")
    ax.set_xlabel("GRPO round")
    ax.set_ylabel("reward (1 = exact answer)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("GRPO: mean reward of each round's sampled answers")
    fig.tight_layout()
    path = out / "plots" / "grpo_reward.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, *, plan: dict, accuracy: dict[str, dict], grpo: dict[int, dict], pairs: dict,
                 start_stage: str, stage_s: dict[str, float], wall_s: float) -> dict[str, Any]:
    start = accuracy[start_stage]["accuracy"]
    passed, gain, spread, verdict = grpo_verdict(start, {s: r["accuracy"] for s, r in grpo.items()})
    plot = reward_plot(out, list(grpo))
    lines = ["# Post-training study", "",
             f"Task: `a+b=` with a, b < {plan['max_operand']}; a model of hidden size {plan['hidden']}, "
             f"{plan['layers']} layers, pre-trained for {plan['pre_steps']} steps on {plan['pre_docs']} plain-text "
             f"problems, then SFT ({plan['sft_steps']} steps on {plan['sft_convs']} ChatML conversations), "
             f"DPO ({plan['dpo_steps']} steps on pairs from {plan['pair_k']} samples per prompt) and GRPO "
             f"({plan['rl_steps']} rounds of {plan['rl_prompts_per_step']} prompts x {plan['group_size']} answers "
             f"sampled at temperature {plan['rl_temperature']}, exact-answer reward, lr {plan['rl_lr']:g}) "
             f"with seeds {', '.join(map(str, plan['seeds']))}. GRPO's {plan['rl_prompts']} prompts are drawn from "
             + (f"{plan['rl_pool']} problems kept for it (never pre-trained on, SFT'd or paired)." if plan['rl_pool']
                else "the training problems."), "",
             "## Held-out exact-match accuracy", "",
             f"{plan['heldout']} fixed held-out problems (never in any training file), greedy decoding, correct "
             "when the answer's final number is the sum.", "",
             "| stage | accuracy | correct |", "|---|---|---|"]
    for name, r in accuracy.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['correct']} / {r['n']} |")
    for s, r in grpo.items():
        lines.append(f"| GRPO, seed {s} | {r['accuracy']:.3f} | {r['correct']} / {r['n']} |")
    lines += ["", "The pre-trained model is asked both in its own plain format (`a+b=`, up to its end of text) "
              "and in ChatML, which it never saw; every later stage in ChatML.", "",
              f"**Verdict:** {verdict}. GRPO started from the {start_stage} model.", "",
              "## Pairs", "",
              f"{pairs['prompts']} prompts x {plan['pair_k']} sampled answers from the SFT model: "
              f"{pairs['correct']} of {pairs['answers']} right; {pairs['pairs']} pairs, {pairs['all_correct']} "
              f"prompts all right and {pairs['all_wrong']} all wrong (skipped).", "",
              "## GRPO rewards", "", f"![GRPO reward]({plot.relative_to(out)})", "",
              "| seed | reward, first rounds | reward, last rounds | kl, last round |", "|---|---|---|---|"]
    for s in grpo:
        recs = jsonl.read(out / f"grpo-seed{s}" / "metrics.jsonl")
        w = max(1, min(10, len(recs) // 5))
        mean = lambda rs: sum(r["reward_mean"] for r in rs) / len(rs)  # noqa: E731
        lines.append(f"| {s} | {mean(recs[:w]):.3f} (first {w}) | {mean(recs[-w:]):.3f} (last {w}) | "
                     f"{recs[-1]['kl']:.2e} |")
    lines += ["", "## Examples (first held-out prompts)", ""]
    for name, r in [*accuracy.items(), *((f"GRPO seed {s}", r) for s, r in grpo.items())]:
        shown = "; ".join(f"`{e['prompt']}` -> `{e['answer']}`{'' if e['correct'] else ' (wrong)'}"
                          for e in r["examples"][:4])
        lines.append(f"- {name}: {shown}")
    lines += ["", "## Time", "", f"This invocation: {wall_s:.0f} s (stages reused from disk take ~0 s): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items()) + ".", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return {"path": str(path), "verdict": verdict, "passed": passed, "gain": gain, "spread": spread,
            "accuracy": {k: v["accuracy"] for k, v in accuracy.items()},
            "grpo": {s: r["accuracy"] for s, r in grpo.items()}, "wall_s": wall_s}
