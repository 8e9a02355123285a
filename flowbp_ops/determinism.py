"""Pinned CPU numerics for the default world: one thread count and deterministic kernels everywhere.

A CPU run's floats depend on how many threads split each reduction and on which kernels run; the default world
trains from scratch for thousands of steps, so such differences grow into different models. Pinning the thread
count and asking torch for deterministic algorithms makes a build repeat bit for bit on one machine and removes
the thread count as a cause of difference between machines; what remains between machines is their instruction
sets (the README gives the spread that leaves, measured over world seeds).
"""

from __future__ import annotations

import torch


def pin_cpu(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def pin_for_world(world_dir) -> None:
    """Pin to the thread count the default world in ``world_dir`` was built with (its ``base_model.json``)."""
    import json
    from pathlib import Path

    from flowbp_ops.world.config import WorldConfig

    meta = Path(world_dir) / "base_model.json"
    threads = WorldConfig().threads
    if meta.exists():
        threads = json.loads(meta.read_text()).get("config", {}).get("threads", threads)
    pin_cpu(threads)
