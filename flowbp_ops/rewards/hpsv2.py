"""HPSv2.1 (Wu et al. 2023) on transformers' ``CLIPModel``.

HPSv2.1 is an open_clip ViT-H-14 fine-tuned on HPDv2; its score is the plain cosine between
the normalised image and text embeddings (HPSv2's ``img_score.py`` takes the diagonal of
``image_features @ text_features.T`` with no ``logit_scale``), so rewards sit around 0.3.
open_clip is not a dependency (its torchvision pin has no CPU wheel beside our torch):
``convert_open_clip_checkpoint`` renames the published ``HPS_v2.1_compressed.pt`` onto
transformers' CLIP, whose layers compute the same function (pre-LN blocks, exact GELU, LayerNorm
eps 1e-5, causal text attention, [CLS] / end-of-text pooling, bias-free projections).

Weights live at ``<world_dir>/rewards/hpsv2/`` in ``save_pretrained`` layout (safetensors),
with the ViT-H-14 tokenizer (OpenAI CLIP's BPE, 77 tokens; e.g. the one of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the model HPSv2 was fine-tuned from).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_ops.rewards.base import check_images
from flowbp_ops.rewards.clip import CLIPReward, clip_preprocess

# open_clip pools the text at argmax(token ids), the end-of-text token being the largest id.
# transformers' CLIPTextModel does exactly that when eos_token_id == 2 (its legacy branch, kept for
# configs written before transformers#24773); any other id pools at that id's first occurrence.
LEGACY_ARGMAX_EOS = 2


def hpsv2_config(vision_config: dict | None = None, text_config: dict | None = None, projection_dim: int = 1024):
    """open_clip's ViT-H-14 as a ``CLIPConfig``; the dicts override sizes (tests build tiny ones)."""
    from transformers import CLIPConfig

    common = dict(hidden_act="gelu", layer_norm_eps=1e-5)  # nn.GELU (exact, not quick_gelu), nn.LayerNorm
    vision = dict(common, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                  patch_size=14, image_size=224) | (vision_config or {})
    text = dict(common, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                vocab_size=49408, max_position_embeddings=77, pad_token_id=0) | (text_config or {})
    text |= dict(bos_token_id=text["vocab_size"] - 2, eos_token_id=LEGACY_ARGMAX_EOS)  # OpenAI's layout: SOT, EOT last
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection_dim)


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_SINGLE = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "logit_scale": "logit_scale"}
_NORM = {"visual.ln_pre": "vision_model.pre_layrnorm",  # sic: transformers' spelling
         "visual.ln_post": "vision_model.post_layernorm", "ln_final": "text_model.final_layer_norm"}
_PROJ = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)")


def open_clip_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP state dict → ``CLIPModel`` state dict; ValueError naming unplaceable keys."""
    out, unmapped = {}, []
    for key, v in state.items():
        key = key.removeprefix("module.")  # a checkpoint saved from DistributedDataParallel
        stem, _, leaf = key.rpartition(".")
        if key.endswith("attn_mask"):
            continue  # the causal mask buffer; transformers builds its own
        if key in _SINGLE:
            out[_SINGLE[key]] = v
        elif key in _PROJ:  # open_clip right-multiplies x @ proj; nn.Linear stores the transpose
            out[_PROJ[key]] = v.T
        elif stem in _NORM and leaf in ("weight", "bias"):
            out[f"{_NORM[stem]}.{leaf}"] = v
        elif m := _RESBLOCK.fullmatch(key):
            layer = f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}"
            if m[3] == "attn.in_proj":  # nn.MultiheadAttention packs q, k, v in one matrix, in that order
                for name, part in zip("qkv", v.chunk(3)):
                    out[f"{layer}.self_attn.{name}_proj.{m[4]}"] = part
            elif m[3] in _BLOCK:
                out[f"{layer}.{_BLOCK[m[3]]}.{m[4]}"] = v
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"open_clip keys with no place in transformers' CLIP: {unmapped[:8]}"
                         f"{f' (+{len(unmapped) - 8} more)' if len(unmapped) > 8 else ''}")
    return out


def convert_open_clip_checkpoint(src_pt: str | Path, dst_dir: str | Path, tokenizer_dir: str | Path | None = None,
                                 config=None) -> Path:
    """Published ``HPS_v2.1_compressed.pt`` (an open_clip ViT-H-14 state dict, possibly under
    ``"state_dict"``) → the folder the ``hpsv2`` reward loads.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers: a full unpickle
    of a downloaded file can run arbitrary code, so a checkpoint holding other objects is refused
    rather than trusted. ``tokenizer_dir``: a ViT-H-14 CLIP tokenizer folder (its BPE is saved
    alongside, see ``openai_clip_tokenizer``). ``config``: a ``CLIPConfig`` (default ``hpsv2_config()``).
    Refuses keys it cannot place and any weight the model needs that the checkpoint lacks.
    """
    from transformers import CLIPModel

    try:
        state = torch.load(str(src_pt), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{src_pt} holds more than tensors and plain containers; it is not unpickled "
                         f"(that could run code). Save its state_dict alone and convert that. ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{src_pt} is not an open_clip state dict (a dict of tensors)")

    config = config or hpsv2_config()
    config.text_config.eos_token_id = LEGACY_ARGMAX_EOS  # pool at argmax(ids), as open_clip does
    context = config.text_config.max_position_embeddings
    # may refuse: before writing
    tok = None if tokenizer_dir is None else openai_clip_tokenizer(tokenizer_dir, context)
    model = CLIPModel(config)
    try:
        result = model.load_state_dict(open_clip_to_transformers(state), strict=False)
    except RuntimeError as e:  # size mismatches: the checkpoint is not this architecture
        raise ValueError(f"{src_pt} does not fit the CLIP config: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{src_pt} does not map onto transformers' CLIP: missing {result.missing_keys[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(dst)
    return dst


def openai_clip_tokenizer(tokenizer_dir: str | Path, context: int = 77):
    """The BPE of a CLIP tokenizer folder, rebuilt to tokenize as open_clip does.

    Rebuilt rather than copied: laion-made folders may declare "!" (id 0, open_clip's padding) their
    special pad token, and then a "!" in a prompt becomes id 0 where open_clip encodes "!</w>".
    Padding with end-of-text is harmless: causal attention keeps it from the tokens before, and
    argmax pooling takes the first end-of-text. Truncation keeps end-of-text last at ``context``,
    as open_clip's tokenizer does.
    """
    import json

    from transformers import AutoTokenizer, CLIPTokenizer

    bpe = json.loads(AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]
    tok = CLIPTokenizer(vocab=bpe["vocab"], merges=merges, pad_token="<|endoftext|>", model_max_length=context)
    if tok.eos_token_id != max(bpe["vocab"].values()):
        raise ValueError(f"tokenizer at {tokenizer_dir}: end-of-text id {tok.eos_token_id} is not the largest id, "
                         f"so argmax pooling (open_clip's) would not find it")
    return tok


def center_square(images: Tensor) -> Tensor:
    """The central square: HPSv2 resizes the shorter side, then centre-crops; cropping first picks
    the same region (pixels differ only by resampling at the crop's edges)."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top:top + s, left:left + s]


class HPSv2Reward(CLIPReward):
    """HPSv2.1: cos(image, prompt) under the fine-tuned CLIP-H; gradient reaches the pixels."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        missing = [f for f in ("config.json", "tokenizer_config.json") if not (path / f).exists()]
        if missing or not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"no HPSv2.1 model at {path} (missing {', '.join(missing) or 'safetensors weights'}): fetch "
                f"HPS_v2.1_compressed.pt (hf://xswu/HPSv2) with the reward_models stage and convert it with "
                f"flowbp_ops.rewards.hpsv2.convert_open_clip_checkpoint(src_pt, {str(path)!r}, "
                f"tokenizer_dir=<laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder>)")
        super().__init__(path, "hpsv2", "hpsv2", device)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        pixels = clip_preprocess(center_square(images.float()), self.size)
        img = self.model.get_image_features(pixel_values=pixels)
        img = F.normalize(getattr(img, "pooler_output", img).float(), dim=-1)
        return (img * self.text_embeddings(prompts).to(img.device)).sum(-1)  # no logit_scale: HPSv2's score


def hpsv2(world_dir: str | Path = "data/world", device: str = "cpu", **_):
    return HPSv2Reward(Path(world_dir) / "rewards" / "hpsv2", device=device)
