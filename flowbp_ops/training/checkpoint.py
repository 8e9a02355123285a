"""Checkpoints: sharded, written atomically, checked when read, a kept-last limit, resumable on any world size.

A checkpoint is a directory ``step-000040/`` written with torch.distributed.checkpoint's Hugging Face
storage: every process writes its own shards of the trained weights, the AdamW state and the EMA
as safetensors (nothing pickled, so a checkpoint pulled from a shared store is safe to read), and
``meta.json`` holds the config, the step, the world size it was written on and the SHA-256 of every
file. It is written into ``step-000040.partial`` and renamed by rank 0 once every rank has
written, so a crash never leaves a checkpoint that looks complete. On load DCP reshards: a run
written on 2 processes resumes on 1 (or 8). A checkpoint damaged later (a flipped byte, a truncated
file) is refused by its checksums — verified by the ranks in parallel, one file each in turn — and
resume falls back to the newest intact one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from flowbp_ops.atomic import remove
from flowbp_ops.errors import IntegrityError
from flowbp_ops.integrity import file_sha256
from flowbp_ops.training.distributed import Dist

_STEP = re.compile(r"^step-(\d{6})$")


def _files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "meta.json")


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep_last: int, dist: Dist = Dist(), sharded: bool = False) -> Path:
    """Write ``tensors`` and ``meta`` as checkpoint ``step``. ``sharded`` (FSDP2 DTensors): every rank writes its
    shards through DCP; otherwise the tensors are whole on every rank and rank 0 writes them in one
    safetensors file (the same format DCP's reader loads, into any sharding)."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".partial")
    if dist.main:
        remove(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save({k: v.detach() for k, v in tensors.items()},
                 storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=dist.active))
    elif dist.main:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    dist.barrier()
    if dist.main:
        sums = {f: file_sha256(tmp / f) for f in _files(tmp)}
        (tmp / "meta.json").write_text(json.dumps({**meta, "world_size": dist.world, "sha256": sums}, indent=2))
        remove(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            remove(old)
    dist.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))


def read_meta(path: Path, dist: Dist = Dist()) -> dict:
    """``meta.json`` of a checkpoint, with its files checked against the recorded checksums (each rank hashes
    every world-th file; the verdict is shared)."""
    path = Path(path)
    problem = ""
    try:
        meta = json.loads((path / "meta.json").read_text())
        sums = meta["sha256"]
        if not sums or sorted(sums) != _files(path):
            problem = "its files differ from the recorded list"
        for f in sorted(sums)[dist.rank::dist.world]:
            if not problem and file_sha256(path / f) != sums[f]:
                problem = f"{f} differs from its recorded checksum (corrupt or truncated)"
    except (OSError, ValueError, KeyError, TypeError):
        meta, problem = {}, "meta.json is missing or unreadable"
    if not dist.all_true(not problem, torch.device("cpu")):
        raise IntegrityError(f"checkpoint {path}: {problem or 'a file differs from its recorded checksum'}")
    return meta


def latest_intact(run_dir: Path, dist: Dist = Dist()) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their checksums, and why each newer one was passed over."""
    passed = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            read_meta(ckpt, dist)
            return ckpt, passed
        except IntegrityError as exc:
            passed.append(str(exc))
    return None, passed


def load_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (this process's plain or DTensor views) in place from checkpoint ``path``, resharding
    from whatever world size wrote it."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with warnings.catch_warnings():  # "loading in a single process": that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
