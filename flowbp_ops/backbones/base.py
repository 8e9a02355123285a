"""The backbone interface: what training, sampling and evaluation need of a model family.

Every backbone (the default world's small model, SD3.5-M, FLUX.1-dev, FLUX.2-Klein) gives
the engine the same five things: prompt encoding, a guided velocity function, decoding to
images in [0, 1], the latent shape, and the modules a LoRA adapter targets.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from flowbp_ops.surrogate.rollout import Denoiser


class Backbone(Protocol):
    name: str
    transformer: torch.nn.Module  # the trained module (LoRA or full fine-tuning)
    lora_target_modules: list[str]

    def encode_prompts(self, prompts: list[str]) -> Any: ...

    def conditioning(self, prompts: list[str], guidance: float | None) -> Any:
        """The engine's ``cond`` for these prompts (a ``CFGCond`` for real CFG)."""

    def denoiser(self, guidance: float | None) -> Denoiser: ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images (B, 3, H, W) in [0, 1], differentiable."""

    def latent_shape(self, batch: int) -> tuple[int, ...]: ...

    def sigmas(self, n_steps: int) -> np.ndarray: ...
