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
                    progress: Callable | None = None) -> dict:
    """Train one method; write the adapter, ``metrics.jsonl`` (DVC plots) and ``summary.json``."""
    from flowbp_ops.adapters import save_trained
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.storage import sha256_of
    from flowbp_ops.training.loop import train

    cfg = params.train_config(method)
    p = paths(params)
    backbone = _backbone(params)
    prompts = load_prompt_set(p.prompts, "train")
    run_id = None
    tags = {"method": method, "rollouts.sha256": _rollouts_sha(p), **(tags or {})}
    if tracker is not None:
        from flowbp_ops.tracking import dvc_hash

        tags["rollouts.dvc_md5"] = dvc_hash(str(p.rollouts))
        run_id = tracker.start_run(method, tags, params={"train": cfg.model_dump(mode="json"),
                                                         "world": params.world.model_dump()})
    run, resumed_from = p.run(method), _resume_point(p.run(method), cfg, _base_pin(params))
    rows = _metric_rows(run, resumed_from)
    if tracker is not None:  # a resumed run's earlier steps, so the MLflow run holds the whole curve
        for row in rows:
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "step"}, row["step"])
    metrics_file = (run / "metrics.jsonl").open("a")

    class Log:
        def on_step(self, step, m):
            row = {"step": step, **{k: v for k, v in m.items() if isinstance(v, (int, float))}}
            rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if tracker is not None:
                tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "step"}, step)
            if progress:
                progress(f"train:{method}", step + 1, cfg.steps, m["loss"])

    t0 = time.perf_counter()
    try:
        with atomic_path(p.variant(method)) as tmp:
            result = train(cfg, backbone, prompts, run, callbacks=[Log()], resume=resumed_from is not None,
                           reward_kwargs={"world_dir": params.world_dir})
            save_trained(backbone, cfg.finetune, tmp / "adapter")  # LoRA file, or the whole transformer
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            summary = {"method": method, "run_id": run_id, "steps": cfg.steps, "skipped": result["skipped"],
                       "seconds": time.perf_counter() - t0, "final": result["last"] or (rows[-1] if rows else {}),
                       "resumed_from": resumed_from,
                       "adapter_sha256": sha256_of(tmp / "adapter"), "config": cfg.model_dump(mode="json")}
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    except BaseException:
        if tracker is not None:
            tracker.end_run(run_id, "FAILED")
        raise
    finally:
        metrics_file.close()
    if tracker is not None:
        if cfg.finetune == "lora":  # a full fine-tune's transformer goes in once, with the registered model
            tracker.log_artifact(run_id, p.variant(method) / "adapter", "adapter")
        summary["model_version"] = _register(params, tracker, run_id, p.variant(method) / "adapter",
                                             {"method": method, "run_id": run_id})
        (p.variant(method) / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.end_run(run_id)
    return summary


def _base_pin(params: Params) -> str:
    """What the run trains on: the real model's pin, or the default model's build record."""
    w = paths(params).world
    record = w / ("base_model.json" if params.train.backbone == "default" else "backbone.json")
    return record.read_text() if record.exists() else ""


def _resume_point(run: Path, cfg, base: str) -> int | None:
    """The step to resume ``run`` from, if its last checkpoint was written by this config on this base model;
    otherwise the old run is cleared and training starts over (``None``)."""
    from flowbp_ops.atomic import remove
    from flowbp_ops.training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run)
    if ckpts and (run / "base.json").exists() and (run / "base.json").read_text() == base:
        meta = json.loads((ckpts[-1] / "meta.json").read_text())
        if meta["config"] == cfg.model_dump(mode="json"):
            return int(meta["step"])
    remove(run)
    run.mkdir(parents=True)
    (run / "base.json").write_text(base)
    return None


def _metric_rows(run: Path, resumed_from: int | None) -> list[dict]:
    """Per-step rows a resumed run already logged (up to its checkpoint); the file keeps only those."""
    file = run / "metrics.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines()] if resumed_from and file.exists() else []
    rows = [r for r in rows if r["step"] < (resumed_from or 0)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


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
    table = json.loads((p.comparison / "comparison.json").read_text())
    metric = params.promote.metric
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
