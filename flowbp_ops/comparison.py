"""Method comparison: the table and the plots users look at (README, MLflow, Dagster metadata)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from flowbp_ops.atomic import atomic_path

CURVE_KEYS = [("reward", "training reward"), ("heldout/align_heldout", "held-out alignment"),
              ("heldout/quality", "quality"), ("heldout/quality_heldout", "held-out quality"),
              ("ema_eval/geneval/overall", "held-out judge (EMA, every 50 steps)")]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[list[dict]]], path: Path, window: int = 5, title: str = "") -> None:
    """Reward-versus-step per method: mean over runs (seeds), moving average of ``window`` steps."""
    plt = _plt()
    keys = [(k, t) for k, t in CURVE_KEYS if any(k in row for runs in curves.values() for c in runs for row in c)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    for name, runs in curves.items():
        runs = [c for c in runs if c]
        if not runs:
            continue
        n = min(len(c) for c in runs)
        style = dict(label=name, lw=2 if name.startswith("flowbp") else 1, ls="--" if "@" in name else "-")
        for ax, (key, label) in zip(axes[0], keys):
            ax.set_title(label)
            ax.set_xlabel("step")
            steps = [i for i in range(n) if all(key in c[i] for c in runs)]
            if len(steps) < n / 2:  # logged now and then (the EMA evaluations): the points themselves
                ax.plot([i + 1 for i in steps], [statistics.fmean(c[i][key] for c in runs) for i in steps], marker="o",
                        **style)
                continue
            mean = [statistics.fmean(c[i].get(key, float("nan")) for c in runs) for i in range(n)]
            smooth = [statistics.fmean(mean[max(0, i - window + 1): i + 1]) for i in range(n)]
            ax.plot(range(1, n + 1), smooth, **style)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or f"batch mean, moving average of {window} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def compare(evals: dict[str, dict], curves: dict[str, list[dict]], out_dir: Path) -> dict:
    """``evals``: per method the evaluation stage's metrics.json; ``curves``: its per-step rows."""
    first = next(iter(evals.values()))["variant"]
    rewards = [k for k in first if k.startswith("reward/")]
    judged = [k for k in first if k in ("geneval/overall", "judge/alignment", "judge/quality")]
    cols = rewards + judged + ["diversity"]
    base = next(iter(evals.values()))["base"]
    lines = ["| variant | " + " | ".join(c.removeprefix("reward/") for c in cols) + " | gates |",
             "|" + "---|" * (len(cols) + 2)]
    lines.append("| base model | " + " | ".join(f"{base.get(c, float('nan')):.3f}" for c in cols) + " | |")
    for m, ev in evals.items():
        v, d = ev["variant"], ev["delta"]
        cells = [f"{v.get(c, float('nan')):.3f} ({d.get(c, 0):+.3f})" for c in cols]
        failed = [g for g, r in ev["gates"].items() if not r["passed"]]
        lines.append(f"| `{m}` | " + " | ".join(cells)
                     + f" | {'pass' if not failed else 'FAIL: ' + ', '.join(failed)} |")
    table = "\n".join(lines) + "\n"
    result = {"variants": evals, "columns": cols, "table": table}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "table.md").write_text(table)
        (tmp / "comparison.json").write_text(json.dumps(result, indent=2))
        _bars(evals, rewards, tmp / "comparison.png")
        plot_curves({m: [rows] for m, rows in curves.items()}, tmp / "curves.png")
    return result


def _bars(evals: dict[str, dict], rewards: list[str], path: Path) -> None:
    """Per method: the held-out judge's change in points (when there is one) and every reward's change in standard
    deviations of the base model's scores (rewards live on different scales)."""
    plt = _plt()
    first = next(iter(evals.values()))
    judged = [k for k in ("geneval/overall", "judge/alignment") if k in first["delta"]]
    fig, axes = plt.subplots(1, 1 + bool(judged), figsize=(1.6 * len(evals) * (1 + bool(judged)) + 3, 3.8),
                             squeeze=False)
    names = list(evals)
    if judged:
        ax = axes[0][0]
        ax.bar(names, [100 * ev["delta"][judged[0]] for ev in evals.values()], color="tab:green")
        ax.set_ylabel(f"{judged[0]}: change vs base (points)")
        ax.set_title("held-out judge", fontsize=9)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.axhline(0, color="k", lw=0.5)
    ax = axes[0][-1]
    width = 0.8 / len(rewards)
    for j, r in enumerate(rewards):
        sd = [ev["delta"][r] / max(ev["base"].get(r.replace("reward/", "reward_std/"), 1.0), 1e-8)
              for ev in evals.values()]
        ax.bar([i + j * width for i in range(len(evals))], sd, width, label=r.removeprefix("reward/"))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(evals))], names, rotation=20, fontsize=8)
    ax.set_ylabel("change vs base (SD of the base's scores)")
    ax.legend(fontsize=7)
    ax.set_title("held-out prompts: reward change per method", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_kj(pairs: list[tuple[int, int]], n_steps: int, path: Path, title: str = "") -> dict[str, int]:
    """The (k, j) pairs a run drew, as a 2-D histogram (the authors' diagnostic); returns the counts."""
    import numpy as np

    plt = _plt()
    counts = np.zeros((n_steps + 1, n_steps + 1), dtype=int)
    for k, j in pairs:
        counts[j, k] += 1
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(counts, origin="lower", cmap="viridis")
    ax.set_xlabel("k (first active step)")
    ax.set_ylabel("j (split)")
    ax.set_title(title or f"(k, j) over {len(pairs)} steps", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {f"{k},{j}": int(counts[j, k]) for k, j in sorted(set(pairs))}
