"""ImageReward through its real loading path, with random-init weights of the same architecture.

The released weights cannot be fetched here, so a tiny BLIP (transformers' own classes, the
ones the released model loads into) stands in for them, saved as the published checkpoint
would be (ImageReward.pt key names, torch.save of a plain dict) and converted. The vision key
renames are checked against a forward pass written from BLIP's vit.py on the original names.
"""

from __future__ import annotations

import pytest
import torch

import flowbp_ops.rewards.imagereward as ir  # registers "imagereward"
from flowbp_ops.rewards.base import get_reward

WORDS = ["a", "red", "cat", "blue", "dog", "on", "the", "left", "photo", "of", "small", "seven"]
PROMPTS = ["a red cat", "a blue dog"]  # as many tokens each: only the words differ


def _tiny_config(vocab_size: int):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6, initializer_range=0.02),
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=len(WORDS) + 5, sep_token_id=3, is_decoder=True),
        image_text_hidden_size=16)


def _original_name(key: str) -> str:
    """transformers BLIP key → ImageReward.pt key (BLIP's vit.py / med.py names), written out
    independently of the converter's renames."""
    if key.startswith("vision_model."):
        table = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
                 "embeddings.patch_embedding": "patch_embed.proj", "post_layernorm": "norm",
                 "encoder.layers": "blocks", "self_attn.projection": "attn.proj", "self_attn.qkv": "attn.qkv",
                 "layer_norm1": "norm1", "layer_norm2": "norm2"}
        key = key.removeprefix("vision_model.")
        for new, old in table.items():
            key = key.replace(new, old)
        key = "visual_encoder." + key
    return "blip." + key


def _blip_vit_reference(sd: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's VisionTransformer.forward (models/vit.py) on ImageReward.pt key names."""
    F = torch.nn.functional

    def p(name):
        return sd[f"blip.visual_encoder.{name}"]

    def ln(x, n):
        return F.layer_norm(x, x.shape[-1:], p(f"{n}.weight"), p(f"{n}.bias"), eps=1e-6)

    def lin(x, n):
        return F.linear(x, p(f"{n}.weight"), p(f"{n}.bias"))

    x = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=8)
    x = torch.cat([p("cls_token").expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + p("pos_embed")
    B, N, C = x.shape
    i = 0
    while f"blip.visual_encoder.blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}"
        qkv = lin(ln(x, f"{b}.norm1"), f"{b}.attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        x = x + lin((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        i += 1
    return ln(x, "norm")


@pytest.fixture(scope="module")
def ir_world(tmp_path_factory):
    """Two worlds with the same tiny ImageReward: one saved directly, one converted from a fake
    ImageReward.pt; plus the fake checkpoint itself."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    root = tmp_path_factory.mktemp("imagereward")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    bert = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})  # stands in for bert-base-uncased
    bert.save_pretrained(root / "bert")

    torch.manual_seed(0)
    cfg = _tiny_config(vocab_size=len(WORDS) + 7)  # + [DEC], [ENC] as BLIP's init_tokenizer adds
    blip, mlp = BlipForImageTextRetrieval(cfg).eval(), ir.MLP(32).eval()
    with torch.no_grad():  # no parameter left at a default 0 or 1: a misplaced LayerNorm or bias must show
        for p in blip.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for p in mlp.parameters():  # ImageReward's own init is ~0 and would hide the prompt's effect
            p.normal_(std=0.3)

    direct = root / "direct" / "rewards" / "imagereward"
    blip.save_pretrained(direct)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(direct / "mlp.safetensors"))
    tok = BertTokenizer.from_pretrained(root / "bert")
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(direct)

    fake = {_original_name(k): v.clone() for k, v in blip.state_dict().items() if not k.startswith("itm_head.")}
    fake["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # med.py persists this buffer
    fake.update({f"mlp.{k}": v.clone() for k, v in mlp.state_dict().items()})
    pt = root / "ImageReward.pt"
    torch.save(fake, pt)
    ir.convert_checkpoint(pt, root / "converted" / "rewards" / "imagereward", tokenizer=root / "bert", config=cfg)
    return {"root": root, "direct": root / "direct", "converted": root / "converted", "fake": fake, "cfg": cfg,
            "blip": blip}


def test_imagereward_scores_prompts_and_passes_gradients_to_the_image(ir_world):
    reward = get_reward("imagereward", world_dir=ir_world["converted"])
    ids = reward.tokenizer(PROMPTS + ["[ENC]"]).input_ids
    assert ids[0][0] == 2 and 1 not in ids[0] + ids[1] and ids[2][1] == len(WORDS) + 6  # [CLS], no [UNK], BLIP's [ENC]
    images = torch.rand(2, 3, 48, 40, requires_grad=True)  # not square: resize + centre crop
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0  # differentiable preprocessing and encoders: the gradient reaches the pixels
    assert not any(p.requires_grad for p in reward.parameters())  # frozen
    swapped = reward(images.detach(), PROMPTS[::-1])
    assert not torch.allclose(swapped, scores.detach())  # the prompt matters
    single = reward(images[:1].detach(), PROMPTS[:1])
    torch.testing.assert_close(single, scores[:1].detach(), atol=1e-5, rtol=1e-5)  # no leakage across the batch


def test_converted_checkpoint_scores_like_the_model_it_came_from(ir_world):
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red cat", "a photo of a small seven", "a blue dog on the left"]
    direct = get_reward("imagereward", world_dir=ir_world["direct"])(images, prompts)
    converted = get_reward("imagereward", world_dir=ir_world["converted"])(images, prompts)
    torch.testing.assert_close(converted, direct, atol=0, rtol=0)


def test_vision_renames_compute_what_blip_vit_computes(ir_world):
    """The converted ViT (transformers' BlipVisionModel) and BLIP's own forward on the original
    key names give the same tokens: the renames put every weight where it does the same job."""
    reward = get_reward("imagereward", world_dir=ir_world["converted"])
    pixels = ir.blip_preprocess(torch.rand(2, 3, 32, 32), 32)
    ours = reward.vision(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, _blip_vit_reference(ir_world["fake"], pixels, heads=2), atol=1e-5, rtol=1e-4)


def test_converter_refuses_what_it_cannot_place_or_unpickle(ir_world, tmp_path):
    fake, cfg = ir_world["fake"], ir_world["cfg"]
    for broken in ({k: v for k, v in fake.items() if "blocks.0.attn.qkv.weight" not in k},  # a missing weight
                   {**fake, "blip.visual_encoder.extra.weight": torch.zeros(1)}):  # a key with no home
        torch.save(broken, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match="does not map onto BLIP"):
            ir.convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out", config=cfg)
    torch.save({"blip.x": torch.zeros(1), "payload": ir.MLP}, tmp_path / "pickled.pt")  # a pickled object, not tensors
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        ir.convert_checkpoint(tmp_path / "pickled.pt", tmp_path / "out", config=cfg)


def test_missing_imagereward_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_checkpoint"):
        get_reward("imagereward", world_dir=tmp_path)


def test_preprocess_matches_the_released_transform_on_square_images():
    """224 px square input: the resize is the identity and only the CLIP normalisation acts."""
    x = torch.rand(1, 3, 224, 224)
    mean = torch.tensor(ir.CLIP_MEAN)[:, None, None]
    std = torch.tensor(ir.CLIP_STD)[:, None, None]
    torch.testing.assert_close(ir.blip_preprocess(x, 224), (x - mean) / std)
    assert ir.blip_preprocess(torch.rand(2, 3, 300, 500), 224).shape == (2, 3, 224, 224)


def test_released_architecture_has_imagereward_shapes():
    """The default config builds BLIP ViT-L/16 at 224 px + med BERT-base with 1024-wide cross-attention
    (on the meta device: shapes only, no memory)."""
    from transformers import BlipForImageTextRetrieval

    with torch.device("meta"):
        model = BlipForImageTextRetrieval(ir.imagereward_config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 197, 1024)
    assert shapes["vision_model.encoder.layers.23.self_attn.qkv.weight"] == (3072, 1024)
    assert shapes["text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert shapes["text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert model.config.vision_config.layer_norm_eps == 1e-6 and model.config.text_config.layer_norm_eps == 1e-12
