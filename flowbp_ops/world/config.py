"""The default world's build settings (``params.yaml`` section ``world``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    seed: int = 0
    n_images: int = Field(16000, ge=8, description="rendered training images of the generator")
    vae_steps: int = Field(250, ge=1)
    vae_batch: int = Field(32, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    flow_steps: int = Field(3400, ge=1, description="rectified-flow training steps of the transformer")
    flow_batch: int = Field(32, ge=1)
    flow_lr: float = Field(1e-3, gt=0)
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty prompts (for real CFG)")
    reward_steps: int = Field(250, ge=1, description="training steps of each reward net")
    reward_batch: int = Field(128, ge=1)

    @classmethod
    def smoke(cls) -> "WorldConfig":
        """A seconds-long build for tests: the same code path, not a usable model."""
        return cls(n_images=256, vae_steps=3, vae_batch=8, flow_steps=3, flow_batch=8, reward_steps=2, reward_batch=8)
