"""FLUX.1-dev: the real backbone, loaded through diffusers' ``FluxPipeline``.

FLUX.1-dev is guidance-distilled: no CFG pass, the guidance scale goes into the transformer
as an embedding. The engine's state is the *packed* latent (B, (H/2)(W/2), 4C) the
transformer reads, with the pipeline's own ``_pack_latents`` / ``_unpack_latents`` and
image ids; the sigma grid uses the dynamic ``mu`` shift of the image sequence length.
Prompts: CLIP-L pooled vector + T5-XXL token states, cached like SD3.5's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowbp_ops.backbones.pipeline import PackedPipelineBackbone
from flowbp_ops.surrogate.rollout import Denoiser


class FluxVelocity:
    """``v(x, σ, cond)`` of a ``FluxTransformer2DModel`` on packed latents, with embedded guidance."""

    def __init__(self, transformer, img_ids: Tensor, guidance: float | None):
        self.transformer, self.img_ids, self.guidance = transformer, img_ids, guidance

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        tr = self.transformer
        guidance = None
        if tr.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), 3.5 if self.guidance is None else self.guidance, device=x.device)
        return tr(hidden_states=x.to(tr.dtype), encoder_hidden_states=cond["tokens"],
                  pooled_projections=cond["pooled"], timestep=sigma, img_ids=self.img_ids,
                  txt_ids=cond["txt_ids"][0], guidance=guidance, return_dict=False)[0]


class Flux1Backbone(PackedPipelineBackbone):
    name = "flux1"
    default_max_sequence_length = 512

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        side = self._packed_side()
        self.img_ids = self.pipe._prepare_latent_image_ids(1, side, side, self.device, self.dtype)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        tokens, pooled, txt_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                          max_sequence_length=self.max_sequence_length)
        return {"tokens": tokens, "pooled": pooled, "txt_ids": txt_ids.expand(len(prompts), *txt_ids.shape)}

    def conditioning(self, prompts: list[str], guidance: float | None):
        return self.encode_prompts(prompts)  # guidance is embedded, not a second (CFG) branch

    def denoiser(self, guidance: float | None) -> Denoiser:
        return Denoiser(FluxVelocity(self.transformer, self.img_ids, guidance), cfg_scale=None)

    def _vae_latents(self, latents: Tensor) -> Tensor:
        vae, px = self.pipe.vae, 2 * self._packed_side() * self.pipe.vae_scale_factor
        z = self.pipe._unpack_latents(latents, px, px, self.pipe.vae_scale_factor)
        return z / vae.config.scaling_factor + vae.config.shift_factor

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self._packed_side() ** 2, self.transformer.config.in_channels)
