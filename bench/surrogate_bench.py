"""Surrogate benchmark on a small SD3-architecture DiT on CPU: memory and time per training step.

For N in {10, 25, 50} and every method (one-pass, plus the two-pass form and full backprop
for comparison) it measures

* peak memory of one training step (rollout + composition + backward): the rise of the
  process's peak resident set over its resident set just before the step (Linux VmHWM,
  reset through /proc/self/clear_refs), measured in a child process whose glibc mmap
  threshold is pinned so freed tensors leave the resident set at once (that slows every
  allocation, so timings come from the parent, with the default allocator);
* step time: the median of two runs for each of 3 seeds (each seed draws its own plan);
  the ratio to the limit is the median of per-run ratios, each against unit costs measured
  just before that run (the VM's speed drifts by tens of percent over seconds); torch runs
  on one thread by default, which leaves a core to the OS;
* the physical limit measured in the same run: ``T_f·(rollout steps) + |A|·(T_fb − T_f)
  + lv_copies·T_fb``, where ``T_f`` is a no-grad forward and ``T_fb`` a forward+backward with
  gradient of the same denoiser call (real CFG; negative branch without gradient, or with it
  for the exact references, which differentiate both branches). Checkpointing's recompute
  is not part of the limit.

Run: ``python bench/surrogate_bench.py`` (about 20 minutes on 2 CPU cores); it writes
``bench/results/surrogate.json`` and prints the markdown table of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.backbones.sd3 import SD3Velocity, random_conditioning, tiny_sd3_transformer
from flowbp_ops.methods import METHODS, get_method
from flowbp_ops.surrogate import CFGCond, Denoiser, build_plan, surrogate_step

# a "small DiT": 256 image tokens, hidden 128 (environment.md: ~29 ms forward at batch 4)
BENCH_DIT = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
                 pooled_projection_dim=64, pos_embed_max_size=32)
_libc = ctypes.CDLL("libc.so.6")


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def measure(fn):
    """(seconds, peak MB above the resident set before the call)."""
    gc.collect()
    _libc.malloc_trim(0)
    before = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (_status_kb("VmHWM:") - before) / 1024


def timed(fn) -> float:
    """Wall seconds of one call (no memory bookkeeping: the unit costs are taken often)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "custom"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 leaves a core to the OS and makes timings far steadier on 2 cores")
    ap.add_argument("--phase", choices=["all", "time", "memory"], default="all", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/surrogate.json")
    args = ap.parse_args()
    if args.phase == "all":
        # memory is measured in a child whose glibc returns every large block at once (pinned mmap
        # threshold); that costs page faults, so time is measured here, with the default allocator
        rows = run(args, "time")
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", "memory", "--out", f.name]
            subprocess.run(cmd, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            mem = {(r["method"], r["steps"]): r for r in json.loads(Path(f.name).read_text())["rows"]}
        for r in rows:
            r.update(peak_mb=mem[(r["method"], r["steps"])]["peak_mb"],
                     cache_mb=mem[(r["method"], r["steps"])]["cache_mb"])
    else:
        rows = run(args, args.phase)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s)",
              "torch": torch.__version__, "model": "SD3Transformer2DModel " + json.dumps(BENCH_DIT),
              "batch": args.batch, "cfg_scale": 3.5, "seeds": args.seeds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.phase == "all":
        print()
        print(markdown(result))


def run(args, phase: str) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = tiny_sd3_transformer(0, **BENCH_DIT)
    params = [p for p in model.parameters()]
    c = model.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = CFGCond(random_conditioning(model, args.batch, seed=1), random_conditioning(model, args.batch, seed=2))
    den = Denoiser(SD3Velocity(model), cfg_scale=3.5)
    both_branches = Denoiser(SD3Velocity(model), cfg_scale=3.5, detach_neg=False)
    u = torch.randn(x0.shape[1:], generator=g)

    def loss_of(out):
        return (out.w * -torch.tanh(out.y * u).flatten(1).mean(1)).mean()

    # the unit costs of the physical limit: a no-grad forward and a forward+backward with gradient
    # (negative CFG branch without gradient; both branches for the exact references)
    def fwd():
        with torch.no_grad():
            den(x0, 0.5, cond)

    def fwd_bwd(d):
        v = d(x0, 0.5, cond)
        torch.autograd.grad((v * u).sum(), params, allow_unused=True)

    def unit_costs(detach_neg: bool):
        """(T_f, T_fb): medians of 3, measured right before every timed step so drift cancels."""
        d = den if detach_neg else both_branches
        return (statistics.median(timed(fwd) for _ in range(3)),
                statistics.median(timed(lambda: fwd_bwd(d)) for _ in range(3)))

    for _ in range(3):
        fwd(), fwd_bwd(den)

    variants = [(m, m, {}) for m in args.methods]
    variants += [(f"{m} (two-pass)", m, {"execution.mode": "two_pass"}) for m in ("flowbp_sparse", "flowbp_lagrange")]
    variants += [("full backprop", "draft_k", {"active.k": "N", "execution.checkpoint": False}),
                 ("full backprop (checkpointed)", "draft_k", {"active.k": "N", "execution.checkpoint": True})]
    rows = []
    # one variant at a time over all N, the big full-backprop steps last, so that every
    # row's memory baseline is alike (no heap left fragmented by a larger step before it)
    for label, method, overrides in variants:
        for n in args.steps:
            sigmas = get_schedule("tiny").sigmas(n)
            cfg = get_method(method, "tiny", n, overrides={k: (n if v == "N" else v) for k, v in overrides.items()})
            times, peaks, limits, cache_mb, units = [], [], [], [], []
            for seed in range(args.seeds):
                plan = build_plan(cfg, sigmas, seed)

                def step():
                    out = surrogate_step(den, plan, x0, cond)
                    torch.autograd.grad(loss_of(out), params, allow_unused=True)
                    # the rollout cache (x_0..x_n, v_0..v_{n-1}): by design 2 latents per step
                    cache_mb.append(sum(t[0].untyped_storage().nbytes() for t in (out.cache.x, out.cache.v)) / 2**20)

                if seed == 0:
                    step()  # warm-up
                if phase == "memory":
                    peaks.append(measure(step)[1])
                    continue
                for _ in range(2):
                    t_f, t_fb = unit_costs(plan.cfg_detach_neg)
                    units.append((t_f, t_fb))
                    limit = t_f * plan.rollout_steps + len(plan.active) * (t_fb - t_f) + plan.lv_copies * t_fb
                    times.append(timed(step))
                    limits.append(limit)
            row = {"method": label, "steps": n, "active": len(plan.active), "cache_mb": max(cache_mb)}
            if phase == "memory":
                row["peak_mb"] = max(peaks)
                print(f"N={n:3d} {label:30s} peak {row['peak_mb']:.1f} MB (cache {row['cache_mb']:.1f} MB)",
                      flush=True)
            else:
                row.update(t_f=statistics.median(u[0] for u in units), t_fb=statistics.median(u[1] for u in units),
                           step_s=statistics.median(times), limit_s=statistics.median(limits),
                           ratio=statistics.median(t / lim for t, lim in zip(times, limits)))
                print(f"N={n:3d} {label:30s} |A|={row['active']:3d} step {row['step_s']:.3f}s "
                      f"limit {row['limit_s']:.3f}s ratio {row['ratio']:.3f}", flush=True)
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    steps = sorted({r["steps"] for r in rows})
    by = {(r["method"], r["steps"]): r for r in rows}
    labels = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"N={n}: step s (×limit) | peak MB" for n in steps) + \
           f" | peak growth N={steps[0]}→{steps[-1]} | same, less the rollout cache |"
    lines = [head, "|" + "---|" * (2 * len(steps) + 3)]
    for lab in labels:
        cells = []
        for n in steps:
            r = by[(lab, n)]
            cells += [f"{r['step_s']:.3f} ({r['ratio']:.2f}×)", f"{r['peak_mb']:.1f}"]
        lo, hi = by[(lab, steps[0])], by[(lab, steps[-1])]
        growth = hi["peak_mb"] / lo["peak_mb"] - 1
        net = (hi["peak_mb"] - hi["cache_mb"]) / (lo["peak_mb"] - lo["cache_mb"]) - 1
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {growth * 100:+.1f}% | {net * 100:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
