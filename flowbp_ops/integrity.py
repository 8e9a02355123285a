"""Recorded bytes are checked where they are loaded: a folder's ``manifest.json`` lists each file's SHA-256.

Whatever flowbp writes and later loads back (LoRA adapters and fine-tuned transformers, the default
world's models and reward nets, fetched reward weights) is sealed when written and verified when
read, so a flipped byte or a truncated file is refused with the file's name instead of being
evaluated, registered or trained on silently. Checkpoints carry their checksums in ``meta.json``
(``flowbp_ops.training.checkpoint``); cached rollouts in their ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flowbp_ops.errors import IntegrityError

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal(folder: str | Path) -> dict[str, str]:
    """Write ``folder/manifest.json`` with the SHA-256 of every file below it; returns the listing."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True))
    return files


def verify(folder: str | Path, what: str, fix: str, only: str | None = None) -> bool:
    """Check ``folder`` against its manifest (False when it has none); ``IntegrityError`` naming the files
    that differ, are missing or were added, with ``fix`` as the remedy. ``only``: check just the files whose
    path starts with it (one reward's files in a shared folder)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False
    try:
        recorded = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{what}: {manifest} is unreadable; {fix}") from None
    found = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if only is not None:
        recorded = {k: v for k, v in recorded.items() if k.startswith(only)}
        found = {k: v for k, v in found.items() if k.startswith(only)}
    changed = [name for name, digest in recorded.items() if name in found and file_sha256(found[name]) != digest]
    missing = sorted(set(recorded) - set(found))
    added = sorted(set(found) - set(recorded))
    if changed or missing or added:
        problems = [f"{label} {', '.join(names)}" for label, names in
                    (("changed:", changed), ("missing:", missing), ("not recorded:", added)) if names]
        raise IntegrityError(f"{what} in {folder} differs from its manifest ({'; '.join(problems)}): the files are "
                             f"corrupt or were replaced; {fix}")
    return True
