"""A LoRA training step: the authors' structure against flowbp's execution, same model, same plan, same numerics.

    .venv/bin/python bench/step_speed.py            # Sparse, Bridge, Lagrange at N = 10, 25, 50 (~15 min on 2 cores)

The authors' structure (their released trainers, spec §6): an eager rollout on the unmerged LoRA model, then one
checkpointed re-forward per active step, one after another (``execution.mode=two_pass, checkpoint=true,
merged_rollout=false``). flowbp: the no-grad forwards on merged weights (optionally compiled), the active
forwards inside the rollout (one_pass) or batched after it, checkpointing only when the activations would not fit
(they fit here). Every configuration runs the same plans (3 seeds) on the same inputs, interleaved, twice; the
step time is the median. One step = rollout + composition + loss + backward to the LoRA weights.

The FLOP bound: the floating-point operations of flowbp's one-pass step counted by ``torch.utils.flop_counter``
(matmuls and attention) over the best matmul rate this process reaches (a 1024³ float32 matmul on the same
threads): no schedule can take less time than that. Writes ``bench/results/step_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig
from surrogate_bench import BENCH_DIT

from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.backbones.sd3 import SD3Velocity, random_conditioning, tiny_sd3_transformer
from flowbp_ops.backbones.table import lora_targets
from flowbp_ops.methods import get_method
from flowbp_ops.surrogate import CFGCond, Denoiser, build_plan, surrogate_step
from flowbp_ops.surrogate.runtime import Runtime
from flowbp_ops.training.fast_rollout import fast_denoiser

AUTHORS = {"execution.mode": "two_pass", "execution.checkpoint": True, "execution.merged_rollout": False}
FLOWBP = {
    "one_pass, merged": {"execution.mode": "one_pass"},
    "batched, merged": {"execution.mode": "batched"},
    "one_pass, merged, compiled": {"execution.mode": "one_pass", "execution.compile_rollout": True},
    "batched, merged, compiled": {"execution.mode": "batched", "execution.compile_rollout": True},
}


def matmul_rate(threads: int) -> float:
    """The best float32 FLOP/s of a 1024³ matmul on this process's threads (best of 5)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 1024 ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--methods", nargs="+", default=["flowbp_sparse", "flowbp_bridge", "flowbp_lagrange"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled configurations")
    ap.add_argument("--out", default="bench/results/step_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = tiny_sd3_transformer(0, **BENCH_DIT)
    model.requires_grad_(False)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                 target_modules=lora_targets("sd35")))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained adapter (B = 0 at init)
    c = model.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = CFGCond(random_conditioning(model, args.batch, seed=1), random_conditioning(model, args.batch, seed=2))
    u = torch.randn(x0.shape[1:], generator=g)
    base = Denoiser(SD3Velocity(model), cfg_scale=3.5)
    rate = matmul_rate(args.threads)
    rows, decisions = compare_structures(model, base, x0, cond, params, args.methods, args.steps, args.seeds, "sd35",
                                         lambda y: -torch.tanh(y * u), compile_rollout=not args.no_compile,
                                         flop_rate=rate)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s)",
              "torch": torch.__version__, "model": "SD3Transformer2DModel " + json.dumps(BENCH_DIT),
              "lora_rank": args.rank, "batch": args.batch, "cfg_scale": 3.5, "seeds": args.seeds,
              "matmul_flops_per_s": rate, "decisions": decisions, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print()
    print(markdown(result))


def compare_structures(model, base: Denoiser, x0, cond, params, methods, steps, seeds: int, arch: str, objective,
                       sigmas_of=None, compile_rollout: bool = True, flop_rate: float | None = None, sync=lambda: None,
                       autocast: torch.dtype | None = None, block_checkpointing: bool = False):
    """Every configuration on the same plans and inputs, interleaved; per (method, N) the median step times, the
    best flowbp configuration and its speedup. ``block_checkpointing``: the authors' transformer-level gradient
    checkpointing, on for their structure and left to the memory planner for flowbp's. Returns (rows, the
    measured decisions of each configuration). ``sigmas_of(n)``: the schedule (default: the arch's)."""
    configs = {"authors": AUTHORS, **{k: v for k, v in FLOWBP.items() if compile_rollout or "compiled" not in k}}
    denoisers, runtimes = {}, {}
    for name, over in configs.items():
        ex = get_method("flowbp_sparse", arch, 10, overrides=over).execution
        denoisers[name], runtimes[name] = fast_denoiser(base, model, ex), Runtime()
    device = x0.device.type

    def step(name, plan):
        if block_checkpointing:
            model.enable_gradient_checkpointing() if name == "authors" else model.disable_gradient_checkpointing()
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = surrogate_step(denoisers[name], plan, x0, cond, runtime=runtimes[name])
            loss = (out.w * objective(out.y.float()).flatten(1).mean(1)).mean()
        torch.autograd.grad(loss, params)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    rows = []
    for method in methods:
        for n in steps:
            sigmas = (sigmas_of or get_schedule(arch).sigmas)(n)
            plans = {name: [build_plan(get_method(method, arch, n, overrides=over), sigmas, seed)
                            for seed in range(seeds)] for name, over in configs.items()}
            for name in configs:  # warm-up (and compilation) outside the timings
                step(name, plans[name][0])
            times: dict[str, list[float]] = {name: [] for name in configs}
            for _ in range(2):
                for seed in range(seeds):
                    for name in configs:
                        times[name].append(timed(lambda: step(name, plans[name][seed])))
            med = {name: statistics.median(t) for name, t in times.items()}
            best = min((k for k in med if k != "authors"), key=med.get)
            row = {"method": method, "steps": n, "active": len(plans["authors"][0].active), "step_s": med,
                   "best": best, "speedup": med["authors"] / med[best]}
            if flop_rate:
                from torch.utils.flop_counter import FlopCounterMode

                flops = []
                for seed in range(seeds):
                    with FlopCounterMode(display=False) as fc:
                        step("one_pass, merged", plans["one_pass, merged"][seed])
                    flops.append(fc.get_total_flops())
                bound = statistics.median(flops) / flop_rate
                row.update(flops=statistics.median(flops), flop_bound_s=bound, best_over_bound=med[best] / bound)
            rows.append(row)
            print(f"{method:16s} N={n:2d} |A|={row['active']:2d} authors {med['authors']:.3f}s  best ({best}) "
                  f"{med[best]:.3f}s  ×{row['speedup']:.2f}" + (f"  bound {row['flop_bound_s']:.3f}s "
                                                                  f"({row['best_over_bound']:.1f}× it)"
                                                                  if flop_rate else ""), flush=True)
    return rows, {k: r.log for k, r in runtimes.items()}


def markdown(result: dict) -> str:
    names = list(result["rows"][0]["step_s"])
    lines = ["| method | N | active | " + " | ".join(names)
             + " | speedup (authors / best) | FLOP bound s | best / bound |",
             "|" + "---|" * (len(names) + 6)]
    for r in result["rows"]:
        cells = [f"{r['step_s'][k]:.3f}" for k in names]
        lines.append(f"| {r['method']} | {r['steps']} | {r['active']} | " + " | ".join(cells)
                     + f" | **{r['speedup']:.2f}×** | {r['flop_bound_s']:.3f} | {r['best_over_bound']:.1f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
