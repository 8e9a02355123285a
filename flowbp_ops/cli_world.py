"""``flowbp world build | train | sample | evaluate``: the default world and the training loop."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowbp_ops.errors import fields
from flowbp_ops.surrogate.config import ConfigError, parse_override

AXES = ("reward_input.", "active.", "weights.", "bridge.", "trajectory_weight.", "execution.", "policy.")


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=Console(stderr=True))
    tasks: dict[str, int] = {}

    def update(stage: str, step: int, total: int, loss: float) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, info="")
        bar.update(tasks[stage], completed=step, info=f"loss {loss:.4f}")

    return bar, update


def _cmd_world_build(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flowbp_ops.world.build import WorldConfig, build_world

    base = WorldConfig.smoke() if args.smoke else WorldConfig()
    changes = {}
    for item in args.set:
        key, value = parse_override(item)
        if key not in WorldConfig.model_fields:
            raise ConfigError(f"--set {key}: unknown world setting; "
                              f"settings are {', '.join(WorldConfig.model_fields)}")
        changes[key] = value
    try:
        cfg = WorldConfig(**{**base.model_dump(), **changes})
    except ValidationError as exc:
        raise ConfigError(fields(exc)) from None
    from flowbp_ops.determinism import pin_cpu

    pin_cpu(cfg.threads)
    bar, update = _progress()
    with bar:
        meta = build_world(args.out, cfg, update, overwrite=args.overwrite)
    print(json.dumps(meta, indent=2))
    return 0


def split_sets(items: list[str]) -> tuple[dict, list[str]]:
    """``--set`` items for the run (TrainConfig) and for the method's axes."""
    run, method = {}, []
    for item in items:
        key, value = parse_override(item)
        (method.append(item) if key.startswith(AXES) else run.__setitem__(key, value))
    return run, method


def load_prompts(world: Path, split: str) -> list[str]:
    from flowbp_ops.prompts import load_prompt_set

    return load_prompt_set(Path(world) / "prompts", split)


def _cmd_train(args: argparse.Namespace) -> int:
    """One run, on this process or (``--nproc``, torchrun) on several: every rank trains, rank 0 alone holds the
    output's lock, logs and writes."""
    from flowbp_ops.training import distributed

    try:
        return _train(args)
    finally:
        distributed.teardown()


def _train(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from flowbp_ops.backbones.loading import base_record
    from flowbp_ops.locks import exclusive
    from flowbp_ops.trained_weights import save_trained
    from flowbp_ops.training.callbacks import SampleFiles
    from flowbp_ops.training.loop import Trainer
    from flowbp_ops.training.run_dir import RunDir

    cfg, params = train_settings(args)
    dist, device = distributed_setup(params.device if params else "cpu")
    out = Path(args.out or f"runs/{cfg.method}")
    with exclusive(out.with_name(out.name + ".lock"), f"training into {out}") if dist.main else nullcontext():
        if params is not None:  # the preset's stages fetch and pin once, on rank 0
            if dist.main:
                _prepare_preset(params)
            dist.barrier()
        backbone, world = _train_backbone(args, params, device)
        prompts = load_prompts(world, "train")
        run = RunDir(out)
        from flowbp_ops.backbones.table import judge_for

        trainer = Trainer(cfg, backbone, prompts, {"world_dir": world}, dist,  # everything that can refuse, first
                          eval_prompts=load_prompts(world, "test"), judge=judge_for(cfg.backbone, world))
        mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
        try:
            point = run.begin(trainer, mode, base_record(world, cfg.backbone), dist)
        except FileExistsError:
            raise FileExistsError(f"{out} already holds a run (checkpoints up to step {run.last_step()}): pass "
                                  "--resume to continue it, --overwrite to start it over, or another --out") from None
        for note in point.passed_over if dist.main and args.resume else ():
            print(f"flowbp: warning: {note}; resuming from an older checkpoint", file=sys.stderr)
        if dist.main and args.resume:
            print(f"flowbp: {point.reason}", file=sys.stderr)
        if not dist.main:
            trainer.fit(out)
            trainer.trained_state()  # the collective that gathers FSDP2 shards for rank 0
            return 0
        log = run.metrics_log(trainer.step)
        bar, _ = _progress()

        class Progress:
            task = bar.add_task(f"train {cfg.method}", total=cfg.steps, completed=trainer.step, info="")

            def on_step(self, step, m):
                bar.update(self.task, completed=step + 1, info=f"reward {m['reward']:.3f} loss {m['loss']:.3f}")

        try:
            with bar:
                result = trainer.fit(out, callbacks=[log, SampleFiles(out), Progress()])
        finally:
            log.close()
        # LoRA file, or transformer/ under full fine-tuning
        save_trained(backbone, cfg.finetune, out / "weights", trainer.trained_state())
    print(json.dumps({"run": str(out), **result["last"], "skipped": result["skipped"], "processes": dist.world,
                      "global_batch": trainer.layout.global_batch}, indent=2))
    return 0


def distributed_setup(device: str):
    from flowbp_ops.training import distributed

    return distributed.setup(device)


def train_settings(args: argparse.Namespace):
    """The run's TrainConfig, and the preset's Params (None for ``--method`` on the default world)."""
    from pydantic import ValidationError

    from flowbp_ops.methods import ALL_METHODS
    from flowbp_ops.training.config import TrainConfig

    if args.preset:
        params = _preset_params(args)
        return params.train_config(params.train.method), params
    if not args.method:
        raise ConfigError("give --method (one of " + ", ".join(ALL_METHODS) + ") or --preset BACKBONE/METHOD")
    if args.method not in ALL_METHODS:
        raise ConfigError(f"unknown method {args.method!r}: choose one of {', '.join(ALL_METHODS)}")
    if args.backbone != "default":
        raise ConfigError(f"--backbone {args.backbone}: a real backbone trains from a preset "
                          f"(`flowbp train --preset {args.backbone}/{args.method}`, see `flowbp preset --list`)")
    run_sets, method_sets = split_sets(args.set)
    try:
        cfg = TrainConfig(method=args.method, backbone=args.backbone, method_overrides=method_sets, **run_sets)
    except ValidationError as exc:
        raise ConfigError(fields(exc)) from None
    return cfg, None


def _train_backbone(args, params, device: str):
    from flowbp_ops import stages
    from flowbp_ops.backbones.default import DefaultBackbone

    if params is None:
        if device == "cpu":
            from flowbp_ops.determinism import pin_for_world

            pin_for_world(args.world)
        return DefaultBackbone(Path(args.world), device=device), Path(args.world)
    return stages.backbone_of(params.model_copy(update={"device": device})), Path(params.world_dir)


def _preset_params(args: argparse.Namespace):
    """The authors' recipe (``flowbp preset``) with ``--set section.key=value`` on top."""
    from flowbp_ops.params import params_from
    from flowbp_ops.presets import get_preset
    from flowbp_ops.training.config import TrainConfig

    try:
        preset = get_preset(args.preset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.world != "data/world" or args.backbone != "default":
        raise ConfigError("--world and --backbone come from the preset: change them with --set world_dir=... "
                          "or pick another preset")
    # a bare training setting (steps=10) means train.steps, as in `flowbp train --method`; method axes
    # (active.k=5) go to train.method_overrides; anything else is a params.yaml key (device=cuda)
    axes = [s for s in args.set if s.startswith(AXES)]
    sets = [f"train.{s}" if s.split("=", 1)[0] in TrainConfig.model_fields else s for s in args.set if s not in axes]
    data = preset.model_dump(mode="json")
    data["train"]["method_overrides"] = data["train"]["method_overrides"] + axes
    params = params_from(data, sets, f"preset {args.preset}")
    if args.method and args.method != params.train.method:
        raise ConfigError(f"--method {args.method} contradicts --preset {args.preset}: give one of them")
    return params


def _prepare_preset(params) -> None:
    """Prompt sets, reward weights fetched and converted, the base model pinned: the pipeline's own stages."""
    import torch

    from flowbp_ops import stages

    if params.device == "cpu" and torch.cuda.is_available():
        print("flowbp: warning: the preset runs on the CPU although a GPU is visible: add --set device=cuda",
              file=sys.stderr)
    for stage in (stages.prompt_sets, stages.reward_models, stages.base_model):
        stage(params)


def _load_backbone(args):
    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.determinism import pin_for_world
    from flowbp_ops.trained_weights import load_trained

    pin_for_world(args.world)
    backbone = DefaultBackbone(Path(args.world))
    if args.weights:
        load_trained(backbone, args.weights)
    return backbone


def _cmd_sample(args: argparse.Namespace) -> int:
    from PIL import Image

    from flowbp_ops.sampling import generate

    if not args.prompt:
        raise ConfigError("--prompt: give at least one prompt")
    backbone = _load_backbone(args)
    images = generate(backbone, args.prompt, args.steps, args.guidance, seed=args.seed)
    grid = (images.permute(0, 2, 3, 1).reshape(-1, images.shape[3], 3) if len(args.prompt) > 1
            else images[0].permute(1, 2, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).byte().numpy()).resize((grid.shape[1] * 4, grid.shape[0] * 4),
                                                                     Image.NEAREST).save(out)
    print(out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flowbp_ops.backbones.table import judge_for
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.sampling import sample_and_score

    backbone = _load_backbone(args)
    prompts = load_prompts(Path(args.world), args.split)[: args.limit]
    rewards = {n: get_reward(n, world_dir=args.world) for n in args.rewards}
    judge = judge_for("default", args.world)
    print(json.dumps(sample_and_score(backbone, prompts, rewards, args.steps, args.guidance, judge, args.seed),
                     indent=2))
    return 0


def add_commands(sub) -> None:
    from flowbp_ops.cli_args import finite_float, positive_int

    w = sub.add_parser("world", help="the default world").add_subparsers(dest="world_command", required=True)
    b = w.add_parser("build", help="build the default world (data, text encoder, VAE, flow model, rewards)")
    b.add_argument("--out", default="data/world")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--smoke", action="store_true", help="a seconds-long build for tests")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_cmd_world_build)

    t = sub.add_parser("train", help="train a method on a backbone")
    t.add_argument("--method", default=None)
    t.add_argument("--preset", default=None, help="BACKBONE/METHOD: the authors' recipe (flowbp preset --list)")
    t.add_argument("--backbone", default="default")
    t.add_argument("--world", default="data/world")
    t.add_argument("--out", default=None, help="run directory (default runs/METHOD)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run settings (steps=100, lr=1e-3) or method axes (active.k=5)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact "
                       "checkpoint (on any number of processes)")
    again.add_argument("--overwrite", action="store_true", help="start over, replacing the run already in --out")
    from flowbp_ops.cli_pipeline import launch_args

    launch_args(t)
    t.set_defaults(func=_cmd_train)

    for name, fn, hlp in [("sample", _cmd_sample, "generate images"), ("evaluate", _cmd_evaluate, "held-out metrics")]:
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--world", default="data/world")
        p.add_argument("--weights", "--adapter", dest="weights", default=None,
                       help="the weights folder flowbp train wrote (a LoRA adapter or a fully fine-tuned transformer)")
        p.add_argument("--steps", type=positive_int, default=20)
        p.add_argument("--guidance", type=finite_float, default=4.0)
        p.add_argument("--seed", type=int, default=42)
        if name == "sample":
            p.add_argument("--prompt", action="append", default=[])
            p.add_argument("--out", default="samples/sample.png")
        else:
            p.add_argument("--split", default="test", choices=["train", "test"])
            p.add_argument("--limit", type=positive_int, default=600)
            p.add_argument("--rewards", nargs="+", default=["align", "align_heldout", "quality", "quality_heldout"])
        p.set_defaults(func=fn)
