"""One differentiable reward interface, a registry by name, and weighted composites.

A reward maps images in [0, 1] of shape (B, 3, H, W) and their prompts to scores (B,).
Preprocessing happens in torch, so the gradient flows back to the pixels (and through the
VAE decoder to the latents). Reward models are frozen.
"""

from __future__ import annotations

from typing import Callable, Protocol

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


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_reward(name: str, **kwargs) -> Reward:
    """A registered reward by name; ``"a:0.7,b:0.3"`` builds a weighted composite."""
    if "," in name or ":" in name:
        parts = {}
        for item in name.split(","):
            n, _, w = item.partition(":")
            parts[n.strip()] = (float(w) if w else 1.0, get_reward(n.strip(), **kwargs))
        return Composite(parts)
    _register_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}: registered are {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name](**kwargs)


def registered() -> list[str]:
    _register_builtin()
    return sorted(_REGISTRY)


def _register_builtin() -> None:
    import flowbp_ops.rewards.clip  # noqa: F401  (clipscore, pickscore)
    import flowbp_ops.rewards.hpsv2  # noqa: F401  (hpsv2)
    import flowbp_ops.rewards.imagereward  # noqa: F401  (imagereward)
    import flowbp_ops.rewards.world  # noqa: F401  (the default world's rewards)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
