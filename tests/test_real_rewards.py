"""CLIPScore and PickScore through their real loading path, with random-init CLIP weights."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory):
    """A world folder holding random-init CLIP models where the reward_models stage would put them."""
    from transformers import CLIPConfig, CLIPModel

    from flowbp_ops.backbones.tiny import CLIP_VOCAB, _clip_tokenizer

    world = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(CLIP_VOCAB), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=8)
    model = CLIPModel(cfg)
    for name in ("clipscore", "pickscore"):  # the same weights: the two scores differ only by their formula
        model.save_pretrained(world / "rewards" / name, safe_serialization=True)
        _clip_tokenizer(32).save_pretrained(world / "rewards" / name)
    return world


def test_clip_rewards_score_prompts_and_pass_gradients_to_the_image(clip_world):
    from flowbp_ops.rewards.base import get_reward

    reward = get_reward("pickscore", world_dir=clip_world)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = reward(images, ["a red cat", "a blue dog on the left"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0  # differentiable preprocessing: the gradient reaches the pixels
    assert not any(p.requires_grad for p in reward.model.parameters())  # frozen
    other = reward(images.detach(), ["a photo of a small seven", "a blue dog on the left"])
    assert not torch.allclose(other[0], scores[0].detach()) and torch.allclose(other[1], scores[1].detach(), atol=1e-5)
    clip = get_reward("clipscore", world_dir=clip_world)(images.detach(), ["a red cat", "a blue dog on the left"])
    cos = scores.detach() / reward.model.logit_scale.exp()
    torch.testing.assert_close(clip, 2.5 * cos.clamp_min(0), atol=1e-5, rtol=1e-4)  # CLIPScore = 2.5·max(cos, 0)


def test_missing_clip_weights_say_how_to_get_them(tmp_path):
    from flowbp_ops.rewards.base import get_reward

    with pytest.raises(FileNotFoundError, match="reward_models stage"):
        get_reward("pickscore", world_dir=tmp_path)
