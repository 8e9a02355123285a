"""Gradient fidelity: how close a method's parameter gradient is to exact backprop.

For one rollout (same ``x_0``, same conditioning) and one loss, compare the method's
gradient with the exact full-trajectory gradient ``∂L(x_N)/∂θ`` (DRaFT full: every step
chained with α = 1, both CFG branches differentiated). Reported as the cosine similarity
and the norm ratio ``|g_method| / |g_exact|`` (the method's trajectory weight ``w`` is part
of its gradient, so it shows in the ratio).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowbp_ops.surrogate.compose import surrogate_step
from flowbp_ops.surrogate.config import MethodConfig
from flowbp_ops.surrogate.plan import Plan, build_plan

LossFn = Callable[[Tensor], Tensor]  # y (B, ...) -> per-sample loss (B,)


def exact_config(n_steps: int) -> MethodConfig:
    """Full backprop through all ``n_steps``: the reference every method is measured against."""
    return MethodConfig.model_validate({
        "name": "exact", "active": {"sampler": "last_k", "k": n_steps}, "bridge": {"alpha": 1.0, "chained": True},
        "execution": {"cfg_detach_neg": False},
    })


def parameter_gradient(denoiser: Callable, params: Sequence[Tensor], plan: Plan, x0: Tensor, cond: Any,
                       loss_fn: LossFn) -> Tensor:
    """The flattened gradient of ``mean(w · loss(y))`` for one plan."""
    out = surrogate_step(denoiser, plan, x0, cond)
    loss = (out.w * loss_fn(out.y)).mean()
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def compare(g: Tensor, ref: Tensor) -> dict[str, float]:
    g, ref = g.double(), ref.double()
    denom = float(g.norm() * ref.norm())
    return {"cosine": float(g @ ref) / denom if denom > 0 else float("nan"),
            "norm_ratio": float(g.norm() / ref.norm()) if ref.norm() > 0 else float("nan")}


def gradient_fidelity(denoiser: Callable, params: Sequence[Tensor], plan: Plan, x0: Tensor, cond: Any,
                      loss_fn: LossFn) -> dict[str, float]:
    reference = build_plan(exact_config(plan.n_steps), plan.sigmas, plan.seed)
    g_ref = parameter_gradient(denoiser, params, reference, x0, cond, loss_fn)
    g = parameter_gradient(denoiser, params, plan, x0, cond, loss_fn)
    return compare(g, g_ref)


def summarize(rows: list[dict[str, float]], keys: Sequence[str] = ("cosine", "norm_ratio")) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[f"{k}_mean"] = statistics.fmean(vals) if vals else float("nan")
        out[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return out


def gradcheck_tiny_dit(cfg: MethodConfig, n_steps: int, seeds: int, batch: int = 2, cfg_scale: float | None = None,
                       model_seed: int = 0) -> dict[str, Any]:
    """Gradient fidelity of ``cfg`` on a small random-init SD3-architecture DiT, per seed and summarized.

    Seed ``s`` fixes the initial noise, the (random) prompt embeddings and the plan's draw.
    The loss is a fixed random differentiable "reward" of the latent: ``−mean tanh(u·y)``.
    """
    from flowbp_ops.backbones.schedules import get_schedule
    from flowbp_ops.backbones.sd3 import SD3Velocity, random_conditioning, tiny_sd3_transformer
    from flowbp_ops.surrogate.rollout import CFGCond, Denoiser

    model = tiny_sd3_transformer(model_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    sigmas = get_schedule("tiny").sigmas(n_steps)
    shape = (batch, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    u = torch.randn(shape[1:], generator=torch.Generator().manual_seed(1234))

    def loss_fn(y: Tensor) -> Tensor:
        return -torch.tanh(y * u).flatten(1).mean(dim=1)

    rows = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(shape, generator=g)
        cond = random_conditioning(model, batch, seed=seed)
        if cfg_scale is not None:
            cond = CFGCond(pos=cond, neg=random_conditioning(model, batch, seed=10_000 + seed))
        denoiser = Denoiser(SD3Velocity(model), cfg_scale=cfg_scale)
        plan = build_plan(cfg, sigmas, seed)
        row = gradient_fidelity(denoiser, params, plan, x0, cond, loss_fn)
        rows.append({"seed": seed, **row, "active": plan.active, "split": plan.split})
    return {"method": cfg.name, "steps": n_steps, "batch": batch, "cfg_scale": cfg_scale,
            "model": "SD3Transformer2DModel (tiny random init)", "per_seed": rows, "summary": summarize(rows)}
