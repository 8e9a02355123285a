"""The surrogate-trajectory engine: pure torch, backbone-agnostic (spec section 2).

The names below are imported on first use, so that reading a method's settings (``surrogate.config``) does not
import torch: the Dagster definitions and settings validation stay light. The ``rollout`` function is imported
from ``surrogate.rollout`` itself: a lazy package attribute of that name would be shadowed by the submodule.
"""

import importlib

_WHERE = {
    "Composer": "compose", "SurrogateOutput": "compose", "surrogate_step": "compose",
    "ConfigError": "config", "MethodConfig": "config",
    "bridge": "ops", "connector": "ops", "scale_grad": "ops", "sg": "ops",
    "Plan": "plan", "Segment": "plan", "Term": "plan", "build_plan": "plan",
    "CFGCond": "rollout", "Denoiser": "rollout", "RolloutCache": "rollout",
    "flow_sigmas": "sigmas",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
