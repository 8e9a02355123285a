"""The surrogate-trajectory engine: pure torch, backbone-agnostic (spec section 2)."""

from flowbp_ops.surrogate.compose import Composer, SurrogateOutput, surrogate_step
from flowbp_ops.surrogate.config import ConfigError, MethodConfig
from flowbp_ops.surrogate.ops import bridge, connector, scale_grad, sg
from flowbp_ops.surrogate.plan import Plan, Segment, Term, build_plan
from flowbp_ops.surrogate.rollout import CFGCond, Denoiser, RolloutCache, rollout
from flowbp_ops.surrogate.sigmas import flow_sigmas

__all__ = [
    "CFGCond", "Composer", "ConfigError", "Denoiser", "MethodConfig", "Plan", "RolloutCache", "Segment",
    "SurrogateOutput", "Term", "bridge", "build_plan", "connector", "flow_sigmas", "rollout", "scale_grad",
    "sg", "surrogate_step",
]
