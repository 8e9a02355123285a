"""Running one stage, the same way from the CLI, DVC, a Dagster op or a Dagster Pipes process.

``run_stage`` takes the stage's lock, pulls its inputs from the shared store (when there is one),
calls the stage's function, pushes its outputs (a training run also every checkpoint), and returns
the stage's metadata with its asset-check results. ``pipes_session`` is the other end of Dagster
Pipes: inside a process Dagster launched it reports log lines, the materialization and the checks.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from flowbp_ops.locks import stage_lock
from flowbp_ops.params import Params
from flowbp_ops.stages.graph import BY_NAME, Stage, require_distributed, resumable_transfers, stage_transfers
from flowbp_ops.surrogate.config import ConfigError

# stdlib logging: Dagster shows these records in a run's event log when its instance lists "flowbp_ops" among
# python_logs.managed_python_loggers (scripts/install.sh writes that dagster.yaml)
log = logging.getLogger(__name__)


def log_progress(label: str, every: float = 0.1):
    """A ``progress(stage, step, total, loss)`` callback that logs each ``every`` of a sub-stage, at INFO."""
    def progress(stage: str, step: int, total: int, loss: float) -> None:
        mark = max(1, int(total * every))
        if step % mark == 0 or step == total:
            log.info("%s: %s %d/%d (loss %.4f)", label, stage, step, total, loss)

    return progress


def run_stage(name: str, params: Params, method: str | None = None, *, tracker=None, tags: dict | None = None,
              dist=None, store=None, callbacks: tuple = ()) -> tuple[dict, list[dict]]:
    """Run stage ``name`` (for ``method`` when per method); returns (metadata, check results). Rank 0 of a
    distributed run holds the lock and moves data; every rank runs the stage. The stage's function gets what
    its signature asks for of: tracker, tags, dist, callbacks, progress, and (with a store, for a resumable
    stage) on_checkpoint and run_key."""
    from flowbp_ops.training.distributed import Dist

    stage, dist = BY_NAME[name], dist or Dist()
    if params.train.backbone == "default" and params.device == "cpu":  # the default world's pinned numerics
        from flowbp_ops.determinism import pin_cpu

        pin_cpu(params.world.threads)
    if stage.per_method and not method:
        raise ConfigError(f"stage {name} needs a method, one of {', '.join(params.methods)}")
    if not stage.per_method and method:
        raise ConfigError(f"stage {name} is not per method: drop the method")
    if dist.active:
        require_distributed(name)
    label = name + (f"[{method}]" if method else "")
    offered: dict[str, Any] = {"tracker": tracker, "tags": tags, "dist": dist, "callbacks": callbacks,
                               "progress": log_progress(name)}
    with stage_lock(params.data_dir, name, method) if dist.main else nullcontext():
        if store is not None and dist.local_rank == 0:  # each node's first process brings the inputs
            for up, transfers in stage_transfers(stage, params, method, inputs=True).items():
                for key, path in transfers:
                    store.pull(key, path, needed_by=f"{label} (from {up})")
            resumable = resumable_transfers(stage, params, method)
            for key, path in resumable:  # a run killed elsewhere resumes from its pushed checkpoints
                store.pull(key, path)
            if resumable:
                offered["on_checkpoint"] = lambda _: [store.push(key, path) for key, path in resumable]
                offered["run_key"] = f"{store.uri}/{resumable[0][0]}"  # the same on every machine
        dist.barrier()
        fn = stage.function()
        accepted = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in offered.items() if k in accepted}
        log.info("%s: started", label)
        t0 = time.perf_counter()
        meta = fn(params, method, **kwargs) if stage.per_method else fn(params, **kwargs)
        log.info("%s: done in %.1f s", label, time.perf_counter() - t0)
        if not dist.main:
            return {}, []
        checks = stage.check(params, method, meta)
        if store is not None:
            for key, path in stage_transfers(stage, params, method)[name]:
                if path.exists():
                    store.push(key, path)
            meta = {**meta, "store": store.uri}
    return meta, checks


# -- the process end of Dagster Pipes ----------------------------------------------------------------

def _pipes_value(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
    return {"raw_value": json.loads(json.dumps(value, default=str)), "type": "json"}


def pipes_metadata(meta: dict) -> dict:
    return {k: _pipes_value(v) for k, v in meta.items() if v is not None}


class PipesLog:
    """A training callback: one log line per step in the Dagster run view (live progress)."""

    def __init__(self, pipes, label: str, total: int):
        self.pipes, self.label, self.total = pipes, label, total

    def on_step(self, step: int, m: dict) -> None:
        extra = " ".join(f"{k}={m[k]:.4f}" for k in ("reward", "loss", "grad_norm") if k in m)
        self.pipes.log.info(f"{self.label} step {step + 1}/{self.total} {extra} ({m.get('time_step', 0):.2f} s)")


@contextmanager
def pipes_session() -> Iterator[Any]:
    """The Dagster Pipes context when Dagster launched this process (else None)."""
    import os

    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        # the library's stdlib log records reach the run's event log from here too, as they do from an op in the
        # Dagster process through the instance's managed loggers
        lib, forward = logging.getLogger("flowbp_ops"), _Forward(pipes.log)
        level = lib.level
        lib.addHandler(forward)
        lib.setLevel(logging.INFO)
        try:
            yield pipes
        finally:
            lib.removeHandler(forward)
            lib.setLevel(level)


class _Forward(logging.Handler):
    def __init__(self, to: logging.Logger):
        super().__init__(logging.INFO)
        self.to = to

    def emit(self, record: logging.LogRecord) -> None:
        self.to.log(record.levelno, record.getMessage())


def report(pipes, stage: Stage, meta: dict, checks: list[dict]) -> None:
    pipes.report_asset_materialization(metadata=pipes_metadata(meta))
    for c in checks:
        pipes.report_asset_check(check_name=c["name"], passed=c["passed"], metadata=pipes_metadata(c["metadata"]))

