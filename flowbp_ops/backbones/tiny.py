"""Real pipelines of the real architectures, random-init from config: what tests and the GPU bench load.

No weights can be downloaded here, so the real loading code (``from_pretrained`` of a whole
diffusers pipeline) is proven on pipelines built from config with in-memory tokenizers,
saved with ``save_pretrained`` and loaded back offline. ``scale="tiny"`` gives seconds-long
CPU models; the transformer configs of the full-size models are in ``FULL``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = ["a", "red", "blue", "cat", "dog", "on", "the", "left", "right", "small", "large", "photo", "of", "seven"]

# the real transformer configs (the published models' config.json), for the GPU bench
FULL = {
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                 dual_attention_layers=tuple(range(13))),
    "flux1": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56)),
    # FLUX.2-klein-base-9B (Qwen3-8B text encoder: 3 x 4096 features; no guidance embedding, real CFG)
    "flux2": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                  num_attention_heads=32, joint_attention_dim=12288, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                  rope_theta=2000, guidance_embeds=False),
}


# character-level CLIP vocabulary (no merges): every prompt of letters and digits tokenizes to distinct ids
CLIP_VOCAB = ["<|startoftext|>", "<|endoftext|>", "!"] + [c + e for e in ("", "</w>") for c in
                                                         "abcdefghijklmnopqrstuvwxyz0123456789,.:"]


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab={t: i for i, t in enumerate(CLIP_VOCAB)}, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int):
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text(hidden: int, proj: int, seed: int, with_projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(CLIP_VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, projection_dim=proj, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _vae(latent_channels: int, seed: int, **extra: Any):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, **extra)


def tiny_sd35_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with SD3.5-M's component classes, ~1 M parameters."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                                        qk_norm="rms_norm", dual_attention_layers=(0,))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_clip_text(8, 8, seed + 1), tokenizer=_clip_tokenizer(32),
        text_encoder_2=_clip_text(8, 8, seed + 2), tokenizer_2=_clip_tokenizer(32),
        text_encoder_3=_t5(32, seed + 3), tokenizer_3=_t5_tokenizer(16))


def tiny_flux1_pipeline(seed: int = 0):
    """A ``FluxPipeline`` with FLUX.1-dev's component classes (guidance embedding), ~1 M parameters."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(4, seed, shift_factor=0.1159,
                                                                            scaling_factor=0.3611),
                        text_encoder=_clip_text(8, 8, seed + 1, with_projection=False), tokenizer=_clip_tokenizer(32),
                        text_encoder_2=_t5(32, seed + 3), tokenizer_2=_t5_tokenizer(16))


def _qwen_tokenizer():
    """Byte-level BPE without merges (every byte a token) and a ChatML template, like Qwen3's."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Qwen2TokenizerFast(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_flux2_pipeline(seed: int = 0):
    """A ``Flux2KleinPipeline`` (Klein-base: real CFG) with its component classes, ~1 M parameters.

    The Qwen3 encoder has 28 layers (tiny ones) because the pipeline reads hidden states 9, 18, 27."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _qwen_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=128, tie_word_embeddings=True))
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             sample_size=32)
    with torch.no_grad():  # the pipeline whitens latents with the VAE's batch-norm statistics
        vae.bn.running_mean.uniform_(-0.1, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=text_encoder, tokenizer=tok, transformer=transformer, is_distilled=False)


def save_tiny(kind: str, out: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it (safetensors): a local "hub repo" to load from."""
    from flowbp_ops.backbones.table import tiny_pipeline

    tiny_pipeline(kind, seed).save_pretrained(str(out), safe_serialization=True)
    return Path(out)
