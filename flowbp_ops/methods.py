"""Every direct-gradient method as a named setting of the four axes (spec section 3).

Each preset is a few lines of configuration over :class:`MethodConfig`, with the authors'
published hyperparameters per backbone. ``custom`` is the bare schema: any combination of
the axes from ``--set key=value``.
"""

from __future__ import annotations

import copy
from typing import Any

from flowbp_ops.backbones.table import get_backbone
from flowbp_ops.policy.config import POLICY_METHODS
from flowbp_ops.surrogate.config import ConfigError, MethodConfig, validated

# method -> (one-line summary, common settings, {backbone: overrides})
# The exact references (DRaFT, AlignProp) differentiate both CFG branches: detaching the
# negative one would also drop its (1 − g)·∂v_neg/∂x from every chained Jacobian.
_PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, dict[str, Any]]]] = {
    "refl": (
        "posterior mean at τ = N − U{1..11}, one grad forward",
        {"reward_input": {"kind": "posterior_mean"}, "active": {"sampler": "uniform_last", "n": 11},
         "weights": {"rule": "leap"}},
        {},
    ),
    "draft_k": (
        "exact backprop through the last K steps (DRaFT-1 by default; active.k=N is DRaFT full)",
        {"active": {"sampler": "last_k", "k": 1}, "bridge": {"alpha": 1.0, "chained": True},
         "execution": {"cfg_detach_neg": False}},
        {},
    ),
    "draft_lv": (
        "posterior mean at N−1 plus 2 re-noised copies (DRaFT-LV, n = 2)",
        {"reward_input": {"kind": "posterior_mean", "lv_copies": 2}, "active": {"sampler": "uniform_last", "n": 1},
         "weights": {"rule": "leap"}},
        {},
    ),
    "alignprop": (
        "exact backprop through a random last K ~ U{1..N} (randomized truncation)",
        {"active": {"sampler": "last_k", "k": "N", "k_min": 1}, "bridge": {"alpha": 1.0, "chained": True},
         "execution": {"cfg_detach_neg": False}},
        {},
    ),
    "drtune": (
        "K = 3 equally spaced steps before an early stop m, posterior mean at m",
        {"reward_input": {"kind": "posterior_mean"},
         "active": {"sampler": "drtune", "k": 3, "early_stop_ratio": 0.4}, "bridge": {"alpha": 0.0}},
        {},
    ),
    "leapalign": (
        "two single-velocity leaps k → j → N, bridge α = 0.3, trajectory weight",
        {"active": {"sampler": "jk", "jk": "uniform"}, "weights": {"rule": "leap"}, "bridge": {"alpha": 0.3},
         "trajectory_weight": {"enabled": True, "tau": 0.1}},
        {"sd35": {"execution": {"cfg_detach_neg": False}}},
    ),
    "flowbp_sparse": (
        "K late-biased steps, Euler weights × g, no Jacobian factor",
        {"active": {"sampler": "late_biased"}},
        {"sd35": {"active": {"k": 4, "beta": 1.0}, "weights": {"eta": 0.5}},
         "flux1": {"active": {"k": 3, "beta": 2.0}, "weights": {"eta": 1.0}},
         "flux2": {"active": {"k": 4, "beta": 2.0}, "weights": {"eta": 0.0}}},
    ),
    "flowbp_bridge": (
        "K late-biased steps split around j ∈ A, bridge α at j",
        {"active": {"sampler": "late_biased", "split": True}},
        {"sd35": {"active": {"k": 5, "beta": 4.0}, "weights": {"eta": 0.0}, "bridge": {"alpha": 0.5}},
         "flux1": {"active": {"k": 5, "beta": 2.0}, "weights": {"eta": 1.0}, "bridge": {"alpha": 0.1}},
         "flux2": {"active": {"k": 3, "beta": 4.0}, "weights": {"eta": 0.5}, "bridge": {"alpha": 1.0}}},
    ),
    "flowbp_lagrange": (
        "Dirichlet (k, j), order-3 Lagrange quadrature on k → j → N, bridge α = 0.1",
        {"active": {"sampler": "jk", "jk": "dirichlet"},
         "weights": {"rule": "lagrange", "order": 3, "support_mode": "midpoint", "support_scale": 0.25,
                     "max_active_supports": 2, "eta": 0.0},
         "bridge": {"alpha": 0.1}, "trajectory_weight": {"enabled": True, "tau": 0.2}},
        {"sd35": {"active": {"rev_j_cap": 10}},
         "flux1": {"weights": {"eta": 0.5}},
         "flux2": {"trajectory_weight": {"tau": 0.1}, "active": {"tail_ratio": 0.7}}},  # reverse indices [1, 19)
    ),
    "custom": ("any point of the design space, from --set key=value", {}, {}),
}

METHODS = tuple(_PRESETS)  # the direct-gradient methods (the four axes)
# every method a run can train: the direct-gradient presets and the policy-gradient family (flowbp_ops.policy)
ALL_METHODS = METHODS + POLICY_METHODS


def get_method(name: str, backbone: str = "sd35", n_steps: int = 25, overrides: list[str] | dict | None = None
               ) -> MethodConfig:
    """The preset ``name`` for ``backbone`` (``n_steps`` resolves AlignProp's K range), plus overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    spec = get_backbone(backbone)
    _, common, per_backbone = _PRESETS[name]
    data = _merge(copy.deepcopy(common), per_backbone.get(spec.hyperparameters, {}))
    active = data.get("active", {})
    if active.get("k") == "N":
        active["k"] = n_steps
    if active.get("sampler") == "uniform_last" and active.get("n", 0) > n_steps:
        active["n"] = n_steps  # ReFL's "last 11" on a rollout shorter than 11 steps: all of them
    data["name"] = name
    cfg = validated(data)
    return cfg.with_overrides(overrides) if overrides else cfg


def summary(name: str) -> str:
    return _PRESETS[name][0]


def describe(cfg: MethodConfig) -> dict[str, str]:
    """The axes of a config as the columns of the spec's method table."""
    a, w, b, r = cfg.active, cfg.weights, cfg.bridge, cfg.reward_input
    active = {
        "uniform_last": f"{{τ}}, τ = N − U{{1..{a.n}}}",
        "late_biased": f"K={a.k} late-biased (β={a.beta:g})" + (", split j ∈ A" if a.split else ""),
        "drtune": f"K={a.k} equally spaced ≤ m (stop ratio {a.early_stop_ratio:g})",
        "jk": f"(k, j) {a.jk}" + (f", rev_j ≤ {a.rev_j_cap}" if a.rev_j_cap else ""),
        "last_k": f"last K={a.k}" if a.k_min is None else f"last K ~ U{{{a.k_min}..{a.k}}}",
        "explicit": f"{a.indices}",
    }[a.sampler]
    weights = {"euler": "Euler h_i", "leap": "single leap", "lagrange": f"Lagrange order {w.order}"}[w.rule]
    if w.eta:
        weights += f" × g (η={w.eta:g})"
    if b.chained:
        alpha, jac = "1 at every step", "K−1"
    elif a.sampler == "jk" or a.split or a.split_at is not None or a.sampler == "drtune":
        alpha, jac = f"{b.alpha:g}", "1 (×α)" if b.alpha > 0 else "0"
    else:
        alpha, jac = "—", "0"
    forwards = {"uniform_last": "1", "late_biased": "K", "drtune": "K", "last_k": "K", "explicit": "|A|",
                "jk": "2" if w.rule != "lagrange" else f"≤{2 * w.max_active_supports}"}[a.sampler]
    if r.lv_copies:
        forwards = f"1+{r.lv_copies}"
    reward = ("conn → x_N" if r.kind == "endpoint"
              else "posterior mean" + (f" + {r.lv_copies} copies" if r.lv_copies else ""))
    return {"reward input": reward, "active set": active, "weights": weights, "bridge α": alpha,
            "grad forwards": forwards, "Jacobian factors": jac,
            "traj. weight": f"τ={cfg.trajectory_weight.tau:g}" if cfg.trajectory_weight.enabled else "—"}


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base
