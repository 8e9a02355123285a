# no `from __future__ import annotations`: Dagster resolves the config and resource annotations at runtime
"""Dagster definitions derived from the stage graph (``flowbp_ops/stages/graph.py``): one asset per stage, its
checks, its partitions and its job. CPU stages run in the Dagster process; GPU stages (rollouts, training,
evaluation) run ``flowbp stage …`` as their own process through Dagster Pipes — a subprocess here, a
Kubernetes pod on a cluster (the ``launcher`` resource) — which streams its per-step log lines, its
materialization and its asset checks back. Start the UI with ``dagster dev -m pipelines.definitions``.
"""

import json
import math
from typing import Any

import dagster as dg

from flowbp_ops.methods import ALL_METHODS
from flowbp_ops.stages.graph import JOB_DESCRIPTIONS, JOBS, STAGES, Stage, sections, stage_file
from pipelines.config import apply, stage_config
from pipelines.resources import ComputeResource, DvcResource, LauncherResource, MlflowResource, StorageResource

METHOD_PARTITIONS = dg.StaticPartitionsDefinition(list(ALL_METHODS))
# a stage with resumable working state (training: its checkpoints) loses nothing when it is retried
RESUMABLE_RETRY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)


def _metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are, everything else as JSON (Dagster shows both)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, (bool, str, dg.MetadataValue)):
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = v if not (isinstance(v, float) and math.isnan(v)) else "nan"
        elif v is not None:
            out[k] = dg.MetadataValue.json(json.loads(json.dumps(v, default=str)))
    return out


def _extra_metadata(stage: Stage, params, method: str | None, mlflow: MlflowResource, meta: dict) -> dict:
    """What users look at, added on the Dagster side: the stage's pictures linked where MLflow keeps them (the
    event log holds links, not images; without MLflow the file's path), a table as markdown, the MLflow run."""
    extra = {}
    for link in stage.links:
        url = mlflow.run_url(params.tracking, meta.get(link.run_key), link.artifact)
        extra.update({link.name: dg.MetadataValue.url(url)} if url else
                     {f"{link.name}_file": dg.MetadataValue.path(str(stage_file(link.path, params, method)))})
    if isinstance(meta.get("table"), str):
        extra["table"] = dg.MetadataValue.md(meta["table"])
    if stage.tracked and meta.get("run_id"):
        extra["mlflow_run"] = mlflow.run_url(params.tracking, meta["run_id"])
    return extra


def _in_process(stage: Stage, context, params, mlflow: MlflowResource, storage: StorageResource, dvc: DvcResource):
    from flowbp_ops.stages.runner import run_stage

    method = context.partition_key if stage.per_method else None
    tracker = mlflow.tracker(params.tracking) if stage.tracked else None
    meta, checks = run_stage(stage.name, params, method, tracker=tracker, store=storage.store(),
                             tags={"dagster.run_id": context.run.run_id, "dagster.partition": method or ""})
    meta = {**_metadata(meta), **_extra_metadata(stage, params, method, mlflow, meta)}
    meta["dvc"] = dg.MetadataValue.json(dvc.record(stage, method, params, local=storage.store() is None))
    results = [dg.AssetCheckResult(check_name=c["name"], passed=c["passed"], metadata=_metadata(c["metadata"]))
               for c in checks]
    return dg.MaterializeResult(metadata=meta, check_results=results or None)


def _external(stage: Stage, context, params, launcher: LauncherResource, storage: StorageResource,
              compute: ComputeResource, mlflow: MlflowResource, dvc: DvcResource):
    """``flowbp stage NAME`` as its own process through Pipes; the settings travel as Pipes extras."""
    method = context.partition_key if stage.per_method else None
    device, precision = compute.resolve(params, local=launcher.mode == "subprocess")
    params = params.model_copy(update={"train": params.train.model_copy(update={"precision": precision}),
                                       "tracking": mlflow.settings(params.tracking)})
    with compute.visible_gpus(device) as (env, device):
        params = params.model_copy(update={"device": device})
        extras = {"params": params.model_dump(mode="json"),
                  "tags": {"dagster.run_id": context.run.run_id, "dagster.partition": method or ""}}
        env.update(storage.env())
        results = launcher.run(context, stage.name, method, compute.processes if stage.distributed else 1,
                               extras, env)
    for r in results:
        if isinstance(r, dg.MaterializeResult):
            raw = {k: getattr(v, "value", v) for k, v in (r.metadata or {}).items()}
            # the outputs are written whatever the gates say (they decide promotion, not validity): record them
            record = dvc.record(stage, method, params, local=storage.store() is None and launcher.mode == "subprocess")
            r = dg.MaterializeResult(metadata={**(r.metadata or {}), **_extra_metadata(stage, params, method, mlflow,
                                                                                         raw),
                                               "dvc": dg.MetadataValue.json(record)},
                                     check_results=r.check_results)
        yield r


def make_asset(stage: Stage) -> dg.AssetsDefinition:
    config_cls = stage_config(stage.name, sections(stage))
    # per-method stages: one check status per method (a later method's gate does not hide an earlier one's)
    check_specs = [dg.AssetCheckSpec(name, asset=stage.name, description=desc, blocking=True,
                                     partitions_def=METHOD_PARTITIONS if stage.per_method else None)
                   for name, desc in stage.checks]

    @dg.asset(name=stage.name, description=stage.description, group_name="flowbp",
              deps=list(stage.deps), partitions_def=METHOD_PARTITIONS if stage.per_method else None,
              check_specs=check_specs or None, pool="gpu" if stage.gpu else None,
              retry_policy=RESUMABLE_RETRY if stage.persist else None,
              kinds={"pytorch"} if stage.gpu else {"python"})
    def _asset(context: dg.AssetExecutionContext, config: config_cls, mlflow: MlflowResource,
               storage: StorageResource, compute: ComputeResource, launcher: LauncherResource, dvc: DvcResource):
        params = apply(config)
        if stage.gpu:
            yield from _external(stage, context, params, launcher, storage, compute, mlflow, dvc)
        else:
            yield _in_process(stage, context, params, mlflow, storage, dvc)

    return _asset


ASSETS = [make_asset(s) for s in STAGES]
RESOURCES = {"mlflow": MlflowResource(), "storage": StorageResource(), "compute": ComputeResource(),
             "launcher": LauncherResource(), "dvc": DvcResource()}

defs = dg.Definitions(
    assets=ASSETS,
    resources=RESOURCES,
    jobs=[dg.define_asset_job(name, selection=[s.name for s in members], description=JOB_DESCRIPTIONS.get(name))
          for name, members in JOBS.items()],
)
