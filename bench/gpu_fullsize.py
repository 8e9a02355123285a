"""Full-size proof on a GPU: every method on the SD3.5-M transformer (and FLUX.1-dev, FLUX.2-Klein-base-9B
where memory allows).

    python bench/gpu_fullsize.py --arch sd35 --out bench/results/gpu_sd35.json     # ~6 min on an H100/H200
    python bench/gpu_fullsize.py --arch flux2 --out bench/results/gpu_flux2.json   # real CFG, batch 2
    python bench/gpu_fullsize.py --arch sd35 --policy --methods flowbp_bridge --out bench/results/gpu_policy_sd35.json
        # the policy-gradient family beside FlowBP at full size: step time, memory, forwards per image
    python bench/gpu_fullsize.py --arch sd35 --structure --out bench/results/gpu_structure_sd35.json
        # the authors' structure vs flowbp's execution (merged, compiled + CUDA graphs, batched) for
        # Sparse / Bridge / Lagrange, as bench/step_speed.py on CPU

Builds the real transformer architecture from its published config (random init, bf16 — no
weights can be downloaded), attaches a peft LoRA (rank 32) with gradient checkpointing, and
for 512×512 latents, 25-step rollouts with CFG (batch 2, SD3.5) or embedded guidance (FLUX.1),
measures per method: peak GPU memory of a training step, its wall time, and the physical
limit measured in the same run (one no-grad rollout + |A| forward/backward passes), plus full
backprop (checkpointed) for comparison. The loss is a fixed random differentiable function of
the endpoint latent (the VAE decode and the reward model are the same for every method and
are left out). Targets: every surrogate within 1.15× of its limit; peak memory independent
of N (run ``--steps 10 25 50`` to see it).

The GPU machine's image has torch but not diffusers: carry the wheel
(``pip download --no-deps --only-binary=:all: --python-version 3.12 diffusers==0.42.1
importlib_metadata -d wheels``) and ``pip install wheels/*`` first. On torch 2.11 the FLUX.1
backward crashes in the cuDNN attention backend; it is disabled here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.backbones.table import lora_targets
from flowbp_ops.backbones.tiny import FULL
from flowbp_ops.methods import METHODS, get_method
from flowbp_ops.surrogate.compose import surrogate_step
from flowbp_ops.surrogate.plan import build_plan
from flowbp_ops.surrogate.rollout import CFGCond, Denoiser

# --smoke: the same code on CPU with small configs of the same architectures (checks the script, not the card)
SMOKE = {"sd35": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                      pooled_projection_dim=16, pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,)),
         "flux1": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, guidance_embeds=True,
                       axes_dims_rope=(4, 6, 6)),
         "flux2": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=16,
                       axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)}


def build(arch: str, device: str, smoke: bool = False):
    from peft import LoraConfig

    torch.manual_seed(0)
    config = (SMOKE if smoke else FULL)[arch]
    dtype = torch.float32 if smoke else torch.bfloat16
    if arch == "sd35":
        from diffusers import SD3Transformer2DModel

        from flowbp_ops.backbones.sd3 import SD3Velocity

        model = SD3Transformer2DModel(**config).to(device, dtype)
        targets, velocity = lora_targets("sd35"), SD3Velocity(model)
        side = config["sample_size"] if smoke else 64  # 512×512 pixels = 64×64 latents
        x0 = torch.randn(2, 16, side, side, device=device)

        def cond(seed):
            g = torch.Generator(device).manual_seed(seed)
            return {"tokens": torch.randn(2, 333, config["joint_attention_dim"], device=device, generator=g,
                                          dtype=dtype),
                    "pooled": torch.randn(2, config["pooled_projection_dim"], device=device, generator=g, dtype=dtype)}

        den = Denoiser(velocity, cfg_scale=3.5)
        conditioning = CFGCond(cond(1), cond(2))
    elif arch == "flux2":
        from diffusers import Flux2Transformer2DModel

        from flowbp_ops.backbones.flux2 import Flux2Velocity

        model = Flux2Transformer2DModel(**config).to(device, dtype)
        side = 4 if smoke else 32  # packed tokens per side: 512 px / (VAE 8 × patchify 2)
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
        targets, velocity = lora_targets("flux2"), Flux2Velocity(model, ids[None].to(device))
        x0 = torch.randn(2, side * side, config["in_channels"], device=device)  # batch 2 with real CFG, as SD3.5

        def cond(seed):
            g = torch.Generator(device).manual_seed(seed)
            txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(512))
            return {"tokens": torch.randn(2, 512, config["joint_attention_dim"], device=device, generator=g,
                                          dtype=dtype),
                    "txt_ids": txt[None].expand(2, -1, -1).to(device)}

        den = Denoiser(velocity, cfg_scale=4.0)
        conditioning = CFGCond(cond(1), cond(2))
    else:
        from diffusers import FluxTransformer2DModel

        from flowbp_ops.backbones.flux1 import FluxVelocity

        torch.backends.cuda.enable_cudnn_sdp(False)
        model = FluxTransformer2DModel(**config).to(device, dtype)
        side = 4 if smoke else 32  # packed tokens per side: 512 px / (VAE 8 × patch 2)
        img_ids = torch.zeros(side * side, 3, device=device)
        img_ids[:, 1] = torch.arange(side, device=device).repeat_interleave(side)
        img_ids[:, 2] = torch.arange(side, device=device).repeat(side)
        targets, velocity = lora_targets("flux1"), FluxVelocity(model, img_ids, 4.0)
        x0 = torch.randn(1, side * side, 64, device=device)
        conditioning = {"tokens": torch.randn(1, 512, config["joint_attention_dim"], device=device, dtype=dtype),
                        "pooled": torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
                        "txt_ids": torch.zeros(1, 512, 3, device=device)}
        den = Denoiser(velocity, cfg_scale=None)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=targets))
    model.enable_gradient_checkpointing()
    return model, den, x0, conditioning


def policy_rows(args, model, den, x0, cond, params, u, sync_time, cuda) -> list[dict]:
    """Wall time, peak memory and velocity evaluations per image of one training step of every policy-gradient
    method and of ``--methods``' direct-gradient ones, on the same model and inputs (the reward: a fixed random
    differentiable function of the endpoint latent, the decode left out as for the other rows)."""
    from flowbp_ops.policy.config import POLICY_METHODS, get_policy
    from flowbp_ops.policy.step import PolicyStep, lora_reference
    from flowbp_ops.surrogate.rollout import repeat_cond

    device = x0.device.type
    if x0.shape[0] < 2:  # FLUX.1's batch of 1: a group needs two images (another draw of the noise)
        g = torch.Generator(device).manual_seed(7)
        px0 = torch.cat([x0, torch.randn(x0.shape, device=x0.device, generator=g, dtype=x0.dtype)])
        pcond = repeat_cond(cond, 2)
    else:
        px0, pcond = x0, cond
    rows = []
    for n in args.steps:
        sigmas = get_schedule(args.arch).sigmas(n, 512)
        jobs = [(m, None) for m in POLICY_METHODS] + [(m, "bp") for m in args.methods if m != "custom"]
        for method, family in jobs:
            times, peaks, forwards = [], [], 0.0
            for seed in range(args.repeats + 1):
                if family is None:
                    policy = get_policy(method, [f"policy.group_size={px0.shape[0]}"])
                    step = PolicyStep(policy, sigmas, lambda: lora_reference(model))

                    def run():
                        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                            return step(den, den, lambda y: y, lambda y, _p: -torch.tanh(y.float() * u).flatten(1)
                                        .mean(1), ["p"] * px0.shape[0], px0, pcond, list(range(px0.shape[0])), seed,
                                        1.0)
                else:
                    plan = build_plan(get_method(method, args.arch, n), sigmas, seed)

                    def run():
                        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                            out = surrogate_step(den, plan, x0, cond)
                            loss = (out.w * -torch.tanh(out.y.float() * u).flatten(1).mean(1)).mean()
                        torch.autograd.grad(loss, params, allow_unused=True)
                        return None, {"forwards": plan.rollout_steps + plan.lv_copies}, None, None

                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                holder = {}
                dt = sync_time(lambda: holder.update(out=run()))
                for p in params:
                    p.grad = None
                if seed == 0:
                    continue  # warm-up
                times.append(dt)
                peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
                forwards = holder["out"][1]["forwards"]
            row = {"method": method, "family": "policy gradient" if family is None else "direct gradient", "steps": n,
                   "step_s": statistics.median(times), "peak_gb": max(peaks), "forwards_per_image": forwards}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["sd35", "flux1", "flux2"], default="sd35")
    ap.add_argument("--steps", type=int, nargs="+", default=[25])
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "custom"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gpu_fullsize.json")
    ap.add_argument("--smoke", action="store_true", help="small configs on CPU: check the script, measure nothing")
    ap.add_argument("--policy", action="store_true",
                    help="instead: one step of each policy-gradient method (a group of the batch's 2 images), beside "
                    "--methods' direct-gradient steps, with forwards per image: the matched-compute numbers")
    ap.add_argument("--structure", action="store_true",
                    help="instead: the authors' structure vs flowbp's execution for Sparse/Bridge/Lagrange "
                    "(bench/step_speed.py's configurations, bf16 autocast)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    cuda = device == "cuda"
    model, den, x0, cond = build(args.arch, device, args.smoke)
    params = [p for p in model.parameters() if p.requires_grad]
    u = torch.randn(x0.shape[1:], device=device, generator=torch.Generator(device).manual_seed(3))
    if args.structure:
        from step_speed import compare_structures

        methods = [m for m in args.methods if m in ("flowbp_sparse", "flowbp_bridge", "flowbp_lagrange")] or \
            ["flowbp_sparse", "flowbp_bridge", "flowbp_lagrange"]
        rows, decisions = compare_structures(
            model, den, x0, cond, params, methods, args.steps, args.repeats, args.arch, lambda y: -torch.tanh(y * u),
            sigmas_of=lambda n: get_schedule(args.arch).sigmas(n, 512), sync=torch.cuda.synchronize if cuda else
            (lambda: None), autocast=torch.bfloat16 if cuda else None, block_checkpointing=True)
        result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
                  "arch": args.arch, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                  "decisions": decisions, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return

    def sync_time(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if args.policy:
        rows = policy_rows(args, model, den, x0, cond, params, u, sync_time, cuda)
        result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
                  "arch": args.arch, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return

    def fwd():
        with torch.no_grad():
            den(x0, 0.5, cond)

    def fwd_bwd():
        v = den(x0, 0.5, cond)
        torch.autograd.grad((v.float() * u).sum(), params, allow_unused=True)

    for _ in range(2):
        fwd(), fwd_bwd()
    t_f = statistics.median(sync_time(fwd) for _ in range(5))
    t_fb = statistics.median(sync_time(fwd_bwd) for _ in range(5))
    rows = []
    variants = [(m, m, {}) for m in args.methods] + [("full backprop (checkpointed)", "draft_k", {"active.k": "N"})]
    for label, method, overrides in variants:
        for n in args.steps:
            sigmas = get_schedule(args.arch).sigmas(n, 512)
            cfg = get_method(method, args.arch, n, overrides={k: (n if v == "N" else v) for k, v in overrides.items()})
            times, limits, peaks = [], [], []
            for seed in range(args.repeats + 1):
                plan = build_plan(cfg, sigmas, seed)

                def step():
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                        out = surrogate_step(den, plan, x0, cond)
                        loss = (out.w * -torch.tanh(out.y.float() * u).flatten(1).mean(1)).mean()
                    torch.autograd.grad(loss, params, allow_unused=True)

                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                dt = sync_time(step)
                if seed == 0:
                    continue  # warm-up
                times.append(dt)
                peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
                limits.append(t_f * plan.rollout_steps + len(plan.active) * (t_fb - t_f) + plan.lv_copies * t_fb)
            row = {"method": label, "steps": n, "active": len(plan.active), "step_s": statistics.median(times),
                   "limit_s": statistics.median(limits),
                   "ratio": statistics.median(t / lim for t, lim in zip(times, limits)),
                   "peak_gb": max(peaks)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
              "arch": args.arch, "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "t_forward_s": t_f,
              "t_forward_backward_s": t_fb, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
