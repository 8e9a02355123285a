"""The evaluation stage: a variant's held-out metrics next to the base model's, and the promotion gates.

The base model's images come from its rollouts (``base_rollouts``: same prompts, same noise); the
variant's are sampled from the same noise. One model is in memory at a time: the base
model scores first, then the trained weights go onto it (a LoRA, or a swapped transformer),
so a FLUX-size backbone is never loaded twice. Scoring runs in small batches without gradient.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowbp_ops.atomic import atomic_path
from flowbp_ops.params import Params
from flowbp_ops.stages.paths import paths
from flowbp_ops.stages.prepare import backbone_of
from flowbp_ops.stages.train import input_tags, verified_variant


def _diversity(backbone, prompts: list[str], n_seeds: int, steps: int, guidance, seed: int,
               batch: int = 64, grid: str = "training") -> tuple[float, Any]:
    """Mean pairwise pixel distance between samples of the same prompt (and the samples)."""
    import torch

    from flowbp_ops.sampling import generate

    copies = [p for p in prompts for _ in range(n_seeds)]
    images = generate(backbone, copies, steps, guidance, seed=seed + 10_000, batch_size=batch,  # distinct seeds
                      grid=grid).cpu()
    grid = images.view(len(prompts), n_seeds, *images.shape[1:])
    flat = grid.flatten(2)
    d = torch.cdist(flat, flat).sum((1, 2)) / (n_seeds * (n_seeds - 1))
    return float(d.mean() / flat.shape[-1] ** 0.5), grid


def _score(images, prompts, rewards: dict, judge, batch: int, device) -> dict[str, float]:
    """Mean and spread of every reward over CPU images, scored in batches on ``device``; the judge's metrics."""
    import torch

    scores: dict[str, list] = {n: [] for n in rewards}
    for i in range(0, len(prompts), batch):
        x, ps = images[i:i + batch].to(device), prompts[i:i + batch]
        for n, r in rewards.items():
            scores[n].append(r(x, ps).float().cpu())
    out = {}
    for n, parts in scores.items():
        s = torch.cat(parts)
        out[f"reward/{n}"], out[f"reward_std/{n}"] = float(s.mean()), float(s.std())
    return {**out, **(judge.metrics(images, prompts) if judge is not None else {})}


def evaluation(params: Params, method: str, tracker=None) -> dict:
    """Held-out metrics of a variant next to the base model's (from its rollouts), and the gates."""
    import torch

    with torch.no_grad():
        return _evaluation(params, method, tracker)


def _evaluation(params: Params, method: str, tracker) -> dict:
    import torch

    from flowbp_ops.backbones.table import get_backbone, judge_for
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.rollout_store import load_rollouts
    from flowbp_ops.sampling import generate
    from flowbp_ops.trained_weights import load_trained

    p, r, e = paths(params), params.rollouts, params.eval
    summary = verified_variant(params, method)
    names = dict.fromkeys([params.train.reward, *e.rewards])  # the training reward (maybe a composite) first
    rewards = {n: get_reward(n, world_dir=params.world_dir, device=params.device) for n in names}
    judge = judge_for(params.train.backbone, params.world_dir)
    bb = backbone_of(params, from_embeddings=True)  # the base model; the variant's weights go onto it below
    batch = get_backbone(params.train.backbone).eval_batch  # real backbones: 512² images, fp32 VAE decode

    shards = list(load_rollouts(p.rollouts))
    prompts = sum((s[0] for s in shards), [])
    base_images = torch.cat([bb.decode(cache.x[-1][i:i + batch].to(bb.device)).cpu()
                             for _, cache, _, _ in shards for i in range(0, cache.x[-1].shape[0], batch)])
    # the first distinct held-out prompts (the default world lists its tags in turn: every tag is there)
    spread = list(dict.fromkeys(prompts))[: max(e.diversity_prompts, e.grid_prompts)]
    base = _score(base_images, prompts, rewards, judge, batch, bb.device)
    base["diversity"], base_grid = _diversity(bb, spread, e.diversity_seeds, r.n_steps, r.guidance, r.seed,
                                              batch, r.grid)
    load_trained(bb, p.variant(method) / "weights")
    images = generate(bb, prompts, r.n_steps, r.guidance, seed=r.seed, batch_size=batch,
                      grid=r.grid).cpu()  # same noise
    tuned = _score(images, prompts, rewards, judge, batch, bb.device)
    tuned["diversity"], grid = _diversity(bb, spread, e.diversity_seeds, r.n_steps, r.guidance, r.seed, batch,
                                          r.grid)
    if e.judge_url:  # evaluation only: a served VLM's 1-5 scores next to the rewards
        from flowbp_ops.judges.vlm import VLMJudge, VLMJudgeConfig

        vlm = VLMJudge(VLMJudgeConfig(base_url=e.judge_url, model=e.judge_model))
        for scores, imgs in ((base, base_images), (tuned, images)):
            scores.update({f"judge/{k}": float(v.mean()) for k, v in vlm(imgs, prompts).items()})
    # the evaluation's own MLflow run, nested under the training run it evaluates (which has ended)
    eval_run = None
    if tracker is not None and summary.get("run_id"):
        eval_run = tracker.start_run(f"{method}/evaluation", {"flowbp.stage": "evaluation", "method": method,
                                                              **input_tags(p.rollouts, "rollouts")},
                                     parent=summary["run_id"])
    metrics = {"method": method, "n_prompts": len(prompts), "base": base, "variant": tuned,
               "delta": {k: tuned[k] - base[k] for k in tuned}, "gates": gates(params, base, tuned),
               "model_version": summary.get("model_version"), "run_id": summary.get("run_id"),
               "eval_run_id": eval_run}
    try:
        _write(p, method, metrics, judge, base_grid, grid, spread, e.grid_prompts)
        if eval_run is not None:
            tracker.log_metrics(eval_run, {f"eval/{k}": v for k, v in tuned.items()})
            tracker.log_metrics(eval_run, {f"eval_base/{k}": v for k, v in base.items()})
            tracker.log_metrics(eval_run, {f"gate/{g}": float(r["passed"]) for g, r in metrics["gates"].items()})
            tracker.log_artifact(eval_run, p.evaluation(method) / "samples.png", "samples")
            tracker.log_artifact(eval_run, p.evaluation(method) / "metrics.json", "evaluation")
    except BaseException:
        if eval_run is not None:
            tracker.end_run(eval_run, "FAILED")
        raise
    if eval_run is not None:
        tracker.end_run(eval_run)
    return metrics


def _write(p, method: str, metrics: dict, judge, base_grid, grid, spread: list[str], n: int) -> None:
    with atomic_path(p.evaluation(method)) as tmp:
        tmp.mkdir()
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        title = f"{method}: base model vs tuned, same noise"
        save_grid(base_grid[:n], grid[:n], spread[:n], tmp / "samples.png",
                  title + (" (green frame: the held-out judge finds the prompt)" if judge is not None else ""),
                  [_verdicts(judge, g[:n], spread[:n]) for g in (base_grid, grid)] if judge is not None else None)


def gate_checks(params: Params, method: str, meta: dict) -> list[dict]:
    """The evaluation stage's asset checks: one per gate, as measured."""
    return [{"name": g, "passed": bool(r["passed"]), "metadata": r} for g, r in meta["gates"].items()]


def gates(params: Params, base: dict, tuned: dict) -> dict[str, dict]:
    """The promotion gates (also Dagster's blocking asset checks): improvement, no hacking, no collapse.

    Held-out rewards live on different scales (probabilities, logits), so their change is
    measured in standard deviations of the base model's scores on the same prompts. The held-out judge
    (the default world's GenEval in miniature, or a served VLM judge) must not fall either: a training reward
    that rises while what it stands for does not is the hack the gates are for.
    """
    pr = params.promote
    train_key = f"reward/{params.train.reward}"
    out = {}
    gain = tuned[train_key] - base[train_key]
    out["reward_improved"] = {"passed": gain > pr.min_improvement, "gain": gain, "min": pr.min_improvement}
    held = {k.removeprefix("reward/"): (tuned[k] - base[k]) / max(base[k.replace("reward/", "reward_std/")], 1e-8)
            for k in tuned if k.startswith("reward/") and k != train_key}
    worst = min(held.values()) if held else 0.0
    out["heldout_not_collapsed"] = {"passed": worst >= -pr.heldout_tolerance_sd, "worst_change_sd": worst,
                                    "change_sd": held, "tolerance_sd": pr.heldout_tolerance_sd}
    judged = params.judge_metric()
    if judged in tuned:
        change = tuned[judged] - base[judged]
        out["heldout_judge_improved"] = {"passed": change >= pr.min_judge_gain, "metric": judged, "change": change,
                                         "min": pr.min_judge_gain}
    else:
        out["heldout_judge_improved"] = {"passed": True, "skipped": "no held-out judge: set eval.judge_url"}
    ratio = tuned["diversity"] / max(base["diversity"], 1e-12)
    out["diversity_not_collapsed"] = {"passed": ratio >= pr.min_diversity_ratio, "ratio": ratio,
                                      "min_ratio": pr.min_diversity_ratio}
    return out


def _verdicts(judge, grid, prompts: list[str]):
    """Per grid image whether the judge finds its prompt in it: (prompts, samples) booleans."""
    import torch

    rows, cols = grid.shape[:2]
    correct = judge(grid.flatten(0, 1), [p for p in prompts for _ in range(cols)]).correct
    return torch.tensor(correct).view(rows, cols)


def save_grid(base_grid, grid, prompts: list[str], path: Path, title: str, verdicts=None) -> None:
    """Per prompt a row: the base model's samples, a gap, the tuned model's on the same noise; with ``verdicts``
    each image framed green (the judge finds the prompt) or red, and the counts beside each block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[0], grid.shape[1]
    fig, axes = plt.subplots(rows, 2 * cols + 1, figsize=((2 * cols + 0.4) * 0.9, rows * 0.95 + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * cols + [0.4] + [1] * cols})
    for i in range(rows):
        axes[i, cols].axis("off")  # the gap between the two models
        for j in range(cols):
            for block, images in ((0, base_grid), (1, grid)):
                ax = axes[i, j + block * (cols + 1)]
                ax.imshow(images[i, j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if verdicts is not None:
                    ok = bool(verdicts[block][i, j])
                    for side in ax.spines.values():
                        side.set(color="tab:green" if ok else "tab:red", linewidth=2.5)
                if i == 0 and j == 0:
                    ax.set_title("base model" if block == 0 else "tuned", fontsize=7, loc="left")
        axes[i, 0].set_ylabel(prompts[i].removeprefix("a photo of ")[:34], fontsize=5, rotation=0, ha="right",
                              va="center")
    if verdicts is not None:
        right = [int(v.sum()) for v in verdicts]
        title += f"\njudge: base {right[0]}/{rows * cols} right, tuned {right[1]}/{rows * cols}"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
