"""One differentiable reward interface, a registry by name, and weighted composites.

A reward maps images in [0, 1] of shape (B, 3, H, W) and their prompts to scores (B,).
Preprocessing happens in torch, so the gradient flows back to the pixels (and through the
VAE decoder to the latents). Reward models are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:  # settings validation checks reward names without importing torch
    import torch
    from torch import Tensor


class Reward(Protocol):
    name: str

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


def check_images(images: Tensor, prompts: list[str]) -> None:
    """Refuse inputs a reward cannot score, with a message that says what was expected."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")


class Composite:
    """``Σ_k w_k · r_k``: a weighted sum of rewards, itself a reward."""

    def __init__(self, parts: dict[str, tuple[float, Reward]]):
        if not parts:
            raise ValueError("a composite reward needs at least one part")
        self.parts = parts
        self.name = "+".join(f"{w:g}*{n}" for n, (w, _) in parts.items())

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return sum(w * r(images, prompts) for w, r in self.parts.values())


@dataclass(frozen=True)
class RewardEntry:
    """A built-in reward: how it is built and, for a published model, where its weights and tokenizer come from."""
    factory: str  # "module:function" taking (world_dir, device), imported only when the reward is built
    checkpoint: str | None = None  # the published weights (a hub URI): what the recipes fetch
    tokenizer: str | None = None  # a published checkpoint carries none: its base model's tokenizer files
    converter: str | None = None  # "module:function" turning the published checkpoint into tensors (no unpickle)
    evaluation_only: bool = False  # scored without gradient: an evaluation reward, never a training one


# The built-in rewards, declared once: the CLI and settings check names against this table without loading any
# model; the reward_models stage fetches and converts from it; the recipes' settings are written from it.
_HUB = "flowbp_ops.rewards."
BUILTIN: dict[str, RewardEntry] = {
    "align": RewardEntry(_HUB + "world:align"),
    "align_heldout": RewardEntry(_HUB + "world:align_heldout"),
    "quality": RewardEntry(_HUB + "world:quality"),
    "quality_heldout": RewardEntry(_HUB + "world:quality_heldout"),
    "realism": RewardEntry(_HUB + "world:realism"),
    # the model's safetensors, not its other weight formats
    "clipscore": RewardEntry(_HUB + "clip:clipscore",
                             "hf://openai/clip-vit-large-patch14?include=*.json,*.txt,*.safetensors"),
    "pickscore": RewardEntry(_HUB + "clip:pickscore", "hf://yuvalkirstain/PickScore_v1"),
    "hpsv2": RewardEntry(_HUB + "hpsv2:hpsv2", "hf://xswu/HPSv2/HPS_v2.1_compressed.pt",
                         "hf://laion/CLIP-ViT-H-14-laion2B-s32B-b79K?include=*.json,*.txt",
                         _HUB + "hpsv2:convert_open_clip_checkpoint"),
    "imagereward": RewardEntry(_HUB + "imagereward:imagereward", "hf://THUDM/ImageReward/ImageReward.pt",
                               "hf://google-bert/bert-base-uncased?include=*.json,*.txt",
                               _HUB + "imagereward:convert_checkpoint"),
    # HPSv3 on Qwen2-VL-7B: scored, never trained on
    "hpsv3": RewardEntry(_HUB + "hpsv3:hpsv3", "hf://MizzenAI/HPSv3/HPSv3.safetensors",
                         "hf://Qwen/Qwen2-VL-7B-Instruct?include=*.json,*.txt", _HUB + "hpsv3:convert_checkpoint",
                         evaluation_only=True),
}
EVALUATION_ONLY = {n for n, e in BUILTIN.items() if e.evaluation_only}
CONVERTED = {n: e for n, e in BUILTIN.items() if e.converter}  # published as one checkpoint file, converted
_REGISTRY: dict[str, Callable[..., Reward]] = {}  # rewards a user registers at run time (tests, plugins)


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Add a reward factory under ``name`` (for rewards outside flowbp; the built-ins are ``BUILTIN``)."""
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        _REGISTRY[name] = factory
        return factory

    return deco


def parse_spec(spec: str) -> dict[str, float]:
    """``"align"`` or ``"a:0.7,b:0.3"`` -> {name: weight}; a clear error for an unknown name or bad weight."""
    import math

    parts: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, weight = (s.strip() for s in item.partition(":"))
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"reward {spec!r}: weight {weight!r} of {name!r} is not a number "
                             "(write name:weight, e.g. align:0.7,realism:0.3)") from None
        if not math.isfinite(w):
            raise ValueError(f"reward {spec!r}: weight of {name!r} must be finite")
        if name not in registered():
            raise ValueError(f"unknown reward {name!r}: registered are {', '.join(registered())}")
        parts[name] = w
    return parts


def get_reward(spec: str, **kwargs) -> Reward:
    """A reward by name; ``"a:0.7,b:0.3"`` builds a weighted composite."""
    import importlib

    parts = parse_spec(spec)
    if len(parts) > 1 or ":" in spec:
        return Composite({n: (w, get_reward(n, **kwargs)) for n, w in parts.items()})
    (name,) = parts
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    module, factory = BUILTIN[name].factory.split(":")
    return getattr(importlib.import_module(module), factory)(**kwargs)


def registered() -> list[str]:
    return sorted({*BUILTIN, *_REGISTRY})


def check_recorded(path: str | Path) -> None:
    """A fetched reward folder ``rewards/<name>`` checked against the manifest its stage wrote."""
    from flowbp_ops.integrity import verify

    path = Path(path)
    verify(path.parent, f"reward model {path.name}", "fetch it again (flowbp stage reward_models)",
           only=path.name + "/")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
