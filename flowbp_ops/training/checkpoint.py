"""Checkpoints written atomically, a kept-last limit, and exact resume.

A checkpoint is a directory ``step-000040/`` holding the trainable weights (safetensors),
and the optimizer, EMA and RNG states (a torch file of tensors and plain containers,
loaded with ``weights_only=True``: nothing is unpickled). It is written to a
``.partial`` sibling and renamed, so a crash never leaves a half-written checkpoint that
resume would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d{6})$")


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    path = Path(path)
    if not (path / "weights.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint (no weights.safetensors)")
    weights = load_file(str(path / "weights.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return weights, state, meta
