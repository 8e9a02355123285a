"""``flowbp``: the command line. Every command is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from flowbp_ops import methods
from flowbp_ops.backbones.table import BACKBONES
from flowbp_ops.cli_args import finite_float, positive_int


def _console() -> Console:
    # wide tables stay readable when piped (rich falls back to 80 columns without a terminal)
    c = Console()
    return c if c.is_terminal else Console(width=200)


def _cmd_methods(args: argparse.Namespace) -> int:
    from flowbp_ops.policy.config import POLICY_METHODS, describe_policy, get_policy, policy_summary

    rows = {m: methods.describe(methods.get_method(m, args.backbone)) for m in methods.METHODS}
    policy = {m: describe_policy(get_policy(m)) for m in POLICY_METHODS}
    if args.json:
        out = {m: {"summary": methods.summary(m), "family": "direct gradient", **r} for m, r in rows.items()}
        out.update({m: {"summary": policy_summary(m), **r} for m, r in policy.items()})
        print(json.dumps(out, indent=2))
        return 0
    for title, group in ((f"direct-gradient methods: the four axes (hyperparameters for backbone {args.backbone})",
                          rows), ("policy-gradient methods: their own axes (--set policy.KEY=VALUE)", policy)):
        table = Table(title=title)
        table.add_column("method", style="bold")
        for col in next(iter(group.values())):
            table.add_column(col)
        for m, r in group.items():
            table.add_row(m, *r.values())
        _console().print(table)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from flowbp_ops.backbones.schedules import get_schedule
    from flowbp_ops.surrogate.plan import build_plan

    cfg = methods.get_method(args.method, args.backbone, args.steps, args.set)
    sigmas = get_schedule(args.backbone).sigmas(args.steps, args.resolution)
    plan = build_plan(cfg, sigmas, args.seed)
    d = plan.to_dict()
    d["backbone"], d["config"] = args.backbone, cfg.model_dump()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    console = _console()
    console.print(f"[bold]{plan.method}[/] on {args.backbone}, N={plan.n_steps}, seed={plan.seed}: "
                  f"active {plan.active}, split j={plan.split}, window [{plan.window[0]}, {plan.window[1]}), "
                  f"rescale per segment {[round(f, 4) for f in plan.rescales]}; reward sees {plan.reward_sees()}")
    if plan.draw:
        console.print(f"Bridge draw: pre-split {plan.draw['pre']} (late bias from the window start), "
                      f"j={plan.draw['split']}, post-split {plan.draw['post']} (late bias from j+1)")
    table = Table("segment", "rule", "α at start", "step", "σ_i", "ω_i", "c_i", "active")
    for s in plan.segments:
        for t in s.terms:
            table.add_row(f"[{s.start}, {s.end})", s.rule, f"{s.alpha:g}", str(t.index), f"{plan.sigmas[t.index]:.4f}",
                          f"{t.weight:.5f}", f"{t.scale:.4g}", "grad" if t.active else "cached")
    console.print(table)
    return 0


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from flowbp_ops.fidelity import gradcheck_tiny_dit

    cfg = methods.get_method(args.method, "tiny", args.steps, args.set)
    result = gradcheck_tiny_dit(cfg, args.steps, args.seeds, batch=args.batch, cfg_scale=args.cfg_scale)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table("seed", "cosine", "norm ratio", "active",
                  title=f"gradient fidelity of {args.method}, N={args.steps}")
    for r in result["per_seed"]:
        table.add_row(str(r["seed"]), f"{r['cosine']:.4f}", f"{r['norm_ratio']:.4f}", str(r["active"]))
    s = result["summary"]
    table.add_row("mean", f"{s['cosine_mean']:.4f} ± {s['cosine_std']:.4f}",
                  f"{s['norm_ratio_mean']:.4f} ± {s['norm_ratio_std']:.4f}", "")
    _console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowbp", description="Direct reward backpropagation for flow-matching models.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or set FLOWBP_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("methods", help="the methods and their four axes, as a table")
    m.add_argument("--backbone", default="sd35", choices=list(BACKBONES))
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_methods)

    def method_args(sp: argparse.ArgumentParser, steps: int) -> None:
        sp.add_argument("--method", required=True, help=f"one of {', '.join(methods.METHODS)}")
        sp.add_argument("--steps", type=positive_int, default=steps, help="rollout steps N")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. active.k=5 or bridge.alpha=0.2 (repeatable)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    pl = sub.add_parser("plan", help="the backward surrogate plan of one draw")
    method_args(pl, 25)
    pl.add_argument("--backbone", default="sd35", help=f"one of {', '.join(BACKBONES)}")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--resolution", type=positive_int, default=512, help="image size (sets FLUX's mu)")
    pl.set_defaults(func=_cmd_plan)

    gc = sub.add_parser("gradcheck", help="gradient fidelity against exact backprop on a small random-init DiT")
    method_args(gc, 10)
    gc.add_argument("--seeds", type=positive_int, default=3)
    gc.add_argument("--batch", type=positive_int, default=2)
    gc.add_argument("--cfg-scale", type=finite_float, default=None, help="use real CFG with this scale")
    gc.set_defaults(func=_cmd_gradcheck)

    from flowbp_ops import cli_pipeline, cli_world

    cli_world.add_commands(sub)
    cli_pipeline.add_commands(sub)
    return p


def _torchrun(args: argparse.Namespace, argv: list[str]) -> int | None:
    """``--nproc N`` / ``--nnodes``: run this same command under torchrun (one process per GPU), return its exit
    code; None when it runs here (one process, or already a torchrun worker)."""
    from flowbp_ops.training import distributed

    nproc, nnodes = getattr(args, "nproc", 1), getattr(args, "nnodes", None)
    if distributed.under_torchrun() or (nproc == 1 and nnodes in (None, "1")):
        return None
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give at least 1 process")
    if getattr(args, "name", None):
        from flowbp_ops.stages.graph import require_distributed

        require_distributed(args.name)
    _check_layout(args, nproc * int(str(nnodes or 1).split(":")[-1]))
    worker_argv = _without_launch_args(argv)  # the workers are already launched (and torchrun's parser would
    return distributed.launch(                # take an abbreviation like --nproc for one of its own options)
        distributed.torchrun_args(worker_argv, nproc, nnodes, args.node_rank, args.rdzv_endpoint))


def _check_layout(args: argparse.Namespace, world: int) -> None:
    """The settings and the batch layout on ``world`` processes, checked before any process starts."""
    from flowbp_ops.training.batches import Layout

    if args.command == "train":
        from flowbp_ops.cli_world import train_settings

        cfg = train_settings(args)[0]
        cfg.check_method()
    else:
        from flowbp_ops.params import load_params

        if not args.method and not args.method_of_dvc_stage:
            raise ValueError(f"stage {args.name} needs --method")
        cfg = load_params(args.params, args.set).train
    Layout.of(cfg.global_batch, cfg.batch, world)


def _without_launch_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    """The error boundary: any failure is one line on stderr (the traceback with --debug), exit code 2 for
    what the user can fix, 1 for a flowbp bug, 130 for Ctrl-C."""
    import os

    from flowbp_ops.errors import describe

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        relaunch = _torchrun(args, argv)
        return relaunch if relaunch is not None else args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        if args.debug or os.environ.get("FLOWBP_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        message, code = describe(exc)
        print(f"flowbp: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
