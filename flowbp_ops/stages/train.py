"""The training stage: one method trained into a variant (its weights: a LoRA adapter or a whole transformer),
an MLflow run, a model version."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from flowbp_ops.atomic import atomic_path
from flowbp_ops.params import Params
from flowbp_ops.stages.paths import paths
from flowbp_ops.stages.prepare import backbone_of


def trained_variant(params: Params, method: str, tracker=None, tags: dict | None = None,
                    callbacks: tuple = (), dist=None, on_checkpoint: Callable[[Path], None] | None = None,
                    run_key: str | None = None) -> dict:
    """Train one method; write its weights, ``metrics.jsonl`` (DVC plots) and ``summary.json``.

    A run continues from its newest intact checkpoint when its settings and the base model are unchanged,
    and starts over otherwise; either way only after everything that can refuse has been checked (the
    settings at load; the base model, prompts, rewards, batch layout and method here), so a refused run
    loses nothing. Under torchrun every process trains (``dist``); rank 0 alone writes and tracks."""
    from flowbp_ops.backbones.loading import base_record
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.training.callbacks import MlflowReport, OnCheckpoint, SampleFiles
    from flowbp_ops.training.distributed import Dist
    from flowbp_ops.training.loop import Trainer
    from flowbp_ops.training.run_dir import RunDir

    dist = dist or Dist()
    cfg = params.train_config(method)
    p = paths(params)
    from flowbp_ops.backbones.table import judge_for

    trainer = Trainer(cfg, backbone_of(params, from_embeddings=True), load_prompt_set(p.prompts, "train"),
                      {"world_dir": params.world_dir}, dist, eval_prompts=load_prompt_set(p.prompts, "test"),
                      judge=judge_for(params.train.backbone, params.world_dir))
    run = RunDir(p.run(method))
    point = run.begin(trainer, "auto", base_record(params.world_dir, params.train.backbone), dist)
    if not dist.main:
        trainer.fit(run.path)
        trainer.trained_state()  # the collective that gathers FSDP2 shards for rank 0
        return {}
    log = run.metrics_log(trainer.step)
    run_id = None
    if tracker is not None:
        key = run_key or str(p.run(method).resolve())  # the same on every machine when runs move through a store
        tracker.end_stale_runs(key)  # a killed earlier attempt left its MLflow run RUNNING: mark it KILLED
        tags = {"method": method, **input_tags(p.embeddings, "embeddings"), "flowbp.run_dir": key,
                "flowbp.resume": point.reason, "processes": str(dist.world),
                "global_batch": str(trainer.layout.global_batch), **(tags or {})}
        run_id = tracker.start_run(method, tags, params={"train": cfg.model_dump(mode="json"),
                                                         "world": params.world.model_dump()})
        for row in log.rows:  # a resumed run's earlier steps, so the MLflow run holds the whole curve
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "step"}, row["step"])

    # metrics.jsonl; MLflow's metrics and per-checkpoint samples (or PNGs in the run folder); the store's push;
    # the caller's (progress, Dagster Pipes log lines)
    report = [log, MlflowReport(tracker, run_id) if tracker is not None else SampleFiles(run.path)]
    report += [OnCheckpoint(on_checkpoint)] if on_checkpoint is not None else []
    t0 = time.perf_counter()
    try:
        with tracker.system_metrics(run_id) if tracker is not None else nullcontext():
            result = trainer.fit(run.path, callbacks=[*report, *callbacks])
        summary = _write_variant(params, method, trainer, log.rows, {
            "method": method, "run_id": run_id, "steps": cfg.steps, "skipped": result["skipped"],
            "seconds": time.perf_counter() - t0, "final": result["last"] or (log.rows[-1] if log.rows else {}),
            "resumed_from": point.step if point.checkpoint else None, "resume": point.reason,
            "processes": dist.world, "global_batch": trainer.layout.global_batch,
            "accumulation": trainer.layout.accumulation, "config": cfg.model_dump(mode="json")})
    except BaseException:
        if tracker is not None:
            tracker.end_run(run_id, "FAILED")
        raise
    finally:
        log.close()
    pairs = [(int(r["k"]), int(r["j"])) for r in log.rows if "k" in r and "j" in r]
    if pairs:  # the (k, j) draws of a LeapAlign / Lagrange run: counts in the summary, the plot in MLflow
        import tempfile

        from flowbp_ops.comparison import plot_kj

        with tempfile.TemporaryDirectory() as tmp:
            summary["kj_counts"] = plot_kj(pairs, cfg.rollout_steps, Path(tmp) / "kj_histogram.png", method)
            if tracker is not None:
                tracker.log_artifact(run_id, Path(tmp) / "kj_histogram.png", "diagnostics")
        if tracker is None:
            with atomic_path(p.variant(method) / "summary.json") as out:
                out.write_text(json.dumps(summary, indent=2))
    if tracker is not None:
        if cfg.finetune == "lora":  # a full fine-tune's transformer goes in once, with the registered model
            tracker.log_artifact(run_id, p.variant(method) / "weights", "weights")
        summary["model_version"] = _register(params, tracker, run_id, p.variant(method) / "weights",
                                             {"method": method, "run_id": run_id})
        with atomic_path(p.variant(method) / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        tracker.end_run(run_id)
    return summary


def _write_variant(params: Params, method: str, trainer, rows: list[dict], summary: dict) -> dict:
    """The variant folder, whole or not at all: weights (LoRA adapter or transformer), per-step metrics, summary."""
    from flowbp_ops.storage import sha256_of
    from flowbp_ops.trained_weights import save_trained

    with atomic_path(paths(params).variant(method)) as tmp:
        save_trained(trainer.backbone, trainer.cfg.finetune, tmp / "weights", trainer.trained_state())
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {**summary, "weights_sha256": sha256_of(tmp / "weights")}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def verified_variant(params: Params, method: str) -> dict:
    """The variant's ``summary.json``, with its weights' bytes checked against the recorded checksum: the
    gates measure, and the registry serves, exactly what training wrote."""
    from flowbp_ops.errors import IntegrityError
    from flowbp_ops.storage import sha256_of

    p = paths(params)
    summary_file = p.variant(method) / "summary.json"
    if not summary_file.exists():
        raise FileNotFoundError(f"{summary_file} not found: train the variant first (trained_variant[{method}])")
    summary = json.loads(summary_file.read_text())
    weights = p.variant(method) / "weights"
    if not weights.exists() and (p.variant(method) / "adapter").exists():
        raise IntegrityError(f"{p.variant(method)} was written by an earlier flowbp (adapter/, now weights/): "
                             f"retrain the variant (flowbp stage trained_variant --method {method})")
    if not weights.exists() or sha256_of(weights) != summary.get("weights_sha256"):
        raise IntegrityError(f"{weights} differs from the checksum in {summary_file} (corrupt or replaced): retrain "
                             f"the variant (flowbp stage trained_variant --method {method}) or restore it "
                             "(scripts/dvc checkout)")
    return summary


def finite_weights(weights: Path) -> dict:
    """Every trained tensor finite: the LoRA file, or every safetensors file of a fully fine-tuned transformer."""
    import torch
    from safetensors import safe_open

    files = sorted(weights.rglob("*.safetensors"))
    bad, n = [], 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n += 1
                if not bool(torch.isfinite(st.get_tensor(key)).all()):
                    bad.append(f"{f.relative_to(weights)}:{key}")
    return {"passed": bool(files) and not bad, "files": len(files), "tensors": n, "non_finite": bad[:20]}


def weight_checks(params: Params, method: str, meta: dict) -> list[dict]:
    """The training stage's asset check: ``finite_weights`` over whatever it trained (LoRA or transformer)."""
    finite = finite_weights(paths(params).variant(method) / "weights")
    return [{"name": "finite_weights", "passed": finite["passed"], "metadata": finite}]


def _register(params: Params, tracker, run_id: str, weights: Path, tags: dict[str, str]) -> str:
    """A real backbone's LoRA with MLflow's diffusers flavour (base model by hub id and commit); everything
    else (the default model, full fine-tuning) as flowbp's pyfunc carrying the weights it needs."""
    from flowbp_ops.backbones.loading import RECORD

    w, name = paths(params).world, params.promote.model_name
    if params.train.backbone == "default":
        base = {"vae": w / "vae", "transformer": w / "transformer"}
        return tracker.register_variant(run_id, name, base, weights, tags)
    record = json.loads((w / RECORD).read_text())
    tags = {**tags, "base_model": record["source"], "base_model.revision": str(record["revision"])}
    if params.train.finetune == "full":
        return tracker.register_variant(run_id, name, {RECORD: w / RECORD}, weights, tags)
    if record["source"].startswith("hf://"):
        from flowbp_ops.storage import parse_hub_uri

        base, revision = parse_hub_uri(record["source"])[1], record["revision"]
    else:
        base, revision = record["path"], None  # an absolute folder
    return tracker.register_adapter(run_id, name, base, weights, tags, revision)


def input_tags(folder: Path, name: str) -> dict[str, str]:
    """What a run read, as MLflow tags: the folder's checksum (of its manifest or index) and its DVC md5."""
    from flowbp_ops.integrity import file_sha256
    from flowbp_ops.tracking import dvc_hash

    index = next((folder / f for f in ("manifest.json", "index.json") if (folder / f).exists()), None)
    return {f"{name}.sha256": file_sha256(index) if index else "none", f"{name}.dvc_md5": dvc_hash(str(folder))}
