"""Tables, paired tests and plots of the paper in miniature (``bench/miniature.py`` writes the runs).

* **equal steps**: the final EMA weights on the 600 held-out prompts (mean ± population std over seeds);
* **equal wall-clock**: the EMA curves on the held-out subset, every method's read (interpolated) at the
  training time the fastest method's whole run took;
* **paired tests**: two variants trained with the same seed saw the same batches and noise and are judged on the
  same held-out prompts with the same noise, so their difference is taken per (seed, prompt) and resampled over
  prompts within each seed (10,000 bootstrap draws): the mean difference in judge accuracy with a 95 % interval,
  and on how many seeds it has the same sign;
* the endpoint ablation, the α sweep, and the connector residual by leap length.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

JUDGE = "geneval/overall"
POLICY = ("flow_grpo", "flow_grpo_fast", "diffusion_nft")  # bench/miniature.py's policy-gradient methods
COLUMNS = [(JUDGE, "judge (GenEval overall)"), ("reward/align", "align (train)"), ("reward/align_heldout",
           "align_heldout"), ("reward/quality", "quality"), ("reward/quality_heldout", "quality_heldout")]
CURVE = "ema_eval/geneval/overall"


def _ms(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "—"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.3f} ± {scale * sd:.3f}"


def paired(a: list[dict], b: list[dict], draws: int = 10_000, seed: int = 0) -> dict:
    """Judge accuracy of ``a`` minus ``b`` over the seeds both have: mean, 95 % bootstrap interval (prompts resampled
    within each seed), and the number of seeds where ``a`` is ahead."""
    rng = np.random.default_rng(seed)
    by_a, by_b = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    seeds = sorted(set(by_a) & set(by_b))
    diffs = [np.asarray(by_a[s]["correct"], float) - np.asarray(by_b[s]["correct"], float) for s in seeds]
    if not diffs:
        return {}
    boot = np.zeros(draws)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(draws, len(d)))].mean(1)
    boot /= len(diffs)
    per_seed = [float(d.mean()) for d in diffs]
    return {"mean": float(np.mean(per_seed)), "ci95": [float(q) for q in np.quantile(boot, [0.025, 0.975])],
            "seeds_ahead": sum(x > 0 for x in per_seed), "seeds": len(seeds)}


def at_time(curve: list[dict], t: float) -> float | None:
    """A run's EMA judge curve read at cumulative training time ``t`` (linear between its evaluations)."""
    pts, elapsed = [], 0.0
    for row in curve:
        elapsed += row.get("time_step", 0.0)
        if CURVE in row:
            pts.append((elapsed, row[CURVE]))
    return _interp(pts, t)


def report(out: Path, order: list[str]) -> dict:
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    variants = [v for v in ["base", *order] if v in by]
    trained = [v for v in variants if v != "base"]
    lines = ["| variant | " + " | ".join(t for _, t in COLUMNS) + " | s/step | grad cosine | norm ratio |",
             "|" + "---|" * (len(COLUMNS) + 4)]
    summary: dict = {}
    for v in variants:
        rs = by[v]
        cells = [_ms([r["eval"][k] for r in rs]) for k, _ in COLUMNS]
        tr = [r for r in rs if "curve" in r]
        fid = [r for r in tr if r.get("fidelity")]
        cells += ([f"{statistics.fmean(r['time_step'] for r in tr):.2f}"] if tr else ["—"]) + \
                 ([_ms([r["fidelity"]["cosine"] for r in fid]), _ms([r["fidelity"]["norm_ratio"] for r in fid])]
                  if fid else ["—"] * 2)
        lines.append(f"| `{v}` ({len(rs)} seed{'s' * (len(rs) > 1)}) | " + " | ".join(cells) + " |")
        summary[v] = {k: statistics.fmean(r["eval"][k] for r in rs) for k, _ in COLUMNS}
    tables = {"equal_steps": "\n".join(lines)}

    # equal wall-clock: every curve read at the time the fastest method's whole run took
    totals = {v: statistics.fmean(sum(c["time_step"] for c in r["curve"]) for r in by[v]) for v in trained}
    if totals:
        budget = min(totals.values())
        lines = [f"| variant | judge at {budget:.0f} s of training ({_subset(rows)}-prompt subset) | judge at the "
                 "last step (same subset) | steps done in that time |", "|---|---|---|---|"]
        for v in trained:
            at = [at_time(r["curve"], budget) for r in by[v]]
            last = [next(c[CURVE] for c in reversed(r["curve"]) if CURVE in c) for r in by[v]]
            steps = [sum(1 for _ in _upto(r["curve"], budget)) for r in by[v]]
            lines.append(f"| `{v}` | {_ms([a for a in at if a is not None])} | {_ms(last)} | "
                         f"{statistics.fmean(steps):.0f} |")
            summary[v]["judge_at_equal_time"] = statistics.fmean(a for a in at if a is not None) if any(
                a is not None for a in at) else None
        tables["equal_time"] = "\n".join(lines)

    # matched compute: the policy-gradient family beside the direct-gradient one, per image, per forward, per second
    if any(v in POLICY for v in trained):
        main = [v for v in trained if "@" not in v]
        budget_f = min(_judge_by_forwards(r)[-1][0] for v in main for r in by[v])
        lines = [f"| variant | family | forwards per image per step | s/step | judge at {budget_f:.0f} forwards per "
                 f"image | judge at {budget:.0f} s | judge at the last step (equal images) |",
                 "|---|---|---|---|---|---|---|"]
        for v in main:
            fw = statistics.fmean(statistics.fmean(_forwards(c, r) for c in r["curve"]) for r in by[v])
            at_f = [_interp(_judge_by_forwards(r), budget_f) for r in by[v]]
            at_t = [at_time(r["curve"], budget) for r in by[v]]
            last = [next(c[CURVE] for c in reversed(r["curve"]) if CURVE in c) for r in by[v]]
            family = "policy gradient" if v in POLICY else "direct gradient"
            lines.append(f"| `{v}` | {family} | {fw:.0f} | {statistics.fmean(r['time_step'] for r in by[v]):.2f} | "
                         f"{_ms([a for a in at_f if a is not None])} | {_ms([a for a in at_t if a is not None])} | "
                         f"{_ms(last)} |")
            summary[v]["judge_at_equal_forwards"] = statistics.fmean(a for a in at_f if a is not None) \
                if any(a is not None for a in at_f) else None
        tables["matched_compute"] = "\n".join(lines)

    # paired tests: each FlowBP variant against every baseline and every policy method; the ablations against their
    # method
    tests = {}
    flowbp = [v for v in trained if v.startswith("flowbp") and "@" not in v]
    for a in flowbp:
        for b in [v for v in trained if not v.startswith("flowbp") and "@" not in v] + ["base"]:
            if b in by:
                tests[f"{a} vs {b}"] = paired(by[a], by[b])
    for v in trained:
        if "@" in v:
            tests[f"{v} vs {v.split('@')[0]}"] = paired(by[v], by[v.split("@")[0]])
    lines = ["| comparison | judge accuracy difference (points) | 95 % interval | seeds ahead |", "|---|---|---|---|"]
    for name, t in tests.items():
        if t:
            lo, hi = (100 * q for q in t["ci95"])
            ahead = f"{t['seeds_ahead']}/{t['seeds']}"
            lines.append(f"| {name} | {100 * t['mean']:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {ahead} |")
    tables["paired"] = "\n".join(lines)

    conn = out / "connector.json"
    if conn.exists():
        rel = json.loads(conn.read_text())["relative_residual"]
        lines = ["| leap j − k | single velocity (LeapAlign) | Lagrange order 3 (FlowBP-Lagrange) |", "|---|---|---|"]
        lines += [f"| {L} | {r['leap']:.4f} | {r['lagrange']:.4f} |" for L, r in rel.items()]
        tables["connector"] = "\n".join(lines)
        _plot_connector(rel, out / "connector.png")
    (out / "tables.md").write_text("\n\n".join(f"### {k}\n\n{t}" for k, t in tables.items()) + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "paired": tests}, indent=2))
    _plot_curves({v: by[v] for v in trained}, out / "curves.png")
    print((out / "tables.md").read_text())
    return {"summary": summary, "paired": tests}


def _forwards(row: dict, run: dict) -> float:
    """Velocity evaluations per image of one step (recorded by the trainer; runs from before the counter: the
    one-pass rollout's N plus DRaFT-LV's copies)."""
    if "forwards" in row:
        return row["forwards"]
    cfg = run["config"]
    return cfg["rollout_steps"] + (2 if cfg["method"] == "draft_lv" else 0)


def _judge_by_forwards(run: dict) -> list[tuple[float, float]]:
    """(cumulative forwards per image, EMA judge) at each of a run's evaluations."""
    pts, total = [], 0.0
    for c in run["curve"]:
        total += _forwards(c, run)
        if CURVE in c:
            pts.append((total, c[CURVE]))
    return pts


def _interp(pts: list[tuple[float, float]], x: float) -> float | None:
    if not pts or x < pts[0][0]:
        return None
    for (x0, v0), (x1, v1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return v0 + (v1 - v0) * (x - x0) / max(x1 - x0, 1e-9)
    return pts[-1][1]


def _subset(rows: list[dict]) -> int:
    return next(r["config"]["ema_eval_prompts"] for r in rows if "config" in r)


def _upto(curve: list[dict], t: float):
    elapsed = 0.0
    for c in curve:
        elapsed += c.get("time_step", 0.0)
        if elapsed > t:
            return
        yield c


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(by: dict[str, list[dict]], path: Path) -> None:
    plt = _plt()
    policy = any(v in POLICY for v in by)
    fig, axes = plt.subplots(1, 4 if policy else 3, figsize=(21 if policy else 16, 4.4))
    for v, rs in by.items():
        if "@" in v:
            continue
        style = dict(lw=2 if v.startswith("flowbp") else 1, label=v, ls="--" if v in POLICY else "-")
        pts = [[(c["step"] + 1, c[CURVE]) for c in r["curve"] if CURVE in c] for r in rs]
        n = min(len(p) for p in pts)
        steps = [pts[0][i][0] for i in range(n)]
        mean = [statistics.fmean(p[i][1] for p in pts) for i in range(n)]
        axes[0].plot(steps, mean, **style)
        times = [statistics.fmean(sum(c["time_step"] for c in r["curve"][:s]) for r in rs) for s in steps]
        axes[1].plot(times, mean, **style)
        m = min(len(r["curve"]) for r in rs)
        reward = [statistics.fmean(r["curve"][i]["reward"] for r in rs) for i in range(m)]
        smooth = [statistics.fmean(reward[max(0, i - 9): i + 1]) for i in range(m)]
        axes[2].plot(range(1, m + 1), smooth, **style)
        if policy:
            pts = [_judge_by_forwards(r) for r in rs]
            n = min(len(p) for p in pts)
            axes[3].plot([statistics.fmean(p[i][0] for p in pts) for i in range(n)],
                         [statistics.fmean(p[i][1] for p in pts) for i in range(n)], **style)
    axes[0].set(title=f"held-out judge (EMA, {_subset([r for rs in by.values() for r in rs])} prompts) vs step",
                xlabel="step")
    axes[1].set(title="held-out judge vs training wall-clock", xlabel="seconds (1 thread)")
    axes[2].set(title="training reward (batch mean, 10-step average)", xlabel="step")
    if policy:
        axes[3].set(title="held-out judge vs model forwards", xlabel="velocity evaluations per image (cumulative)")
    axes[0].legend(fontsize=7)
    fig.suptitle("default world, mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_connector(rel: dict, path: Path) -> None:
    plt = _plt()
    leaps = [int(k) for k in rel]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(leaps, [rel[str(L)]["leap"] for L in leaps], "o-", label="single velocity (LeapAlign)")
    ax.plot(leaps, [rel[str(L)]["lagrange"] for L in leaps], "s-", label="Lagrange order 3 (FlowBP-Lagrange)")
    ax.set(xlabel="leap length j − k (of 25 steps)", ylabel="|x̂_j − x_j| / |x_j − x_k|", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
