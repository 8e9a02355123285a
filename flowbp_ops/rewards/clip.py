"""CLIP-based rewards through transformers: CLIPScore and PickScore.

Both embed the image and the prompt with a CLIP model and score their cosine similarity:
CLIPScore as ``w·max(cos, 0)`` with w = 2.5 (Hessel et al.), PickScore as
``logit_scale·cos`` (Kirstain et al.; a CLIP-H fine-tuned on Pick-a-Pic). Preprocessing is
torch (bicubic antialiased resize to the model's input size, CLIP normalisation), so the
reward's gradient reaches the image; the weights are frozen.

Weights come from the ``reward_models`` stage: a folder in ``save_pretrained`` layout
(model + tokenizer, safetensors) at ``<world_dir>/rewards/<name>/``, fetched from the hub
(``hf://yuvalkirstain/PickScore_v1@<rev>``), S3 or a local path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_ops.rewards.base import check_images, check_recorded, freeze

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """[0, 1] images → CLIP input, differentiably (no PIL on the gradient path)."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


class CLIPReward:
    def __init__(self, path: str | Path, name: str, kind: str, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no CLIP model at {path}: fetch it with the reward_models stage "
                                    f"(rewards.source) or save one there with save_pretrained")
        check_recorded(path)
        self.model = freeze(CLIPModel.from_pretrained(path, use_safetensors=True).to(device))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.size = self.model.config.vision_config.image_size
        self.name, self.kind, self.device = name, kind, torch.device(device)
        self._text: dict[str, Tensor] = {}

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            tok = self.tokenizer(missing, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = self.model.get_text_features(**tok)
            emb = getattr(emb, "pooler_output", emb)
            self._text.update(zip(missing, F.normalize(emb.float(), dim=-1)))
        return torch.stack([self._text[p] for p in prompts])

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        img = self.model.get_image_features(pixel_values=clip_preprocess(images.float(), self.size))
        img = F.normalize(getattr(img, "pooler_output", img).float(), dim=-1)
        cos = (img * self.text_embeddings(prompts).to(img.device)).sum(-1)
        if self.kind == "clipscore":
            return 2.5 * cos.clamp_min(0)
        return self.model.logit_scale.exp() * cos


def _path(world_dir: str | Path, name: str) -> Path:
    return Path(world_dir) / "rewards" / name


def clipscore(world_dir: str | Path = "data/world", device: str = "cpu", **_):
    return CLIPReward(_path(world_dir, "clipscore"), "clipscore", "clipscore", device)


def pickscore(world_dir: str | Path = "data/world", device: str = "cpu", **_):
    return CLIPReward(_path(world_dir, "pickscore"), "pickscore", "pickscore", device)
