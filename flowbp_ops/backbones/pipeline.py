"""What the real backbones share: a diffusers pipeline loaded for training, cached prompts, real CFG.

The pipeline comes from ``from_pretrained`` (a hub id with a pinned revision, or a local
folder) in the chosen dtype and device; the VAE is put back in float32 (bf16 decoding bands
the images) and every module but the transformer is frozen. Prompt embeddings are cached per
prompt, keyed by backbone, source, revision, dtype and text length. Real CFG uses the empty
prompt as negative; FLUX.1 (embedded guidance) overrides ``conditioning``. Images decode in
float32 to [0, 1]; each backbone says how its latents become the VAE's (``_vae_latents``).
``text_encoders=False`` loads the pipeline without them (``text_encoder*=None``: T5-XXL and Qwen3 are most of
a pipeline's memory) and reads every prompt from the embeddings the ``prompt_embeddings`` stage wrote.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowbp_ops.backbones.embedding_cache import EmbeddingCache
from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.surrogate.rollout import CFGCond

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def text_encoder_components(pipeline_class) -> list[str]:
    """The pipeline's text-encoder components (SD3.5: three, FLUX.1: two, FLUX.2: one), from its signature."""
    return [n for n in inspect.signature(pipeline_class.__init__).parameters if n.startswith("text_encoder")]


class PipelineBackbone:
    name: str
    pipeline_class: str  # the diffusers class, also the format the saved LoRA is written in
    lora_target_modules: list[str] | str
    default_max_sequence_length: int

    def __init_subclass__(cls, **kwargs):
        """A subclass names its backbone; its pipeline class and LoRA targets are that row of the backbone table."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            from flowbp_ops.backbones.table import get_backbone, lora_targets

            cls.pipeline_class, cls.lora_target_modules = get_backbone(cls.name).pipeline_class, lora_targets(cls.name)

    def __init__(self, source: str | Path, revision: str | None = None, dtype: str | torch.dtype = "bf16",
                 device: str | torch.device = "cpu", resolution: int = 512, cache_dir: str | Path | None = None,
                 max_sequence_length: int | None = None, text_encoders: bool = True, cache_key: str | None = None):
        import diffusers

        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        cls = getattr(diffusers, self.pipeline_class)
        skip = {} if text_encoders else dict.fromkeys(text_encoder_components(cls))
        self.pipe = cls.from_pretrained(str(source), revision=revision, dtype=self.dtype, use_safetensors=True, **skip)
        self.check(source)
        self.pipe.to(self.device)
        self.pipe.vae.to(torch.float32)
        for part, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module) and part != "transformer":
                module.requires_grad_(False)
        self.transformer = self.pipe.transformer
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        # the key names the pinned model (``cache_key``: the record's source@revision, the same wherever it is
        # loaded from), so embeddings written on one machine are found on another
        self.cache = EmbeddingCache(cache_dir, key=f"{self.name}|{cache_key or f'{source}|{revision}'}|{self.dtype}|"
                                                   f"{self.max_sequence_length}", read_only=not text_encoders)

    def check(self, source: str | Path) -> None:
        """Refuse a loaded pipeline this backbone cannot train (before it is moved to the device)."""

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self.cache.get(prompts, self._encode).items()}

    def conditioning(self, prompts: list[str], guidance: float | None):
        pos = self.encode_prompts(prompts)
        if guidance is None:
            return pos
        neg = self.encode_prompts([""])
        return CFGCond(pos, {k: v.expand(len(prompts), *v.shape[1:]) for k, v in neg.items()})

    def _vae_latents(self, latents: Tensor) -> Tensor:
        """The engine's latents (float32) as the VAE's decoder reads them."""
        raise NotImplementedError

    def decode(self, latents: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        # float32 even inside training's bf16 autocast (bf16 decoding bands the images), unless asked for the
        # authors' numerics (dtype=bfloat16: the VAE under bf16 autocast)
        low = dtype != torch.float32
        with torch.autocast(latents.device.type, dtype=dtype if low else torch.bfloat16, enabled=low):
            images = self.pipe.vae.decode(self._vae_latents(latents.float())).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def sigmas(self, n_steps: int, grid: str = "training") -> np.ndarray:
        return get_schedule(self.name).sigmas(n_steps, self.resolution, grid)


class PackedPipelineBackbone(PipelineBackbone):
    """FLUX.1 and FLUX.2: the latent is packed 2x2 into a token sequence, whose length sets the time shift."""

    def _packed_side(self) -> int:
        return self.resolution // (self.pipe.vae_scale_factor * 2)

    def sigmas(self, n_steps: int, grid: str = "training") -> np.ndarray:
        # the pipeline's shift depends on the packed sequence length: this VAE's factor x the 2x2 packing
        schedule = replace(get_schedule(self.name), latent_downsample=2 * self.pipe.vae_scale_factor)
        return schedule.sigmas(n_steps, self.resolution, grid)
