"""The main job: materialize the default chain through Dagster (the runs show in the Dagster UI).

prepare (prompt sets, reward models, base model, cached rollouts) → for each method in
``params.methods`` its own partitioned run (train, evaluate, checks) → comparison → promotion.
Uses the Dagster instance in ``$DAGSTER_HOME`` (``.dagster`` by the scripts) when set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg

from flowbp_ops.stages.graph import BY_NAME, JOBS, sections


def run_chain(params_file: str | Path = "params.yaml", overrides: list[str] = ()) -> dict:
    from flowbp_ops.params import load_params

    os.environ["FLOWBP_PARAMS"] = str(params_file)
    params = load_params(params_file, overrides)
    from pipelines import config as pconfig
    from pipelines.definitions import ASSETS, RESOURCES

    pconfig.defaults.cache_clear()
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    # every stage gets its sections of this params file (with the overrides) as explicit run config
    data = params.model_dump(mode="json")
    run_config = {"ops": {a.key.path[-1]: {"config": {k: data[k] for k in _sections(a)}} for a in ASSETS}}

    def go(names, partition=None):
        t0 = time.perf_counter()
        keys = [dg.AssetKey(n) for n in names]
        cfg = {"ops": {k: v for k, v in run_config["ops"].items() if k in names}}
        res = dg.materialize(ASSETS, selection=keys, resources=RESOURCES, instance=instance, partition_key=partition,
                             run_config=cfg, raise_on_error=False)
        checks = {e.check_name: e.passed for e in res.get_asset_check_evaluations()}
        print(f"[{' '.join(names)}{' ' + partition if partition else ''}] "
              f"{'ok' if res.success else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
        return {"success": res.success, "run_id": res.run_id, "checks": checks}

    out: dict = {}
    for job, members in JOBS.items():  # the graph's jobs in order; the per-method one for each method
        names = [s.name for s in members]
        if any(s.per_method for s in members):
            out["variants"] = {m: go(names, m) for m in params.methods}
        else:
            out[job] = go(names)
            if not out[job]["success"]:
                return {"success": False, **out}
    out["success"] = True
    return out


def _sections(asset) -> list[str]:
    return sections(BY_NAME[asset.key.path[-1]])
