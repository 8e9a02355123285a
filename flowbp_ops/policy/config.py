"""The policy-gradient methods' settings: one schema, presets as data (no torch imported here).

A policy method samples G images per prompt with the current weights, scores them, and turns the group-relative
advantages into a loss — through per-step Gaussian likelihoods of an SDE sampler (Flow-GRPO) or through the
forward process (DiffusionNFT). Settings are changed like the direct-gradient axes: ``--set policy.clip=2e-4``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowbp_ops.surrogate.config import ConfigError, parse_override


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str = "flow_grpo"
    family: Literal["flow_grpo", "diffusion_nft"] = "flow_grpo"
    group_size: int = Field(4, ge=2, description="images per prompt (the group of the advantages); divides "
                            "train.batch")
    adv_clip: float = Field(5.0, gt=0, description="advantages clipped to ±adv_clip (NFT: the scale of r ∈ [0, 1])")
    # Flow-GRPO
    noise_level: float = Field(0.7, gt=0, le=2.0, description="Flow-GRPO: a in the SDE's s(σ) = a·sqrt(σ/(1 − σ))")
    sde_window: int | None = Field(None, ge=1, description="Flow-GRPO-Fast: SDE (and training) on this many "
                                   "consecutive steps at a random place of the first half; None: every step")
    train_steps: int | None = Field(None, ge=1, description="Flow-GRPO: SDE steps trained per image (a random "
                                    "subset, the paper's fewer training than sampling steps); None: all")
    clip: float = Field(1e-4, gt=0, lt=1, description="Flow-GRPO: the ratio's clip range 1 ± clip")
    inner_steps: int = Field(1, ge=1, description="Flow-GRPO: optimizer steps on each sampled batch (the first on "
                             "policy, ratio 1; the later ones off policy, where the clip acts)")
    kl: float = Field(0.04, ge=0, description="KL penalty to the reference (the base model: the LoRA adapter "
                      "switched off, or a copy of the starting weights when fine-tuning fully): Flow-GRPO per-step "
                      "Gaussian KL, NFT velocity MSE; 0 = off")
    # DiffusionNFT
    beta: float = Field(1.0, gt=0, description="DiffusionNFT: the implicit policies v± = v_old ± β(v_θ − v_old)")
    nft_timesteps: int = Field(2, ge=1, description="DiffusionNFT: forward-process times σ trained per image")

    def check(self, n_steps: int, batch: int) -> None:
        if batch % self.group_size:
            raise ConfigError(f"policy.group_size={self.group_size} does not divide train.batch={batch}: a batch "
                              "holds whole groups of images of one prompt; choose a batch that is a multiple")
        sde = n_steps - 1  # σ_0 = 1 has no finite SDE noise: steps 1..N−1 can be stochastic
        if self.family == "flow_grpo":
            if sde < 1:
                raise ConfigError(f"Flow-GRPO needs at least 2 sampling steps (train.rollout_steps={n_steps})")
            if self.sde_window is not None and self.sde_window > sde:
                raise ConfigError(f"policy.sde_window={self.sde_window} is invalid: allowed is 1..{sde}")
        elif self.inner_steps > 1:
            raise ConfigError(f"policy.inner_steps={self.inner_steps} is invalid for DiffusionNFT: allowed is 1 (its "
                              "old policy is the sampling one, recomputed each step)")

    def with_overrides(self, overrides: list[str] | dict | None) -> "PolicyConfig":
        if not overrides:
            return self
        if isinstance(overrides, list):
            overrides = dict(parse_override(s) for s in overrides)
        data = self.model_dump()
        for key, value in overrides.items():
            field = key.removeprefix("policy.")
            if field not in data or field in ("name", "family"):
                raise ConfigError(f"--set {key}: unknown setting of a policy method; settings are "
                                  + ", ".join(f"policy.{k}" for k in data if k not in ("name", "family")))
            data[field] = value
        try:
            return PolicyConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError("invalid policy setting: " + "; ".join(
                f"policy.{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
            ) from None


# name -> (summary, settings); Flow-GRPO's published defaults (noise 0.7, clip 1e-4, KL 0.04), DiffusionNFT's β = 1
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "flow_grpo": ("Flow-GRPO: SDE sampler, per-step Gaussian likelihoods, group advantages, clipped ratio, KL",
                  {"family": "flow_grpo"}),
    "flow_grpo_fast": ("Flow-GRPO-Fast: the SDE (and training) on a 2-step window, ODE elsewhere",
                       {"family": "flow_grpo", "sde_window": 2}),
    "diffusion_nft": ("DiffusionNFT: forward-process fine-tuning on reward-split implicit positive/negative "
                      "policies, ODE sampling, no likelihoods, no CFG at training",
                      {"family": "diffusion_nft", "kl": 1e-4}),
}
POLICY_METHODS = tuple(_PRESETS)


def is_policy(name: str) -> bool:
    return name in _PRESETS


def get_policy(name: str, overrides: list[str] | dict | None = None) -> PolicyConfig:
    if name not in _PRESETS:
        raise ConfigError(f"unknown policy method {name!r}: choose one of {', '.join(POLICY_METHODS)}")
    data = {"name": name, **copy.deepcopy(_PRESETS[name][1])}
    return PolicyConfig.model_validate(data).with_overrides(overrides)


def policy_summary(name: str) -> str:
    return _PRESETS[name][0]


def describe_policy(cfg: PolicyConfig) -> dict[str, str]:
    """The columns ``flowbp methods`` shows for a policy method (its own axes)."""
    if cfg.family == "flow_grpo":
        sde = "every step" if cfg.sde_window is None else f"{cfg.sde_window}-step window"
        return {"family": "Flow-GRPO", "sampler noise": f"a={cfg.noise_level:g}, SDE on {sde}",
                "group size": str(cfg.group_size), "clip range": f"{cfg.clip:g}", "KL": f"{cfg.kl:g}"}
    return {"family": "DiffusionNFT", "sampler noise": "ODE (none)", "group size": str(cfg.group_size),
            "clip range": f"β={cfg.beta:g}, adv ±{cfg.adv_clip:g}", "KL": f"{cfg.kl:g}"}
