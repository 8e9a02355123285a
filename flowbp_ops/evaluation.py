"""Held-out evaluation: every reward and the attribute accuracy of a held-out classifier."""

from __future__ import annotations

from typing import Any

import torch

from flowbp_ops.rewards.world import HEADS, prompt_labels
from flowbp_ops.sampling import generate


@torch.no_grad()
def attribute_accuracy(classifier, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Per-attribute and all-attributes accuracy of a (held-out) attribute classifier."""
    logits = classifier(images)
    labels = prompt_labels(prompts, images.device)
    right = {k: logits[k].argmax(-1) == labels[k] for k in HEADS}
    out = {f"acc_{k}": float(v.float().mean()) for k, v in right.items()}
    out["acc_all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    return out


def evaluate(backbone, prompts: list[str], rewards: dict[str, Any], n_steps: int, guidance: float | None,
             classifier=None, seed: int = 42) -> dict[str, float]:
    images = generate(backbone, prompts, n_steps, guidance, seed=seed)
    with torch.no_grad():
        out = {f"reward/{n}": float(r(images, prompts).mean()) for n, r in rewards.items()}
    if classifier is not None:
        out.update(attribute_accuracy(classifier, images, prompts))
    return out
