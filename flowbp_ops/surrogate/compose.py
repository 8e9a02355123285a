"""The one composition: (rollout cache, plan, model) → reward input ``y``, weight ``w``, diagnostics.

Spec section 2, general form::

    x̂_b = conn(x̂_a, x_a) + Σ_terms ω_i·ṽ_i          for each segment [a, b)
    ṽ_i = scale(v_θ(input_i, σ_i), c_i)  (i active),  sg(v_i) otherwise
    input_i = bridge(conn(x̂_i, x_i), α)  at a split with α > 0,  sg(x_i) otherwise
    y = conn(x̂_N, x_N)   or, for a posterior mean, x̂_N of the final leap itself

Every method is this loop over its plan; there are no per-method copies. Active velocities
are memoised: in the one-pass form the rollout asks for them at their own step (the forward
with gradient replaces the no-grad one), in the two-pass form the composition asks after
the rollout, one call per step; in the batched form every active step whose input is its cached
state ``sg(x_i)`` is re-forwarded in one call (per-sample σ), and only the bridged ones, whose
input depends on the composed state, follow one by one. The gradient is the same; only the
number and size of the calls differ.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flowbp_ops.surrogate.ops import bridge, connector, per_sample_mean_abs, scale_grad
from flowbp_ops.surrogate.plan import Plan
from flowbp_ops.surrogate.rollout import Denoiser, RolloutCache, euler_step, repeat_cond, rollout
from flowbp_ops.surrogate.runtime import Runtime, count_saved_bytes, free_bytes


@dataclass
class SurrogateOutput:
    y: Tensor  # the reward model's input, (B·(1 + lv_copies), ...)
    w: Tensor  # per-sample weight, detached, (B·(1 + lv_copies),)
    plan: Plan
    cache: RolloutCache
    residuals: dict[int, Tensor]  # connector residual d_b = mean|x̂_b − x_b| per sample, per split b
    composition_error: float  # max|x̂_N − x_N| before the final connector (0 when no endpoint)
    grad_forwards: int  # gradient-carrying model forwards actually run (per step velocity)
    grad_calls: int = 0  # calls they took (fewer when batched)
    mode: str = "one_pass"  # the concrete execution mode of this step
    checkpointed: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    d_j_leap: Tensor | None = None  # what d_j would be with one velocity over [k, j) (a Lagrange plan's gain)

    @property
    def d_j(self) -> Tensor | None:
        return self.residuals.get(self.plan.split) if self.plan.split is not None else None

    @property
    def d_0(self) -> Tensor | None:
        return self.residuals.get(self.plan.n_steps)

    def diagnostics(self) -> dict[str, Any]:
        """Scalars for logging."""
        out = {"active": self.plan.active, "composition_error": self.composition_error, "mode": self.mode,
               "grad_forwards": self.grad_forwards, "grad_calls": self.grad_calls,
               "checkpointed": float(self.checkpointed), **{f"time_{k}": v for k, v in self.timings.items()}}
        if self.d_j is not None:
            out["d_j"] = float(self.d_j.mean())
        if self.d_0 is not None:
            out["d_0"] = float(self.d_0.mean())
        if self.d_j_leap is not None:
            out["d_j_leap"] = float(self.d_j_leap.mean())
        out["w"] = float(self.w.mean())
        out.update({f"rescale_{i}": f for i, f in enumerate(self.plan.rescales)})
        if self.plan.split is not None:
            out["j"] = self.plan.split
            if self.plan.segments[0].rule in ("leap", "lagrange"):  # a (k, j) pair (LeapAlign, Lagrange)
                out["k"] = self.plan.segments[0].start
        return out


class Composer:
    def __init__(self, plan: Plan, denoiser: Callable, cond: Any, cache: RolloutCache,
                 sample_seeds: list[int] | None = None, runtime: Runtime | None = None, mode: str = "one_pass"):
        self.plan, self.denoiser, self.cond, self.cache = plan, denoiser, cond, cache
        self.sample_seeds, self.mode = sample_seeds, mode
        self.runtime = runtime if runtime is not None else Runtime()
        self.velocities: dict[int, Tensor] = {}
        self.states: dict[int, Tensor] = {}  # connected state at each segment boundary
        self.x_hat: dict[int, Tensor] = {}  # the composed (pre-connector) state at each boundary
        self.grad_forwards = self.grad_calls = 0
        self.forward_seconds = 0.0
        self._bridged = plan.bridged
        # checkpointing: fixed by the plan, or decided after the first forward's activations were measured
        self.checkpoint: bool | None = None if plan.checkpoint == "auto" else bool(plan.checkpoint)
        self.chunk = len(plan.active) + plan.lv_copies  # active steps per batched call
        self._free: int | None = None

    # -- model forwards with gradient ------------------------------------------------------
    def _forward(self, x_in: Tensor, sigma: float | Tensor, steps: int = 1) -> Tensor:
        """One gradient-carrying call over ``steps`` step-velocities stacked along the batch."""
        self.grad_forwards += steps
        self.grad_calls += 1
        t0 = time.perf_counter()
        cond = repeat_cond(self.cond, steps) if steps > 1 else self.cond
        fn = lambda x: self.denoiser(x, sigma, cond)  # noqa: E731
        with torch.enable_grad():
            if self.checkpoint is None:
                v = self._measured(fn, x_in, steps)
            else:
                v = checkpoint(fn, x_in, use_reentrant=False) if self.checkpoint else fn(x_in)
        self.forward_seconds += time.perf_counter() - t0
        return v.float()

    def _measured(self, fn: Callable, x_in: Tensor, steps: int) -> Tensor:
        """The first forward of an ``auto`` step: run it whole while counting what it saves, then decide whether
        the step's other forwards fit (``surrogate.runtime``); one that runs out of memory is retried checkpointed."""
        rt, plan = self.runtime, self.plan
        key = (tuple(x_in.shape[1:]), x_in.shape[0] // steps, str(x_in.device))
        n, batched = plan.n_grad_forwards, len(plan.active) - len(self._bridged) + plan.lv_copies
        self._free = free_bytes(x_in.device) if self._free is None else self._free
        decision = rt.decide(key, n, batched, self._free)
        if decision is None:
            saved = [0]
            try:
                with count_saved_bytes(saved):
                    v = fn(x_in)
            except torch.OutOfMemoryError:
                rt.note("a single gradient forward ran out of memory: checkpointing every forward")
                self.checkpoint, self.chunk = True, 1
                return checkpoint(fn, x_in, use_reentrant=False)
            rt.per_forward[key] = saved[0] // steps
            decision = rt.decide(key, n, batched, self._free)
        else:
            v = None
        rt.note(decision.reason, (decision.checkpoint, decision.chunk, n))
        self.checkpoint, self.chunk = decision.checkpoint, decision.chunk
        if v is None:
            v = checkpoint(fn, x_in, use_reentrant=False) if self.checkpoint else fn(x_in)
        return v

    def velocity(self, i: int) -> Tensor:
        """The raw (unscaled) velocity at active step ``i``, forwarded with gradient once."""
        if i not in self.velocities:
            alpha = self._bridged.get(i)
            # clone: cached states are views of one buffer the rollout keeps writing into, and
            # autograd must not see the buffer's version counter move under a saved input
            x_in = bridge(self.state(i), alpha) if alpha else self.cache.x[i].detach().clone()
            self.velocities[i] = self._forward(x_in, self.plan.sigmas[i])
        return self.velocities[i]

    def prefetch(self) -> None:
        """Batched form: the active steps whose input is their cached state, in as few calls as memory allows
        (one, unless checkpointing limits a call to ``chunk`` steps); the bridged ones are left to
        :meth:`velocity`, in order, since their input is the composed state."""
        todo = [i for i in self.plan.active if i not in self._bridged and i not in self.velocities]
        if todo and self.checkpoint is None:  # nothing measured yet: one step alone first, then as many as fit
            self.velocity(todo.pop(0))
        while todo:
            group, todo = todo[: self.chunk], todo[self.chunk:]
            b = self.cache.x[group[0]].shape[0]
            x_in = torch.cat([self.cache.x[i].detach() for i in group])  # a new tensor: no view of the cache
            sigma = torch.cat([torch.full((b,), self.plan.sigmas[i], dtype=torch.float32, device=x_in.device)
                               for i in group])
            for i, v in zip(group, self._forward(x_in, sigma, len(group)).split(b)):
                self.velocities[i] = v

    # -- composition -----------------------------------------------------------------------
    def state(self, b: int) -> Tensor:
        """``conn(x̂_b, x_b)`` at a segment boundary (the cached ``x_b`` at the first start)."""
        if b in self.states:
            return self.states[b]
        first = self.plan.segments[0].start
        if b == first:
            self.states[b] = self.cache.x[b].detach()
            return self.states[b]
        seg = next(s for s in self.plan.segments if s.end == b)
        x_hat = self.state(seg.start)
        for t in seg.terms:
            v = scale_grad(self.velocity(t.index), t.scale) if t.active else self.cache.v[t.index]
            x_hat = euler_step(x_hat, t.weight, v)
        self.x_hat[b] = x_hat
        if b < len(self.cache.x):  # a cached state exists: pin the forward value to it
            self.states[b] = connector(x_hat, self.cache.x[b])
        else:  # posterior mean beyond where the rollout stopped: the value is x̂ itself
            self.states[b] = x_hat
        return self.states[b]

    def finish(self) -> SurrogateOutput:
        plan, cache = self.plan, self.cache
        N = plan.n_steps
        end = self.state(N)
        if plan.reward_input == "endpoint":
            y = end  # = conn(x̂_N, x_N): the cached endpoint, bit for bit
        else:
            y = self.x_hat[N]  # the posterior mean of the final leap
        residuals = {
            b: per_sample_mean_abs(self.x_hat[b], cache.x[b]) for b in self.x_hat if b < len(cache.x)
        }
        comp_err = float((self.x_hat[N].detach() - cache.x[N]).abs().max()) if N < len(cache.x) else 0.0
        batch = y.shape[0]
        if plan.trajectory_tau is not None and residuals:
            # w = 1 / Σ_b max(d_b, τ_w) over the connectors (LeapAlign: d_j and d_0), stop-grad
            w = 1.0 / sum(d.clamp_min(plan.trajectory_tau) for d in residuals.values())
        else:
            w = torch.ones(batch, device=y.device)
        if plan.lv_copies:
            y, w = self._lv_copies(y, w)
        first = plan.segments[0]
        leap = None
        if first.rule == "lagrange" and first.end < len(cache.x):  # the residual a single-velocity leap would leave
            leap = per_sample_mean_abs(cache.x[first.start].float()
                                       + (plan.sigmas[first.end] - plan.sigmas[first.start])
                                       * cache.v[first.start].float(), cache.x[first.end].float())
        return SurrogateOutput(y=y, w=w.detach(), plan=plan, cache=cache, residuals=residuals,
                               composition_error=comp_err, grad_forwards=self.grad_forwards, d_j_leap=leap,
                               grad_calls=self.grad_calls, mode=self.mode, checkpointed=bool(self.checkpoint))

    def _lv_copies(self, y0: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """DRaFT-LV: ``x' = (1−σ)·sg(y_0) + σ·ε_m``, ``y_m = x' − σ·v_θ(x')`` at the posterior step."""
        tau = self.plan.segments[-1].start
        sigma = self.plan.sigmas[tau]
        if self.sample_seeds is not None:  # per-sample draws: the same copies however the batch is split
            gens = [torch.Generator().manual_seed(s) for s in self.sample_seeds]
            draw = lambda: torch.stack([torch.randn(y0.shape[1:], generator=g) for g in gens])  # noqa: E731
        else:
            gen = torch.Generator().manual_seed(self.plan.seed)
            draw = lambda: torch.randn(y0.shape, generator=gen)  # noqa: E731
        x_prime = [(1 - sigma) * y0.detach() + sigma * draw().to(y0.device, y0.dtype)
                   for _ in range(self.plan.lv_copies)]
        if self.mode == "batched":  # the copies are independent: one call
            v = self._forward(torch.cat(x_prime), sigma, len(x_prime)).split(y0.shape[0])
        else:
            v = [self._forward(x, sigma) for x in x_prime]
        ys = [y0] + [x - sigma * vi for x, vi in zip(x_prime, v)]
        return torch.cat(ys), w.repeat(len(ys))


def surrogate_step(
    denoiser: Callable, plan: Plan, x0: Tensor | None, cond: Any, cache: RolloutCache | None = None,
    sample_seeds: list[int] | None = None, state_dtype: torch.dtype = torch.float32, runtime: Runtime | None = None,
) -> SurrogateOutput:
    """Run one training step's forward: the rollout (unless a ``cache`` is given) and the composition.
    ``sample_seeds``: one seed per sample for draws inside the step (DRaFT-LV's copies); default the plan's.
    ``runtime``: the run's measured decisions (checkpointing, the auto mode); a fresh one measures this step.

    ``plan.mode``: one_pass runs the active forwards inside the rollout (N forwards in all); two_pass and
    batched roll out without gradient and re-forward (N + |A|), one call per step or batched. A given ``cache``
    (a stored rollout) is composed in the two-pass way, or batched.
    """
    runtime = runtime if runtime is not None else Runtime()
    mode = runtime.mode(plan.mode)
    if isinstance(denoiser, Denoiser):
        denoiser = dataclasses.replace(denoiser, detach_neg=plan.cfg_detach_neg)
    t0 = time.perf_counter()
    if cache is not None:
        if cache.n_steps != plan.n_steps or len(cache.v) < plan.rollout_steps:
            raise ValueError(f"the cached rollout has {len(cache.v)} of N={cache.n_steps} steps; "
                             f"the plan needs {plan.rollout_steps} of N={plan.n_steps}")
        mode = "batched" if mode == "batched" else "two_pass"
        composer = Composer(plan, denoiser, cond, cache, sample_seeds, runtime, mode)
        rollout_s = 0.0
    else:
        composer = Composer(plan, denoiser, cond, RolloutCache(sigmas=np.asarray(plan.sigmas)), sample_seeds,
                            runtime, mode)
        rollout(denoiser, x0, composer.cache.sigmas, cond, steps=plan.rollout_steps,
                active_velocity=composer.velocity if mode == "one_pass" else None,
                active=set(plan.active), cache=composer.cache, state_dtype=state_dtype)
        rollout_s = time.perf_counter() - t0 - composer.forward_seconds
    if mode == "batched":
        composer.prefetch()
    out = composer.finish()
    out.timings = {"rollout": rollout_s, "surrogate_forward": time.perf_counter() - t0 - rollout_s}
    return out
