"""Training-run settings: one schema for the CLI's ``--set``, presets and the pipeline."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def _reward_spec(value: str) -> str:
    from flowbp_ops.rewards.base import parse_spec

    parse_spec(value)  # a known name, or name:weight,... with finite weights
    return value


RewardSpec = Annotated[str, AfterValidator(_reward_spec)]


def _trainable(value: str) -> str:
    from flowbp_ops.rewards.base import EVALUATION_ONLY, parse_spec

    frozen = sorted(set(parse_spec(value)) & EVALUATION_ONLY)
    if frozen:
        raise ValueError(f"{', '.join(frozen)} scores without gradient: an evaluation reward (eval.rewards), not a "
                         "training one")
    return value


class TrainConfig(BaseModel):
    # allow_inf_nan=False: lr=Infinity or guidance=NaN are refused at load, not found as NaN weights later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    method: str = "flowbp_lagrange"
    backbone: str = "default"
    seed: int = 0
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch: int = Field(4, ge=1, description="samples per process per micro-batch (what fits one device)")
    global_batch: int | None = Field(None, ge=1, description="samples per optimizer step over all processes; "
                                     "micro-batches accumulate to reach it (None: batch × processes)")
    rollout_steps: int = Field(10, ge=1, description="N, sampling steps of the training rollout")
    guidance: float | None = Field(4.0, ge=0, description="real CFG scale (None: no CFG)")
    reward: Annotated[RewardSpec, AfterValidator(lambda v: _trainable(v))] = Field(
        "align", description="training reward (registry name or 'a:0.7,b:0.3')")
    heldout_rewards: list[RewardSpec] = Field(default_factory=lambda: ["align_heldout", "quality", "quality_heldout"])
    loss: Literal["hinge", "log_hinge", "negative"] = Field(
        "hinge", description="hinge: w·relu(r_max − r); log_hinge: w·relu(log r_max − log r), for a reward that is a "
        "probability (its gradient does not vanish where the probability is small); negative: −w·r")
    cfg_grad_compensate: bool = Field(False, description="divide the loss by the guidance scale before backward "
                                      "(the authors' FLUX.2 Lagrange; with clipping at 1 it changes the update)")
    numerics: Literal["fp32_state", "authors"] = Field(
        "fp32_state", description="fp32_state: float32 latents, sigmas, VAE decode and reward; authors: bf16 "
        "latents, noise and timesteps in the rollout, bf16 VAE decode, the reward under fp16 autocast, x̂ cast "
        "to bf16 before the connector (spec §6.10)")
    heldout_every: int = Field(10, ge=1, description="score the training samples with the held-out rewards at "
                               "step 1, every this many steps and at the last (each is a reward model's forward)")
    ema_eval_every: int | None = Field(50, ge=1, description="evaluate the EMA weights at step 1 and every this "
                                       "many steps on a fixed held-out subset (None: never)")
    ema_eval_prompts: int = Field(16, ge=1, description="held-out prompts of that evaluation")
    checkpoint_samples: int = Field(8, ge=0, le=64, description="held-out prompts sampled at each checkpoint (the "
                                    "EMA weights when kept; same noise each time): MLflow's image history by step, "
                                    "or PNGs in the run folder (0: none)")
    pretrain_weight: float | None = Field(
        None, ge=0, description="weight of the base model's own flow-matching loss on its training data, added to "
        "the reward loss (ReFL's pre-training loss: keeps samples diverse; measured). None: 1.0 on the default world "
        "(fresh renders of its training scenes), 0 on a real backbone (no training images here)")
    r_max: float = Field(0.7, description="hinge target of the training reward (the default world: a sample already "
                         "right with probability 0.7 gets no gradient, which keeps samples diverse; measured)")
    # optimisation (spec section 4, scaled to the default world)
    # the default world's recipe, measured (README: the default world): full fine-tuning, 300 steps at 1e-4
    finetune: Literal["lora", "full"] = "full"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast of the forward (GPU)")
    gradient_checkpointing: bool = Field(False, description="recompute the transformer's activations in backward")
    ema: float | None = Field(0.95, ge=0, lt=1, description="EMA decay of the trained weights (None: off)")
    ema_warmup: bool = Field(True, description="ramp the decay as min(ema, (1+t)/(10+t)); false: the fixed decay "
                             "from step 1, as the authors")
    # robustness and bookkeeping
    checkpoint_every: int = Field(20, ge=1)
    keep_last: int = Field(2, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="consecutive non-finite steps before the run stops")
    method_overrides: list[str] = Field(default_factory=list, description="--set for the method's axes")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from flowbp_ops.methods import ALL_METHODS

        if value not in ALL_METHODS:
            raise ValueError(f"unknown method {value!r}; choose from {', '.join(ALL_METHODS)}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from flowbp_ops.backbones.table import BACKBONES

        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose from {', '.join(BACKBONES)}")
        return value

    @model_validator(mode="after")
    def _pretraining_data(self) -> "TrainConfig":
        if self.pretrain_weight and self.backbone != "default":
            raise ValueError(f"train.pretrain_weight={self.pretrain_weight} needs the base model's training images, "
                             "which only the default world has here: set it to 0 (or leave it unset) for "
                             f"backbone {self.backbone}")
        return self

    def pretraining(self) -> float:
        """The weight of the pre-training loss this run uses."""
        if self.pretrain_weight is not None:
            return self.pretrain_weight
        return 1.0 if self.backbone == "default" else 0.0

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"{list(value)}: each beta must be in [0, 1)")
        return value

    # how a run is laid out, kept and how long it goes, not what each step computes: a run resumes across
    # changes of these (steps=400 continues a finished 300-step run)
    LAYOUT_FIELDS: ClassVar[tuple[str, ...]] = ("steps", "gradient_checkpointing", "checkpoint_every", "keep_last",
                                                "max_bad_steps", "checkpoint_samples")

    def identity(self) -> dict:
        """The settings that define what a run computes (resume needs them equal). With ``global_batch`` set, the
        per-process ``batch`` only lays the global batch out over processes and micro-batches, so a run moves
        between 1 and 8 GPUs, or to a smaller micro-batch, and continues."""
        drop = set(self.LAYOUT_FIELDS) | ({"batch"} if self.global_batch else set())
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in drop}

    def check_method(self) -> None:
        """The method's axes with ``method_overrides`` on this run's N (ConfigError naming the field)."""
        from flowbp_ops.methods import get_method
        from flowbp_ops.policy.config import get_policy, is_policy

        if is_policy(self.method):
            get_policy(self.method, self.method_overrides).check(self.rollout_steps, self.batch)
            return
        get_method(self.method, self.backbone, self.rollout_steps, self.method_overrides).check(self.rollout_steps)
