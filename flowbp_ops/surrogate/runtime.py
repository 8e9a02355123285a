"""How a plan runs on this machine, decided by measurement: gradient checkpointing (memory) and the auto mode (speed).

None of these decisions changes the gradient's definition; they change what a step costs. One :class:`Runtime`
lives for a training run (the trainer keeps it), so the measurements are taken once:

* **checkpointing** (``execution.checkpoint=auto``): the first gradient forward runs without checkpointing while
  the bytes autograd saves for its backward are counted (``saved_tensors_hooks``: the activations a backward
  needs, weights excluded). The step's ``n`` gradient forwards keep ``n`` times that until the backward; if that
  does not fit the memory free before the step (with a margin), the remaining forwards are checkpointed. A first
  forward that does not fit at all (out of memory) is retried checkpointed. The decision and its numbers are kept
  in :attr:`Runtime.log` and in each step's diagnostics.
* **auto mode** (``execution.mode=auto``): the first steps alternate one-pass and batched, the trainer reports
  each step's time, and from then on the faster mode is kept.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field

import torch

MARGIN = 1.25  # room for the backward's own transients above the saved activations


def free_bytes(device: torch.device) -> int:
    """Memory a step can still take: the CUDA allocator's free + cached-but-unused bytes, or the host's available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


@contextlib.contextmanager
def count_saved_bytes(out: list[int]):
    """Add to ``out[0]`` the bytes of every distinct storage autograd saves for backward, the module's parameters
    (and views of them) excluded: the activations a forward keeps alive until its backward."""
    seen: set[int] = set()
    weight = torch.nn.Parameter

    def pack(t: torch.Tensor):
        if not (isinstance(t, weight) or isinstance(t._base, weight)):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@dataclass
class CheckpointDecision:
    checkpoint: bool
    chunk: int  # active forwards per batched call
    reason: str


@dataclass
class Runtime:
    trials: int = 2  # steps of each mode before ``auto`` decides
    per_forward: dict[tuple, int] = field(default_factory=dict)  # saved bytes of one gradient forward, by input
    times: dict[str, list[float]] = field(default_factory=lambda: {"one_pass": [], "batched": []})
    chosen: str | None = None
    log: list[str] = field(default_factory=list)
    _last: tuple | None = None

    # -- the mode ----------------------------------------------------------------------------------
    def mode(self, requested: str) -> str:
        """The concrete mode of the next step."""
        if requested != "auto":
            return requested
        if self.chosen is not None:
            return self.chosen
        return min(("one_pass", "batched"), key=lambda m: len(self.times[m]))  # alternate until both have trials

    def record(self, mode: str, seconds: float) -> None:
        """A step's wall time in ``mode`` (auto): once both modes have ``trials`` steps, keep the faster."""
        if self.chosen is not None or mode not in self.times:
            return
        self.times[mode].append(seconds)
        if all(len(t) >= self.trials for t in self.times.values()):
            med = {m: statistics.median(t) for m, t in self.times.items()}
            self.chosen = min(med, key=med.get)
            self.log.append(f"execution.mode=auto: {self.chosen} (median step one_pass {med['one_pass']:.3f} s, "
                            f"batched {med['batched']:.3f} s over {self.trials} steps each)")

    # -- checkpointing -----------------------------------------------------------------------------
    def decide(self, key: tuple, n_forwards: int, n_batched: int, free: int) -> CheckpointDecision | None:
        """Once the first forward of ``key`` was measured: checkpoint the rest only if ``n_forwards`` of them
        would not fit in ``free`` bytes; ``chunk``: how many fit in one batched call when checkpointing."""
        per = self.per_forward.get(key)
        if per is None:
            return None
        need = n_forwards * per * MARGIN
        mb = 2 ** 20
        if need <= free:
            return CheckpointDecision(False, max(1, n_batched), f"activations {n_forwards}×{per / mb:.1f} MB fit in "
                                      f"{free / mb:.0f} MB free: no checkpointing")
        chunk = max(1, min(n_batched, int(free // max(per * MARGIN, 1))))
        return CheckpointDecision(True, chunk, f"activations {n_forwards}×{per / mb:.1f} MB exceed {free / mb:.0f} "
                                  f"MB free: checkpointing, {chunk} forward(s) per call")

    def note(self, text: str, choice: tuple | None = None) -> None:
        """Log ``text`` when ``choice`` differs from the last one noted (steps re-decide; the log keeps changes)."""
        if choice is None or choice != self._last:
            self.log.append(text)
        self._last = choice
