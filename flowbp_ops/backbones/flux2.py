"""FLUX.2-Klein-base: the real backbone, loaded through diffusers' ``Flux2KleinPipeline``.

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

import torch
from torch import Tensor

from flowbp_ops.backbones.pipeline import PackedPipelineBackbone
from flowbp_ops.surrogate.rollout import Denoiser


class Flux2Velocity:
    """``v(x, σ, cond)`` of a ``Flux2Transformer2DModel``; ``cond = {"tokens", "txt_ids"}``."""

    def __init__(self, transformer, img_ids: Tensor):
        self.transformer, self.img_ids = transformer, img_ids

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        tr = self.transformer
        return tr(hidden_states=x.to(tr.dtype), encoder_hidden_states=cond["tokens"].to(tr.dtype),
                  timestep=sigma.to(tr.dtype), guidance=None, txt_ids=cond["txt_ids"],
                  img_ids=self.img_ids.expand(x.shape[0], -1, -1), return_dict=False)[0]


class Flux2Backbone(PackedPipelineBackbone):
    name = "flux2"
    default_max_sequence_length = 512

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        side = self._packed_side()
        probe = torch.zeros(1, 1, side, side)
        self.img_ids = self.pipe._prepare_latent_ids(probe).to(self.device)

    def check(self, source) -> None:
        if self.pipe.config.is_distilled:
            raise ValueError(f"{source} is a step-distilled Klein (no CFG): fine-tune the *base* model, "
                             "e.g. black-forest-labs/FLUX.2-klein-base-9B")

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        tokens, txt_ids = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                                  max_sequence_length=self.max_sequence_length)
        return {"tokens": tokens, "txt_ids": txt_ids}

    def denoiser(self, guidance: float | None) -> Denoiser:
        return Denoiser(Flux2Velocity(self.transformer, self.img_ids), cfg_scale=guidance)

    def _vae_latents(self, latents: Tensor) -> Tensor:
        pipe, vae, side = self.pipe, self.pipe.vae, self._packed_side()
        z = pipe._unpack_latents_with_ids(latents, self.img_ids.expand(latents.shape[0], -1, -1), side, side)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)  # undo the pipeline's batch-norm whitening, then the patchify
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return pipe._unpatchify_latents(z * std + mean)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self._packed_side() ** 2, self.transformer.config.in_channels)
