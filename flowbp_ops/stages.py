"""The pipeline's stages as library functions: what a Dagster asset and a DVC stage each call.

Every stage reads ``Params`` (``params.yaml``), writes its outputs atomically under
``params.data_dir`` and returns metadata (counts, checksums, timings, run ids) for Dagster
and for ``flowbp stage``'s JSON. No orchestration here: the order is the graph in
``pipelines/graph.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flowbp_ops.atomic import atomic_path
from flowbp_ops.integrity import seal
from flowbp_ops.params import Params
from flowbp_ops.surrogate.config import ConfigError


@dataclass(frozen=True)
class Paths:
    world: Path
    data: Path

    @property
    def prompts(self) -> Path:
        return self.world / "prompts"

    @property
    def rewards(self) -> Path:
        return self.world / "rewards"

    @property
    def rollouts(self) -> Path:
        return self.data / "rollouts"

    def variant(self, method: str) -> Path:
        return self.data / "variants" / method

    def run(self, method: str) -> Path:
        """A training run's checkpoints and per-step metrics: kept when the run fails, so it resumes."""
        return self.data / "runs" / method

    def evaluation(self, method: str) -> Path:
        return self.data / "eval" / method

    @property
    def comparison(self) -> Path:
        return self.data / "comparison"

    @property
    def promoted(self) -> Path:
        return self.data / "promoted.json"


def paths(params: Params) -> Paths:
    return Paths(Path(params.world_dir), Path(params.data_dir))


def prompt_sets(params: Params) -> dict:
    from flowbp_ops.prompts import prepare_prompt_set

    p = params.prompts
    return prepare_prompt_set(p.source, paths(params).prompts, p.eval_fraction, p.seed, p.column, p.eval_source)


def reward_models(params: Params, progress: Callable | None = None) -> dict:
    from flowbp_ops.storage import fetch
    from flowbp_ops.world.build import build_reward_models

    r, target = params.rewards, paths(params).rewards
    meta = {}
    if r.source == "default":
        meta = build_reward_models(params.world_dir, params.world, progress)
    elif r.source:
        meta = {"source": r.source, "sha256": fetch(r.source, target, r.sha256)}
    for name, uri in r.models.items():  # e.g. pickscore: hf://yuvalkirstain/PickScore_v1@<revision>
        if uri.endswith(".pt"):  # HPSv2.1 and ImageReward publish torch checkpoints: convert to safetensors
            meta[f"{name}.sha256"] = _convert_reward(name, uri, r, target)
        else:
            meta[f"{name}.sha256"] = fetch(uri, target / name, r.checksums.get(name))
    if target.exists():
        seal(target)  # every reward's files, checked when a reward loads them
    return meta


def _convert_reward(name: str, uri: str, r, target: Path) -> str:
    """Fetch a ``.pt`` checkpoint (checksum verified) and its tokenizer, convert (tensors only, never a full
    unpickle) into ``rewards/<name>/``; returns the checkpoint's checksum."""
    import importlib
    import tempfile

    from flowbp_ops.storage import fetch

    converters = {"hpsv2": "flowbp_ops.rewards.hpsv2:convert_open_clip_checkpoint",
                  "imagereward": "flowbp_ops.rewards.imagereward:convert_checkpoint"}
    if name not in converters:
        raise ConfigError(f"rewards.models.{name}={uri!r}: only {', '.join(converters)} are converted from .pt "
                          "checkpoints; give a folder in save_pretrained layout (safetensors) instead")
    if name not in r.tokenizers:
        raise ConfigError(f"rewards.models.{name} is a .pt checkpoint: set rewards.tokenizers.{name} to its tokenizer "
                          "folder (hpsv2: a CLIP ViT-H-14 tokenizer; imagereward: bert-base-uncased)")
    module, fn = converters[name].split(":")
    with tempfile.TemporaryDirectory() as tmp:
        digest = fetch(uri, Path(tmp) / "checkpoint.pt", r.checksums.get(name))
        fetch(r.tokenizers[name], Path(tmp) / "tokenizer")
        with atomic_path(target / name) as out:
            getattr(importlib.import_module(module), fn)(Path(tmp) / "checkpoint.pt", out, Path(tmp) / "tokenizer")
    return digest


def base_model(params: Params, progress: Callable | None = None) -> dict:
    """Build the default world's model, or resolve, pin and check a real pipeline (``backbone.json``)."""
    b = params.base_model
    if b.source == "default":
        from flowbp_ops.world.build import build_base_model

        return build_base_model(params.world_dir, params.world, progress)
    from flowbp_ops.backbones.loading import resolve_base_model

    return resolve_base_model(b.source, b.revision, params.train.backbone, params.world_dir,
                              b.model_dump(include={"dtype", "resolution", "max_sequence_length"}))


def _backbone(params: Params, adapter: Path | None = None):
    from flowbp_ops.adapters import load_trained
    from flowbp_ops.backbones.loading import load_backbone

    b = params.base_model
    bb = load_backbone(params.train.backbone, params.world_dir, device=params.device, dtype=b.dtype,
                       resolution=b.resolution, max_sequence_length=b.max_sequence_length)
    if adapter is not None:
        load_trained(bb, adapter)
    return bb


def eval_prompts(params: Params) -> list[str]:
    from flowbp_ops.prompts import load_prompt_set

    return load_prompt_set(paths(params).prompts, "test")[: params.rollouts.n_prompts]


def cached_rollouts(params: Params) -> dict:
    from flowbp_ops.rollout_store import generate_rollouts

    r = params.rollouts
    t0 = time.perf_counter()
    meta = generate_rollouts(_backbone(params), eval_prompts(params), r.n_steps, r.guidance, paths(params).rollouts,
                             seed=r.seed, shard_size=r.shard_size)
    return {**meta, "seconds": time.perf_counter() - t0}


def trained_variant(params: Params, method: str, tracker=None, tags: dict | None = None,
                    progress: Callable | None = None, dist=None) -> dict:
    """Train one method; write the adapter, ``metrics.jsonl`` (DVC plots) and ``summary.json``.

    A run continues from its newest intact checkpoint when its settings and the base model are unchanged,
    and starts over otherwise; either way only after everything that can refuse has been checked (the
    settings at load; the base model, prompts, rewards, batch layout and method here), so a refused run
    loses nothing. Under torchrun every process trains (``dist``); rank 0 alone writes and tracks."""
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.training.distributed import Dist
    from flowbp_ops.training.loop import Trainer
    from flowbp_ops.training.run_dir import RunDir

    dist = dist or Dist()
    cfg = params.train_config(method)
    p = paths(params)
    trainer = Trainer(cfg, _backbone(params), load_prompt_set(p.prompts, "train"),
                      {"world_dir": params.world_dir}, dist)
    run, base = RunDir(p.run(method)), _base_pin(params)
    point = run.resume_point(cfg.identity(), base, dist)
    if point.checkpoint is not None:
        trainer.restore(point.checkpoint, point.meta)
    elif dist.main:
        run.start(base)
    dist.barrier()
    if not dist.main:
        trainer.fit(run.path)
        trainer.trained_state()  # the collective that gathers FSDP2 shards for rank 0
        return {}
    log = run.metrics_log(trainer.step)
    run_id = None
    if tracker is not None:
        from flowbp_ops.tracking import dvc_hash

        key = str(p.run(method).resolve())
        tracker.end_stale_runs(key)  # a killed earlier attempt left its MLflow run RUNNING: mark it KILLED
        tags = {"method": method, "rollouts.sha256": _rollouts_sha(p), "rollouts.dvc_md5": dvc_hash(str(p.rollouts)),
                "flowbp.run_dir": key, "flowbp.resume": point.reason, "processes": str(dist.world),
                "global_batch": str(trainer.layout.global_batch), **(tags or {})}
        run_id = tracker.start_run(method, tags, params={"train": cfg.model_dump(mode="json"),
                                                         "world": params.world.model_dump()})
        for row in log.rows:  # a resumed run's earlier steps, so the MLflow run holds the whole curve
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "step"}, row["step"])

    class Report:
        def on_step(self, step, m):
            if tracker is not None:
                tracker.log_metrics(run_id, {k: v for k, v in m.items() if isinstance(v, (int, float))}, step)
            if progress:
                progress(f"train:{method}", step + 1, cfg.steps, m["loss"])

    t0 = time.perf_counter()
    try:
        result = trainer.fit(run.path, callbacks=[log, Report()])
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
    if tracker is not None:
        if cfg.finetune == "lora":  # a full fine-tune's transformer goes in once, with the registered model
            tracker.log_artifact(run_id, p.variant(method) / "adapter", "adapter")
        summary["model_version"] = _register(params, tracker, run_id, p.variant(method) / "adapter",
                                             {"method": method, "run_id": run_id})
        with atomic_path(p.variant(method) / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        tracker.end_run(run_id)
    return summary


def _write_variant(params: Params, method: str, trainer, rows: list[dict], summary: dict) -> dict:
    """The variant folder, whole or not at all: adapter (or transformer), per-step metrics, summary."""
    from flowbp_ops.adapters import save_trained
    from flowbp_ops.storage import sha256_of

    with atomic_path(paths(params).variant(method)) as tmp:
        save_trained(trainer.backbone, trainer.cfg.finetune, tmp / "adapter", trainer.trained_state())
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {**summary, "adapter_sha256": sha256_of(tmp / "adapter")}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def verified_variant(params: Params, method: str) -> dict:
    """The variant's ``summary.json``, with its adapter's bytes checked against the recorded checksum: the
    gates measure, and the registry serves, exactly what training wrote."""
    from flowbp_ops.errors import IntegrityError
    from flowbp_ops.storage import sha256_of

    p = paths(params)
    summary_file = p.variant(method) / "summary.json"
    if not summary_file.exists():
        raise FileNotFoundError(f"{summary_file} not found: train the variant first (trained_variant[{method}])")
    summary = json.loads(summary_file.read_text())
    adapter = p.variant(method) / "adapter"
    if not adapter.exists() or sha256_of(adapter) != summary.get("adapter_sha256"):
        raise IntegrityError(f"{adapter} differs from the checksum in {summary_file} (corrupt or replaced): retrain "
                             f"the variant (flowbp stage trained_variant --method {method}) or restore it "
                             "(scripts/dvc checkout)")
    return summary


def finite_weights(adapter: Path) -> dict:
    """Every trained tensor finite: the LoRA file, or every safetensors file of a fully fine-tuned transformer."""
    import torch
    from safetensors import safe_open

    files = sorted(adapter.rglob("*.safetensors"))
    bad, n = [], 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n += 1
                if not bool(torch.isfinite(st.get_tensor(key)).all()):
                    bad.append(f"{f.relative_to(adapter)}:{key}")
    return {"passed": bool(files) and not bad, "files": len(files), "tensors": n, "non_finite": bad[:20]}


def _base_pin(params: Params) -> str:
    """What the run trains on: the real model's pin, or the default model's build record."""
    w = paths(params).world
    record = w / ("base_model.json" if params.train.backbone == "default" else "backbone.json")
    return record.read_text() if record.exists() else ""


def _register(params: Params, tracker, run_id: str, adapter: Path, tags: dict[str, str]) -> str:
    """A real backbone's LoRA with MLflow's diffusers flavour (base model by hub id and commit); everything
    else (the default model, full fine-tuning) as flowbp's pyfunc carrying the weights it needs."""
    from flowbp_ops.backbones.loading import RECORD

    w, name = paths(params).world, params.promote.model_name
    if params.train.backbone == "default":
        base = {"vae": w / "vae", "transformer": w / "transformer"}
        return tracker.register_variant(run_id, name, base, adapter, tags)
    record = json.loads((w / RECORD).read_text())
    tags = {**tags, "base_model": record["source"], "base_model.revision": str(record["revision"])}
    if params.train.finetune == "full":
        return tracker.register_variant(run_id, name, {RECORD: w / RECORD}, adapter, tags)
    if record["source"].startswith("hf://"):
        from flowbp_ops.storage import parse_hub_uri

        base, revision = parse_hub_uri(record["source"])[1], record["revision"]
    else:
        base, revision = record["path"], None  # an absolute folder
    return tracker.register_adapter(run_id, name, base, adapter, tags, revision)


def _rollouts_sha(p: Paths) -> str:
    index = p.rollouts / "index.json"
    if not index.exists():
        return "none"
    from flowbp_ops.storage import sha256_of

    return sha256_of(index)


# -- evaluation: flowbp_ops/evaluation_stage.py --------------------------------------------------

from flowbp_ops.evaluation_stage import evaluation  # noqa: E402,F401  (a stage: found here by name)


# -- comparison and promotion ---------------------------------------------------------------------


def method_comparison(params: Params, tracker=None) -> dict:
    """The method table and plots over every evaluated variant."""
    from flowbp_ops.comparison import compare

    p = paths(params)
    found = [m for m in params.methods if (p.evaluation(m) / "metrics.json").exists()]
    if not found:
        raise FileNotFoundError(f"no evaluated variants under {p.data / 'eval'}: run the evaluation stage first")
    evals = {m: json.loads((p.evaluation(m) / "metrics.json").read_text()) for m in found}
    curves = {m: [json.loads(line) for line in (p.variant(m) / "metrics.jsonl").read_text().splitlines()]
              for m in found}
    result = compare(evals, curves, p.comparison)
    if tracker is not None:
        run_id = tracker.start_run("method_comparison", {"kind": "comparison"})
        for f in ["table.md", "comparison.json", "comparison.png", "curves.png"]:
            tracker.log_artifact(run_id, p.comparison / f)
        tracker.end_run(run_id)
        result["run_id"] = run_id
    return result


def promoted_model(params: Params, tracker) -> dict:
    """Promote the best variant whose gates all pass to ``champion`` (else leave it unchanged)."""
    from flowbp_ops.tracking import PromotionError

    p = paths(params)
    if not (p.comparison / "comparison.json").exists():
        raise FileNotFoundError(f"no method comparison in {p.comparison}: run it first (flowbp stage method_comparison, "
                                "after evaluating the variants)")
    table = json.loads((p.comparison / "comparison.json").read_text())
    metric = params.promote_metric()
    missing = [m for m, v in table["variants"].items() if metric not in v["variant"]]
    if missing:
        raise ConfigError(f"promote.metric={metric!r} was not measured for {', '.join(missing)}: rerun their evaluation "
                          "with the settings that produce it, or pick another metric")
    ranked = sorted(table["variants"], key=lambda m: -table["variants"][m]["variant"][metric])
    passing = [m for m in ranked if all(g["passed"] for g in table["variants"][m]["gates"].values())]
    record: dict[str, Any] = {"metric": metric, "ranking": ranked, "passing": passing}
    if not passing:
        best = ranked[0]
        record.update(promoted=None, reason=f"no variant passed every gate; best by {metric} was {best}")
        version = table["variants"][best].get("model_version")
        if version:
            try:
                tracker.promote(params.promote.model_name, version, table["variants"][best]["gates"])
            except PromotionError as exc:
                record["refusal"] = str(exc)
    else:
        best = passing[0]
        v = table["variants"][best]
        result = tracker.promote(params.promote.model_name, v["model_version"], v["gates"],
                                 reason=f"best {metric} = {v['variant'][metric]:.4f} among passing variants")
        record.update(promoted=best, version=v["model_version"], **result)
    with atomic_path(p.promoted) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return record
