"""The default world's backbone: small AutoencoderKL + SD3-architecture DiT + MiniLM text encoder.

Loaded from a world directory written by :func:`flowbp_ops.world.build.build_world`
(``vae/`` and ``transformer/`` in diffusers' ``save_pretrained`` layout). Real CFG with the
empty prompt as negative, static shift 3 like SD3.5. Prompts are encoded once (in memory, or in the
``embeddings`` folder); ``text_encoder=False`` reads them from the folder the ``prompt_embeddings`` stage wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import Tensor

from flowbp_ops.backbones.embedding_cache import EmbeddingCache
from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.backbones.sd3 import SD3Velocity
from flowbp_ops.backbones.table import lora_targets
from flowbp_ops.integrity import verify
from flowbp_ops.surrogate.rollout import CFGCond, Denoiser
from flowbp_ops.world.base_model import decode_latents
from flowbp_ops.world.text import MINILM, MiniLMTextEncoder


class DefaultBackbone:
    name = "default"
    lora_target_modules = lora_targets("default")

    def __init__(self, world_dir: str | Path, device: str | torch.device = "cpu", embeddings: str | Path | None = None,
                 text_encoder: bool = True):
        world_dir = Path(world_dir)
        for sub in ("vae", "transformer"):
            if not (world_dir / sub / "config.json").exists():
                raise FileNotFoundError(f"{world_dir / sub} is not a saved model: build the default world first "
                                        f"with `flowbp world build --out {world_dir}`")
            verify(world_dir / sub, f"the default world's {sub}", "rebuild it (flowbp stage base_model) or restore it "
                   "(scripts/dvc checkout)")
        self.vae = AutoencoderKL.from_pretrained(world_dir / "vae", use_safetensors=True).to(device).eval()
        self.vae.requires_grad_(False)
        self.transformer = SD3Transformer2DModel.from_pretrained(world_dir / "transformer", use_safetensors=True)
        self.transformer.to(device).eval()
        self.text = MiniLMTextEncoder(device=device) if text_encoder else None
        self.device, self.world_dir = torch.device(device), world_dir
        self._null: dict[str, Tensor] | None = None
        self.cache = EmbeddingCache(embeddings, key=f"default|{MINILM}", read_only=not text_encoder)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token states and pooled vectors, each prompt encoded once per backbone (the world's prompt sets repeat)."""
        encode = self.text.encode if self.text is not None else None
        return {k: v.to(self.device) for k, v in self.cache.get(prompts, encode).items()}

    def null(self, batch: int) -> dict[str, Tensor]:
        if self._null is None:
            self._null = self.encode_prompts([""])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._null.items()}

    def conditioning(self, prompts: list[str], guidance: float | None):
        pos = self.encode_prompts(prompts)
        return pos if guidance is None else CFGCond(pos, self.null(len(prompts)))

    def denoiser(self, guidance: float | None) -> Denoiser:
        return Denoiser(SD3Velocity(self.transformer), cfg_scale=guidance)

    def decode(self, latents: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Images in [0, 1]; ``dtype=bfloat16`` decodes under bf16 autocast (the authors' numerics)."""
        low = dtype != torch.float32
        with torch.autocast(latents.device.type, dtype=dtype, enabled=low):
            return decode_latents(self.vae, latents.float()).float()

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        c = self.transformer.config
        return (batch, c.in_channels, c.sample_size, c.sample_size)

    def sigmas(self, n_steps: int, grid: str = "training") -> np.ndarray:
        return get_schedule("default").sigmas(n_steps, grid=grid)
