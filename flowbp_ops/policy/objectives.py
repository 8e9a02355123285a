"""The policy-gradient family's math: Flow-GRPO's SDE step and objective, DiffusionNFT's forward-process loss.

flowbp's convention (spec §1): ``x_σ = (1 − σ)·x_0 + σ·ε``, σ from 1 (noise) to 0 (image), velocity
``v = dx/dσ = ε − x_0``, Euler ``x_{i+1} = x_i + h_i·v_i`` with ``h_i = σ_{i+1} − σ_i < 0``.

**Flow-GRPO** (Liu et al., 2025) turns the sampler's ODE into an SDE with the same marginals, so a step is a
Gaussian with a density. With ``Δ = −h > 0`` and a noise level ``a`` (the paper's ``σ_t = a·sqrt(σ/(1 − σ))``)::

    μ = x + h·[v + s²/(2σ)·(x + (1 − σ)·v)],     std = s·sqrt(Δ),     x' = μ + std·ξ,  ξ ~ N(0, I)

(the score of ``x_σ`` is ``−(x + (1 − σ)·v)/σ``; the drift adds ``s²/2`` times it, so the marginals match the
ODE's). The log-density of ``x'`` is that Gaussian's, averaged over the latent's elements as the authors do (a
per-step log-likelihood scale that keeps the ratio's clip range meaningful at any resolution).
The objective over G images of each prompt: group-relative advantages ``A = (r − mean_g)/(std_g + ε)``, the ratio
``ρ = exp(log π_θ(x'|x) − log π_old(x'|x))`` and ``L = mean max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c))``, plus
``β·KL(π_θ ‖ π_ref)`` — between two Gaussians of one std: ``|μ_θ − μ_ref|²/(2·std²)``, per element.

**DiffusionNFT** (Zheng et al., 2025) trains on the forward process instead: for a generated image ``x_0`` with an
optimality ``r ∈ [0, 1]`` (its clipped, rescaled advantage), a fresh ``σ`` and ``ε``, ``x_σ = (1 − σ)x_0 + σε``,
target ``v = ε − x_0``, and two implicit policies around the frozen sampling policy ``v_old``::

    v⁺ = (1 − β)·v_old + β·v_θ,     v⁻ = (1 + β)·v_old − β·v_θ
    L = mean[ r·|v⁺ − v|² + (1 − r)·|v⁻ − v|² ]

no likelihoods and no CFG at training (the model's conditional velocity alone).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sde_noise_std(sigma: float, noise_level: float) -> float:
    """Flow-GRPO's ``s(σ) = a·sqrt(σ/(1 − σ))`` (σ = 1 at pure noise is clamped to the grid's next-to-last value
    by the caller; the step there is deterministic in the limit)."""
    if not 0.0 < sigma < 1.0:
        raise ValueError(f"the SDE's noise needs 0 < σ < 1, got σ={sigma}")
    return noise_level * math.sqrt(sigma / (1.0 - sigma))


def sde_mean_std(x: Tensor, v: Tensor, sigma: float, sigma_next: float, noise_level: float) -> tuple[Tensor, float]:
    """Mean and std of ``x_{i+1} | x_i`` under the SDE whose marginals are the flow ODE's."""
    h = sigma_next - sigma
    if h >= 0:
        raise ValueError(f"SDE steps go from noise to image: σ_next={sigma_next} must be below σ={sigma}")
    s = sde_noise_std(sigma, noise_level)
    mean = x + h * (v + s * s / (2.0 * sigma) * (x + (1.0 - sigma) * v))
    return mean, s * math.sqrt(-h)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """``log N(x_next; mean, std²·I)`` averaged over each sample's elements: shape (B,)."""
    elem = -((x_next - mean) ** 2) / (2.0 * std * std) - math.log(std) - 0.5 * math.log(2.0 * math.pi)
    return elem.flatten(1).mean(1)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """``(r − mean)/(std + ε)`` within each prompt's group of ``group_size`` consecutive samples."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)).view(-1)


def clipped_objective(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                      clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (to minimise) and the ratio: ``mean max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c))``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped).mean(), ratio


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: float) -> Tensor:
    """KL between two Gaussians of one std, per sample, averaged over elements: ``|μ − μ_ref|²/(2·std²)``."""
    return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2.0 * std * std)


def nft_optimality(advantages: Tensor, clip_max: float) -> Tensor:
    """DiffusionNFT's ``r ∈ [0, 1]``: the advantage clipped to ``±clip_max`` and mapped linearly (0.5 = average)."""
    return 0.5 + 0.5 * torch.clamp(advantages / clip_max, -1.0, 1.0)


def nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, r: Tensor, beta: float) -> Tensor:
    """``mean[r·|v⁺ − v|² + (1 − r)·|v⁻ − v|²]`` with the implicit positive and negative policies around ``v_old``."""
    if not 0.0 < beta:
        raise ValueError(f"DiffusionNFT's β must be positive, got {beta}")
    v_old = v_old.detach()
    pos = (1.0 - beta) * v_old + beta * v_theta
    neg = (1.0 + beta) * v_old - beta * v_theta
    per = r * ((pos - target) ** 2).flatten(1).mean(1) + (1.0 - r) * ((neg - target) ** 2).flatten(1).mean(1)
    return per.mean()
