"""A training run's folder: its checkpoints, its per-step metrics and what it trains on, decided once.

``checkpoints/step-*`` (``training.checkpoint``), ``metrics.jsonl`` (one row per finished step)
and ``base.json`` (the base model's record the run trains on). ``resume_point`` is the one place
that decides whether a run continues: from the newest intact checkpoint written with the same
config on the same base model. Rows logged after that checkpoint (a run killed between two
checkpoints) are dropped when the run continues, so every step appears once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowbp_ops.atomic import atomic_path, remove
from flowbp_ops.training.checkpoint import latest_intact, list_checkpoints
from flowbp_ops.training.distributed import Dist


@dataclass
class ResumePoint:
    checkpoint: Path | None  # None: start over
    step: int
    reason: str  # why it resumes or starts over, for logs and stage metadata
    passed_over: list[str] = field(default_factory=list)  # damaged newer checkpoints
    meta: dict = field(default_factory=dict)  # the checkpoint's meta.json


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics_file = self.path / "metrics.jsonl"
        self.base_file = self.path / "base.json"

    def holds_run(self) -> bool:
        return bool(list_checkpoints(self.path)) or self.metrics_file.exists()

    def last_step(self) -> int:
        ckpts = list_checkpoints(self.path)
        return int(ckpts[-1].name.split("-")[1]) if ckpts else 0

    def resume_point(self, config: dict[str, Any], base: str | None = None, dist: Dist = Dist()) -> ResumePoint:
        """Where a run whose settings' identity (``TrainConfig.identity()``) is ``config`` (on ``base``, when given)
        continues, and why (the same answer on every process: each checks its share of the files)."""
        if not list_checkpoints(self.path):
            return ResumePoint(None, 0, "no checkpoint")
        ckpt, passed = latest_intact(self.path, dist)
        if ckpt is None:
            return ResumePoint(None, 0, "every checkpoint is damaged", passed)
        meta = json.loads((ckpt / "meta.json").read_text())
        if base is not None and not self.base_file.exists():
            return ResumePoint(None, 0, "the run has no record of its base model (base.json)", passed)
        if base is not None and self.base_file.read_text() != base:
            return ResumePoint(None, 0, "the base model changed", passed)
        written = {k: meta.get("config", {}).get(k) for k in config}  # compared on what defines the run now
        if written != config:
            diff = "; ".join(_changed(written, config))
            return ResumePoint(None, 0, f"the config changed ({diff})", passed)
        why = f"resumed at step {meta['step']}" + (f" (passed over {len(passed)} damaged newer checkpoint(s))"
                                                    if passed else "")
        if meta.get("world_size", 1) != dist.world:
            why += (f"; written on {meta.get('world_size', 1)} process(es), resumed on {dist.world}: the same "
                    "weights, optimizer state and data order (the batch layout is per step), float sums in another "
                    "order")
        return ResumePoint(ckpt, int(meta["step"]), why, passed, meta)

    def begin(self, trainer, mode: str = "auto", base: str | None = None, dist: Dist = Dist()) -> ResumePoint:
        """The one resume decision, acted on: the trainer restored from the chosen checkpoint, or the folder cleared
        for a new run (called once everything that can refuse has been built). ``auto`` continues an identical run
        on the same base model and starts over otherwise (the pipeline); ``resume`` continues or refuses, saying
        why; ``new`` refuses a folder that holds a run; ``overwrite`` starts over."""
        from flowbp_ops.surrogate.config import ConfigError

        if mode not in ("auto", "resume", "new", "overwrite"):
            raise ValueError(f"RunDir.begin mode {mode!r}: auto, resume, new or overwrite")
        held = self.holds_run() or (self.path / "weights").exists()
        if mode == "new" and held:
            raise FileExistsError(f"{self.path} already holds a run (checkpoints up to step {self.last_step()}): "
                                  "resume it, start it over, or train into another folder")
        point = (self.resume_point(trainer.cfg.identity(), base, dist) if mode in ("auto", "resume")
                 else ResumePoint(None, 0, "a new run"))
        if mode == "resume" and point.checkpoint is None:
            raise ConfigError(f"cannot resume {self.path}: {point.reason}; resume with the settings it was started "
                              "with, or start it over")
        if point.checkpoint is not None:
            trainer.restore(point.checkpoint, point.meta)
        elif dist.main and held:  # a folder that holds an earlier run is cleared for the new one
            self.start(base)
        elif dist.main:  # any other is only created: nothing that is not a run is ever deleted
            self._open(base)
        dist.barrier()
        return point

    def start(self, base: str | None = None) -> None:
        """Clear the folder for a new run (call only once everything that can refuse has been checked)."""
        remove(self.path)
        self._open(base)

    def _open(self, base: str | None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if base is not None:
            self.base_file.write_text(base)

    def rows(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill: the step reruns after resume
                continue
        return rows

    def metrics_log(self, start_step: int) -> "MetricsLog":
        return MetricsLog(self, start_step)


class MetricsLog:
    """``metrics.jsonl``: the rows before ``start_step`` are kept (a resumed run's curve stays whole), later ones
    dropped; then one row per finished step, flushed as it is written. A training callback."""

    def __init__(self, run: RunDir, start_step: int):
        self.rows = [r for r in run.rows() if r.get("step", 1 << 62) < start_step] if start_step else []
        run.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.metrics_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.file = run.metrics_file.open("a")

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

