"""HPSv2.1 through its real conversion and loading path, with tiny random-init CLIP weights.

The reference-free tests write a transformers CLIP out as an open_clip-style state dict (the
inverse renaming below, test-only), convert it back and compare scores. When open_clip can be
imported (it is not a dependency: ``uv pip install --target DIR --no-deps open-clip-torch==3.3.0
ftfy wcwidth`` and ``PYTHONPATH=DIR``), a tiny open_clip CLIP is the reference instead.
"""

from __future__ import annotations

import argparse
import enum
import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import flowbp_ops.rewards.hpsv2  # noqa: F401  (registers "hpsv2")
from flowbp_ops.rewards.base import get_reward
from flowbp_ops.rewards.clip import clip_preprocess
from flowbp_ops.rewards.hpsv2 import center_square, convert_open_clip_checkpoint, hpsv2_config

# OpenAI CLIP's layout: "!" is id 0 (open_clip pads with 0), start/end of text are the last two ids
VOCAB = (["!"] + [c + e for e in ("", "</w>") for c in "abcdefghijklmnopqrstuvwxyz"]
         + ["<|startoftext|>", "<|endoftext|>"])
CTX, SIZE, WIDTH, HEADS, LAYERS, DIM = 16, 32, 16, 2, 2, 8
PROMPTS = ["a red cat", "a blue dog on the left"]


def tiny_config():
    sizes = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * WIDTH)
    return hpsv2_config(vision_config=dict(sizes, patch_size=8, image_size=SIZE),
                        text_config=dict(sizes, vocab_size=len(VOCAB), max_position_embeddings=CTX),
                        projection_dim=DIM)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import CLIPTokenizer

    out = tmp_path_factory.mktemp("tok")
    CLIPTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[], pad_token="!",
                  model_max_length=1000).save_pretrained(out)  # 1000: the converter must cap it at CTX
    return out


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight off its init (LayerNorms off 1/0, biases off 0), so a swapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def to_open_clip(hf: dict) -> dict:
    """transformers CLIP state dict → open_clip names (test-only inverse of the converter)."""
    out = {}
    for k, v in hf.items():
        for tower, prefix in (("vision_model.", "visual."), ("text_model.", "")):
            if k.startswith(tower + "encoder.layers."):
                i, rest = k.removeprefix(tower + "encoder.layers.").split(".", 1)
                block = f"{prefix}transformer.resblocks.{i}."
                if rest.startswith("self_attn.q_proj."):
                    leaf = rest.rsplit(".", 1)[1]
                    out[f"{block}attn.in_proj_{leaf}"] = torch.cat(
                        [hf[f"{tower}encoder.layers.{i}.self_attn.{n}_proj.{leaf}"] for n in "qkv"])
                elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                    for new, old in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                     ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                        rest = rest.replace(old, new)
                    out[block + rest] = v
                break
        else:
            names = {"vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                     "vision_model.embeddings.class_embedding": "visual.class_embedding",
                     "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                     "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                     "text_model.embeddings.position_embedding.weight": "positional_embedding",
                     "logit_scale": "logit_scale"}
            norms = {"vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post",
                     "text_model.final_layer_norm": "ln_final"}
            stem, _, leaf = k.rpartition(".")
            if k in names:
                out[names[k]] = v
            elif stem in norms:
                out[f"{norms[stem]}.{leaf}"] = v
            else:
                out[{"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}[k]] = v.T
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    """A tiny transformers CLIP, saved as an open_clip checkpoint and converted into a world folder."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = perturb(CLIPModel(tiny_config()).eval(), 0)
    tmp = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": to_open_clip(model.state_dict()), "epoch": 3}, tmp / "HPS_v2.1_compressed.pt")
    convert_open_clip_checkpoint(tmp / "HPS_v2.1_compressed.pt", tmp / "world" / "rewards" / "hpsv2",
                                 tokenizer_dir=tokenizer_dir, config=tiny_config())
    return model, tmp / "world"


def test_hpsv2_is_the_cosine_of_the_converted_model_and_passes_gradients(converted):
    model, world = converted
    reward = get_reward("hpsv2", world_dir=world)
    images = torch.rand(2, 3, 48, 64, requires_grad=True)  # not square: centre square, then resize
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-6).all()

    tok = reward.tokenizer(PROMPTS, padding="max_length", max_length=CTX, truncation=True,
                           return_tensors="pt")
    assert reward.tokenizer.model_max_length == CTX and (tok.input_ids[:, 0] == len(VOCAB) - 2).all()
    with torch.no_grad():  # the original weights, scored independently of the reward's code path
        img = model.get_image_features(pixel_values=clip_preprocess(center_square(images), SIZE)).pooler_output
        txt = model.get_text_features(input_ids=tok.input_ids).pooler_output
    want = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    torch.testing.assert_close(scores.detach(), want, atol=1e-5, rtol=0)

    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0  # differentiable preprocessing: the gradient reaches the pixels
    assert grad[..., :, :8].abs().sum() == 0  # the cropped-off columns do not count
    assert not any(p.requires_grad for p in reward.model.parameters())  # frozen
    other = reward(images.detach(), ["a green tree", PROMPTS[1]])
    assert not torch.allclose(other[0], scores[0].detach()) and torch.allclose(other[1], scores[1].detach(), atol=1e-6)


def test_missing_hpsv2_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_open_clip_checkpoint"):
        get_reward("hpsv2", world_dir=tmp_path)


def test_converter_refuses_pickled_objects_unmapped_and_missing_keys(converted, tmp_path):
    model, _ = converted
    state = to_open_clip(model.state_dict())
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not unpickled"):
        convert_open_clip_checkpoint(tmp_path / "pickled.pt", tmp_path / "out", config=tiny_config())
    torch.save(dict(state, **{"visual.attn_pool.query": torch.zeros(3)}), tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        convert_open_clip_checkpoint(tmp_path / "extra.pt", tmp_path / "out", config=tiny_config())
    torch.save({k: v for k, v in state.items() if k != "visual.ln_post.bias"}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="vision_model.post_layernorm.bias"):
        convert_open_clip_checkpoint(tmp_path / "short.pt", tmp_path / "out", config=tiny_config())
    assert not (tmp_path / "out").exists()  # nothing written for a refused checkpoint


# ---- the reference: open_clip itself, when it can be imported ------------------------------------

@pytest.fixture(scope="module")
def open_clip():
    """open_clip with a stub torchvision (only its PIL transforms use it), or a skip.

    The stub is in sys.modules only while open_clip imports, so no other test sees it; transformers
    has cached "no torchvision" before then."""
    from transformers.utils import is_torchvision_available

    is_torchvision_available()
    tv, tr, fn, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                             "torchvision.transforms.functional", "torchvision.ops", "torchvision.ops.misc"))
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    for name in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop", "ColorJitter",
                 "Grayscale"):
        setattr(tr, name, object)
    tr.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    misc.FrozenBatchNorm2d = object
    tv.transforms, tr.functional, tv.ops, ops.misc = tr, fn, ops, misc
    stubs = {m.__name__: m for m in (tv, tr, fn, ops, misc)}
    saved = {n: sys.modules.get(n) for n in stubs}
    sys.modules.update(stubs)
    try:
        import open_clip
    except ImportError as e:
        pytest.skip(f"open_clip not importable ({e}): the reference comparison did not run")
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)
    return open_clip


def test_hpsv2_matches_open_clip_on_a_tiny_clip(open_clip, tmp_path, tokenizer_dir):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    ref = CLIP(DIM, vision_cfg=CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=8,
                                             image_size=SIZE, mlp_ratio=4.0),
               text_cfg=CLIPTextCfg(context_length=CTX, vocab_size=len(VOCAB), width=WIDTH, heads=HEADS,
                                    layers=LAYERS), quick_gelu=False)  # ViT-H-14: exact nn.GELU
    assert isinstance(ref.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    ref = perturb(ref.eval(), 1)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")  # a bare state dict, as open_clip saves one
    convert_open_clip_checkpoint(tmp_path / "ref.pt", tmp_path / "rewards" / "hpsv2", tokenizer_dir=tokenizer_dir,
                                 config=tiny_config())
    reward = get_reward("hpsv2", world_dir=tmp_path)

    images = torch.rand(2, 3, 40, 40)
    prompts = PROMPTS + ["a b c d e f g h i j k l m n o p q r"]  # the last runs past the context: truncated
    images = torch.cat([images, images[:1]])
    # open_clip's tokenizer output: [SOT] tokens [EOT], EOT kept when truncating, zero padding to CTX
    ids = reward.tokenizer(prompts, add_special_tokens=False).input_ids
    tokens = torch.zeros(len(prompts), CTX, dtype=torch.long)
    for i, t in enumerate(ids):
        t = ([len(VOCAB) - 2] + t + [len(VOCAB) - 1])[:CTX]
        t[-1] = len(VOCAB) - 1
        tokens[i, :len(t)] = torch.tensor(t)
    with torch.no_grad():
        img = ref.encode_image(clip_preprocess(center_square(images), SIZE), normalize=True)
        txt = ref.encode_text(tokens, normalize=True)
        got = reward(images, prompts)
    torch.testing.assert_close(got, torch.diagonal(img @ txt.T), atol=1e-5, rtol=0)  # HPSv2's img_score
    assert not torch.allclose(got[0], got[2])  # same image, different prompt


def test_rebuilt_tokenizer_matches_open_clips_on_the_real_bpe(open_clip, tmp_path):
    """OpenAI CLIP's BPE (shipped with open_clip), saved as a laion-style folder padding with "!"."""
    from transformers import CLIPTokenizer

    from flowbp_ops.rewards.hpsv2 import openai_clip_tokenizer

    ref = open_clip.tokenizer.SimpleTokenizer()  # what get_tokenizer("ViT-H-14") returns, context 77
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(k, k): v for k, v in ref.encoder.items()}
    merges = [tuple(p) for p, _ in sorted(ref.bpe_ranks.items(), key=lambda kv: kv[1])]
    CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!").save_pretrained(tmp_path)
    tok = openai_clip_tokenizer(tmp_path, 77)

    prompts = ["A photo of an astronaut riding a horse on Mars, 4k, highly detailed!!",
               "café con leche — the 'best' one",
               "Portrait of a cyberpunk samurai, trending on ArtStation, by Greg Rutkowski " * 4]  # > 77 tokens
    want = ref(prompts)
    got = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert tok.eos_token_id == 49407 and (got.argmax(-1) == want.argmax(-1)).all()  # the same pooled position
    after_eot = torch.arange(77) > got.argmax(-1, keepdim=True)
    assert torch.equal(got.masked_fill(after_eot, 0), want)  # the same ids; only the padding id differs


def test_reward_models_stage_converts_a_published_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    """``rewards.models.hpsv2: <...>.pt`` is fetched, checksummed and converted by the pipeline's stage."""
    from transformers import CLIPModel

    from flowbp_ops import stages
    from flowbp_ops.params import Params
    from flowbp_ops.storage import SourceError, _fetch_hub, sha256_of
    from flowbp_ops.surrogate.config import ConfigError

    torch.manual_seed(0)
    model = perturb(CLIPModel(tiny_config()).eval(), 1)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": to_open_clip(model.state_dict())}, ckpt)

    def params(**rewards):
        return Params.model_validate({"world_dir": str(tmp_path / "world"), "rewards": {"source": "", **rewards}})

    # the stage converts with the published architecture; here the tiny one
    monkeypatch.setattr("flowbp_ops.rewards.hpsv2.hpsv2_config", tiny_config)
    with pytest.raises(ConfigError, match="rewards.tokenizers.hpsv2"):
        stages.reward_models(params(models={"hpsv2": str(ckpt)}))
    with pytest.raises(Exception, match="checksum mismatch"):
        stages.reward_models(params(models={"hpsv2": str(ckpt)}, tokenizers={"hpsv2": str(tokenizer_dir)},
                                    checksums={"hpsv2": "0" * 64}))
    assert not (tmp_path / "world" / "rewards" / "hpsv2").exists()  # nothing half-converted is left
    meta = stages.reward_models(params(models={"hpsv2": str(ckpt)}, tokenizers={"hpsv2": str(tokenizer_dir)}))
    assert meta["hpsv2.sha256"] == sha256_of(ckpt)
    scores = get_reward("hpsv2", world_dir=tmp_path / "world")(torch.rand(2, 3, SIZE, SIZE), PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(ConfigError, match="only hpsv2, imagereward"):
        stages.reward_models(params(models={"pickscore": str(ckpt)}))
    with pytest.raises(SourceError, match="include="):
        _fetch_hub("hf://owner/name?files=*.json", tmp_path / "x")
