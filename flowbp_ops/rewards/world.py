"""The default world's reward models, trained by the project (no weights can be downloaded).

* ``align`` (plays HPSv2.1, the training reward): the probability that the image shows exactly the prompt's
  scene — the right digits, in the asked colours, count and arrangement, nothing else — read cell by cell by
  three calibrated, adversarially trained parsers and combined by a geometric mean (how and why:
  :mod:`flowbp_ops.world.train_rewards`).
* ``align_heldout`` (plays PickScore / ImageReward): the same probability from one parser of another
  architecture, trained plainly on the other half of the handwriting with another seed. Never trained against:
  a training reward that rises while it stalls is reward hacking made visible.
* ``quality`` / ``quality_heldout``: realism critics, the logit that an image is a clean render rather than a
  degraded one (noise, blur, washed-out or clipped colour, stray blobs, overlaps); ``realism`` is the first
  one's probability, bounded for weighted composites.

The GenEval-style judge (detector + GenEval's rules) is not a reward: it has no gradient
(:mod:`flowbp_ops.world.judge`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_ops.rewards.base import check_images
from flowbp_ops.world import nets, scenes

ENSEMBLE = ("align_0", "align_1", "align_2")


@lru_cache(maxsize=4096)
def placements(prompt: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A prompt's scene as tensors: every placement's cells (A, n), the objects' content classes (n,) and colours
    (n,; −1 = any), and which cells each placement leaves empty (A, 4)."""
    options = scenes.assignments(scenes.parse_prompt(prompt))
    cells = torch.tensor([c for c, _, _ in options])
    empty = torch.ones(len(options), 4)
    empty[torch.arange(len(options))[:, None], cells] = 0
    _, classes, colors = options[0]
    return cells, torch.tensor(classes), torch.tensor(colors), empty


def scene_log_probability(content: Tensor, color: Tensor, prompts: list[str]) -> Tensor:
    """log P(exactly the prompt's scene) per image from per-cell log-probabilities ``content`` (B, 4, 11) and
    ``color`` (B, 4, 4), cells independent: a log-sum over the scene's placements (disjoint events) of the objects'
    content and colour terms plus the other cells' "empty"."""
    out = []
    for lc, lk, prompt in zip(content, color, prompts):
        cells, classes, colors, empty = (t.to(content.device) for t in placements(prompt))
        lp = lc[cells, classes].sum(1) + (lc[:, 0] * empty).sum(1)
        lp = lp + (lk[cells, colors.clamp_min(0)] * (colors >= 0)).sum(1)
        out.append(torch.logsumexp(lp, 0))
    return torch.stack(out)


class SceneReward:
    """``P(scene | image)`` under calibrated parsers; several parsers: the geometric mean of their probabilities."""

    def __init__(self, members: list[tuple[torch.nn.Module, float]], name: str):
        self.members, self.name = members, name

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        logs = []
        for net, temperature in self.members:
            content, color = net(images)
            logs.append(scene_log_probability(F.log_softmax(content / temperature, -1),
                                              F.log_softmax(color / temperature, -1), prompts))
        return torch.stack(logs).mean(0).exp()

    def to(self, device) -> "SceneReward":
        self.members = [(net.to(device), t) for net, t in self.members]
        return self


class QualityReward:
    """The critic's logit that the image is a clean render (``probability=True``: its sigmoid, in [0, 1])."""

    def __init__(self, net: torch.nn.Module, name: str, probability: bool = False):
        self.net, self.name, self.probability = net, name, probability

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        logit = self.net(images)
        return torch.sigmoid(logit) if self.probability else logit


def _load(world_dir: str | Path, name: str, device) -> tuple[torch.nn.Module, dict]:
    net, cfg = nets.load_net(Path(world_dir) / "rewards" / name)
    return net.to(device), cfg


def _parsers(names: tuple[str, ...], reward: str):
    def factory(world_dir: str | Path = "data/world", device: str = "cpu", **_) -> SceneReward:
        members = [_load(world_dir, n, device) for n in names]
        return SceneReward([(net, cfg.get("temperature", 1.0)) for net, cfg in members], reward)

    factory.__name__ = reward
    return factory


def _critic(net_name: str, reward: str, probability: bool = False):
    def factory(world_dir: str | Path = "data/world", device: str = "cpu", **_) -> QualityReward:
        return QualityReward(_load(world_dir, net_name, device)[0], reward, probability)

    factory.__name__ = reward
    return factory


align, align_heldout = _parsers(ENSEMBLE, "align"), _parsers(("align_heldout",), "align_heldout")
quality, quality_heldout = _critic("quality", "quality"), _critic("quality_heldout", "quality_heldout")
# bounded realism for composites with the alignment probability ("align:0.7,realism:0.3"): the logit is
# unbounded and a composite with it is won by pushing the critic alone
realism = _critic("quality", "realism", probability=True)
