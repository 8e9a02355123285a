"""The default world's training images as a fine-tuning regulariser (ReFL's "pre-training loss").

Reward fine-tuning pulls a model toward whatever scores best, and on the default world that converges the
colours the prompts leave open (every "a photo of a four" turns red: the pixel diversity of samples halves).
ReFL (Xu et al., 2023) adds the base model's own training objective on its training data to the reward loss;
here that is the rectified-flow loss on fresh renders of the world's training scenes, drawn like the base
model's data. A batch is a function of (seed, step, slot), as the prompts and noise of the reward loss are, so
runs resume and spread over processes unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowbp_ops.training.batches import mix
from flowbp_ops.world import scenes


def training_scenes(world_dir: str | Path) -> list[scenes.Scene]:
    """The training scenes of the world in ``world_dir`` (``prompts/specs.json``)."""
    specs = Path(world_dir) / "prompts" / "specs.json"
    if not specs.exists():
        raise FileNotFoundError(f"{specs} not found: the pre-training regulariser renders the default world's "
                                "training scenes; build the prompt sets first, or set train.pretrain_weight=0")
    return [scenes.Scene(s["tag"], tuple(tuple(o) for o in s["objects"]), s["relation"])
            for s in json.loads(specs.read_text())["train"]]


class WorldRenders:
    """Renders of the training scenes of the world in ``world_dir``, as the base model saw them: canonical
    layouts, every handwriting sample, tags equally often."""

    def __init__(self, world_dir: str | Path):
        self.scenes = training_scenes(world_dir)
        by_tag = {t: [s for s in self.scenes if s.tag == t] for t in scenes.TAGS}
        self.by_tag = [v for v in by_tag.values() if v]
        self.renderer = scenes.Renderer()

    def batch(self, seed: int, step: int, qs: list[int]) -> tuple[Tensor, list[str]]:
        """Images (B, 3, 32, 32) and their prompts for the slots ``qs`` of step ``step``."""
        images, prompts = [], []
        for q in qs:
            rng = np.random.default_rng(mix(seed, step, q, 0x9E7))
            pool = self.by_tag[int(rng.integers(len(self.by_tag)))]
            scene = pool[int(rng.integers(len(pool)))]
            images.append(self.renderer.scene(scenes.layout(scene, rng), rng))
            prompts.append(scene.prompt())
        return torch.stack(images), prompts
