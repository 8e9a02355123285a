"""The default world's build settings (``params.yaml`` section ``world``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    seed: int = 0
    threads: int = Field(1, ge=1, description="CPU threads of every default-world computation (pinned, with "
                                              "deterministic kernels: the thread count changes float results). "
                                              "One: the least machine-dependent, and the main job runs "
                                              "independent stages side by side instead")
    n_images: int = Field(16000, ge=8, description="rendered training images of the generator")
    # measured over world seeds: 400 steps of 16 reconstruct colours far more reliably than 250 of 32 (one seed's
    # VAE lost blue), at about the same cost
    vae_steps: int = Field(400, ge=1)
    vae_batch: int = Field(16, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    flow_steps: int = Field(4000, ge=1, description="rectified-flow training steps of the transformer")
    flow_batch: int = Field(32, ge=1)
    flow_lr: float = Field(1e-3, gt=0)
    flow_ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved transformer (with warm-up)")
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty prompts (for real CFG)")
    reward_steps: int = Field(600, ge=1, description="training steps of each scene parser (the alignment rewards)")
    reward_batch: int = Field(128, ge=1)
    adv_eps: float = Field(0.05, ge=0, le=1, description="L-inf radius of the training reward's adversarial examples")
    critic_steps: int = Field(300, ge=1, description="training steps of each quality critic")
    detector_steps: int = Field(1500, ge=1, description="training steps of the GenEval-style judge's detector")
    detector_batch: int = Field(64, ge=1)

    @classmethod
    def smoke(cls) -> "WorldConfig":
        """A seconds-long build for tests: the same code path, not a usable model."""
        return cls(n_images=256, vae_steps=3, vae_batch=8, flow_steps=3, flow_batch=8, reward_steps=2, reward_batch=8,
                   critic_steps=2, detector_steps=2, detector_batch=8)
