"""Prompt embeddings cached per prompt, keyed by encoder, revision and dtype.

Text encoders (T5-XXL, Qwen3) cost more than a training step's forward on the prompt side;
every prompt of a prompt set is encoded once. In memory always; on disk (one safetensors
file per prompt under ``cache_dir``) when a directory is given, so reruns skip the encoders.
``read_only``: the pipeline's ``prompt_embeddings`` stage wrote the folder and the model was loaded without
its text encoders, so a prompt missing there is an error naming that stage, never a silent encode.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from flowbp_ops.atomic import atomic_path
from flowbp_ops.surrogate.config import ConfigError


class EmbeddingCache:
    def __init__(self, cache_dir: str | Path | None, key: str, read_only: bool = False):
        self.dir = Path(cache_dir) if cache_dir else None
        self.key, self.read_only = key, read_only
        self.memory: dict[str, dict[str, Tensor]] = {}
        self.misses = 0

    def _file(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.key}\0{prompt}".encode()).hexdigest()[:24]
        return self.dir / f"{digest}.safetensors"

    def get(self, prompts: list[str], encode: Callable[[list[str]], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Stacked embeddings of ``prompts``; only the ones not cached go through ``encode``."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.memory]
        if self.dir is not None:
            for p in list(missing):
                if self._file(p).exists():
                    self.memory[p] = load_file(str(self._file(p)))
                    missing.remove(p)
        if missing and self.read_only:
            raise ConfigError(f"{len(missing)} prompt(s) are not among the embeddings in {self.dir} (for {self.key}), "
                              f"e.g. {missing[0]!r}: the prompt sets or the base model changed since they were "
                              "encoded; rerun `flowbp stage prompt_embeddings` (or `dvc repro`)")
        if missing:
            self.misses += len(missing)
            with torch.no_grad():
                out = encode(missing)
            for i, p in enumerate(missing):
                row = {k: v[i].detach().cpu().contiguous() for k, v in out.items()}
                self.memory[p] = row
                if self.dir is not None:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    with atomic_path(self._file(p)) as tmp:
                        save_file(row, str(tmp))
        return {k: torch.stack([self.memory[p][k] for p in prompts]) for k in self.memory[prompts[0]]}
