"""HPSv3 (Ma et al. 2025): human preference from a fine-tuned Qwen2-VL-7B-Instruct, an evaluation reward.

The released model is Qwen2-VL with one added special token ``<|Reward|>`` and a small "ranknet" head
(``hidden → 1024 → 16 → 2``, float32) that reads the last hidden state at that token and predicts
(μ, σ) of the preference; the score is μ. The scoring conversation is fixed by training: the image at
exactly 256·28·28 pixels, then the published instruction with the prompt, then the reward prompt
ending in ``<|Reward|>``. Scoring runs without gradient (evaluation only).

The published checkpoint ``HPSv3.safetensors`` (hf://MizzenAI/HPSv3) is one state dict saved with the
pre-4.52 transformers layout (``visual.*``, ``model.*``, ``lm_head``, ``rm_head.*``);
:func:`convert_checkpoint` maps it onto today's ``Qwen2VLForConditionalGeneration`` with the base model's
config and tokenizer (hf://Qwen/Qwen2-VL-7B-Instruct, configs and tokenizer files only) and writes
``rewards/hpsv3/`` in ``save_pretrained`` layout plus ``rm_head.safetensors``. Tensors only: safetensors
in, safetensors out.

The prompt is tokenized with the tokenizer's own chat template and the image with Qwen2-VL's image
processor; the image placeholder is expanded to the image's merged patch count here, and the token types
marked, as ``Qwen2VLProcessor`` does (that class cannot be built where torchvision is missing: its video
half needs it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from flowbp_ops.rewards.base import check_images, check_recorded

REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # min = max: every image is resized to this area, as in training
# the instruction the model was trained on, verbatim (MizzenAI/HPSv3, MIT): other words move the scores
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The "
    "following sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any "
    "significant biological or logical errors, such as abnormal body structures or nonsensical environmental "
    "setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy "
    "to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail in "
    "textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic and "
    "Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, "
    "depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n- "
    "**Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, "
    "animal, object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular artistic or "
    "stylistic style, evaluate how well the image adheres to this style.\n- **Contextual Consistency**: Assess "
    "whether the background, setting, and surrounding elements in the image logically fit the scenario described in "
    "the prompt. The environment should support and enhance the subject without contradictions.\n- **Attribute "
    "Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, "
    "expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical "
    "attributes should be preserved.\n- **Semantic Coherence**: Evaluate whether the overall meaning and intent of "
    "the prompt are captured in the image. The generated content should not introduce elements that conflict with "
    "or distort the original description.\nTextual prompt - {text_prompt}\n\n\n")
SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
# the checkpoint's pre-4.52 layout -> today's submodules
LEGACY_KEYS = ((r"^visual\.", "model.visual."), (r"^model\.(?!language_model\.|visual\.)", "model.language_model."))


def head(hidden: int) -> nn.Sequential:
    """The released "ranknet" head; its keys are rm_head.0 / .3 / .5."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if not tok.chat_template and (base_dir / "chat_template.json").exists():  # Qwen2-VL keeps it for the processor
        tok.chat_template = json.loads((base_dir / "chat_template.json").read_text())["chat_template"]
    return tok


def convert_checkpoint(src: str | Path, dst: str | Path, base_dir: str | Path) -> Path:
    """``HPSv3.safetensors`` + the base model's configs and tokenizer → ``dst`` (loadable by :class:`HPSv3Reward`)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    base_dir, dst = Path(base_dir), Path(dst)
    tok = _tokenizer(base_dir)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = AutoConfig.from_pretrained(base_dir)
    model = Qwen2VLForConditionalGeneration(config)
    model.resize_token_embeddings(len(tok))
    state = load_file(str(src))
    if any(k.startswith("model.model.") or k == "model" for k in state):  # a {"model": ...} wrapper, flattened
        state = {k.removeprefix("model."): v for k, v in state.items()}
    remapped = {}
    for key, value in state.items():
        for pattern, repl in LEGACY_KEYS:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        remapped[key] = value
    rm = {k.removeprefix("rm_head."): v.float() for k, v in remapped.items() if k.startswith("rm_head.")}
    body = {k: v for k, v in remapped.items() if not k.startswith("rm_head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or "lm_head.weight" in body]
    if missing or unexpected or set(rm) != set(head(1).state_dict()):
        raise ValueError(f"{src} is not an HPSv3 checkpoint for this base model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, head {sorted(rm)}")
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    for name in ("preprocessor_config.json", "chat_template.json"):
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, dst / name)
    save_file({k: v.contiguous() for k, v in rm.items()}, str(dst / "rm_head.safetensors"))
    return dst


class HPSv3Reward:
    """``reward(images, prompts) -> μ`` of HPSv3 for images in [0, 1] (no gradient: an evaluation reward)."""

    name = "hpsv3"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

        path = Path(path)
        if not (path / "config.json").exists() or not (path / "rm_head.safetensors").exists():
            raise FileNotFoundError(f"no HPSv3 model at {path}: fetch HPSv3.safetensors (hf://MizzenAI/HPSv3) "
                                    "and the Qwen2-VL-7B-Instruct configs with the reward_models stage "
                                    "(rewards.models.hpsv3 and rewards.tokenizers.hpsv3), which converts them")
        check_recorded(path)
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # 16 GB in bf16 on a GPU, as released
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(path, use_safetensors=True, dtype=dtype)
        self.model = self.model.to(self.device).eval()
        self.head = head(self.model.config.get_text_config().hidden_size)
        self.head.load_state_dict(load_file(str(path / "rm_head.safetensors")))
        self.head = self.head.float().to(self.device).eval()
        self.tokenizer = _tokenizer(path)
        self.images = AutoImageProcessor.from_pretrained(path, min_pixels=PIXELS, max_pixels=PIXELS)
        self.reward_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token = "<|image_pad|>"

    def _batch(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        from PIL import Image

        pils = [Image.fromarray((im.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()) for im in images]
        vision = self.images(images=pils, return_tensors="pt")
        merge = self.images.merge_size ** 2
        texts = []
        for p, grid in zip(prompts, vision["image_grid_thw"]):
            msg = [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + SUFFIX}]}]
            text = self.tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(self.image_token, self.image_token * int(grid.prod() // merge)))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        # which positions are image tokens (the processor's mm_token_type_ids: 0 text, 1 image): M-RoPE needs them
        mm = (tokens["input_ids"] == self.tokenizer.convert_tokens_to_ids(self.image_token)).long()
        return {**tokens, **vision, "mm_token_type_ids": mm}

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        b = {k: v.to(self.device) for k, v in self._batch(images, prompts).items()}
        hidden = self.model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                                  mm_token_type_ids=b["mm_token_type_ids"]).last_hidden_state
        at = b["input_ids"] == self.reward_id
        if not bool((at.sum(1) == 1).all()):
            raise ValueError("the HPSv3 prompt must hold exactly one <|Reward|> token per image")
        return self.head(hidden[at].float())[:, 0]  # μ


def hpsv3(world_dir: str | Path = "data/world", device: str = "cpu", **_):
    return HPSv3Reward(Path(world_dir) / "rewards" / "hpsv3", device=device)
