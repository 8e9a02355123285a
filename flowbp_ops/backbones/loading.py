"""Pick and pin a backbone: ``default`` (the world's small model) or a real diffusers pipeline.

A real base model is resolved once by the ``base_model`` stage: a hub id is pinned to the
commit it resolves to (and downloaded into the hub cache), an S3 prefix is fetched, a local
folder is used in place; each is checked to be the pipeline class its backbone loads and
recorded in ``<world_dir>/backbone.json``. Every later stage loads from that record, so a
rerun never silently picks up a newer upload.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowbp_ops.atomic import atomic_path
from flowbp_ops.backbones.table import get_backbone
from flowbp_ops.surrogate.config import ConfigError

RECORD = "backbone.json"


def base_record(world_dir: str | Path, kind: str) -> str:
    """What a run trains on, as text a resumed run must find unchanged: a real model's pin (``backbone.json``), or
    the default model's build record (``base_model.json``); "" when neither is there."""
    record = Path(world_dir) / ("base_model.json" if kind == "default" else RECORD)
    return record.read_text() if record.exists() else ""


def implementation_class(kind: str):
    return get_backbone(kind).implementation_class()


def check_pipeline(index: Path, kind: str) -> str:
    """``model_index.json`` names the pipeline class the backbone loads (and, for FLUX.2, an undistilled
    Klein), or a clear error before any weight is downloaded."""
    if not index.exists():
        raise ConfigError(f"{index.parent} has no model_index.json: base_model.source must be a whole diffusers "
                          "pipeline (a hub id such as hf://stabilityai/stable-diffusion-3.5-medium, or its saved "
                          "folder)")
    meta = json.loads(index.read_text())
    spec = get_backbone(kind)
    found, expected = meta.get("_class_name"), spec.pipeline_class
    if found != expected:
        raise ConfigError(f"{index.parent} holds a {found}, but train.backbone={kind} loads a {expected}: "
                          "set train.backbone to the matching backbone or point base_model.source at the right model")
    for flag, why in spec.refuse.items():
        if meta.get(flag):
            raise ConfigError(f"{index.parent} is {why}")
    return found


def _hub_pipeline(source: str, revision: str | None, kind: str) -> tuple[Path, str]:
    """Pin the hub repo to a commit, check its pipeline class from ``model_index.json`` alone, then download
    only what the pipeline loads (diffusers' own file selection, safetensors), not the repo's other files."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi, hf_hub_download

    from flowbp_ops.storage import parse_hub_uri

    _, repo, rev, _, _ = parse_hub_uri(source)
    if revision and rev and revision != rev:
        raise ConfigError(f"base_model.source={source!r} pins @{rev} but base_model.revision={revision!r}: give one")
    sha = HfApi().model_info(repo, revision=revision or rev).sha  # the commit it resolves to now
    check_pipeline(Path(hf_hub_download(repo, "model_index.json", revision=sha)), kind)
    return Path(DiffusionPipeline.download(repo, revision=sha, use_safetensors=True)), sha


def resolve_base_model(source: str, revision: str | None, kind: str, world_dir: str | Path,
                       settings: dict | None = None) -> dict:
    """Resolve, pin, check and record the base model with the settings it runs at (dtype, resolution,
    text length), so a registered model loads as it was trained; returns the record (stage metadata).
    An existing pin of the same source and revision is kept: a rerun never moves to a newer upload."""
    from flowbp_ops.storage import fetch

    world_dir = Path(world_dir)
    settings = settings or {}
    if (world_dir / RECORD).exists():
        old = json.loads((world_dir / RECORD).read_text())
        same = old["source"] == source and old["backbone"] == kind and revision in (None, old["revision"])
        if same and Path(old["path"]).exists():
            record = {**old, "settings": settings}
            with atomic_path(world_dir / RECORD) as tmp:
                tmp.write_text(json.dumps(record, indent=2))
            return {**record, "reused_pin": True}
    if source.startswith("hf://"):
        path, pinned = _hub_pipeline(source, revision, kind)
    elif source.startswith("s3://"):
        path = (world_dir / "base_model").resolve()
        pinned = fetch(source, path, revision)  # for S3 the pin is the content checksum
        check_pipeline(path / "model_index.json", kind)
    else:
        path = Path(source.removeprefix("file://")).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"base_model.source={source!r} is not a folder: give hf://owner/name[@rev], "
                              "s3://bucket/prefix or a local pipeline folder")
        check_pipeline(path / "model_index.json", kind)
        pinned = revision
    record = {"backbone": kind, "source": source, "revision": pinned, "path": str(path),
              "pipeline": get_backbone(kind).pipeline_class, "settings": settings}
    world_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(world_dir / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return record


def load_backbone(kind: str, world_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                  resolution: int | None = None, max_sequence_length: int | None = None, disk_cache: bool = True,
                  embeddings: str | Path | None = None, text_encoders: bool = True):
    """The backbone ``kind``: the default world's model, or the real pipeline the record pins (at the
    record's settings unless given here). Prompt embeddings are cached in ``embeddings`` (by default
    ``<world_dir>/embeddings/<kind>`` for a real pipeline, memory for the default world; ``disk_cache=False``:
    memory only, for a served model whose folder may be read-only). ``text_encoders=False``: the model is loaded
    without them and every prompt must be in ``embeddings`` (what the ``prompt_embeddings`` stage wrote)."""
    world_dir = Path(world_dir)
    if not text_encoders and embeddings is None:
        raise ValueError("text_encoders=False reads every prompt from an embeddings folder: give embeddings=")
    if kind == "default":
        from flowbp_ops.backbones.default import DefaultBackbone

        return DefaultBackbone(world_dir, device=device, embeddings=embeddings, text_encoder=text_encoders)
    if not (world_dir / RECORD).exists():
        raise ConfigError(f"no {world_dir / RECORD}: resolve the base model first (`flowbp stage base_model`)")
    record = json.loads((world_dir / RECORD).read_text())
    if record["backbone"] != kind:
        raise ConfigError(f"{world_dir / RECORD} pins a {record['backbone']} model, not {kind}: rerun base_model")
    given = {"dtype": dtype, "resolution": resolution, "max_sequence_length": max_sequence_length}
    settings = {k: v for k, v in {**record.get("settings", {}), **{k: v for k, v in given.items() if v}}.items() if v}
    source, revision = Path(record["path"]), None
    if not source.exists() and record["source"].startswith("s3://") and (world_dir / "base_model").is_dir():
        source = world_dir / "base_model"  # fetched on another machine, pulled here from the shared store
    if not source.exists():  # another machine (a GPU executor, a registered model): the pinned hub commit
        if not record["source"].startswith("hf://"):
            raise ConfigError(f"{source} (from {record['source']}) is not on this machine: fetch it here with "
                              "`flowbp stage base_model` (same source, checksum checked)")
        from flowbp_ops.storage import parse_hub_uri

        source, revision = parse_hub_uri(record["source"])[1], record["revision"]
    cache_dir = embeddings or (world_dir / "embeddings" / kind if disk_cache else None)
    return implementation_class(kind)(source, revision=revision, device=device, cache_dir=cache_dir,
                               text_encoders=text_encoders,
                               cache_key=f"{record['source']}@{record['revision']}", **settings)
