"""Checkpoints written atomically, checked when read, a kept-last limit, and exact resume.

A checkpoint is a directory ``step-000040/`` holding the trainable weights (safetensors),
and the optimizer, EMA and RNG states (a torch file of tensors and plain containers,
loaded with ``weights_only=True``: nothing is unpickled), and ``meta.json`` with the config,
the step and the SHA-256 of both files. It is written to a ``.partial`` sibling and renamed,
so a crash never leaves a half-written checkpoint; a checkpoint damaged later (a flipped byte,
a truncated file) is refused by its checksums and resume falls back to the newest intact one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flowbp_ops.atomic import atomic_path, remove
from flowbp_ops.errors import IntegrityError
from flowbp_ops.integrity import file_sha256

_STEP = re.compile(r"^step-(\d{6})$")
FILES = ("weights.safetensors", "state.pt")


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        sums = {f: file_sha256(tmp / f) for f in FILES}
        (tmp / "meta.json").write_text(json.dumps({**meta, "sha256": sums}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))


def read_meta(path: Path) -> dict:
    """``meta.json`` of a checkpoint, with its files checked against the recorded checksums."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        sums = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise IntegrityError(f"checkpoint {path}: meta.json is missing or unreadable") from None
    for f in FILES:
        if not (path / f).exists() or file_sha256(path / f) != sums.get(f):
            raise IntegrityError(f"checkpoint {path}: {f} differs from its recorded checksum (corrupt or truncated)")
    return meta


def latest_intact(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their checksums, and why each newer one was passed over."""
    passed = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            read_meta(ckpt)
            return ckpt, passed
        except IntegrityError as exc:
            passed.append(str(exc))
    return None, passed


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    path = Path(path)
    meta = read_meta(path)
    weights = load_file(str(path / "weights.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    return weights, state, meta
