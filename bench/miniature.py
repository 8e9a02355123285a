"""The paper in miniature: every method trained on the default world with the same budget, 3 seeds.

    .venv/bin/python bench/miniature.py --world data/world            # every variant × 3 seeds, 2 jobs
    .venv/bin/python bench/miniature.py --world data/world --report   # tables, tests and plots from saved runs

Each (variant, seed) runs in its own process with one torch thread (two at a time on two cores) and writes
``bench/results/miniature/runs/VARIANT-SEED.json``; finished runs are skipped, so an interrupted sweep continues.
Every run of a seed sees the same prompts and noise at every step (they are functions of (seed, step, slot)),
so methods are compared on the same batches. Per run:

* gradient fidelity of the method's first-step gradient against exact backprop (cosine, norm ratio);
* training (``TrainConfig`` defaults and ``BUDGET``, then ``--set``): per-step training and held-out rewards,
  wall time per step, and the EMA weights judged every 50 steps on a fixed 48-prompt held-out subset (the
  curves at equal steps and at equal wall-clock);
* evaluation of the final EMA weights on all 600 held-out prompts (20 steps, CFG 4): every reward and the
  GenEval-style judge, with each prompt's verdict kept for the paired tests of ``miniature_report``.

The policy-gradient methods (``flow_grpo``, ``flow_grpo_fast``, ``diffusion_nft``) train with the same recipe and
budget (4 images a step: one prompt's group of 4); each run's curve records the model forwards per image, so the
report compares both families at equal steps (= equal images), equal wall-clock and equal forwards.

``refl@endpoint`` and ``drtune@endpoint`` are the paper's Table 4 ablation (the real endpoint through the
connector instead of the posterior mean); ``flowbp_bridge@alpha=A`` the α sweep (the preset is 0.5). The
ablations run on ``--ablation-seeds`` seeds (1 by default: two CPU cores' time), the methods on ``--seeds``.
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
POLICY = ["flow_grpo", "flow_grpo_fast", "diffusion_nft"]  # the policy-gradient family, same recipe and budget
VARIANTS = {m: (m, []) for m in METHODS + POLICY}
VARIANTS["refl@endpoint"] = ("refl", ["reward_input.kind=endpoint"])
VARIANTS["drtune@endpoint"] = ("drtune", ["reward_input.kind=endpoint"])
for _alpha in ("0", "0.25", "1"):
    VARIANTS[f"flowbp_bridge@alpha={_alpha}"] = ("flowbp_bridge", [f"bridge.alpha={_alpha}"])
REWARDS = ["align", "align_heldout", "quality", "quality_heldout"]
ABLATIONS = [v for v in VARIANTS if "@" in v]
# the main job's recipe (TrainConfig's defaults: 300 steps of 4 prompts, the pre-training regulariser), and the
# EMA weights judged every 50 steps on a fixed 48-prompt held-out subset
BUDGET = ["ema_eval_every=50", "ema_eval_prompts=48"]


def run_one(world: str, variant: str, seed: int, sets: list[str], out_file: Path) -> None:
    import torch
    from surrogate_bench import measure

    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.cli_world import load_prompts, split_sets
    from flowbp_ops.determinism import pin_cpu
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.sampling import generate
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import train
    from flowbp_ops.world.judge import load_judge

    pin_cpu(1)
    backbone = DefaultBackbone(world)
    rewards = {n: get_reward(n, world_dir=world) for n in REWARDS}
    judge = load_judge(world)
    train_prompts, test_prompts = load_prompts(Path(world), "train"), load_prompts(Path(world), "test")
    result: dict = {"variant": variant, "seed": seed}
    if variant != "base":
        method, overrides = VARIANTS[variant]
        run_sets, method_sets = split_sets(BUDGET + sets)
        cfg = TrainConfig(method=method, seed=seed, method_overrides=overrides + method_sets, **run_sets)
        cfg.checkpoint_every = cfg.steps
        result["config"] = cfg.model_dump(mode="json")
        # gradient fidelity is a direct-gradient notion (a policy gradient estimates another quantity)
        result["fidelity"] = None if method in POLICY else fidelity(backbone, cfg, rewards[cfg.reward], train_prompts)
        curve: list[dict] = []

        class Collect:
            def on_step(self, step, m):
                curve.append({"step": step, **{k: v for k, v in m.items() if isinstance(v, (int, float))}})

        with tempfile.TemporaryDirectory() as tmp:
            _, peak_mb = measure(lambda: train(cfg, backbone, train_prompts, tmp, callbacks=[Collect()],
                                               reward_kwargs={"world_dir": world}, eval_prompts=test_prompts,
                                               judge=judge))
        result.update(curve=curve, peak_mb=peak_mb,
                      time_step=statistics.median(c["time_step"] for c in curve[1:] or curve))
    images = generate(backbone, test_prompts, 20, 4.0, seed=42)
    with torch.no_grad():
        result["eval"] = {f"reward/{n}": float(r(images, test_prompts).mean()) for n, r in rewards.items()}
    verdict = judge(images, test_prompts)
    result["eval"].update({"geneval/overall": verdict.overall,
                           **{f"geneval/{t}": a for t, a in verdict.tag_accuracy.items()}})
    result["correct"] = [bool(c) for c in verdict.correct]  # per held-out prompt, for the paired tests
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


def connector(world: str, out_file: Path, n_steps: int = 25, prompts: int = 64) -> dict:
    """The paper's Fig. 7 on the base model: how far a leap's estimate of ``x_j`` lands from the cached ``x_j``,
    single velocity (LeapAlign) vs Lagrange quadrature of order 3 (FlowBP-Lagrange), by leap length j − k."""
    import numpy as np
    import torch

    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.cli_world import load_prompts
    from flowbp_ops.determinism import pin_cpu
    from flowbp_ops.sampling import initial_noise
    from flowbp_ops.surrogate.quadrature import lagrange_weights, support_indices
    from flowbp_ops.surrogate.rollout import rollout

    pin_cpu(2)
    bb = DefaultBackbone(world)
    ps = load_prompts(Path(world), "test")[:prompts]
    sigmas = bb.sigmas(n_steps)
    with torch.no_grad():
        cache = rollout(bb.denoiser(4.0), initial_noise(bb.latent_shape(1)[1:], range(42, 42 + len(ps))), sigmas,
                        bb.conditioning(ps, 4.0))
    x, v = torch.stack(cache.x).double(), torch.stack(cache.v).double()
    rows: dict[int, dict[str, list[float]]] = {}
    for k in range(n_steps):
        for j in range(k + 1, n_steps + 1):
            truth = x[j]
            leap = x[k] + (sigmas[j] - sigmas[k]) * v[k]
            sup = support_indices(k, j, 3)
            weights = lagrange_weights(sigmas[sup], sigmas[k], sigmas[j])
            quad = x[k] + sum(float(w) * v[s] for s, w in zip(sup, weights))
            norm = (truth - x[k]).flatten(1).norm(dim=1)
            row = rows.setdefault(j - k, {"leap": [], "lagrange": []})
            row["leap"] += ((leap - truth).flatten(1).norm(dim=1) / norm).tolist()
            row["lagrange"] += ((quad - truth).flatten(1).norm(dim=1) / norm).tolist()
    table = {str(L): {name: float(np.mean(vals)) for name, vals in r.items()} for L, r in sorted(rows.items())}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({"n_steps": n_steps, "prompts": len(ps), "relative_residual": table}, indent=1))
    return table


def sweep(args) -> None:
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    jobs = [("base", 0)] + [(v, s) for s in range(args.seeds) for v in args.variants
                            if v not in ABLATIONS or s < args.ablation_seeds]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="data/world")
    p.add_argument("--out", default="bench/results/miniature")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ablation-seeds", type=int, default=1, help="seeds of the endpoint and α variants")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training settings for every run")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only rebuild the tables and plots")
    args = p.parse_args()
    if args.one:
        v, s = args.one
        run_one(args.world, v, int(s), args.set, Path(args.out) / "runs" / f"{v}-{s}.json")
        return
    if not args.report:
        if not (Path(args.out) / "connector.json").exists():
            connector(args.world, Path(args.out) / "connector.json")
        sweep(args)
    from miniature_report import report

    report(Path(args.out), list(VARIANTS))


if __name__ == "__main__":
    main()
