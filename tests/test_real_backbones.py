"""SD3.5-M, FLUX.1-dev and FLUX.2-Klein-base through their real loading path, on tiny random-init pipelines.

Each pipeline is built from config with the real component classes, saved with
``save_pretrained`` (safetensors) and loaded back by the adapter's ``from_pretrained``; then a
rollout, every method's surrogate with one optimizer step, and the saved LoRA loaded into
the matching diffusers pipeline with ``load_lora_weights``.
"""

from __future__ import annotations

import pytest
import torch

from flowbp_ops.methods import METHODS
from flowbp_ops.policy.config import POLICY_METHODS
from flowbp_ops.rewards.base import register
from flowbp_ops.training.config import TrainConfig
from flowbp_ops.training.loop import train

PROMPTS = ["a red cat on the left", "a blue dog on the right", "a photo of a small seven"]


@register("test_brightness")
def _brightness(**_):
    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))

    return reward


@pytest.fixture(scope="module", params=["sd35", "flux1", "flux2"])
def saved(request, tmp_path_factory):
    from flowbp_ops.backbones.tiny import save_tiny

    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "pipe")


def load(kind, path, **kw):
    from flowbp_ops.backbones.flux1 import Flux1Backbone
    from flowbp_ops.backbones.flux2 import Flux2Backbone
    from flowbp_ops.backbones.sd35 import SD35Backbone

    cls = {"sd35": SD35Backbone, "flux1": Flux1Backbone, "flux2": Flux2Backbone}[kind]
    # Qwen3's chat template wraps the prompt: the tiny byte-level tokenizer needs more tokens
    return cls(path, dtype="fp32", resolution=32, max_sequence_length=64 if kind == "flux2" else 16, **kw)


def test_loads_encodes_with_cache_and_samples(saved, tmp_path):
    from flowbp_ops.sampling import generate

    kind, path = saved
    bb = load(kind, path, cache_dir=tmp_path / "emb")
    cond = bb.conditioning(PROMPTS[:2], 4.0)
    pos = cond.pos if hasattr(cond, "pos") else cond
    assert all(v.shape[0] == 2 for v in pos.values()) and set(pos) >= {"tokens"}
    assert bb.cache.misses == 2 + (kind != "flux1")  # two prompts (+ the empty negative prompt under real CFG)
    again = load(kind, path, cache_dir=tmp_path / "emb")  # a new process would read the disk cache
    again.encode_prompts(PROMPTS[:2])
    assert again.cache.misses == 0
    torch.testing.assert_close(again.encode_prompts(PROMPTS[:2])["tokens"], pos["tokens"])
    images = generate(bb, PROMPTS, 4, 4.0)
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert len(bb.sigmas(25)) == 26


def test_sampler_reproduces_the_pipeline(saved):
    """Our rollout (sigmas, guidance, packing, decoding) against the diffusers pipeline's own sampling
    from the same noise; SD3.5 is given the spec's grid (its pipeline's default grid differs)."""
    import numpy as np

    from flowbp_ops.sampling import generate, initial_noise

    kind, path = saved
    bb = load(kind, path)
    ours = generate(bb, ["a red cat"], 6, 4.0, seed=3)
    x0 = initial_noise(bb.latent_shape(1)[1:], range(3, 4))
    extra = {"sigmas": list(np.linspace(1, 1 / 6, 6))} if kind == "sd35" else {}
    if kind == "flux2":  # its pipeline takes the patchified latent unpacked: (B, C, h, w)
        side = int(x0.shape[1] ** 0.5)
        x0 = x0.permute(0, 2, 1).reshape(1, -1, side, side)
    theirs = bb.pipe(prompt="a red cat", height=32, width=32, num_inference_steps=6, guidance_scale=4.0, latents=x0,
                     output_type="pt", max_sequence_length=bb.max_sequence_length, **extra).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if kind == "sd35":  # the evaluation grid the authors use: the pipeline called without sigmas (spec §6.9)
        ours = generate(bb, ["a red cat"], 6, 4.0, seed=3, grid="scheduler")
        theirs = bb.pipe(prompt="a red cat", height=32, width=32, num_inference_steps=6, guidance_scale=4.0,
                         latents=x0, output_type="pt", max_sequence_length=bb.max_sequence_length).images
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_step(saved, method, tmp_path):
    kind, path = saved
    bb = load(kind, path)
    cfg = TrainConfig(method=method, backbone=kind, steps=1, batch=2, rollout_steps=25, reward="test_brightness",
                      heldout_rewards=[], checkpoint_every=1, ema=None, lr=1e-2, finetune="lora")
    result = train(cfg, bb, PROMPTS, tmp_path)
    assert result["skipped"] == 0 and result["last"]["grad_norm"] > 0
    # LoRA's B starts at zero: after one step some B is not, so the gradient reached the adapter
    b = [p for n, p in bb.transformer.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b), "the optimizer step changed no LoRA weight"


@pytest.mark.parametrize("method", POLICY_METHODS)
def test_every_policy_method_trains_one_step(saved, method, tmp_path):
    """Flow-GRPO (SDE sampler, likelihood ratio, KL to the adapter-free model) and DiffusionNFT on the real
    pipelines: groups of 2 images per prompt, one optimizer step that reaches the adapter."""
    kind, path = saved
    bb = load(kind, path)
    cfg = TrainConfig(method=method, backbone=kind, steps=1, batch=4, rollout_steps=6, reward="test_brightness",
                      heldout_rewards=[], checkpoint_every=1, ema=None, lr=1e-2, finetune="lora",
                      method_overrides=["policy.group_size=2"])
    result = train(cfg, bb, PROMPTS, tmp_path)
    assert result["skipped"] == 0 and result["last"]["grad_norm"] > 0
    if method.startswith("flow_grpo"):
        assert result["last"]["ratio_max_dev"] == 0.0  # on policy
    b = [p for n, p in bb.transformer.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b), "the optimizer step changed no LoRA weight"


def test_saved_lora_loads_into_the_diffusers_pipeline(saved, tmp_path):
    import diffusers

    from flowbp_ops.trained_weights import WEIGHT_NAME, save_lora

    kind, path = saved
    bb = load(kind, path)
    train(TrainConfig(method="flowbp_sparse", backbone=kind, steps=2, batch=2, rollout_steps=25, lr=5e-2,
                      reward="test_brightness", heldout_rewards=[], checkpoint_every=2, ema=None, finetune="lora"),
          bb, PROMPTS, tmp_path)
    save_lora(bb.transformer, tmp_path / "weights", pipeline_class=bb.pipeline_class)
    pipe = getattr(diffusers, bb.pipeline_class).from_pretrained(str(path))
    x = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(0))
    cond = load(kind, path).encode_prompts(PROMPTS[:1])

    def velocity(transformer):
        v = bb.denoiser(None).model
        v.transformer = transformer
        with torch.no_grad():
            return v(x, torch.tensor([0.5]), cond)

    base = velocity(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "weights"), weight_name=WEIGHT_NAME)
    tuned = velocity(pipe.transformer)
    assert not torch.allclose(base, tuned)  # the adapter changes the pipeline's output
    torch.testing.assert_close(tuned, velocity(bb.transformer), atol=1e-5, rtol=1e-4)  # and reproduces training
