"""The stage graph, defined once: Dagster builds its assets from it and ``dvc.yaml`` is generated from it.

Each stage names its upstream stages, the ``params.yaml`` keys it reads (DVC params and the
Dagster run config), its outputs under ``data/`` (DVC outs), and whether it is partitioned by
method (a Dagster partition; a DVC ``foreach`` over ``methods``). ``flowbp pipeline dvc-yaml``
writes ``dvc.yaml``; a test fails if the committed file drifts from this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    deps: tuple[str, ...] = ()
    params: tuple[str, ...] = ()  # params.yaml keys (a section or section.key)
    outs: tuple[str, ...] = ()  # relative to the repo; ${item} is the method
    metrics: tuple[str, ...] = ()
    plots: dict = field(default_factory=dict)
    per_method: bool = False
    gpu: bool = False
    persist: tuple[str, ...] = ()  # outs DVC keeps when the stage reruns (a failed training run resumes)


W = "data/world"
STAGES: tuple[Stage, ...] = (
    Stage("prompt_sets", "Prompt set: loaded, normalised, deduplicated, split with a fixed seed",
          params=("world_dir", "prompts"), outs=(f"{W}/prompts",)),
    Stage("reward_models", "Reward models: the default world's (trained here) or fetched and checksummed",
          params=("world_dir", "rewards", "world.seed", "world.reward_steps", "world.reward_batch"),
          outs=(f"{W}/rewards",)),
    Stage("base_model", "Base model: the default world's VAE + SD3-architecture DiT, trained here",
          deps=("prompt_sets",),
          params=("base_model",) + tuple(f"world.{k}" for k in ("seed", "n_images", "vae_steps", "vae_batch", "vae_lr",
                                                               "flow_steps", "flow_batch", "flow_lr", "cfg_dropout")),
          outs=(f"{W}/vae", f"{W}/transformer", f"{W}/base_model.json")),
    Stage("cached_rollouts", "No-grad base-model rollouts of the held-out prompts with their caches (sharded)",
          deps=("prompt_sets", "base_model"), params=("rollouts",), outs=("data/rollouts",), gpu=True),
    Stage("trained_variant", "One method trained (LoRA adapter, EMA weights), one MLflow run, a model version",
          deps=("prompt_sets", "reward_models", "base_model", "cached_rollouts"), params=("train",),
          outs=("data/variants/${item}/adapter", "data/runs/${item}"), persist=("data/runs/${item}",),
          metrics=("data/variants/${item}/summary.json",),
          plots={"data/variants/${item}/metrics.jsonl": {"x": "step", "y": "reward"}}, per_method=True, gpu=True),
    Stage("evaluation", "Held-out rewards, attribute accuracy, diversity and sample grid vs the base model",
          deps=("trained_variant", "reward_models", "cached_rollouts"),
          params=("eval", "promote", "rollouts", "train.reward"),
          outs=("data/eval/${item}/samples.png",), metrics=("data/eval/${item}/metrics.json",),
          per_method=True, gpu=True),
    Stage("method_comparison", "The method table and plots over every evaluated variant",
          deps=("evaluation",), params=("methods",), outs=("data/comparison",)),
    Stage("promoted_model", "Champion alias moved to the best variant that passes every gate",
          deps=("method_comparison",), params=("promote",), metrics=("data/promoted.json",)),
)
BY_NAME = {s.name: s for s in STAGES}


def _outs_of(stage: Stage, item: str | None, params=None) -> list[str]:
    """The stage's DVC outputs: the table's paths under the params' ``world_dir`` / ``data_dir``."""
    outs = stage.outs
    if stage.name == "base_model" and params is not None and params.base_model.source != "default":
        outs = (f"{W}/backbone.json",)  # a real model is pinned (hub commit / checksum), not built here
        if params.base_model.source.startswith("s3://"):
            outs += (f"{W}/base_model",)  # fetched into the world: DVC keeps it (a hub model is in the hub cache)
    paths = list(outs) + list(stage.metrics) + list(stage.plots)
    paths = [p.replace("${item}", item) for p in paths] if item else paths
    return [_relocate(p, params) for p in paths]


def _relocate(path: str, params) -> str:
    if params is None:
        return path
    if path.startswith(W + "/"):
        return f"{params.world_dir.rstrip('/')}/{path[len(W) + 1:]}"
    return f"{params.data_dir.rstrip('/')}/{path[len('data/'):]}"


def stage_outputs(stage: Stage, params, item: str | None = None) -> list[Path]:
    """The stage's output paths under ``params.world_dir`` / ``params.data_dir``."""
    return [Path(p) for p in _outs_of(stage, item, params)]


def dvc_yaml(params=None) -> str:
    """``dvc.yaml`` for the graph: each stage runs ``flowbp stage NAME``; per-method stages ``foreach``.
    With ``params``: outputs where those settings put them (another ``world_dir``, a real base model)."""
    stages = {}
    for s in STAGES:
        deps = []
        for d in s.deps:
            up = BY_NAME[d]
            if up.per_method and s.per_method:
                deps += _outs_of(up, "${item}", params)
            elif up.per_method:  # the whole per-method folder
                deps += [_relocate(p.split("${item}")[0].rstrip("/"), params) for p in up.metrics]
            else:
                deps += _outs_of(up, None, params)
        outs, metrics = _outs_of(s, None, params), [_relocate(m, params) for m in s.metrics]
        plots = {_relocate(p, params): opts for p, opts in s.plots.items()}
        outs = [o for o in outs if o not in metrics and o not in plots]
        # the method reaches flowbp through DVC_STAGE (``trained_variant@refl``), never through the shell: a
        # `${item}` in cmd would hand whatever params.yaml lists to /bin/sh before flowbp could refuse it
        body: dict = {"cmd": f"flowbp stage {s.name}" + (" --method-of-dvc-stage" if s.per_method else "")}
        if deps:
            body["deps"] = sorted(set(deps))
        body["params"] = list(s.params)
        if outs:
            persist = {_relocate(o, params) for o in s.persist}
            body["outs"] = [{o: {"persist": True}} if o in persist else o for o in outs]
        if metrics:
            body["metrics"] = [{m: {"cache": False}} for m in metrics]
        if plots:
            body["plots"] = [{p: {"cache": False, **opts}} for p, opts in plots.items()]
        stages[s.name] = {"foreach": "${methods}", "do": body} if s.per_method else body
    header = "# generated from pipelines/graph.py by `flowbp pipeline dvc-yaml`; do not edit by hand\n"
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
