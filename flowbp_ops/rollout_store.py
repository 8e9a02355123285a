"""Cached rollouts on disk: the ``base_rollouts`` stage, as sharded safetensors.

Each shard holds, for up to ``shard_size`` prompts, one no-grad rollout of the base model:
``x`` (N+1, B, ...) and ``v`` (N, B, ...) in float32, the sigma grid (float64), each
sample's noise seed and the conditioning tensors (``cond.pos.*`` / ``cond.neg.*`` under
CFG); the prompts and settings ride in the safetensors metadata. ``index.json`` lists the
shards with their SHA-256. The stored rollouts give the base model's evaluation (decode
``x_N``) and the gradient-fidelity diagnostics (compose a plan from the stored cache), and
DVC tracks them like any other stage output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flowbp_ops.atomic import atomic_path
from flowbp_ops.sampling import initial_noise
from flowbp_ops.storage import canonical_header, sha256_of
from flowbp_ops.surrogate.rollout import CFGCond, RolloutCache, rollout


def _flatten(cond: Any, prefix: str = "cond") -> dict[str, torch.Tensor]:
    if isinstance(cond, CFGCond):
        return {**_flatten(cond.pos, prefix + ".pos"), **_flatten(cond.neg, prefix + ".neg")}
    if isinstance(cond, torch.Tensor):
        return {prefix: cond.contiguous()}
    return {k: v for key, val in cond.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}


def _unflatten(tensors: dict[str, torch.Tensor]) -> Any:
    tree: dict = {}
    for key, t in tensors.items():
        *path, leaf = key.split(".")[1:]
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = t
    return CFGCond(tree["pos"], tree["neg"]) if set(tree) == {"pos", "neg"} else tree


@torch.no_grad()
def generate_rollouts(backbone, prompts: list[str], n_steps: int, guidance: float | None, out_dir: str | Path,
                      seed: int = 42, shard_size: int = 64, grid: str = "training") -> dict:
    """Roll out every prompt once (noise seed ``seed + i``, on ``grid``) and write the shards atomically."""
    if not prompts:
        raise ValueError("generate_rollouts() needs at least one prompt")
    sigmas = backbone.sigmas(n_steps, grid=grid) if grid != "training" else backbone.sigmas(n_steps)
    denoiser = backbone.denoiser(guidance)
    shape = backbone.latent_shape(1)[1:]
    shards = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for k, start in enumerate(range(0, len(prompts), shard_size)):
            chunk = prompts[start:start + shard_size]
            seeds = list(range(seed + start, seed + start + len(chunk)))
            cond = backbone.conditioning(chunk, guidance)
            x0 = initial_noise(shape, seeds).to(getattr(backbone, "device", "cpu"))  # CPU draw: same on any device
            cache = rollout(denoiser, x0, sigmas, cond)
            tensors = {"x": torch.stack(cache.x), "v": torch.stack(cache.v),
                       "sigmas": torch.from_numpy(cache.sigmas), "seeds": torch.tensor(seeds), **_flatten(cond)}
            tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}  # shards are device-free
            name = f"shard-{k:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={
                "prompts": json.dumps(chunk), "guidance": json.dumps(guidance), "backbone": backbone.name})
            canonical_header(tmp / name)
            shards.append({"file": name, "n": len(chunk), "sha256": sha256_of(tmp / name)})
        meta = {"n_prompts": len(prompts), "n_steps": n_steps, "guidance": guidance, "seed": seed, "grid": grid,
                "backbone": backbone.name, "shards": shards}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_rollouts(path: str | Path,
                  verify: bool = True) -> Iterator[tuple[list[str], RolloutCache, Any, torch.Tensor]]:
    """Yield ``(prompts, cache, cond, seeds)`` per shard; checksums verified against ``index.json``."""
    path = Path(path)
    index_file = path / "index.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{index_file} not found: generate the rollouts first (`flowbp stage base_rollouts`)")
    for shard in json.loads(index_file.read_text())["shards"]:
        f = path / shard["file"]
        if verify and sha256_of(f) != shard["sha256"]:
            raise ValueError(f"{f}: checksum differs from index.json; the shard is corrupt: regenerate the rollouts")
        with safe_open(str(f), framework="pt") as st:
            prompts = json.loads(st.metadata()["prompts"])
            t = {k: st.get_tensor(k) for k in st.keys()}
        cache = RolloutCache(sigmas=t["sigmas"].numpy(), x=list(t["x"].unbind(0)), v=list(t["v"].unbind(0)))
        cond = _unflatten({k: v for k, v in t.items() if k.startswith("cond.")})
        yield prompts, cache, cond, t["seeds"]
