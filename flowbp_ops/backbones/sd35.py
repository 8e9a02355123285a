"""Stable Diffusion 3.5 Medium: the real backbone adapter, loaded through diffusers.

``StableDiffusion3Pipeline.from_pretrained`` (a hub id with a pinned revision, or a local
directory) provides the transformer, the VAE and the three text encoders (CLIP-L, CLIP-G,
T5-XXL) with their tokenizers. Prompts are encoded with the pipeline's own ``encode_prompt``
(token states and pooled vector) and cached per prompt, keyed by the model source, revision
and dtype; real CFG uses the empty prompt as negative; the VAE decodes in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowbp_ops.backbones.embedding_cache import EmbeddingCache
from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.backbones.sd3 import SD3_LORA_TARGETS, SD3Velocity
from flowbp_ops.surrogate.rollout import CFGCond, Denoiser

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class SD35Backbone:
    name = "sd35"
    lora_target_modules = SD3_LORA_TARGETS
    pipeline_class = "StableDiffusion3Pipeline"

    def __init__(self, source: str | Path, revision: str | None = None, dtype: str | torch.dtype = "bf16",
                 device: str | torch.device = "cpu", resolution: int = 512, cache_dir: str | Path | None = None,
                 max_sequence_length: int = 256):
        from diffusers import StableDiffusion3Pipeline

        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        self.pipe = StableDiffusion3Pipeline.from_pretrained(str(source), revision=revision, dtype=self.dtype,
                                                             use_safetensors=True)
        self.pipe.to(self.device)
        self.pipe.vae.to(torch.float32)  # decode in float32: bf16 decoding bands the images
        for module in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
        self.transformer = self.pipe.transformer
        self.resolution, self.max_sequence_length = resolution, max_sequence_length
        self.cache = EmbeddingCache(cache_dir, key=f"sd35|{source}|{revision}|{self.dtype}|{max_sequence_length}")

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"tokens": tokens, "pooled": pooled}

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self.cache.get(prompts, self._encode).items()}

    def conditioning(self, prompts: list[str], guidance: float | None):
        pos = self.encode_prompts(prompts)
        if guidance is None:
            return pos
        neg = self.encode_prompts([""])
        return CFGCond(pos, {k: v.expand(len(prompts), *v.shape[1:]) for k, v in neg.items()})

    def denoiser(self, guidance: float | None) -> Denoiser:
        return Denoiser(SD3Velocity(self.transformer), cfg_scale=guidance)

    def decode(self, latents: Tensor) -> Tensor:
        # float32 even inside training's bf16 autocast: bf16 decoding bands the images
        with torch.autocast(latents.device.type, enabled=False):
            vae = self.pipe.vae
            z = latents.float() / vae.config.scaling_factor + vae.config.shift_factor
            return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        side = self.resolution // factor
        return (batch, self.transformer.config.in_channels, side, side)

    def sigmas(self, n_steps: int) -> np.ndarray:
        return get_schedule("sd35").sigmas(n_steps, self.resolution)
