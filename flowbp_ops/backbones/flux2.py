"""FLUX.2-Klein-base: the real backbone adapter, loaded through diffusers' ``Flux2KleinPipeline``.

Klein-*base* is the undistilled Klein (the one to fine-tune): real CFG with the empty prompt as
negative, no guidance embedding (the pipeline passes ``guidance=None``). Prompts are the
Qwen3 text encoder's hidden states of layers 9, 18 and 27 stacked along features (the
pipeline's ``encode_prompt``), cached per prompt set. The engine's state is the pipeline's
packed latent: the 32-channel VAE latent, patchified 2×2 into 128 channels and flattened to
(B, (H/16)(W/16), 128), with 4-D position ids (t, h, w, l); the sigma grid uses the
pipeline's empirical ``mu`` (a function of sequence length *and* step count). Decoding undoes
the pipeline's batch-norm whitening and patchify, then runs the VAE in float32.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from flowbp_ops.backbones.pipeline import PipelineBackbone
from flowbp_ops.backbones.flux1 import FLUX_LORA_TARGETS
from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.surrogate.rollout import Denoiser

# double-stream attention as FLUX.1, plus the single-stream blocks' fused input projection and their output
# projection (a plain Linear named `attn.to_out` there, a ModuleList in the double-stream blocks): peft takes
# a regex over full module names
FLUX2_LORA_TARGETS = (r".*(?:\.(?:" + "|".join(t.replace(".", r"\.") for t in FLUX_LORA_TARGETS + ["to_qkv_mlp_proj"])
                      + r")|single_transformer_blocks\.\d+\.attn\.to_out)$")


class Flux2Velocity:
    """``v(x, σ, cond)`` of a ``Flux2Transformer2DModel``; ``cond = {"tokens", "txt_ids"}``."""

    def __init__(self, transformer, img_ids: Tensor):
        self.transformer, self.img_ids = transformer, img_ids

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        tr = self.transformer
        return tr(hidden_states=x.to(tr.dtype), encoder_hidden_states=cond["tokens"].to(tr.dtype),
                  timestep=sigma.to(tr.dtype), guidance=None, txt_ids=cond["txt_ids"],
                  img_ids=self.img_ids.expand(x.shape[0], -1, -1), return_dict=False)[0]


class Flux2Backbone(PipelineBackbone):
    name = "flux2"
    lora_target_modules = FLUX2_LORA_TARGETS
    pipeline_class = "Flux2KleinPipeline"
    default_max_sequence_length = 512

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        side = self._latent_side()
        probe = torch.zeros(1, 1, side // 2, side // 2)
        self.img_ids = self.pipe._prepare_latent_ids(probe).to(self.device)

    def check(self, source) -> None:
        if self.pipe.config.is_distilled:
            raise ValueError(f"{source} is a step-distilled Klein (no CFG): fine-tune the *base* model, "
                             "e.g. black-forest-labs/FLUX.2-klein-base-9B")

    def _latent_side(self) -> int:
        return 2 * (self.resolution // (self.pipe.vae_scale_factor * 2))

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        tokens, txt_ids = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                                  max_sequence_length=self.max_sequence_length)
        return {"tokens": tokens, "txt_ids": txt_ids}

    def denoiser(self, guidance: float | None) -> Denoiser:
        return Denoiser(Flux2Velocity(self.transformer, self.img_ids), cfg_scale=guidance)

    def decode(self, latents: Tensor) -> Tensor:
        # float32 even inside training's bf16 autocast: bf16 decoding bands the images
        with torch.autocast(latents.device.type, enabled=False):
            pipe, vae, side = self.pipe, self.pipe.vae, self._latent_side() // 2
            z = pipe._unpack_latents_with_ids(latents.float(), self.img_ids.expand(latents.shape[0], -1, -1), side, side)
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            z = pipe._unpatchify_latents(z * std + mean)
            return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        side = self._latent_side() // 2
        return (batch, side * side, self.transformer.config.in_channels)

    def sigmas(self, n_steps: int) -> np.ndarray:
        # the pipeline's shift depends on the packed sequence length: this VAE's factor x the 2x2 packing
        schedule = replace(get_schedule("flux2"), latent_downsample=2 * self.pipe.vae_scale_factor)
        return schedule.sigmas(n_steps, self.resolution)
