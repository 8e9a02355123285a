"""One GPU per training / evaluation op on a multi-GPU node.

Dagster's multiprocess executor runs up to ``gpu`` pool-limit ops at once but does not place
them on devices. ``gpu_slot`` gives each op a device of its own: it takes an exclusive
``flock`` on ``<lock_dir>/gpu-<i>.lock`` for the first free ``i`` (waiting while all are
taken) and holds it for the op. The kernel drops the lock when the process dies, so a
crashed op never leaves its GPU reserved.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_DIR = "/tmp/flowbp-gpu-locks"


@contextmanager
def placed(device: str, lock_dir: str | Path = LOCK_DIR) -> Iterator[str]:
    """``device`` as given, or for ``cuda:auto`` a GPU of this node no other op holds, for the block's length."""
    if device != "cuda:auto":
        yield device
        return
    import torch

    with gpu_slot(torch.cuda.device_count(), lock_dir) as i:
        torch.cuda.set_device(i)  # the current device too: libraries that assume it (cuda:0) then agree
        yield f"cuda:{i}"


@contextmanager
def gpu_slots(n_gpus: int, count: int, lock_dir: str | Path, poll_s: float = 1.0,
              timeout_s: float | None = None) -> Iterator[list[int]]:
    """``count`` GPUs of this node that no other op holds (a training run on several), reserved until the block
    ends; all or none, so two ops each waiting for a second GPU never deadlock."""
    if count > n_gpus:
        raise RuntimeError(f"a run on {count} GPUs cannot be placed on a node with {n_gpus}")
    if count == 1:
        with gpu_slot(n_gpus, lock_dir, poll_s, timeout_s) as i:
            yield [i]
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    while True:
        held: list[tuple[int, int]] = []
        for i in range(n_gpus):
            fd = os.open(lock_dir / f"gpu-{i}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((i, fd))
            except BlockingIOError:
                os.close(fd)
            if len(held) == count:
                break
        if len(held) == count:
            try:
                yield [i for i, _ in held]
            finally:
                for _, fd in held:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
            return
        for _, fd in held:  # not enough free: give back what was taken and wait
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{count} of {n_gpus} GPUs did not come free in {timeout_s:.0f} s "
                               f"(locks in {lock_dir})")
        time.sleep(poll_s)


@contextmanager
def gpu_slot(n_gpus: int, lock_dir: str | Path, poll_s: float = 1.0, timeout_s: float | None = None) -> Iterator[int]:
    """The index of a GPU no other op of this node holds, reserved until the block ends."""
    if n_gpus < 1:
        raise RuntimeError("no GPU to place the op on: run on a GPU node or set the compute device to cpu")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    while True:
        for i in range(n_gpus):
            fd = os.open(lock_dir / f"gpu-{i}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                os.fchmod(fd, 0o666)  # every user's ops share the locks (the umask would narrow them)
            except PermissionError:  # another user's file: already shared
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield i
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"all {n_gpus} GPUs stayed taken for {timeout_s:.0f} s (locks in {lock_dir})")
        time.sleep(poll_s)
