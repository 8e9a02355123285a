"""``flowbp stage | promote | pipeline``: the pipeline's stages from the command line (what DVC runs)."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

PIPES_PARAMS = "dagster-pipes"  # --params value: the settings come from the Dagster run that launched this process


def _params(args, pipes=None):
    from flowbp_ops.params import load_params, params_from

    if args.params == PIPES_PARAMS:
        if pipes is None:
            from flowbp_ops.surrogate.config import ConfigError

            raise ConfigError(f"--params {PIPES_PARAMS} is for processes Dagster launches through Pipes")
        return params_from(pipes.extras["params"], args.set, "Dagster run config")
    return load_params(args.params, args.set)


def _cmd_stage(args: argparse.Namespace) -> int:
    from flowbp_ops.stages.runner import pipes_session

    if args.method_of_dvc_stage:
        args.method = _dvc_item(args.name)
    with pipes_session() as pipes:
        return _stage(args, pipes)


def _stage(args: argparse.Namespace, pipes) -> int:
    from flowbp_ops.methods import ALL_METHODS
    from flowbp_ops.stages.graph import BY_NAME, require_distributed
    from flowbp_ops.stages.runner import PipesLog, report, run_stage
    from flowbp_ops.store import from_env
    from flowbp_ops.surrogate.config import ConfigError
    from flowbp_ops.training import distributed

    stage = BY_NAME[args.name]
    params = _params(args, pipes)
    if stage.per_method and args.method not in ALL_METHODS:
        raise ConfigError(f"stage {args.name} needs --method, one of {', '.join(ALL_METHODS)}")
    if distributed.under_torchrun():
        require_distributed(args.name)
    dist, device = distributed.setup(params.device) if stage.distributed else (distributed.Dist(), None)
    try:
        pipes = pipes if dist.main else None  # one process reports to Dagster
        store = from_env(args.store)
        tracker = None
        if stage.tracked and dist.main:
            from flowbp_ops.tracking import Tracker

            tracker = Tracker(params.tracking)
        callbacks = (PipesLog(pipes, f"{args.name}[{args.method}]", params.train.steps),) if pipes else ()
        with _placed(params if not dist.active else params.model_copy(update={"device": device})) as placed:
            meta, checks = run_stage(args.name, placed, args.method, tracker=tracker, dist=dist, store=store,
                                     callbacks=callbacks, tags=pipes.extras.get("tags") if pipes else None)
    finally:
        distributed.teardown()
    if pipes is not None:
        report(pipes, stage, meta, checks)
    if dist.main:
        print(json.dumps(meta, indent=2, default=str))
    return 0


def _dvc_item(stage: str) -> str:
    """The method of the DVC stage running this command: ``DVC_STAGE`` is ``[dvc.yaml:]trained_variant@<method>``."""
    import os

    from flowbp_ops.surrogate.config import ConfigError

    address = os.environ.get("DVC_STAGE", "")
    if not address:
        raise ConfigError("--method-of-dvc-stage is for dvc.yaml's commands (DVC sets DVC_STAGE): give --method")
    name, sep, item = address.split("dvc.yaml:", 1)[-1].partition("@")
    if name != stage or not sep:
        raise ConfigError(f"DVC_STAGE={address!r} is not a {stage}@<method> stage")
    return item


@contextmanager
def _placed(params):
    """``device: cuda:auto`` (several `flowbp stage` processes on one multi-GPU node): a free GPU each."""
    from flowbp_ops.gpu_slots import placed

    with placed(params.device) as device:
        yield params if device == params.device else params.model_copy(update={"device": device})


def _cmd_promote(args: argparse.Namespace) -> int:
    from flowbp_ops.tracking import Tracker

    params = _params(args)
    tracker = Tracker(params.tracking)
    name = params.promote.model_name
    if args.rollback:
        print(json.dumps(tracker.rollback(name), indent=2))
        return 0
    if args.version is None:
        from flowbp_ops import stages

        print(json.dumps(stages.promoted_model(params, tracker), indent=2))
        return 0
    evals = [json.loads(p.read_text()) for p in sorted((Path(params.data_dir) / "eval").glob("*/metrics.json"))]
    match = [e for e in evals if str(e.get("model_version")) == str(args.version)]
    if not match:
        raise ValueError(f"no evaluation of version {args.version} under {params.data_dir}/eval: evaluate it first "
                         f"(flowbp stage evaluation --method M)")
    print(json.dumps(tracker.promote(name, str(args.version), match[0]["gates"], reason="flowbp promote"), indent=2))
    return 0


def _cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from flowbp_ops.params import load_params
    from flowbp_ops.stages.graph import dvc_yaml

    text = dvc_yaml(load_params(args.params))  # outputs where this params file puts them
    if args.check:
        current = Path(args.out).read_text() if Path(args.out).exists() else ""
        if current != text:
            raise ValueError(f"{args.out} differs from flowbp_ops/stages/graph.py and {args.params}: "
                             "run `flowbp pipeline dvc-yaml`")
        return 0
    Path(args.out).write_text(text)
    print(args.out)
    return 0


def _cmd_preset(args: argparse.Namespace) -> int:
    from flowbp_ops.params import dump_params
    from flowbp_ops.presets import get_preset, preset_names

    if args.name is None or args.list:
        from flowbp_ops.presets import describe

        print("\n".join(describe(n) for n in preset_names()))
        return 0
    text = dump_params(get_preset(args.name))
    if args.out:
        Path(args.out).write_text(text)
        print(args.out)
    else:
        print(text)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from flowbp_ops.doctor import run

    checks = run(_params(args))
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    return 2 if any(c.status == "FAIL" for c in checks) else 0


def launch_args(p) -> None:
    """One run over several processes (trained_variant, train): flowbp re-runs itself under torchrun."""
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--nproc", type=int, default=1, help="processes on this node, one per GPU (CUDA_VISIBLE_DEVICES "
                   "picks them); on CPUs, gloo")
    g.add_argument("--nnodes", default=None, help="nodes of the run (N or MIN:MAX), each running this same command")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank (with --nnodes)")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (with --nnodes)")


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--params", default="params.yaml")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override params.yaml, e.g. train.lr=3e-4 (repeatable)")

    from flowbp_ops.stages.graph import STAGES

    s = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml and the Dagster assets call)")
    s.add_argument("name", choices=[st.name for st in STAGES])
    s.add_argument("--method", default=None)
    s.add_argument("--method-of-dvc-stage", action="store_true", help="take the method from DVC_STAGE (dvc.yaml)")
    s.add_argument("--store", default=None, help="shared store s3://bucket/prefix: pull the stage's inputs, push its "
                   "outputs (default: $FLOWBP_STORE; none: local files only)")
    common(s)
    launch_args(s)
    s.set_defaults(func=_cmd_stage)

    dr = sub.add_parser("doctor", help="preflight: CUDA, hub access, S3, MLflow, the gpu pool, DVC, disk "
                        "(a fix per FAIL)")
    common(dr)
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=_cmd_doctor)

    pr = sub.add_parser("promote", help="move the champion alias (gated), or roll it back")
    pr.add_argument("--version", default=None, help="a registered model version (default: the best that passes)")
    pr.add_argument("--rollback", action="store_true", help="restore the previous champion")
    common(pr)
    pr.set_defaults(func=_cmd_promote)

    ps = sub.add_parser("preset", help="the authors' recipe for <backbone>/<method> as a params.yaml")
    ps.add_argument("name", nargs="?", default=None, help="e.g. sd35/flowbp_lagrange (none: list them)")
    ps.add_argument("--out", default=None, help="write to this file (e.g. params.yaml) instead of stdout")
    ps.add_argument("--list", action="store_true", help="list the presets")
    ps.set_defaults(func=_cmd_preset)

    pp = sub.add_parser("pipeline", help="the whole chain through Dagster, or dvc.yaml from the graph")
    psub = pp.add_subparsers(dest="pipeline_command", required=True)
    d = psub.add_parser("dvc-yaml", help="write dvc.yaml from flowbp_ops/stages/graph.py")
    d.add_argument("--out", default="dvc.yaml")
    d.add_argument("--check", action="store_true", help="fail if the file differs")
    d.add_argument("--params", default="params.yaml", help="the settings it is written for (world_dir, base model)")
    d.set_defaults(func=_cmd_dvc_yaml)
    # the orchestration layer's commands (`pipeline run`: pipelines/cli.py), found through their entry point
    from importlib.metadata import entry_points

    found = entry_points(group="flowbp.pipeline_commands")
    for ep in found:
        try:
            ep.load()(psub, common)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the other commands down
            _unavailable(psub, ep.name, f"{ep.value} does not load ({type(exc).__name__}: {exc})")
    if "run" not in {ep.name for ep in found}:
        _unavailable(psub, "run", "the orchestration layer (pipelines/) is not installed")


def _unavailable(psub, name: str, why: str) -> None:
    """A pipeline command whose plugin is missing or broken: it says so, and how to fix it, when it is called."""
    def refuse(args):
        from flowbp_ops.surrogate.config import ConfigError

        raise ConfigError(f"flowbp pipeline {name}: {why}; reinstall the project (bash scripts/install.sh)")

    psub.add_parser(name, help=f"(unavailable: {why})").set_defaults(func=refuse)
