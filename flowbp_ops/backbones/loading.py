"""Pick and pin a backbone: ``default`` (the world's small model) or a real diffusers pipeline.

A real base model is resolved once by the ``base_model`` stage: a hub id is pinned to the
commit it resolves to (and downloaded into the hub cache), an S3 prefix is fetched, a local
folder is used in place; each is checked to be the pipeline class its adapter expects and
recorded in ``<world_dir>/backbone.json``. Every later stage loads from that record, so a
rerun never silently picks up a newer upload.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowbp_ops.atomic import atomic_path
from flowbp_ops.surrogate.config import ConfigError

RECORD = "backbone.json"


def adapter_class(kind: str):
    from flowbp_ops.backbones.flux1 import Flux1Backbone
    from flowbp_ops.backbones.flux2 import Flux2Backbone
    from flowbp_ops.backbones.sd35 import SD35Backbone

    classes = {"sd35": SD35Backbone, "flux1": Flux1Backbone, "flux2": Flux2Backbone}
    if kind not in classes:
        raise ConfigError(f"backbone {kind!r}: a real base model needs train.backbone = one of {', '.join(classes)}")
    return classes[kind]


def check_pipeline(folder: Path, kind: str) -> str:
    """The folder's ``model_index.json`` names the pipeline class the adapter loads, or a clear error."""
    index = folder / "model_index.json"
    if not index.exists():
        raise ConfigError(f"{folder} has no model_index.json: base_model.source must be a whole diffusers pipeline "
                          "(a hub id such as hf://stabilityai/stable-diffusion-3.5-medium, or its saved folder)")
    found, expected = json.loads(index.read_text()).get("_class_name"), adapter_class(kind).pipeline_class
    if found != expected:
        raise ConfigError(f"{folder} holds a {found}, but train.backbone={kind} loads a {expected}: "
                          "set train.backbone to the matching backbone or point base_model.source at the right model")
    return found


def resolve_base_model(source: str, revision: str | None, kind: str, world_dir: str | Path,
                       settings: dict | None = None) -> dict:
    """Resolve, pin, check and record the base model with the settings it runs at (dtype, resolution,
    text length), so a registered model loads as it was trained; returns the record (stage metadata)."""
    from flowbp_ops.storage import fetch

    world_dir = Path(world_dir)
    if source.startswith("hf://"):
        from huggingface_hub import HfApi, snapshot_download

        repo, _, rev = source[len("hf://"):].partition("@")
        sha = HfApi().model_info(repo, revision=revision or rev or None).sha  # the commit it resolves to now
        path, pinned = Path(snapshot_download(repo, revision=sha)), sha
    elif source.startswith("s3://"):
        path = world_dir / "base_model"
        pinned = fetch(source, path, revision)  # for S3 the pin is the content checksum
    else:
        path = Path(source.removeprefix("file://")).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"base_model.source={source!r} is not a folder: give hf://owner/name[@rev], "
                              "s3://bucket/prefix or a local pipeline folder")
        pinned = revision
    record = {"backbone": kind, "source": source, "revision": pinned, "path": str(path),
              "pipeline": check_pipeline(path, kind), "settings": settings or {}}
    world_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(world_dir / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return record


def load_backbone(kind: str, world_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                  resolution: int | None = None, max_sequence_length: int | None = None):
    """The adapter of ``kind``: the default world's model, or the real pipeline the record pins (at the
    record's settings unless given here)."""
    world_dir = Path(world_dir)
    if kind == "default":
        from flowbp_ops.backbones.default import DefaultBackbone

        return DefaultBackbone(world_dir, device=device)
    if not (world_dir / RECORD).exists():
        raise ConfigError(f"no {world_dir / RECORD}: resolve the base model first (`flowbp stage base_model`)")
    record = json.loads((world_dir / RECORD).read_text())
    if record["backbone"] != kind:
        raise ConfigError(f"{world_dir / RECORD} pins a {record['backbone']} model, not {kind}: rerun base_model")
    given = {"dtype": dtype, "resolution": resolution, "max_sequence_length": max_sequence_length}
    settings = {k: v for k, v in {**record.get("settings", {}), **{k: v for k, v in given.items() if v}}.items() if v}
    source, revision = Path(record["path"]), None
    if not source.exists():  # another machine (a GPU executor, a registered model): the pinned hub commit
        if not record["source"].startswith("hf://"):
            raise ConfigError(f"{source} (from {record['source']}) is not on this machine: rerun base_model here")
        source, revision = record["source"][len("hf://"):].partition("@")[0], record["revision"]
    return adapter_class(kind)(source, revision=revision, device=device, cache_dir=world_dir / "embeddings" / kind,
                               **settings)
