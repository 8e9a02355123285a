"""Euler ODE rollout with a cache of every ``x_i`` and ``v_i`` (spec section 1).

The engine sees a model only as a velocity function ``v(x, σ, cond)``. :class:`Denoiser`
adds guidance on top: real CFG ``v = v_neg + g·(v_cond − v_neg)`` (SD3.5, FLUX.2) whose
negative branch runs without gradient when ``detach_neg`` (the default in training), or a
guidance-embedding model (FLUX.1-dev) whose raw function takes the guidance itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor


class VelocityFn(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


@dataclass(frozen=True)
class CFGCond:
    """Conditioning of a real-CFG model: the prompt's and the negative prompt's embeddings."""

    pos: Any
    neg: Any


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_cat(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}; use tensors, dicts or tuples")


def repeat_cond(cond: Any, k: int) -> Any:
    """``k`` copies of a batch's conditioning one after another (the batched re-forwards of ``k`` steps)."""
    if k == 1:
        return cond
    if isinstance(cond, CFGCond):
        return CFGCond(repeat_cond(cond.pos, k), repeat_cond(cond.neg, k))
    out = cond
    for _ in range(k - 1):
        out = _cat(out, cond)
    return out


@dataclass
class Denoiser:
    """A velocity function with guidance. ``cfg_scale=None``: call the model as is.

    ``sigma``: one float for the batch, or one per sample (a batched call of several steps). ``no_grad_model``,
    when set, answers every call made without gradient (the rollout, the detached negative branch): the same
    function on merged LoRA weights and/or compiled (:mod:`flowbp_ops.training.fast_rollout`)."""

    model: VelocityFn
    cfg_scale: float | None = None
    detach_neg: bool = True
    no_grad_model: VelocityFn | None = None

    def _raw(self) -> VelocityFn:
        return self.model if self.no_grad_model is None or torch.is_grad_enabled() else self.no_grad_model

    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Any) -> Tensor:
        if isinstance(sigma, Tensor):
            s = sigma.to(device=x.device, dtype=torch.float32)
        else:
            s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        if self.cfg_scale is None:
            return self._raw()(x, s, cond)
        if not isinstance(cond, CFGCond):
            raise TypeError("real CFG needs a CFGCond(pos, neg) conditioning")
        if torch.is_grad_enabled() and self.detach_neg:
            with torch.no_grad():  # only the conditional branch carries gradient
                v_neg = self._raw()(x.detach(), s, cond.neg)
            v_pos = self.model(x, s, cond.pos)
        else:  # one batched call of both branches
            v_both = self._raw()(torch.cat([x, x]), torch.cat([s, s]), _cat(cond.pos, cond.neg))
            v_pos, v_neg = v_both.chunk(2)
        return v_neg + self.cfg_scale * (v_pos - v_neg)


@dataclass
class RolloutCache:
    """``x_0..x_n`` and ``v_0..v_{n−1}`` of one no-grad rollout (all detached, float32)."""

    sigmas: np.ndarray  # σ_0..σ_N (float64), the whole grid even if the rollout stopped early
    x: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)

    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1


def euler_step(x: Tensor, h: float, v: Tensor) -> Tensor:
    """``x_{i+1} = x_i + h_i·v_i``, the one update both the rollout and the composition use."""
    return x + h * v.to(x.dtype)


def rollout(
    denoiser: Callable[[Tensor, float, Any], Tensor],
    x0: Tensor,
    sigmas: np.ndarray,
    cond: Any,
    steps: int | None = None,
    active_velocity: Callable[[int], Tensor] | None = None,
    active: set[int] = frozenset(),
    on_step: Callable[[int], None] | None = None,
    cache: RolloutCache | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> RolloutCache:
    """Roll out ``steps`` Euler steps (default all N) and cache every state and velocity.

    ``active_velocity(i)`` is called at the steps in ``active`` instead of a no-grad forward:
    it runs the forward with gradient (the one-pass form) and returns it; the rollout goes on
    with its detached value, so the trajectory is the same either way. Pass an empty
    ``cache`` to fill one the caller (the composer) already holds.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    N = len(sigmas) - 1
    steps = N if steps is None else steps
    cache = RolloutCache(sigmas=sigmas) if cache is None else cache
    # one contiguous buffer per kind, allocated once: the cache is 2·steps latents whatever the
    # interleaving of the forwards' transient allocations (no per-step fragmentation)
    # (float32 states by default; ``state_dtype=bfloat16`` keeps latents and velocities in bf16, as the authors)
    xs = torch.empty((steps + 1, *x0.shape), dtype=state_dtype, device=x0.device)
    vs = torch.empty((steps, *x0.shape), dtype=state_dtype, device=x0.device)
    xs[0] = x0.detach()
    cache.x[:], cache.v[:] = [xs[0]], []
    for i in range(steps):
        x = cache.x[i]
        if i in active and active_velocity is not None:
            v = active_velocity(i).detach()
        else:
            with torch.no_grad():
                v = denoiser(x, float(sigmas[i]), cond)
        vs[i] = v
        cache.v.append(vs[i])
        xs[i + 1] = euler_step(x, float(sigmas[i + 1] - sigmas[i]), vs[i])
        cache.x.append(xs[i + 1])
        if on_step is not None:
            on_step(i)
    return cache
