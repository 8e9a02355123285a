"""What a training run reports, one callback per destination, the same from ``flowbp train`` and the pipeline.

The trainer calls ``on_step(step, metrics)`` after every optimizer step and, after each checkpoint,
``on_checkpoint(step, run_dir, samples)`` with the model's samples at that step (the EMA weights when the run
keeps them) of a fixed set of held-out prompts, with the same noise every time: one strip of images per
checkpoint, comparable across the run. Callbacks run on rank 0 only.

- ``MetricsLog`` (``run_dir.py``): ``metrics.jsonl``, one row per step (DVC's plots).
- ``SampleFiles``: the strips as PNGs in the run folder (``samples/step-000040.png``).
- ``MlflowReport``: every metric by step, the strips as MLflow's image history by step.
- ``on_checkpoint``: a function of the run folder, e.g. the shared store's push.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch


class Callback(Protocol):
    def on_step(self, step: int, metrics: dict[str, Any]) -> None: ...


def strip(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> one (H, B·W, 3) uint8 image."""
    return (images.permute(2, 0, 3, 1).flatten(1, 2).clamp(0, 1) * 255).round().byte().cpu().numpy()


class SampleFiles:
    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / "samples"

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, run_dir: Path, samples: torch.Tensor | None) -> None:
        from PIL import Image

        if samples is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(strip(samples)).save(self.folder / f"step-{step:06d}.png")


class MlflowReport:
    def __init__(self, tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics(self.run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)

    def on_checkpoint(self, step: int, run_dir: Path, samples: torch.Tensor | None) -> None:
        if samples is not None:
            self.tracker.log_image(self.run_id, strip(samples), "samples", step)


class OnCheckpoint:
    """A function of the run folder, called after each checkpoint (the shared store's push)."""

    def __init__(self, fn: Callable[[Path], Any]):
        self.fn = fn

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, run_dir: Path, samples: torch.Tensor | None) -> None:
        self.fn(run_dir)
