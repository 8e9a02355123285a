"""The SD3 / SD3.5 transformer as a velocity function, and a small random-init one built from config.

``SD3Transformer2DModel`` predicts the flow velocity ``ε − x_data`` from the latent, the
prompt's token states and pooled vector, and the timestep ``t = 1000·σ`` (the scheduler's
``num_train_timesteps`` scaling).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

# ~280k parameters: forward in a few ms on one CPU core (environment.md); same architecture
# as SD3.5-M's transformer, only smaller. Config rule: caption_projection_dim = heads × head_dim.
TINY_SD3_CONFIG: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
    pos_embed_max_size=8,
)


def tiny_sd3_transformer(seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A random-init SD3-architecture DiT (float32, eval mode: no dropout)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY_SD3_CONFIG, **overrides}).eval()


def random_conditioning(model: SD3Transformer2DModel, batch: int, tokens: int = 8, seed: int = 0) -> dict[str, Tensor]:
    """Random prompt embeddings of the right shapes, for tests and gradcheck (no text encoder)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "tokens": torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g),
        "pooled": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
    }


class SD3Velocity:
    """``v(x, σ, cond)`` for an ``SD3Transformer2DModel``; ``cond = {"tokens", "pooled"}``."""

    def __init__(self, transformer: SD3Transformer2DModel):
        self.transformer = transformer

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = self.transformer(
            hidden_states=x.to(self.transformer.dtype),
            encoder_hidden_states=cond["tokens"],
            pooled_projections=cond["pooled"],
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]
        return out
