"""The default world's reward models, trained by the project (no weights can be downloaded).

* ``align`` (plays HPSv2.1): the probability, under an attribute classifier, that the image
  shows everything the prompt asks for: the product of the probabilities of the prompted
  digit, colour, size and position (a mean would hide a wrong digit behind three right
  easy attributes).
* ``quality``: a realism critic, the logit that an image is a clean render rather than a
  degraded one (noise, blur, washed-out or clipped colour, stray blobs); ``realism`` is the
  same critic's probability, bounded for weighted composites.
* ``align_heldout`` and ``quality_heldout`` (play PickScore / ImageReward): the same
  questions answered by independently trained models of another architecture, on another
  half of the digits and another seed. They are never used for training, so a training
  reward that rises while they stall or fall is reward hacking made visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowbp_ops.integrity import verify
from flowbp_ops.rewards.base import check_images, freeze
from flowbp_ops.world import digits

HEADS = {"digit": 10, "color": len(digits.COLORS), "size": len(digits.SIZES), "position": len(digits.POSITIONS)}


class ConvNet(nn.Module):
    """A small CNN on 32×32 RGB with one linear head per output group."""

    def __init__(self, width: int = 32, depth: int = 3, heads: dict[str, int] = HEADS):
        super().__init__()
        layers, c = [], 3
        for i in range(depth):
            layers += [nn.Conv2d(c, width * 2**i, 3, stride=2, padding=1), nn.SiLU()]  # 32 → 16 → 8 → 4
            c = width * 2**i
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, 128),
                                      nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in heads.items()})
        self.config = {"width": width, "depth": depth, "heads": dict(heads)}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}


def save_net(net: ConvNet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(net.config))


def load_net(path: Path) -> ConvNet:
    path = Path(path)
    cfg_file, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not weights.exists() or not cfg_file.exists():
        raise FileNotFoundError(f"no reward model at {weights}: build the default world first (flowbp world build)")
    verify(path.parent, f"reward model {path.name}", "rebuild the reward models (flowbp stage reward_models)",
           only=path.name + ".")
    net = ConvNet(**json.loads(cfg_file.read_text()))
    net.load_state_dict(load_file(str(weights)))
    return freeze(net)


def prompt_labels(prompts: list[str], device: torch.device) -> dict[str, Tensor]:
    specs = [digits.parse_prompt(p) for p in prompts]
    cols = list(zip(*(s.labels() for s in specs)))
    return {k: torch.tensor(c, device=device) for k, c in zip(HEADS, cols)}


class AlignmentReward:
    """``Π_attributes p(prompted value | image)``: the probability that every attribute is right."""

    def __init__(self, net: ConvNet, name: str):
        self.net, self.name = net, name

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        logits = self.net(images)
        labels = prompt_labels(prompts, images.device)
        probs = [F.softmax(logits[k], -1).gather(1, labels[k][:, None])[:, 0] for k in HEADS]
        return torch.stack(probs).prod(0)


class QualityReward:
    """The critic's logit that the image is a clean render (``probability=True``: its sigmoid, in [0, 1])."""

    def __init__(self, net: ConvNet, name: str, probability: bool = False):
        self.net, self.name, self.probability = net, name, probability

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        logit = self.net(images)["real"][:, 0]
        return torch.sigmoid(logit) if self.probability else logit


def _path(world_dir: str | Path, name: str) -> Path:
    return Path(world_dir) / "rewards" / name


def _world_reward(name: str, kind, **extra):
    def factory(world_dir: str | Path = "data/world", device: str = "cpu", **_):
        return kind(load_net(_path(world_dir, extra.get("net", name))).to(device), name, **extra.get("kw", {}))

    factory.__name__ = name
    return factory


align, align_heldout = _world_reward("align", AlignmentReward), _world_reward("align_heldout", AlignmentReward)
quality, quality_heldout = _world_reward("quality", QualityReward), _world_reward("quality_heldout", QualityReward)
# bounded realism for composites with the alignment probability ("align:0.7,realism:0.3"): the logit is
# unbounded and a composite with it is won by pushing the critic alone
realism = _world_reward("realism", QualityReward, net="quality", kw={"probability": True})
