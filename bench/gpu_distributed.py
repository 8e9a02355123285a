r"""Full fine-tuning across N GPUs: FSDP2 on the full-size SD3.5-M / FLUX.1-dev / FLUX.2-Klein-base-9B transformer,
for when a multi-GPU machine is lent (the memory table in the README is computed until then).

    torchrun --standalone --nproc-per-node 8 bench/gpu_distributed.py --arch flux1 \
        --out bench/results/gpu_fsdp_flux1.json
    torchrun --standalone --nproc-per-node 2 bench/gpu_distributed.py --arch sd35 \
        --smoke   # CPU, gloo: checks the script

The transformer is built from its published config on the meta device, sharded with flowbp's own
``training.distributed.fsdp_shard`` (``fully_shard`` per block, then the root; bf16 compute, float32 master weights
and reductions), materialised on the GPUs and filled with random weights (nothing can be downloaded).
Each timed step is flowbp's: one surrogate step of the method at 512² with 25-step rollouts, backward,
clip, AdamW, EMA. Reported per configuration: step time and the peak GPU memory of the worst rank
(weights + gradients + AdamW + EMA shards, gathered blocks, activations). The loss is a fixed random
function of the endpoint latent (VAE and reward add the same memory to every method; see the README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_fullsize import FULL, SMOKE  # noqa: E402  (the configs, shared with the single-GPU bench)


def build(arch: str, device: str, smoke: bool):
    """The transformer (meta init, then sharded and materialised), its denoiser, a latent and a conditioning."""
    import importlib

    from flowbp_ops.surrogate.rollout import CFGCond, Denoiser

    config = (SMOKE if smoke else FULL)[arch]
    classes = {"sd35": ("SD3Transformer2DModel", "flowbp_ops.backbones.sd3", "SD3Velocity"),
               "flux1": ("FluxTransformer2DModel", "flowbp_ops.backbones.flux1", "FluxVelocity"),
               "flux2": ("Flux2Transformer2DModel", "flowbp_ops.backbones.flux2", "Flux2Velocity")}
    cls_name, module, velocity_name = classes[arch]
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    return model, config, importlib.import_module(module), velocity_name, CFGCond, Denoiser


def main() -> None:
    from flowbp_ops.backbones.schedules import get_schedule
    from flowbp_ops.methods import get_method
    from flowbp_ops.surrogate.compose import surrogate_step
    from flowbp_ops.surrogate.plan import build_plan
    from flowbp_ops.training import distributed
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.distributed import fsdp_shard
    from flowbp_ops.training.ema import EMA

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["sd35", "flux1", "flux2"], default="sd35")
    ap.add_argument("--methods", nargs="+", default=["flowbp_sparse", "flowbp_lagrange"])
    ap.add_argument("--batch", type=int, default=2, help="samples per GPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    dist, device = distributed.setup("cpu" if a.smoke else "cuda")
    cuda = device.startswith("cuda")
    model, config, mod, velocity_name, CFGCond, Denoiser = build(a.arch, device, a.smoke)
    cfg = TrainConfig(method=a.methods[0], backbone=a.arch, finetune="full",
                      precision="bf16" if cuda else "fp32", gradient_checkpointing=True)
    fsdp_shard(model, cfg.precision)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(0, 0.02)
    model.requires_grad_(True)
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    ema = EMA(params, 0.995, warmup=False)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(dist.rank)
    if a.arch == "sd35":
        side = config["sample_size"] if a.smoke else 64
        x0 = torch.randn(a.batch, 16, side, side, generator=g).to(device)
        tokens = lambda: torch.randn(a.batch, 333, config["joint_attention_dim"], generator=g).to(device, dtype)  # noqa
        pooled = lambda: torch.randn(a.batch, config["pooled_projection_dim"], generator=g).to(device, dtype)  # noqa
        cond = CFGCond({"tokens": tokens(), "pooled": pooled()}, {"tokens": tokens(), "pooled": pooled()})
        den = Denoiser(getattr(mod, velocity_name)(model), cfg_scale=3.5)
    elif a.arch == "flux1":
        side = 4 if a.smoke else 32
        ids = torch.zeros(side * side, 3)
        ids[:, 1] = torch.arange(side).repeat_interleave(side)
        ids[:, 2] = torch.arange(side).repeat(side)
        x0 = torch.randn(a.batch, side * side, 64, generator=g).to(device)
        cond = {"tokens": torch.randn(a.batch, 512, config["joint_attention_dim"], generator=g).to(device, dtype),
                "pooled": torch.randn(a.batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
                "txt_ids": torch.zeros(a.batch, 512, 3, device=device)}
        den = Denoiser(getattr(mod, velocity_name)(model, ids.to(device), 4.0), cfg_scale=None)
    else:
        side = 4 if a.smoke else 32
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
        txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(512))
        x0 = torch.randn(a.batch, side * side, config["in_channels"], generator=g).to(device)
        one = lambda: {"tokens": torch.randn(a.batch, 512, config["joint_attention_dim"], generator=g)  # noqa: E731
                       .to(device, dtype), "txt_ids": txt[None].expand(a.batch, -1, -1).to(device)}
        cond = CFGCond(one(), one())
        den = Denoiser(getattr(mod, velocity_name)(model, ids[None].to(device)), cfg_scale=4.0)
    u = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(3)).to(device)
    sigmas = get_schedule(a.arch).sigmas(25, 512)
    rows = []
    for method in a.methods:
        mcfg = get_method(method, a.arch, 25)
        times, peaks = [], []
        for seed in range(a.repeats + 1):
            plan = build_plan(mcfg, sigmas, seed)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                out = surrogate_step(den, plan, x0, cond)
                loss = (out.w * -torch.tanh(out.y.float() * u).flatten(1).mean(1)).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(params)
            if cuda:
                torch.cuda.synchronize()
            if seed:  # the first is warm-up
                times.append(time.perf_counter() - t0)
                peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
        worst_peak = max(peaks)
        if dist.active:
            t = torch.tensor([worst_peak], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            worst_peak = float(t)
        rows.append({"method": method, "gpus": dist.world, "batch_per_gpu": a.batch,
                     "step_s": statistics.median(times), "peak_gb_worst_rank": worst_peak})
        if dist.main:
            print(json.dumps(rows[-1]), flush=True)
    if dist.main and a.out:
        n = sum(p.numel() for p in model.parameters())
        Path(a.out).write_text(json.dumps({"arch": a.arch, "params_b": n / 1e9, "torch": torch.__version__,
                                           "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
                                           "rows": rows}, indent=2))
    distributed.teardown()


if __name__ == "__main__":
    main()
