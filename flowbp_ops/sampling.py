"""Sampling with any backbone: the engine's Euler rollout, no gradient, then decode."""

from __future__ import annotations

import torch
from torch import Tensor

from flowbp_ops.surrogate.rollout import rollout


def initial_noise(shape: tuple[int, ...], seeds) -> Tensor:
    """``x_0`` per sample, each from its own seed: the same sample whatever the batch it is in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(backbone, prompts: list[str], n_steps: int, guidance: float | None, seed: int = 42,
             batch_size: int = 64, grid: str = "training") -> Tensor:
    """Images (B, 3, H, W) in [0, 1]; prompt ``i``'s noise is seeded with ``seed + i`` (spec section 5);
    ``grid``: the training grid or the scheduler's own (``flowbp_ops.surrogate.sigmas``)."""
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    sigmas = backbone.sigmas(n_steps, grid=grid) if grid != "training" else backbone.sigmas(n_steps)
    denoiser = backbone.denoiser(guidance)
    shape = backbone.latent_shape(1)[1:]
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        # drawn on the CPU (the same images on any device), then moved to the model
        x0 = initial_noise(shape, range(seed + start, seed + start + len(chunk))).to(
            getattr(backbone, "device", "cpu"))
        cache = rollout(denoiser, x0, sigmas, backbone.conditioning(chunk, guidance))
        out.append(backbone.decode(cache.x[-1]))
    return torch.cat(out)


def sample_and_score(backbone, prompts: list[str], rewards: dict, n_steps: int, guidance: float | None, judge=None,
                     seed: int = 42) -> dict[str, float]:
    """Sample ``prompts`` (noise seeded as :func:`generate`) and score the images: ``reward/<name>`` per reward,
    and the judge's metrics (``judge.metrics(images, prompts)``) when given."""
    images = generate(backbone, prompts, n_steps, guidance, seed=seed)
    with torch.no_grad():
        out = {f"reward/{n}": float(r(images, prompts).mean()) for n, r in rewards.items()}
    if judge is not None:
        out.update(judge.metrics(images, prompts))
    return out
