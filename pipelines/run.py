"""The main job: materialize the default chain through Dagster (the runs show in the Dagster UI).

prepare (prompt sets, reward models, base model, prompt embeddings, base rollouts) → for each method in
``params.methods`` its own partitioned run (train, evaluate, checks) → comparison → promotion.

Each run is launched as the Dagster UI launches it: ``dagster job execute`` in its own process, with the job's
executor. ``prepare`` runs on the multiprocess executor, so stages that do not depend on each other (the reward
models and the base model) run side by side; the per-method runs go ``lanes`` at a time, as many as the
instance's ``gpu`` pool admits (``concurrency: pools: default_limit`` in ``dagster.yaml``: one per GPU, or per
core on the CPU). Uses the Dagster instance in ``$DAGSTER_HOME`` (``.dagster`` by the scripts) when set, else a
temporary one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml

from flowbp_ops.stages.graph import BY_NAME, JOBS, sections
from pipelines.instance import write_instance

CHAIN_TAG = "flowbp/chain"


def run_chain(params_file: str | Path = "params.yaml", overrides: list[str] = (), lanes: int | None = None) -> dict:
    from flowbp_ops.params import load_params

    params_file = Path(params_file).resolve()
    params = load_params(params_file, overrides)  # refused here, whole, before any run starts
    data = params.model_dump(mode="json")
    ops = {s.name: {"config": {k: data[k] for k in sections(s)}} for s in BY_NAME.values()}
    chain = uuid.uuid4().hex[:12]
    with (_instance_home(lambda: _default_lanes(params)) as home,
          tempfile.TemporaryDirectory(prefix="flowbp-chain-") as tmp):
        env = {**os.environ, "DAGSTER_HOME": home, "FLOWBP_PARAMS": str(params_file)}
        lanes = lanes or _lanes(home, params)

        def go(job: str, names: list[str], partition: str | None = None, executor: str = "in_process") -> dict:
            t0 = time.perf_counter()
            # every stage gets its sections of this params file (with the overrides) as explicit run config
            cfg = Path(tmp) / f"{job}-{partition or 'all'}.yaml"
            execution = ({"multiprocess": {"max_concurrent": lanes}} if executor == "multiprocess"
                         else {"in_process": {}})
            cfg.write_text(yaml.safe_dump({"ops": {n: ops[n] for n in names}, "execution": {"config": execution}}))
            tags = {CHAIN_TAG: chain, **({"dagster/partition": partition} if partition else {})}
            subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions",
                            "-a", "defs", "-j", job, "-c", str(cfg), "--tags", json.dumps(tags)],
                           env=env, check=False)
            result = _result(home, chain, job, partition)
            print(f"[{' '.join(names)}{' ' + partition if partition else ''}] "
                  f"{'ok' if result['success'] else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
            return result

        out: dict = {"lanes": lanes}
        for job, members in JOBS.items():  # the graph's jobs in order; the per-method one for each method
            names = [s.name for s in members]
            if any(s.per_method for s in members):
                with ThreadPoolExecutor(max_workers=lanes) as pool:
                    done = pool.map(lambda m: go(job, names, m), params.methods)
                    out["variants"] = dict(zip(params.methods, done))
            else:
                out[job] = go(job, names, executor="multiprocess" if len(names) > 1 else "in_process")
                if not out[job]["success"]:
                    return {"success": False, **out}
    out["success"] = True
    return out


@contextmanager
def _instance_home(gpu_slots):
    """``$DAGSTER_HOME``, or a temporary instance for this chain (its runs are not kept)."""
    if os.environ.get("DAGSTER_HOME"):
        yield os.environ["DAGSTER_HOME"]
        return
    with tempfile.TemporaryDirectory(prefix="flowbp-dagster-") as home:
        write_instance(Path(home) / "dagster.yaml", gpu_slots())
        yield home


def _instance(home: str):
    import dagster as dg

    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = home
    try:
        return dg.DagsterInstance.get()
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME")
        else:
            os.environ["DAGSTER_HOME"] = old


def _lanes(home: str, params) -> int:
    """How many per-method runs go at once: the instance's ``gpu`` pool limit where it sets one; else one per
    GPU of a ``cuda`` device, or one per ``world.threads`` CPU cores."""
    with _instance(home) as instance:
        limit = instance.event_log_storage.get_concurrency_info("gpu").limit
    return max(1, int(limit)) if limit else _default_lanes(params)


def _default_lanes(params) -> int:
    """One per GPU of a ``cuda`` device, or one per ``world.threads`` CPU cores."""
    if params.device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count()) if params.device == "cuda:auto" else 1
    return max(1, (os.cpu_count() or 1) // params.world.threads)


def _result(home: str, chain: str, job: str, partition: str | None) -> dict:
    """The run this chain launched for ``job`` (and ``partition``): success, run id and its asset checks."""
    import dagster as dg

    tags = {CHAIN_TAG: chain, **({"dagster/partition": partition} if partition else {})}
    with _instance(home) as instance:
        runs = [r for r in instance.get_runs(dg.RunsFilter(job_name=job, tags=tags))]
        if not runs:
            return {"success": False, "run_id": None, "checks": {}}
        run = runs[0]
        events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        checks = {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data.passed
                  for e in events}
    return {"success": run.status == dg.DagsterRunStatus.SUCCESS, "run_id": run.run_id, "checks": checks}
