"""Write-then-rename: a stage's output appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield ``target.partial-<unique>`` to write into; on success it replaces ``target``, on failure it is
    removed. Unique per writer: two processes writing the same target (ops sharing an embedding cache)
    never touch each other's half-written file; the last complete write wins."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.partial-*"):  # left by a writer that was killed
        if not _alive(stale.name.rsplit(".partial-", 1)[1].split("-")[0]):
            remove(stale)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if tmp.is_dir() and target.exists():  # a folder cannot be renamed over: move the old one aside first
        old = target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
        tmp.rename(target)
        remove(old)
    else:
        os.replace(tmp, target)  # a file replaces the old one in one step
