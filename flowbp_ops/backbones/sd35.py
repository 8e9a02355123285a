"""Stable Diffusion 3.5 Medium: the real backbone, loaded through diffusers.

``StableDiffusion3Pipeline.from_pretrained`` (a hub id with a pinned revision, or a local
directory) provides the transformer, the VAE and the three text encoders (CLIP-L, CLIP-G,
T5-XXL) with their tokenizers. Prompts are encoded with the pipeline's own ``encode_prompt``
(token states and pooled vector) and cached per prompt, keyed by the model source, revision
and dtype; real CFG uses the empty prompt as negative; the VAE decodes in float32.
"""

from __future__ import annotations

from torch import Tensor

from flowbp_ops.backbones.pipeline import PipelineBackbone
from flowbp_ops.backbones.sd3 import SD3Velocity
from flowbp_ops.surrogate.rollout import Denoiser


class SD35Backbone(PipelineBackbone):
    name = "sd35"
    default_max_sequence_length = 512  # T5 tokens, as the authors train and evaluate (spec §6.8)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"tokens": tokens, "pooled": pooled}

    def denoiser(self, guidance: float | None) -> Denoiser:
        return Denoiser(SD3Velocity(self.transformer), cfg_scale=guidance)

    def _vae_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        side = self.resolution // factor
        return (batch, self.transformer.config.in_channels, side, side)
