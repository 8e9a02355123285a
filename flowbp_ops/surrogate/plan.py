"""The backward surrogate plan: one draw of the four axes, fixed before the rollout.

A plan is a chain of intervals (segments) ``[a, b)`` of the sampling grid. Each segment
recomposes ``x̂_b`` from the (connected) state at ``a`` and a list of terms ``ω·ṽ_i``;
a term is *active* (re-forwarded with gradient, scaled by ``c``) or uses the cached
velocity. Every segment after the first starts at a split, where the state passes the
connector and an active velocity at ``a`` sees ``bridge(conn(x̂_a, x_a), α)``.

Because the plan exists before the rollout, the rollout can run each active forward with
gradient at its own step (the one-pass form), or the re-forwards can be batched after it;
see :mod:`flowbp_ops.surrogate.compose`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from flowbp_ops.surrogate import samplers
from flowbp_ops.surrogate.config import MethodConfig
from flowbp_ops.surrogate.quadrature import active_supports, lagrange_weights, support_indices


@dataclass(frozen=True)
class Term:
    index: int  # step i whose velocity enters
    weight: float  # ω_i (float64 before use)
    scale: float  # gradient scale c_i (1 for cached terms)
    active: bool  # re-forwarded with gradient


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    rule: str  # "euler" | "leap" | "lagrange"
    alpha: float  # bridge coupling of an active velocity at `start` (0 for the first segment)
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class Plan:
    method: str
    seed: int
    sigmas: tuple[float, ...]  # σ_0..σ_N, float64
    segments: tuple[Segment, ...]
    reward_input: str  # "endpoint" | "posterior_mean"
    lv_copies: int = 0
    split: int | None = None  # j of a single-split method, for the d_j diagnostic
    rescale: float = 1.0  # g (one factor over the window)
    rescales: tuple[float, ...] = ()  # the factor applied in each segment (Lagrange: one per interval)
    window: tuple[int, int] = (0, 0)  # the tail window [a, N) the sampler drew from
    draw: dict = field(default_factory=dict)  # Bridge: the pre-split steps, j, the post-split steps
    trajectory_tau: float | None = None  # τ_w when the trajectory weight is on
    mode: str = "one_pass"  # one_pass | two_pass | batched | auto (the Execution axis)
    checkpoint: bool | str = "auto"  # True | False | "auto" (decided by measurement, ``surrogate.runtime``)
    cfg_detach_neg: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def active(self) -> list[int]:
        return sorted({t.index for s in self.segments for t in s.terms if t.active})

    @property
    def n_grad_forwards(self) -> int:
        """Gradient-carrying model forwards per training step: |A| plus DRaFT-LV's copies."""
        return len(self.active) + self.lv_copies

    @property
    def rollout_steps(self) -> int:
        """Velocities the rollout must produce: all N for the endpoint, up to τ for a posterior mean."""
        if self.reward_input == "endpoint":
            return self.n_steps
        return max(t.index for t in self.segments[-1].terms) + 1

    @property
    def bridged(self) -> dict[int, float]:
        """Active steps whose input is ``bridge(conn(x̂_a, x_a), α)`` with α > 0."""
        out = {}
        for s in self.segments[1:]:
            if s.alpha > 0 and any(t.active and t.index == s.start for t in s.terms):
                out[s.start] = s.alpha
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_steps=self.n_steps, active=self.active, n_grad_forwards=self.n_grad_forwards,
                 rollout_steps=self.rollout_steps, bridged=self.bridged,
                 reward_sees=self.reward_sees())
        return d

    def reward_sees(self) -> str:
        if self.reward_input == "endpoint":
            return f"x_{self.n_steps} (cached endpoint, through the connector)"
        tau = self.segments[-1].start
        return f"posterior mean x̂({tau}) = x_{tau} − σ_{tau}·v_{tau}" + (
            f", plus {self.lv_copies} re-noised copies" if self.lv_copies else "")


# ---------------------------------------------------------------------------------- build


def build_plan(cfg: MethodConfig, sigmas: np.ndarray, seed: int) -> Plan:
    """Draw one plan for an ``N = len(sigmas) − 1`` step rollout. Validates ``cfg`` first."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    N = len(sigmas) - 1
    cfg.check(N)
    rng = np.random.default_rng(seed)
    a, w = cfg.active, cfg.weights
    notes: list[str] = []
    window = cfg.window(N)  # every sampler draws from the tail [N − window, N) (spec §6.4)
    window_start = N - window
    split, draw = None, {}

    # 1. the sampler decides the segment boundaries and (for Euler segments) the active steps
    if a.sampler == "uniform_last":  # ReFL, DRaFT-LV: one leap from τ
        tau = samplers.uniform_last(min(a.n, window), N, rng)
        bounds, active, rules = [tau, N], {tau}, ["leap"]
    elif a.sampler == "drtune":  # Euler to m, then the leap from m
        steps, m = samplers.drtune(a.k, a.early_stop_ratio, N, rng, lo=window_start)
        bounds, active, rules = ([0, m, N], set(steps), ["euler", "leap"]) if m > 0 else ([0, N], set(steps), ["leap"])
        split = m if m > 0 else None
    elif a.sampler == "late_biased":
        if a.split:  # FlowBP-Bridge: j from the uniform jk sampler over the window, j ∈ A
            _, j = samplers.jk_uniform(N, rng, span=window)
            k_pre, k_post = samplers.split_budget(a.k, j - window_start, N - j)
            if k_pre + k_post < a.k:
                notes.append(f"split j={j} leaves room for only {k_pre + k_post} of K={a.k} steps")
            # late bias counted from the window start before j, from j + 1 after it (spec §6.5)
            relative = a.split_bias == "relative"
            pre = samplers.late_biased(k_pre, a.beta, window_start, j, rng, origin=window_start if relative else 0)
            post = samplers.late_biased(k_post - 1, a.beta, j + 1, N, rng, origin=j + 1 if relative else 0)
            bounds, active, rules, split = [0, j, N], set(pre) | {j} | set(post), ["euler", "euler"], j
            draw = {"pre": pre, "split": j, "post": post, "k_pre": k_pre, "k_post": k_post}
        else:  # FlowBP-Sparse
            bounds, active, rules = [0, N], set(samplers.late_biased(a.k, a.beta, window_start, N, rng)), ["euler"]
    elif a.sampler == "jk":  # LeapAlign, FlowBP-Lagrange
        if a.jk == "dirichlet":
            k, j = samplers.jk_dirichlet(N, rng, a.dirichlet, a.rev_j_cap, span=window)
        elif a.jk == "midpoint":
            k, j = samplers.jk_midpoint(N, rng, span=window)
        else:
            k, j = samplers.jk_uniform(N, rng, span=window)
        bounds, active, rules, split = [k, j, N], {k, j}, [w.rule, w.rule], j
        window_start = k
    elif a.sampler == "last_k":  # DRaFT-K, AlignProp (random K), exact references
        K = a.k if a.k_min is None else int(rng.integers(a.k_min, a.k + 1))
        start = N - K
        if cfg.bridge.chained:
            bounds, rules = list(range(start, N + 1)), ["euler"] * K
        else:
            bounds, rules = [start, N], ["euler"]
        active = set(range(start, N))
        window_start = start
    elif a.sampler == "explicit":
        active = set(a.indices)
        if a.split_at is not None:
            bounds, rules, split = [0, a.split_at, N], ["euler", "euler"], a.split_at
        else:
            bounds, rules = [0, N], ["euler"]
    else:  # pragma: no cover - pydantic restricts the literal
        raise AssertionError(a.sampler)

    # 2. integration weights per segment
    segments = []
    for n_seg, (start, end, rule) in enumerate(zip(bounds[:-1], bounds[1:], rules)):
        alpha = cfg.bridge.alpha if n_seg > 0 else 0.0
        segments.append(Segment(start, end, rule, alpha, tuple(_terms(rule, start, end, active, sigmas, cfg))))

    # 3. the gradient rescale over the active terms (η = 0 leaves it at 1): one g over the window (Sparse,
    # Bridge), or per Lagrange interval Σ_supports|W| / Σ_active|W| (spec §6.7)
    g, per_segment = 1.0, [1.0] * len(segments)
    if w.eta > 0:
        if all(s.rule == "lagrange" for s in segments) and w.rescale == "per_interval":
            per_segment = [float(1.0 + w.eta * (sum(abs(t.weight) for t in s.terms)
                                                / sum(abs(t.weight) for t in s.terms if t.active) - 1.0))
                           for s in segments]
        else:
            span = np.abs(np.diff(sigmas)[window_start:]).sum()
            act = sum(abs(t.weight) for s in segments for t in s.terms if t.active)
            g = float(1.0 + w.eta * (span / act - 1.0))
            per_segment = [g] * len(segments)
        segments = [Segment(s.start, s.end, s.rule, s.alpha,
                            tuple(Term(t.index, t.weight, t.scale * f if t.active else t.scale, t.active)
                                  for t in s.terms)) for s, f in zip(segments, per_segment)]

    tw = cfg.trajectory_weight
    return Plan(
        method=cfg.name, seed=int(seed), sigmas=tuple(float(s) for s in sigmas), segments=tuple(segments),
        reward_input=cfg.reward_input.kind, lv_copies=cfg.reward_input.lv_copies, split=split, rescale=float(g),
        rescales=tuple(per_segment), window=(N - window, N), draw=draw,
        trajectory_tau=tw.tau if tw.enabled else None, mode=cfg.execution.mode,
        checkpoint=cfg.execution.checkpoint, cfg_detach_neg=cfg.execution.cfg_detach_neg, notes=tuple(notes),
    )


def _terms(rule: str, start: int, end: int, active: set[int], sigmas: np.ndarray, cfg: MethodConfig) -> list[Term]:
    if rule == "euler":  # ω_i = h_i = σ_{i+1} − σ_i
        return [Term(i, float(sigmas[i + 1] - sigmas[i]), 1.0, i in active) for i in range(start, end)]
    if rule == "leap":  # one velocity over the whole interval
        return [Term(start, float(sigmas[end] - sigmas[start]), 1.0, start in active)]
    w = cfg.weights  # lagrange
    supports = support_indices(start, end, w.order, w.support_rounding)
    weights = lagrange_weights(sigmas[supports], sigmas[start], sigmas[end])
    act = active_supports(supports, w.max_active_supports, w.support_mode)
    return [
        Term(s, float(W), 1.0 if s == start else (w.support_scale if s in act else 1.0), s in act)
        for s, W in zip(supports, weights)
    ]
