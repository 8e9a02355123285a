"""The stage graph, declared once: the CLI's stages, the Dagster assets, checks, jobs and their metadata links,
``dvc.yaml``, the run chain and the shared store's transfers are all derived from this table.

Each stage names its library function, its upstream stages (what it really reads: their products,
not their resumable working state), the ``params.yaml`` keys it reads (DVC params and the Dagster
run config), its outputs (DVC outs, store keys), whether it is partitioned by method (a Dagster
partition; a DVC ``foreach`` over ``methods``), whether it runs on a GPU (then Dagster launches it
as its own process through Pipes) and on several processes (torchrun), its asset checks and the
function that measures them, the pictures Dagster links to, and its Dagster job. Adding a stage: a
function and a row here (then ``flowbp pipeline dvc-yaml``). Importing this module imports no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from flowbp_ops.uris import scheme


@dataclass(frozen=True)
class Link:
    """A picture users look at: Dagster's metadata links to it where MLflow keeps it (else names the file)."""
    name: str
    path: str  # the stage's output file (a template, like outs)
    artifact: str  # its path among the MLflow run's artifacts
    run_key: str = "run_id"  # the stage metadata's key holding that MLflow run's id


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    fn: str  # "module:function": fn(params, [method,] **what it accepts of tracker/tags/dist/callbacks/...)
    deps: tuple[str, ...] = ()
    params: tuple[str, ...] = ()  # params.yaml keys (a section or section.key)
    outs: tuple[str, ...] = ()  # relative to the repo; ${item} is the method
    outs_by_source: dict = field(default_factory=dict)  # base_model.source scheme -> outs instead of ``outs``
    metrics: tuple[str, ...] = ()
    plots: dict = field(default_factory=dict)
    per_method: bool = False
    gpu: bool = False  # runs as its own process (Dagster Pipes: a subprocess, or a Kubernetes Job)
    distributed: bool = False  # may run on several processes (torchrun: --nproc, Dagster's compute.processes)
    tracked: bool = False  # writes to MLflow (gets a tracker)
    # outs that are the stage's resumable working state: DVC keeps them when the stage reruns, the store pulls them
    # before and pushes them at each checkpoint, Dagster retries the stage; downstream stages never read them
    persist: tuple[str, ...] = ()
    checks: tuple[tuple[str, str], ...] = ()  # Dagster asset checks (blocking): name, description
    checked_by: str | None = None  # "module:function" (params, method, meta) -> [{"name", "passed", "metadata"}]
    links: tuple[Link, ...] = ()
    job: str = "prepare"

    def function(self) -> Callable:
        return _load(self.fn)

    def check(self, params, method: str | None, meta: dict) -> list[dict]:
        """The stage's asset-check results from its outputs and metadata."""
        return _load(self.checked_by)(params, method, meta) if self.checked_by else []


def _load(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


W = "data/world"
P = "flowbp_ops.stages."
GATES = (("reward_improved", "training reward on held-out prompts beats the base model"),
         ("heldout_not_collapsed", "held-out rewards did not fall more than the tolerance (reward hacking)"),
         ("heldout_judge_improved", "the held-out judge (GenEval in miniature, or a VLM) did not fall"),
         ("diversity_not_collapsed", "samples per prompt stay diverse (mode collapse)"))
STAGES: tuple[Stage, ...] = (
    Stage("prompt_sets", "Prompt set: loaded, normalised, deduplicated, split with a fixed seed",
          P + "prepare:prompt_sets", params=("world_dir", "prompts"), outs=(f"{W}/prompts",)),
    Stage("reward_models", "Reward models: the default world's (trained here) or fetched and checksummed",
          P + "prepare:reward_models",
          params=("world_dir", "rewards") + tuple(f"world.{k}" for k in (
              "seed", "threads", "reward_steps", "reward_batch", "adv_eps", "critic_steps", "detector_steps",
              "detector_batch")),
          outs=(f"{W}/rewards",)),
    Stage("base_model", "Base model: the default world's VAE + SD3-architecture DiT, trained here",
          P + "prepare:base_model", deps=("prompt_sets",),
          params=("base_model",) + tuple(f"world.{k}" for k in (
              "seed", "threads", "n_images", "vae_steps", "vae_batch", "vae_lr", "flow_steps", "flow_batch", "flow_lr",
              "flow_ema", "cfg_dropout")),
          outs=(f"{W}/vae", f"{W}/transformer", f"{W}/base_model.json"),
          # a real model is pinned (hub commit / checksum), not built here; one from S3 is fetched into the world
          # (DVC keeps it; a hub model stays in the hub cache)
          outs_by_source={"hf": (f"{W}/backbone.json",), "local": (f"{W}/backbone.json",),
                          "s3": (f"{W}/backbone.json", f"{W}/base_model")}),
    # every prompt encoded once with the base model's text encoders: later stages load the model without them
    Stage("prompt_embeddings", "Every training and held-out prompt encoded once by the base model's text encoders",
          P + "prepare:prompt_embeddings", deps=("prompt_sets", "base_model"), params=("base_model", "train.backbone"),
          outs=("data/embeddings",), gpu=True),
    Stage("base_rollouts", "The base model's no-grad rollouts of the held-out prompts with their caches (sharded)",
          P + "prepare:base_rollouts", deps=("prompt_sets", "base_model", "prompt_embeddings"), params=("rollouts",),
          outs=("data/rollouts",), gpu=True),
    # training reads the prompts, their embeddings, the rewards and the base model (not the evaluation rollouts)
    Stage("trained_variant", "One method trained (LoRA adapter or transformer, EMA weights), one MLflow run, a "
          "model version", P + "train:trained_variant",
          deps=("prompt_sets", "reward_models", "base_model", "prompt_embeddings"), params=("train",),
          outs=("data/variants/${item}/weights", "data/runs/${item}"), persist=("data/runs/${item}",),
          metrics=("data/variants/${item}/summary.json",),
          plots={"data/variants/${item}/metrics.jsonl": {"x": "step", "y": "reward"}}, per_method=True, gpu=True,
          distributed=True, tracked=True, checks=(("finite_weights", "every trained weight is finite"),),
          checked_by=P + "train:weight_checks", job="variant"),
    # evaluation loads the base model and puts the variant's weights onto it; it scores against the base rollouts
    Stage("evaluation", "Held-out rewards, the held-out judge, diversity and sample grid vs the base model",
          P + "evaluate:evaluation",
          deps=("trained_variant", "reward_models", "base_model", "base_rollouts", "prompt_embeddings"),
          params=("eval", "promote", "rollouts", "base_model", "train.backbone", "train.reward"),
          metrics=("data/eval/${item}/metrics.json",),
          # the sample grid as a DVC image plot: `dvc plots diff` sets it beside another experiment's
          plots={"data/eval/${item}/samples.png": {}},
          per_method=True, gpu=True, tracked=True, checks=GATES, checked_by=P + "evaluate:gate_checks",
          links=(Link("samples", "data/eval/${item}/samples.png", "samples/samples.png", "eval_run_id"),),
          job="variant"),
    Stage("method_comparison", "The method table and plots over every evaluated variant",
          P + "compare:method_comparison", deps=("evaluation", "trained_variant"), params=("methods",),
          outs=("data/comparison",), tracked=True,
          links=(Link("reward_change", "data/comparison/comparison.png", "comparison.png"),
                 Link("curves", "data/comparison/curves.png", "curves.png")),
          job="compare_and_promote"),
    Stage("promoted_model", "Champion alias moved to the best variant that passes every gate",
          P + "compare:promoted_model", deps=("method_comparison",), params=("promote",),
          metrics=("data/promoted.json",), tracked=True, job="compare_and_promote"),
)
BY_NAME = {s.name: s for s in STAGES}
JOBS = {name: [s for s in STAGES if s.job == name] for name in dict.fromkeys(s.job for s in STAGES)}
JOB_DESCRIPTIONS = {"prepare": "prompt sets, reward models, base model, prompt embeddings, base rollouts",
                    "variant": "train and evaluate one method", "compare_and_promote": "compare the methods, promote"}


def require_distributed(name: str) -> None:
    """Refuse several processes (torchrun, ``--nproc``) for a stage that runs in one."""
    if not BY_NAME[name].distributed:
        from flowbp_ops.surrogate.config import ConfigError

        runs = ", ".join(s.name for s in STAGES if s.distributed)
        raise ConfigError(f"stage {name} runs in one process: only {runs} (and flowbp train) run under torchrun / "
                          "--nproc")


def sections(stage: Stage) -> list[str]:
    """The ``params.yaml`` sections a stage's run config holds."""
    return sorted({p.split(".")[0] for p in stage.params} | {"world_dir", "data_dir"})


def _outs_of(stage: Stage, item: str | None, params=None, product: bool = False) -> list[str]:
    return [_relocate(p, params) for p in _templates(stage, item, params, product)]


def _templates(stage: Stage, item: str | None, params=None, product: bool = False) -> list[str]:
    """The stage's DVC outputs: the table's paths under the params' ``world_dir`` / ``data_dir``; ``product``:
    without its resumable working state (what a downstream stage may read)."""
    outs = stage.outs
    if stage.outs_by_source and params is not None and params.base_model.source != "default":
        outs = stage.outs_by_source.get(scheme(params.base_model.source), stage.outs_by_source["local"])
    paths = [p for p in list(outs) + list(stage.metrics) + list(stage.plots)
             if not (product and p in stage.persist)]
    return [p.replace("${item}", item) for p in paths] if item else paths


def _relocate(path: str, params) -> str:
    if params is None:
        return path
    if path.startswith(W + "/"):
        return f"{params.world_dir.rstrip('/')}/{path[len(W) + 1:]}"
    return f"{params.data_dir.rstrip('/')}/{path[len('data/'):]}"


def stage_file(template: str, params, item: str | None = None) -> Path:
    """One of the table's paths (``data/eval/${item}/samples.png``) where ``params`` puts it."""
    return Path(_relocate(template.replace("${item}", item) if item else template, params))


def stage_outputs(stage: Stage, params, item: str | None = None) -> list[Path]:
    """The stage's output paths under ``params.world_dir`` / ``params.data_dir``."""
    return [Path(p) for p in _outs_of(stage, item, params)]


def stage_transfers(stage: Stage, params, item: str | None = None, inputs: bool = False
                    ) -> dict[str, list[tuple[str, Path]]]:
    """(store key, local path) of a stage's outputs, or (``inputs``) of what it reads by upstream stage (a
    per-method upstream: this method's outputs, or every method's in ``params.methods``). The key is the
    output's place in the graph (``data/world/prompts``), the same on every machine."""
    def pairs(s: Stage, i: str | None, product: bool = True) -> list[tuple[str, Path]]:
        return [(t, Path(_relocate(t, params))) for t in _templates(s, i, params, product)]

    if not inputs:
        return {stage.name: pairs(stage, item, product=False)}
    out = {}
    for d in stage.deps:
        up = BY_NAME[d]
        items = [item] if up.per_method and item else (params.methods if up.per_method else [None])
        out[d] = [pair for i in items for pair in pairs(up, i)]
    return out


def resumable_transfers(stage: Stage, params, item: str | None = None) -> list[tuple[str, Path]]:
    """(store key, local path) of the stage's ``persist`` outputs: its working state, pushed as it is written."""
    keep = {t.replace("${item}", item) if item else t for t in stage.persist}
    return [(k, path) for k, path in stage_transfers(stage, params, item)[stage.name] if k in keep]


def dvc_yaml(params=None) -> str:
    """``dvc.yaml`` for the graph: each stage runs ``flowbp stage NAME``; per-method stages ``foreach``.
    With ``params``: outputs where those settings put them (another ``world_dir``, a real base model)."""
    stages = {}
    for s in STAGES:
        deps = []
        for d in s.deps:
            up = BY_NAME[d]
            if up.per_method and s.per_method:
                deps += _outs_of(up, "${item}", params, product=True)
            elif up.per_method:  # the whole per-method folder
                deps += [_relocate(p.split("${item}")[0].rstrip("/"), params) for p in up.metrics]
            else:
                deps += _outs_of(up, None, params, product=True)
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
    header = "# generated from flowbp_ops/stages/graph.py by `flowbp pipeline dvc-yaml`; do not edit by hand\n"
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
