"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

The model: a BLIP ViT-L/16 image encoder; a BERT-base text encoder whose layers cross-attend
to the image tokens; a 5-layer linear MLP (768→1024→128→64→16→1, dropouts between, no
activations) on the text encoder's [CLS] state; the score normalised as
``(mlp − 0.16717362830052426) / 1.0333394966054072``. This follows ``ImageReward.score`` in
THUDM/ImageReward: prompts padded to 35 tokens, image tokens all attended, the [CLS] id left
as the tokenizer gives it. The text depends on the image (cross-attention), so nothing of the
text side can be cached but its tokens.

Weights live at ``<world_dir>/rewards/imagereward/``: ``config.json`` + ``model.safetensors``
(a ``BlipForImageTextRetrieval`` in ``save_pretrained`` layout; its unused ``itm_head`` is
zeroed), the BLIP tokenizer (bert-base-uncased with ``[DEC]`` and ``[ENC]`` added) and
``mlp.safetensors``. ``convert_checkpoint`` builds that folder from the published ImageReward.pt.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowbp_ops.rewards.base import check_images, check_recorded, freeze
from flowbp_ops.rewards.clip import CLIP_MEAN, CLIP_STD

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35  # ImageReward tokenizes with padding="max_length", max_length=35
UNUSED = ("itm_head.", "vision_proj.", "text_proj.")  # BLIP heads the reward never calls


class MLP(nn.Module):
    """ImageReward's head, layer for layer, so its keys are the checkpoint's ``mlp.layers.*``."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def imagereward_config(vocab_size: int = 30524):
    """The released model's architecture: BLIP ViT-L/16 at 224 px + BLIP's med BERT-base."""
    from transformers import BlipConfig

    return BlipConfig(
        # BLIP's ViT: LayerNorm eps 1e-6, exact GELU, qkv bias (blip/models/vit.py)
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu"),
        # med_config.json with encoder_width = 1024; is_decoder builds the cross-attention layers
        text_config=dict(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512,
                         layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0, is_decoder=True),
        image_text_hidden_size=256)


def blip_preprocess(images: Tensor, size: int) -> Tensor:
    """[0, 1] images → BLIP input as ImageReward's ``_transform``: shorter side to ``size``
    (bicubic, antialiased), centre crop, CLIP normalisation; differentiable."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


class ImageReward:
    def __init__(self, path: str | Path, name: str = "imagereward", device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        path = Path(path)
        missing = [f for f in ("config.json", "model.safetensors", "mlp.safetensors") if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"no ImageReward model at {path} (missing {', '.join(missing)}): fetch THUDM/ImageReward's "
                f"ImageReward.pt (reward_models stage) and convert it with "
                f"flowbp_ops.rewards.imagereward.convert_checkpoint(src_pt, {path}, "
                f"tokenizer=<bert-base-uncased dir>)")
        check_recorded(path)
        blip = BlipForImageTextRetrieval.from_pretrained(path, use_safetensors=True)
        self.vision, self.text = freeze(blip.vision_model.to(device)), freeze(blip.text_encoder.to(device))
        self.mlp = MLP(blip.config.text_config.hidden_size)
        self.mlp.load_state_dict(load_file(str(path / "mlp.safetensors")))
        self.mlp = freeze(self.mlp.to(device))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.size = blip.config.vision_config.image_size
        self.name, self.device = name, torch.device(device)

    def parameters(self):
        for m in (self.vision, self.text, self.mlp):
            yield from m.parameters()

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt").to(self.device)
        image_embeds = self.vision(pixel_values=blip_preprocess(images.float(), self.size)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        reward = self.mlp(out.last_hidden_state[:, 0].float()).squeeze(-1)
        return (reward - MEAN) / STD


def rename_key(key: str) -> str | None:
    """ImageReward.pt key → ``BlipForImageTextRetrieval`` key; None for keys to drop.

    Renames as transformers' convert_blip_original_pytorch_to_hf.py: the ViT's timm-style
    names to BlipVisionModel's; the text encoder (BLIP's med.py BertModel, which transformers'
    BlipTextModel copies name for name) and the projections keep theirs.
    """
    if key.startswith("mlp."):
        return None  # the head goes to mlp.safetensors
    key = key.removeprefix("blip.")
    if key.endswith("embeddings.position_ids"):
        return None  # a persistent buffer in med.py, a recomputed one in transformers
    if key.startswith("visual_encoder."):
        key = "vision_model." + key.removeprefix("visual_encoder.")
        for old, new in (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                         ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."),
                         (".attn.proj.", ".self_attn.projection."), (".attn.qkv.", ".self_attn.qkv."),
                         (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2.")):
            key = key.replace(old, new)
        if key.startswith("vision_model.norm."):
            key = key.replace("vision_model.norm.", "vision_model.post_layernorm.")
    return key


def convert_checkpoint(src_pt: str | Path, dst_dir: str | Path, tokenizer: str | Path | None = None,
                       config=None) -> Path:
    """Published ImageReward.pt → the folder ``ImageReward`` loads.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers: a full unpickle
    of a downloaded file can run arbitrary code. ``tokenizer``: a bert-base-uncased tokenizer
    folder; ``[DEC]``/``[ENC]`` are added as BLIP's ``init_tokenizer`` does. ``config``: the
    BlipConfig (default: the released architecture). Refuses keys it cannot place, and any
    weight the reward uses that the checkpoint lacks.
    """
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    state = torch.load(str(src_pt), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    mlp = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    blip_state = {new: v for k, v in state.items() if (new := rename_key(k)) is not None}

    model = BlipForImageTextRetrieval(config or imagereward_config())
    result = model.load_state_dict(blip_state, strict=False)
    unused = [k for k in result.missing_keys if k.startswith(UNUSED)]
    missing = [k for k in result.missing_keys if k not in unused]
    if missing or result.unexpected_keys:
        raise ValueError(f"ImageReward checkpoint does not map onto BLIP: missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    for k in unused:  # zeros rather than random values in the saved file
        nn.init.zeros_(model.get_parameter(k))
    head = MLP(model.config.text_config.hidden_size)
    head.load_state_dict(mlp)  # strict: all five linears must be there

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(dst / "mlp.safetensors"))
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        tok.save_pretrained(dst)
    return dst


def imagereward(world_dir: str | Path = "data/world", device: str = "cpu", **_):
    return ImageReward(Path(world_dir) / "rewards" / "imagereward", device=device)
