"""The four design axes as typed, validated configuration (spec section 2).

One definition of every setting: the CLI's ``--set key=value``, presets and (later) the
pipeline's run config are all this schema. Field ranges are checked by pydantic when the
config is built; the checks that need the number of steps ``N`` run in
:meth:`MethodConfig.check`, before any rollout.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A setting is invalid; the message names the field and the allowed range."""


class _Axis(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RewardInput(_Axis):
    """Axis 1: what the reward model sees."""

    kind: Literal["endpoint", "posterior_mean"] = Field(
        "endpoint",
        description="endpoint: the real sample x_N through the connector; "
        "posterior_mean: x̂ at the plan's last leap (ReFL, DRTune, DRaFT-LV)",
    )
    lv_copies: int = Field(0, ge=0, le=16, description="DRaFT-LV: re-noised copies of the posterior mean")


class ActiveSet(_Axis):
    """Axis 2: which steps are re-forwarded with gradient."""

    sampler: Literal["uniform_last", "late_biased", "drtune", "jk", "last_k", "explicit"] = "late_biased"
    n: int = Field(11, ge=1, description="uniform_last: τ = N − U{1..n}")
    k: int = Field(4, ge=1, description="number of active steps (late_biased, drtune, last_k)")
    k_min: int | None = Field(None, ge=1, description="last_k: draw K uniformly in [k_min, k] (AlignProp)")
    beta: float = Field(1.0, ge=0.0, description="late_biased: P(i) ∝ (i+1)^β")
    tail_ratio: float = Field(1.0, gt=0.0, le=1.0, description="every sampler draws from the last ceil(ratio·N) "
                              "steps (reverse indices 1..ceil(ratio·N))")
    split: bool = Field(False, description="late_biased: draw a split j (uniform jk) and put j in A (FlowBP-Bridge)")
    early_stop_ratio: float = Field(0.4, gt=0.0, le=1.0, description="drtune: m = N − U{1..round(ratio·N)}")
    jk: Literal["uniform", "dirichlet", "midpoint"] = Field("uniform", description="jk pair sampler")
    dirichlet: tuple[float, float, float] = Field(
        (2.5, 6.0, 2.0), description="jk dirichlet: concentrations of segments (near image, k–j gap, near noise)"
    )
    rev_j_cap: int | None = Field(None, ge=1, description="jk dirichlet: cap on rev_j = N − j")
    split_bias: Literal["relative", "absolute"] = Field(
        "relative", description="Bridge's late bias: relative = counted from the window start before j and from j+1 "
        "after it (the authors'); absolute = (i+1)^β on both sides (the earlier rule, for ablations)")
    indices: list[int] = Field(default_factory=list, description="explicit: the active step indices")
    split_at: int | None = Field(None, ge=1, description="explicit: optional split j")


class Weights(_Axis):
    """Axis 3: how each interval is integrated, and the gradient scales."""

    rule: Literal["euler", "leap", "lagrange"] = "euler"
    order: int = Field(1, ge=1, le=8, description="lagrange: number of support points")
    support_mode: Literal["midpoint", "sequential"] = Field(
        "midpoint", description="lagrange: which extra supports are active (the middle one, or the next ones)"
    )
    support_scale: float = Field(1.0, ge=0.0, description="lagrange: gradient scale of the extra active supports")
    support_rounding: Literal["interval", "absolute"] = Field(
        "interval", description="lagrange supports: rounding of the interval's own positions (the authors') or of "
        "absolute step indices (the earlier rule, for ablations)")
    rescale: Literal["per_interval", "window"] = Field(
        "per_interval", description="lagrange with eta > 0: one factor per interval (the authors') or one g over "
        "the window (the earlier rule)")
    max_active_supports: int = Field(1, ge=1, description="lagrange: active supports per interval")
    eta: float = Field(0.0, ge=0.0, description="gradient rescale: g = 1 + η(Σ_window|h| / Σ_A|ω| − 1); Lagrange: "
                       "per interval, 1 + η(Σ_supports|W| / Σ_active|W| − 1)")


class Bridge(_Axis):
    """Axis 4: the coupling α of the model input at a split."""

    alpha: float = Field(0.0, ge=0.0, le=1.0, description="0 = stop-grad, 1 = the full nested Jacobian term")
    chained: bool = Field(False, description="every active step is a split (exact backprop: DRaFT, AlignProp)")


class TrajectoryWeight(_Axis):
    """Per-sample weight w = 1 / Σ_b max(d_b, τ) over the connector residuals (LeapAlign, Lagrange)."""

    enabled: bool = False
    tau: float = Field(0.1, gt=0.0)


class Execution(_Axis):
    """How the plan is executed; none of these change the gradient's definition."""

    mode: Literal["one_pass", "two_pass", "batched", "auto"] = Field(
        "one_pass", description="one_pass: active forwards inside the rollout (N forwards); two_pass: a no-grad "
        "rollout, then one re-forward per active step (N + |A|, the authors'); batched: a no-grad rollout, then the "
        "re-forwards in as few batched calls as the plan's dependencies allow; auto: one_pass and batched on the "
        "first steps, then the faster")
    checkpoint: bool | Literal["auto"] = Field(
        "auto", description="gradient checkpointing of the grad-carrying forwards: auto = only when the activations "
        "measured on the first forward would not fit the free memory")
    cfg_detach_neg: bool = Field(True, description="real CFG: the negative branch runs without gradient")
    merged_rollout: bool = Field(True, description="LoRA: the no-grad forwards on weights with the adapter folded in "
                                 "(the base weights restored bit for bit for the gradient forwards)")
    compile_rollout: bool = Field(False, description="torch.compile the no-grad forwards (eager if compiling fails, "
                                  "said in the log)")


class MethodConfig(_Axis):
    """A point in the design space. Presets in :mod:`flowbp_ops.methods` fill it in."""

    name: str = "custom"
    reward_input: RewardInput = Field(default_factory=RewardInput)
    active: ActiveSet = Field(default_factory=ActiveSet)
    weights: Weights = Field(default_factory=Weights)
    bridge: Bridge = Field(default_factory=Bridge)
    trajectory_weight: TrajectoryWeight = Field(default_factory=TrajectoryWeight)
    execution: Execution = Field(default_factory=Execution)

    # ------------------------------------------------------------------ checks that need N
    def check(self, n_steps: int) -> None:
        """Raise :class:`ConfigError` if this setting is impossible for an ``n_steps`` rollout."""
        N = n_steps
        a, w, r = self.active, self.weights, self.reward_input
        if N < 1:
            _fail("steps", N, "at least 1")
        if w.max_active_supports > w.order:
            _fail("weights.max_active_supports", w.max_active_supports, f"1..weights.order (= {w.order})")
        if a.sampler != "jk" and w.rule != "euler" and not (a.sampler == "uniform_last" and w.rule == "leap"):
            _fail("weights.rule", w.rule, f"'euler' with active.sampler={a.sampler!r} (leap and lagrange need 'jk')")
        if a.sampler == "uniform_last" and not 1 <= a.n <= N:
            _fail("active.n", a.n, f"1..{N} (the last n of N={N} steps)")
        if a.sampler == "late_biased":
            window = self.window(N)
            if a.k > window:
                _fail("active.k", a.k, f"1..{window} (the window of the last {window} of N={N} steps)")
            if a.split and (a.k < 2 or N < 2):
                _fail("active.k", a.k, "at least 2 with active.split (one step each side of j) and N ≥ 2")
        window, lo = self.window(N), N - self.window(N)
        if a.sampler == "drtune":
            m_min = N - round(a.early_stop_ratio * N)
            if round(a.early_stop_ratio * N) < 1:
                _fail("active.early_stop_ratio", a.early_stop_ratio, f"large enough that round(ratio·{N}) ≥ 1")
            if a.k > m_min + 1 - lo:
                _fail("active.k", a.k, f"1..{m_min + 1 - lo} (K steps equally spaced in [{lo}, m] before the "
                      f"earliest stop m={m_min})")
        if a.sampler == "jk":
            need = 3 if a.jk == "dirichlet" else 2
            if window < need:
                _fail("steps" if window == N else "active.tail_ratio", N if window == N else a.tail_ratio,
                      f"a window of at least {need} steps for a {a.jk} jk pair (now {window})")
            if a.rev_j_cap is not None and a.rev_j_cap < 2:  # rev_j = 1 + len_A with len_A ≥ 1
                _fail("active.rev_j_cap", a.rev_j_cap, "at least 2 (a cap ≥ N − 1 never binds)")
        if a.sampler == "last_k":
            if a.k > window:
                _fail("active.k", a.k, f"1..{window} (the last K of the window of {window} of N={N} steps)")
            if a.k_min is not None and a.k_min > a.k:
                _fail("active.k_min", a.k_min, f"1..active.k (= {a.k})")
        if a.sampler == "explicit":
            if not a.indices or len(set(a.indices)) != len(a.indices) or not all(0 <= i < N for i in a.indices):
                _fail("active.indices", a.indices, f"a non-empty list of distinct steps in 0..{N - 1}")
            if a.split_at is not None and not 1 <= a.split_at < N:
                _fail("active.split_at", a.split_at, f"1..{N - 1}")
        if self.bridge.chained and a.sampler != "last_k":
            _fail("bridge.chained", True, "only with active.sampler='last_k' (the exact-gradient references)")
        if r.kind == "posterior_mean":
            ends_in_leap = a.sampler in ("uniform_last", "drtune") or (a.sampler == "jk" and w.rule == "leap")
            if not ends_in_leap:
                _fail("reward_input.kind", "posterior_mean", "'endpoint' unless the plan ends in a single leap "
                      "(active.sampler uniform_last/drtune, or jk with weights.rule=leap)")
        if r.lv_copies and r.kind != "posterior_mean":
            _fail("reward_input.lv_copies", r.lv_copies, "0 unless reward_input.kind='posterior_mean'")

    def window(self, n_steps: int) -> int:
        """Size of the tail window ``[a, N)`` every sampler draws from: ``ceil(ratio·N)`` (spec §6.4)."""
        return max(1, math.ceil(round(self.active.tail_ratio * n_steps, 9)))

    # ------------------------------------------------------------------ overrides
    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "MethodConfig":
        """Apply dotted ``key=value`` overrides (``active.k=5``), re-validating everything."""
        if isinstance(overrides, list):
            overrides = dict(parse_override(s) for s in overrides)
        data = self.model_dump()
        for key, value in overrides.items():
            node = data
            parts = key.split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"--set {key}: unknown setting {p!r}; settings are {settable_keys()}")
                node = node[p]
            if parts[-1] not in node:
                raise ConfigError(f"--set {key}: unknown setting; settings are {settable_keys()}")
            node[parts[-1]] = value
        return validated(data)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. active.k=5")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as jk=dirichlet
    return key.strip(), value


def validated(data: dict[str, Any]) -> MethodConfig:
    """Build a :class:`MethodConfig`, turning pydantic errors into one clear :class:`ConfigError`."""
    try:
        return MethodConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"{field}={err.get('input')!r}: {err['msg']}")
        raise ConfigError("invalid method setting: " + "; ".join(lines)) from None


def settable_keys() -> str:
    keys = []
    for axis, info in MethodConfig.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += [f"{axis}.{f}" for f in sub.model_fields]
    return ", ".join(keys)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field}={value!r} is invalid: allowed is {allowed}")
