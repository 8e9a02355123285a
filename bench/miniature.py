"""The paper in miniature: every method trained on the default world with the same budget.

    .venv/bin/python bench/miniature.py --world data/world            # all variants × 3 seeds, 2 jobs
    .venv/bin/python bench/miniature.py --world data/world --report   # table + curves from saved runs

Each (variant, seed) runs in its own process with one torch thread (two at a time on two
cores) and writes ``bench/results/miniature/runs/VARIANT-SEED.json``; finished runs are
skipped, so an interrupted sweep continues where it stopped. Per run:

* gradient fidelity of the method's first-step gradient (base model, CFG 4, N = 10,
  batch 2, loss = hinge on the training reward) against exact backprop through every step
  and both CFG branches: cosine and norm ratio, all transformer weights;
* training (``TrainConfig`` defaults unless ``--set``): per-step reward and held-out rewards;
  wall time per step (median) and the peak resident memory growth of the training call;
* evaluation of the EMA weights on every held-out prompt (20 steps, CFG 4): all four rewards
  and the attribute accuracy of the held-out classifier.

``base`` is the untrained model, evaluated the same way. ``refl@endpoint`` and
``drtune@endpoint`` are the paper's ablation: the real endpoint through the connector
instead of the posterior mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ["refl", "draft_k", "draft_lv", "alignprop", "drtune", "leapalign",
           "flowbp_sparse", "flowbp_bridge", "flowbp_lagrange"]
VARIANTS = {m: (m, []) for m in METHODS}
VARIANTS["refl@endpoint"] = ("refl", ["reward_input.kind=endpoint"])
VARIANTS["drtune@endpoint"] = ("drtune", ["reward_input.kind=endpoint"])
REWARDS = ["align", "align_heldout", "quality", "quality_heldout"]


def run_one(world: str, variant: str, seed: int, sets: list[str], out_file: Path) -> None:
    import torch
    from surrogate_bench import measure

    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.cli_world import load_prompts, split_sets
    from flowbp_ops.evaluation import evaluate
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import train

    torch.set_num_threads(1)
    backbone = DefaultBackbone(world)
    rewards = {n: get_reward(n, world_dir=world) for n in REWARDS}
    test_prompts = load_prompts(Path(world), "test")
    result: dict = {"variant": variant, "seed": seed}
    if variant != "base":
        method, overrides = VARIANTS[variant]
        run_sets, method_sets = split_sets(sets)
        cfg = TrainConfig(method=method, seed=seed, method_overrides=overrides + method_sets, **run_sets)
        cfg.checkpoint_every = cfg.steps
        result["config"] = cfg.model_dump(mode="json")
        result["fidelity"] = fidelity(backbone, cfg, rewards[cfg.reward], load_prompts(Path(world), "train"))
        curve: list[dict] = []

        class Collect:
            def on_step(self, step, m):
                curve.append({"step": step, **{k: v for k, v in m.items() if isinstance(v, (int, float))}})

        with tempfile.TemporaryDirectory() as tmp:
            _, peak_mb = measure(lambda: train(cfg, backbone, load_prompts(Path(world), "train"), tmp,
                                               callbacks=[Collect()], reward_kwargs={"world_dir": world}))
        result.update(curve=curve, peak_mb=peak_mb,
                      time_step=statistics.median(c["time_step"] for c in curve[1:] or curve))
    result["eval"] = evaluate(backbone, test_prompts, rewards, 20, 4.0, rewards["align_heldout"].net)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = out_file.with_suffix(".partial")
    tmp_file.write_text(json.dumps(result))
    tmp_file.rename(out_file)


def fidelity(backbone, cfg, reward, prompts: list[str]) -> dict:
    """Cosine / norm ratio of the method's gradient vs exact backprop, on the base weights."""
    import torch

    from flowbp_ops.fidelity import gradient_fidelity
    from flowbp_ops.methods import get_method
    from flowbp_ops.surrogate.plan import build_plan

    tr = backbone.transformer
    tr.requires_grad_(True)
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    batch = [prompts[i] for i in torch.randint(0, len(prompts), (2,), generator=g).tolist()]
    x0 = torch.randn(backbone.latent_shape(2), generator=g)
    method = get_method(cfg.method, cfg.backbone, cfg.rollout_steps, cfg.method_overrides)
    plan = build_plan(method, backbone.sigmas(cfg.rollout_steps), seed=cfg.seed * 1_000_003)

    def loss_fn(y):
        return torch.relu(cfg.r_max - reward(backbone.decode(y), batch * (len(y) // len(batch))))

    out = gradient_fidelity(backbone.denoiser(cfg.guidance), list(tr.parameters()), plan, x0,
                            backbone.conditioning(batch, cfg.guidance), loss_fn)
    tr.requires_grad_(False)
    return out


def sweep(args) -> None:
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    jobs = [("base", 0)] + [(v, s) for v in args.variants for s in range(args.seeds)]
    todo = [(v, s) for v, s in jobs if not (runs / f"{v}-{s}.json").exists()]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

    def launch(job):
        v, s = job
        cmd = [sys.executable, __file__, "--world", args.world, "--one", v, str(s), "--out", args.out]
        cmd += [x for item in args.set for x in ("--set", item)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        status = "ok" if done.returncode == 0 else f"FAILED\n{done.stderr[-2000:]}"
        print(f"{v} seed {s}: {status}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, todo))


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def report(args) -> None:
    runs = Path(args.out) / "runs"
    rows = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    head = ("| method | align (train reward) | align_heldout | quality | quality_heldout | attribute acc "
            "| s/step | peak MB | grad cosine | norm ratio |")
    lines = [head, "|" + "---|" * 10]
    summary = {}
    for v in ["base"] + [v for v in VARIANTS if v in by]:
        rs = by.get(v, [])
        if not rs:
            continue
        ev = {k: [r["eval"][k] for r in rs] for k in [f"reward/{n}" for n in REWARDS] + ["acc_all"]}
        tr = [r for r in rs if "curve" in r]
        cells = [_mean_std(ev[f"reward/{n}"]) for n in REWARDS] + [_mean_std(ev["acc_all"])]
        if tr:
            cells += [f"{statistics.fmean(r['time_step'] for r in tr):.2f}",
                      f"{statistics.fmean(r['peak_mb'] for r in tr):.0f}",
                      _mean_std([r["fidelity"]["cosine"] for r in tr]),
                      _mean_std([r["fidelity"]["norm_ratio"] for r in tr])]
        else:
            cells += ["—"] * 4
        lines.append(f"| `{v}` ({len(rs)} seed{'s' * (len(rs) > 1)}) | " + " | ".join(cells) + " |")
        summary[v] = {k: statistics.fmean(x) for k, x in ev.items()}
    table = "\n".join(lines)
    (Path(args.out) / "table.md").write_text(table + "\n")
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    from flowbp_ops.comparison import plot_curves

    plot_curves({v: [r["curve"] for r in rs if "curve" in r] for v, rs in by.items()}, Path(args.out) / "curves.png",
                title="default world: batch mean over 3 seeds, moving average of 5 steps")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="data/world")
    p.add_argument("--out", default="bench/results/miniature")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training settings for every run")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only rebuild the table and curves")
    args = p.parse_args()
    if args.one:
        v, s = args.one
        run_one(args.world, v, int(s), args.set, Path(args.out) / "runs" / f"{v}-{s}.json")
        return
    if not args.report:
        sweep(args)
    report(args)


if __name__ == "__main__":
    main()
