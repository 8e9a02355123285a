"""Held-out evaluation: every reward's mean, and a judge's metrics (the default world's GenEval in miniature)."""

from __future__ import annotations

from typing import Any

import torch

from flowbp_ops.sampling import generate


def evaluate(backbone, prompts: list[str], rewards: dict[str, Any], n_steps: int, guidance: float | None,
             judge=None, seed: int = 42) -> dict[str, float]:
    """``reward/<name>`` per reward and the judge's metrics (``judge.metrics(images, prompts)``) when given."""
    images = generate(backbone, prompts, n_steps, guidance, seed=seed)
    with torch.no_grad():
        out = {f"reward/{n}": float(r(images, prompts).mean()) for n, r in rewards.items()}
    if judge is not None:
        out.update(judge.metrics(images, prompts))
    return out


def judge_for(backbone_name: str, world_dir) -> Any:
    """The held-out judge of a backbone's world: the default world's GenEval-style judge, else None (plug a real
    GenEval detector into :func:`flowbp_ops.judges.geneval.score_geneval`, or serve a VLM judge)."""
    if backbone_name != "default":
        return None
    from flowbp_ops.world.judge import load_judge

    return load_judge(world_dir)
