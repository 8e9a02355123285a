# no `from __future__ import annotations`: Dagster resolves the config and resource annotations at runtime
"""Dagster definitions: one asset per stage of ``pipelines/graph.py``, each a thin call into
``flowbp_ops.stages`` that returns the stage's metadata (counts, checksums, timings, MLflow link,
tables and plots). Start the UI with ``dagster dev -m pipelines.definitions`` (127.0.0.1).
"""


import base64
from contextlib import nullcontext
import json
import math
from pathlib import Path
from typing import Any

import dagster as dg

from flowbp_ops import stages
from flowbp_ops.methods import METHODS
from pipelines.config import apply, stage_config
from pipelines.graph import STAGES, Stage, stage_outputs
from pipelines.resources import ComputeResource, MlflowResource, StorageResource

METHOD_PARTITIONS = dg.StaticPartitionsDefinition(list(METHODS))
# GPU executors (Kubernetes): one GPU per training / evaluation op; one machine: the `gpu` pool limits them
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
CHECKS = {
    "trained_variant": [("finite_weights", "every trained adapter weight is finite")],
    "evaluation": [("reward_improved", "training reward on held-out prompts beats the base model"),
                   ("heldout_not_collapsed", "held-out rewards did not fall more than the tolerance (reward hacking)"),
                   ("diversity_not_collapsed", "samples per prompt stay diverse (mode collapse)")],
}


def _image_md(path: Path) -> dg.MetadataValue:
    b64 = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{path.name}](data:image/png;base64,{b64})")


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


def _run(stage: Stage, context: dg.AssetExecutionContext, params, mlflow: MlflowResource, compute: ComputeResource):
    """Call the stage's library function; returns (metadata, check results)."""
    from flowbp_ops.locks import stage_lock

    device, precision = compute.resolve(params)
    method = context.partition_key if stage.per_method else None
    with stage_lock(params.data_dir, stage.name, method), \
            compute.placed(device) if stage.gpu else nullcontext(device) as device:
        params = params.model_copy(update={"device": device,
                                           "train": params.train.model_copy(update={"precision": precision})})
        return _call(stage, context, params, mlflow)


def _call(stage: Stage, context: dg.AssetExecutionContext, params, mlflow: MlflowResource):
    method = context.partition_key if stage.per_method else None
    tags = {"dagster.run_id": context.run.run_id, "dagster.partition": method or ""}
    tracker = mlflow.tracker(params.tracking) if stage.name in ("trained_variant", "evaluation", "method_comparison",
                                                 "promoted_model") else None
    if stage.name == "trained_variant":
        meta = stages.trained_variant(params, method, tracker, tags)
        finite = stages.finite_weights(stages.paths(params).variant(method) / "adapter")
        checks = [dg.AssetCheckResult(check_name="finite_weights", passed=finite["passed"], metadata=finite)]
        return {**meta, "mlflow_run": mlflow.run_url(tracker, meta.get("run_id"))}, checks
    if stage.name == "evaluation":
        meta = stages.evaluation(params, method, tracker)
        checks = [dg.AssetCheckResult(check_name=g, passed=bool(r["passed"]), metadata=_metadata(r))
                  for g, r in meta["gates"].items()]
        samples = stages.paths(params).evaluation(method) / "samples.png"
        return {**meta, "samples": _image_md(samples), "mlflow_run": mlflow.run_url(tracker, meta.get("run_id"))}, checks
    if stage.name == "method_comparison":
        meta = stages.method_comparison(params, tracker)
        out = stages.paths(params).comparison
        return {"table": dg.MetadataValue.md(meta["table"]), "reward_change": _image_md(out / "comparison.png"),
                "curves": _image_md(out / "curves.png"), "variants": list(meta["variants"])}, []
    if stage.name == "promoted_model":
        return stages.promoted_model(params, tracker), []
    return getattr(stages, stage.name)(params), []


def make_asset(stage: Stage) -> dg.AssetsDefinition:
    sections = sorted({p.split(".")[0] for p in stage.params} | {"world_dir", "data_dir"})
    config_cls = stage_config(stage.name, sections)
    check_specs = [dg.AssetCheckSpec(name, asset=stage.name, description=desc, blocking=True)
                   for name, desc in CHECKS.get(stage.name, [])]

    @dg.asset(name=stage.name, description=stage.description, group_name="flowbp",
              deps=list(stage.deps), partitions_def=METHOD_PARTITIONS if stage.per_method else None,
              check_specs=check_specs or None, pool="gpu" if stage.gpu else None,
              op_tags=GPU_TAGS if stage.gpu else None, kinds={"pytorch"} if stage.gpu else {"python"})
    def _asset(context: dg.AssetExecutionContext, config: config_cls, mlflow: MlflowResource,
               storage: StorageResource, compute: ComputeResource):
        params = apply(config)
        meta, checks = _run(stage, context, params, mlflow, compute)
        outs = stage_outputs(stage, params, context.partition_key if stage.per_method else None)
        published = storage.publish([p for p in outs if p.exists()])
        if published:
            meta["published"] = published
        return dg.MaterializeResult(metadata=_metadata(meta), check_results=checks or None)

    return _asset


ASSETS = [make_asset(s) for s in STAGES]
RESOURCES = {"mlflow": MlflowResource(), "storage": StorageResource(), "compute": ComputeResource()}

defs = dg.Definitions(
    assets=ASSETS,
    resources=RESOURCES,
    jobs=[dg.define_asset_job("prepare", selection=[s.name for s in STAGES[:4]],
                              description="prompt sets, reward models, base model, cached rollouts"),
          dg.define_asset_job("variant", selection=[s.name for s in STAGES if s.per_method],
                              partitions_def=METHOD_PARTITIONS, description="train and evaluate one method"),
          dg.define_asset_job("compare_and_promote", selection=[s.name for s in STAGES[-2:]])],
)
