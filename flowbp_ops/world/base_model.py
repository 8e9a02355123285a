"""The default world's generator: a small AutoencoderKL and a small SD3-architecture DiT.

Both are plain diffusers models, trained here from scratch and saved with
``save_pretrained``: the VAE by reconstruction (+ a small KL term), the transformer by
rectified flow matching on the VAE's latents, ``x_σ = (1−σ)·x + σ·ε``, target ``ε − x``,
with logit-normal σ (as SD3) and the prompt dropped to the empty prompt 10% of the time so
that real classifier-free guidance works at sampling time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import Tensor

from flowbp_ops.world.text import EMBED_DIM

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
# 16×16×4 latents, patch 4 → 16 image tokens (patch 2 gave 64 tokens at 2.3× the cost per step,
# too slow for the 8-minute build); 16 text tokens from MiniLM (384-d)
DIT_CONFIG = dict(
    sample_size=16, patch_size=4, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=EMBED_DIM, caption_projection_dim=128,
    pooled_projection_dim=EMBED_DIM, pos_embed_max_size=16,
)

Progress = Callable[[str, int, int, float], None]  # (stage, step, total, loss)


def make_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def make_transformer(seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**DIT_CONFIG)


def train_vae(vae: AutoencoderKL, images: Tensor, steps: int, batch: int, lr: float, seed: int,
              kl_weight: float = 1e-5, progress: Progress | None = None) -> AutoencoderKL:
    """Fit the VAE to images in [0, 1]; then set ``shift_factor``/``scaling_factor`` to unit-variance latents."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress("vae", step + 1, steps, loss.item())
    vae.eval().requires_grad_(False)
    z = _latent_means(vae, images[:4096])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def _latent_means(vae: AutoencoderKL, images: Tensor, chunk: int = 512) -> Tensor:
    return torch.cat([vae.encode(images[i:i + chunk] * 2 - 1).latent_dist.mean for i in range(0, len(images), chunk)])


def encode_images(vae: AutoencoderKL, images: Tensor) -> Tensor:
    """Images in [0, 1] → normalised latents ``(z − shift)·scale`` (what the transformer models)."""
    c = vae.config
    return (_latent_means(vae, images) - c.shift_factor) * c.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Normalised latents → images in [0, 1] (differentiable: the reward's gradient flows through)."""
    c = vae.config
    return ((vae.decode(latents / c.scaling_factor + c.shift_factor).sample + 1) / 2).clamp(0, 1)


def flow_matching_loss(transformer, x: Tensor, tokens: Tensor, pooled: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """The rectified-flow loss: ``v_θ(x_σ)`` against ``ε − x`` at ``x_σ = (1−σ)x + σε`` (the base model's training
    objective; fine-tuning can keep it as a regulariser on the same data)."""
    s = sigma[:, None, None, None]
    pred = transformer(hidden_states=(1 - s) * x + s * eps, encoder_hidden_states=tokens, pooled_projections=pooled,
                       timestep=sigma * 1000, return_dict=False)[0]
    return F.mse_loss(pred, eps - x)


def train_flow(transformer: SD3Transformer2DModel, latents: Tensor, tokens: Tensor, pooled: Tensor,
               null: dict[str, Tensor], steps: int, batch: int, lr: float, seed: int, cfg_dropout: float = 0.1,
               ema_decay: float = 0.999, progress: Progress | None = None) -> SD3Transformer2DModel:
    """Rectified flow matching: predict ``ε − x`` at ``x_σ = (1−σ)x + σε``, σ = sigmoid(N(0, 1)); returns the
    exponential moving average of the weights (diffusers' ``EMAModel``), which samples far better
    than the last iterate of so short a run."""
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(seed)
    ema = EMAModel(transformer.parameters(), decay=ema_decay, foreach=True)  # decay min(d, (1+t)/(10+t))
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    transformer.train()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x, tok, pool = latents[idx], tokens[idx], pooled[idx]
        drop = torch.rand(batch, generator=g) < cfg_dropout
        tok = torch.where(drop[:, None, None], null["tokens"].expand_as(tok), tok)
        pool = torch.where(drop[:, None], null["pooled"].expand_as(pool), pool)
        eps = torch.randn(x.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))
        loss = flow_matching_loss(transformer, x, tok, pool, eps, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(transformer.parameters())
        if progress:
            progress("flow", step + 1, steps, loss.item())
    ema.copy_to(transformer.parameters())
    return transformer.eval()
