"""One writer per output: an exclusive ``flock`` held for as long as a stage or a training run writes.

Two ``flowbp stage trained_variant --method M`` at once would both train, both register a model
version and interleave their metrics. The second is refused instead, naming the process that
holds the lock. The kernel releases a ``flock`` when its process dies, so a killed run never
leaves its output locked; the file itself stays (removing it would race with the next holder).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flowbp_ops.errors import BusyError

LOCK_DIR = ".flowbp-locks"  # under a pipeline's data_dir (git-ignored)


@contextmanager
def exclusive(lock_file: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold ``lock_file`` for the block; ``BusyError`` at once if another process holds it (``wait``: queue
    behind it instead, for short critical sections such as a ``dvc commit``)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            raise BusyError(f"{what} is already running: {holder} (lock {lock_file}); wait for it to finish or "
                            "stop that process, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "another process"


def stage_lock(data_dir: str | Path, stage: str, method: str | None = None):
    """The lock of a pipeline stage's outputs: one per stage, and one per method for the per-method stages
    (training and evaluation of the same method exclude each other: evaluation reads what training writes)."""
    name = f"variant@{method}" if method else stage
    return exclusive(Path(data_dir) / LOCK_DIR / f"{name}.lock", f"stage {stage}" + (f" for {method}" if method
                                                                                       else ""))
