"""Build the default world from a fixed seed, as three stages (the pipeline's first assets).

* ``build_prompt_sets``: the train / held-out split of the digit prompts (``prompts/``);
* ``build_reward_models``: the four reward nets;
* ``build_base_model``: the VAE and the flow transformer, trained on the train split.

Each stage writes to a temporary sibling path and renames it into place at the end, so an
interrupted build leaves nothing half-written. ``build_world`` runs all three into one
directory (the ``flowbp world build`` command).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flowbp_ops.atomic import atomic_path
from flowbp_ops.integrity import seal
from flowbp_ops.prompts import default_prompt_set
from flowbp_ops.world import scenes
from flowbp_ops.world.base_model import Progress, encode_images, make_transformer, make_vae, train_flow, train_vae
from flowbp_ops.world.config import WorldConfig
from flowbp_ops.world.text import MiniLMTextEncoder
from flowbp_ops.world.train_rewards import train_reward_nets


def build_prompt_sets(world: str | Path, seed: int = 0) -> dict:
    """``prompts/``: the train and held-out digit prompts (held-out attribute combinations)."""
    return default_prompt_set(Path(world) / "prompts", seed)


def build_reward_models(world: str | Path, cfg: WorldConfig = WorldConfig(), progress: Progress | None = None) -> dict:
    """``rewards/``: the alignment and quality rewards and their held-out twins."""
    t0 = time.perf_counter()
    with atomic_path(Path(world) / "rewards") as tmp:
        accuracy = train_reward_nets(tmp, cfg, progress)
        (tmp / "meta.json").write_text(json.dumps({"config": cfg.model_dump(), "accuracy": accuracy}, indent=2))
        seal(tmp)
    return {"reward_accuracy": accuracy, "rewards_s": time.perf_counter() - t0}


def build_base_model(world: str | Path, cfg: WorldConfig = WorldConfig(), progress: Progress | None = None) -> dict:
    """``vae/`` and ``transformer/`` (diffusers layout) and ``base_model.json``, trained on the train split."""
    world = Path(world)
    specs_file = world / "prompts" / "specs.json"
    if not specs_file.exists():
        raise FileNotFoundError(f"{specs_file} not found: the default base model trains on the default prompt set; "
                                f"build it first (build_prompt_sets, or prompts.source=default)")
    train = [scenes.Scene(s["tag"], tuple(tuple(o) for o in s["objects"]), s["relation"])
             for s in json.loads(specs_file.read_text())["train"]]
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pool = scenes.balanced(train, per_tag=max(1, cfg.n_images // len(scenes.TAGS)), seed=cfg.seed)
    images, chosen, _ = scenes.Renderer().dataset(pool, cfg.n_images, cfg.seed)
    prompts = [s.prompt() for s in chosen]
    text = MiniLMTextEncoder()
    unique = sorted(set(prompts))
    emb = text.encode(unique + [""])
    row = {p: i for i, p in enumerate(unique)}
    idx = torch.tensor([row[p] for p in prompts])
    tokens, pooled = emb["tokens"][idx], emb["pooled"][idx]
    null = {"tokens": emb["tokens"][-1:], "pooled": emb["pooled"][-1:]}
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae = train_vae(make_vae(cfg.seed), images, cfg.vae_steps, cfg.vae_batch, cfg.vae_lr, cfg.seed, progress=progress)
    latents = encode_images(vae, images)
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    transformer = train_flow(make_transformer(cfg.seed), latents, tokens, pooled, null, cfg.flow_steps,
                             cfg.flow_batch, cfg.flow_lr, cfg.seed, cfg.cfg_dropout, cfg.flow_ema, progress=progress)
    timings["flow_s"] = time.perf_counter() - t0
    meta = {"config": cfg.model_dump(), "timings": timings, "n_unique_prompts": len(unique)}
    for name, model in [("vae", vae), ("transformer", transformer)]:
        with atomic_path(world / name) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            seal(tmp)
    with atomic_path(world / "base_model.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta


def build_world(out: str | Path, cfg: WorldConfig = WorldConfig(), progress: Progress | None = None,
                overwrite: bool = False) -> dict:
    """All three stages into ``out`` at once (``flowbp world build``); nothing is left if it fails."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=True (CLI: --overwrite) to rebuild it")
    meta: dict = {}
    with atomic_path(out) as tmp:
        t0 = time.perf_counter()
        meta.update(build_prompt_sets(tmp, cfg.seed))
        base = build_base_model(tmp, cfg, progress)
        rewards = build_reward_models(tmp, cfg, progress)
        meta.update(config=cfg.model_dump(), timings={**base["timings"], "rewards_s": rewards["rewards_s"],
                                                 "total_s": time.perf_counter() - t0},
                    reward_accuracy=rewards["reward_accuracy"], n_unique_prompts=base["n_unique_prompts"])
        (tmp / "world.json").write_text(json.dumps(meta, indent=2))
    return meta
