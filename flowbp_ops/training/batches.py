"""Which prompts and which noise each process trains on: a function of (seed, step), never of a running state.

An optimizer step trains on ``global_batch`` samples. With W processes holding ``batch`` samples each,
that is ``accumulation = global_batch / (W · batch)`` micro-batches per process. Slot q of step s is
micro-batch ``q // (W·batch)``, process ``(q // batch) % W``; its prompt is position ``s·global + q``
of an endless sequence of seeded per-epoch permutations (a distributed sampler that shuffles without
replacement), and its starting noise comes from its own seed. So:

* every process draws different prompts and noise, deterministically;
* the global batch is the same on any number of processes: 1 process × 2 micro-batches, 2 processes
  × 1 and 1 process × a double batch train on the same samples (tested);
* resuming at step s needs only s: no sampler or generator state to checkpoint, and a run resumes on
  another world size with the same data order.

The plan (active set, k, j) is drawn from the step alone, identical on every process and micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class Layout:
    global_batch: int
    batch: int  # samples per process per micro-batch
    world: int

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.world * self.batch)

    @classmethod
    def of(cls, global_batch: int | None, batch: int, world: int) -> "Layout":
        from flowbp_ops.surrogate.config import ConfigError

        g = global_batch or batch * world
        if g % (world * batch):
            raise ConfigError(f"train.global_batch={g} is not a multiple of {world} process(es) × "
                              f"train.batch={batch}: choose a global batch divisible by {world * batch}, or another "
                              "batch / process count")
        return cls(g, batch, world)


def mix(*parts: int) -> int:
    """A 64-bit seed from non-negative integers (numpy's SeedSequence: well mixed, stable across versions)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(mix(seed, 0x5EED, epoch)).permutation(n)


def slots(layout: Layout, micro: int, rank: int) -> list[int]:
    """The slots q of this process's micro-batch."""
    start = (micro * layout.world + rank) * layout.batch
    return list(range(start, start + layout.batch))


def prompt_indices(seed: int, step: int, layout: Layout, qs: list[int], n_prompts: int) -> list[int]:
    out = []
    for q in qs:
        n = step * layout.global_batch + q
        out.append(int(_permutation(seed, n // n_prompts, n_prompts)[n % n_prompts]))
    return out


def noise(seed: int, step: int, qs: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Starting noise of the samples in slots ``qs`` (each from its own seed; drawn on the CPU: any device
    gives the same values)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(mix(seed, step, q)))
                        for q in qs])


def sample_seeds(seed: int, step: int, qs: list[int]) -> list[int]:
    """Per-sample seeds for draws inside the step (DRaFT-LV's re-noised copies)."""
    return [mix(seed, step, q, 0x1F) for q in qs]


def plan_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step
