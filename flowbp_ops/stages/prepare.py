"""The preparing stages: prompt sets, reward models, the base model, its prompt embeddings, its rollouts of the
held-out prompts (what evaluation compares a variant with)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from flowbp_ops.atomic import atomic_path
from flowbp_ops.integrity import file_sha256, seal, verify
from flowbp_ops.params import Params
from flowbp_ops.rewards.base import CONVERTED
from flowbp_ops.stages.paths import paths
from flowbp_ops.surrogate.config import ConfigError


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
        path = uri.split("?")[0]
        if path.endswith(".pt") or (name in CONVERTED and path.endswith(".safetensors")):  # a published file: convert
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

    if name not in CONVERTED:
        raise ConfigError(f"rewards.models.{name}={uri!r}: only {', '.join(CONVERTED)} are converted from .pt "
                          "checkpoints; give a folder in save_pretrained layout (safetensors) instead")
    if name not in r.tokenizers:
        raise ConfigError(f"rewards.models.{name} is a published checkpoint: set rewards.tokenizers.{name} to its "
                          f"tokenizer folder (the published one: {CONVERTED[name].tokenizer})")
    module, fn = CONVERTED[name].converter.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / ("checkpoint" + Path(uri.split("?")[0]).suffix)
        digest = fetch(uri, ckpt, r.checksums.get(name))
        fetch(r.tokenizers[name], Path(tmp) / "tokenizer")
        with atomic_path(target / name) as out:
            getattr(importlib.import_module(module), fn)(ckpt, out, Path(tmp) / "tokenizer")
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


def backbone_of(params: Params, weights: Path | None = None, *, from_embeddings: bool = False,
                embeddings: Path | None = None):
    """The base model the settings pin (the default world's, or a real pipeline), with trained weights if given.
    ``from_embeddings``: without its text encoders, every prompt read from the ``prompt_embeddings`` stage's
    sealed folder (what training, the base rollouts and evaluation load); ``embeddings``: encode into that folder."""
    from flowbp_ops.backbones.loading import load_backbone
    from flowbp_ops.trained_weights import load_trained

    b = params.base_model
    if from_embeddings:
        embeddings = paths(params).embeddings
        fix = "rerun `flowbp stage prompt_embeddings` (or `dvc repro`), or restore them (scripts/dvc checkout)"
        if not verify(embeddings, "the prompt embeddings", fix):
            raise ConfigError(f"no sealed prompt embeddings in {embeddings}: {fix}")
    bb = load_backbone(params.train.backbone, params.world_dir, device=params.device, dtype=b.dtype,
                       resolution=b.resolution, max_sequence_length=b.max_sequence_length, embeddings=embeddings,
                       text_encoders=not from_embeddings)
    if weights is not None:
        load_trained(bb, weights)
    return bb


def eval_prompts(params: Params) -> list[str]:
    from flowbp_ops.prompts import load_prompt_set

    return load_prompt_set(paths(params).prompts, "test")[: params.rollouts.n_prompts]


def prompts_read(params: Params) -> list[str]:
    """Every prompt a later stage conditions on: the training and held-out prompts, the empty CFG negative and,
    on the default world, the training scenes the pre-training regulariser renders."""
    from flowbp_ops.prompts import load_prompt_set

    p = paths(params)
    prompts = load_prompt_set(p.prompts, "train") + load_prompt_set(p.prompts, "test") + [""]
    if params.train.backbone == "default" and (p.prompts / "specs.json").exists():
        from flowbp_ops.world.pretrain import training_scenes

        prompts += [s.prompt() for s in training_scenes(params.world_dir)]
    return list(dict.fromkeys(prompts))


def prompt_embeddings(params: Params, batch: int = 64) -> dict:
    """Encode every prompt once with the base model's own text encoders into ``data/embeddings/`` (sealed), so
    the stages after it load the model without them."""
    prompts, target = prompts_read(params), paths(params).embeddings
    t0 = time.perf_counter()
    with atomic_path(target) as tmp:
        bb = backbone_of(params, embeddings=tmp)
        for i in range(0, len(prompts), batch):
            bb.encode_prompts(prompts[i:i + batch])
        seal(tmp)
        digest = file_sha256(tmp / "manifest.json")
    return {"prompts": len(prompts), "key": bb.cache.key, "sha256": digest, "seconds": time.perf_counter() - t0}


def base_rollouts(params: Params) -> dict:
    """The base model's no-grad rollouts of the held-out prompts with their caches (sharded): evaluation's base."""
    from flowbp_ops.rollout_store import generate_rollouts

    r = params.rollouts
    t0 = time.perf_counter()
    meta = generate_rollouts(backbone_of(params, from_embeddings=True), eval_prompts(params), r.n_steps, r.guidance,
                             paths(params).rollouts, seed=r.seed, shard_size=r.shard_size, grid=r.grid)
    return {**meta, "seconds": time.perf_counter() - t0}
