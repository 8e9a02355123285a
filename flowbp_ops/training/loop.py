"""The training loop: any method preset on any backbone adapter and reward.

One step: draw prompts and noise, draw the method's plan, run the surrogate step (one-pass
rollout + composition), decode, score, ``loss = mean w·relu(r_max − r)`` (or ``−w·r``),
backward, clip, AdamW, EMA. LoRA through peft or full fine-tuning. Non-finite steps are
skipped and counted; too many in a row stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from diffusers.training_utils import EMAModel

from flowbp_ops.methods import get_method
from flowbp_ops.rewards.base import get_reward
from flowbp_ops.surrogate.compose import surrogate_step
from flowbp_ops.surrogate.plan import build_plan
from flowbp_ops.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from flowbp_ops.training.config import TrainConfig


class NonFiniteError(RuntimeError):
    pass


class Callback(Protocol):
    def on_step(self, step: int, metrics: dict[str, Any]) -> None: ...


def attach_trainable(backbone, cfg: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """LoRA adapters on the backbone's target modules (peft), or every transformer weight."""
    tr = backbone.transformer
    if cfg.finetune == "lora":
        from peft import LoraConfig

        tr.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the adapter's random init is part of the run's seeded state
        tr.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=backbone.lora_target_modules))
    else:
        tr.requires_grad_(True)
    # the trained weights (and so AdamW's state and the EMA) in float32 even when the model loads in bf16:
    # a 1e-5 step on a bf16 weight mostly rounds to nothing; bf16 compute comes from autocast
    from diffusers.training_utils import cast_training_params

    cast_training_params(tr, torch.float32)
    return [(n, p) for n, p in tr.named_parameters() if p.requires_grad]


def train(cfg: TrainConfig, backbone, prompts: list[str], run_dir: str | Path, callbacks: Iterable[Callback] = (),
          resume: bool = False, stop_after: int | None = None, reward_kwargs: dict | None = None) -> dict[str, Any]:
    """Train ``backbone.transformer`` in place; checkpoints under ``run_dir/checkpoints``."""
    run_dir = Path(run_dir)
    method = get_method(cfg.method, cfg.backbone, cfg.rollout_steps, cfg.method_overrides)
    sigmas = backbone.sigmas(cfg.rollout_steps)
    method.check(cfg.rollout_steps)
    if not prompts:
        raise ValueError("train() needs a non-empty prompt list")
    # reward models live where the images are decoded
    reward_kwargs = {"device": getattr(backbone, "device", torch.device("cpu")), **(reward_kwargs or {})}
    reward = get_reward(cfg.reward, **reward_kwargs)
    heldout = {n: get_reward(n, **reward_kwargs) for n in cfg.heldout_rewards}
    named = attach_trainable(backbone, cfg)
    if cfg.gradient_checkpointing:
        backbone.transformer.enable_gradient_checkpointing()
    device = getattr(backbone, "device", torch.device("cpu"))
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema) if cfg.ema is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    denoiser = backbone.denoiser(cfg.guidance)
    start, skipped = 0, 0

    if resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no checkpoints")
        weights, state, meta = load_checkpoint(ckpts[-1])
        if meta["config"] != cfg.model_dump(mode="json"):
            raise ValueError(f"the checkpoint in {ckpts[-1]} was written by a different config; resume with the same one")
        with torch.no_grad():
            for n, p in named:
                p.copy_(weights[n])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["generator"])
        start, skipped = state["step"], state["skipped"]

    bad = 0
    last = {}
    for step in range(start, cfg.steps):
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        idx = torch.randint(0, len(prompts), (cfg.batch,), generator=gen)
        batch_prompts = [prompts[i] for i in idx.tolist()]
        x0 = torch.randn(backbone.latent_shape(cfg.batch), generator=gen).to(device)  # CPU RNG: same on any device
        plan = build_plan(method, sigmas, seed=cfg.seed * 1_000_003 + step)
        cond = backbone.conditioning(batch_prompts, cfg.guidance)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = surrogate_step(denoiser, plan, x0, cond)
            images = backbone.decode(out.y)
            scored_prompts = batch_prompts * (1 + plan.lv_copies)
            r = reward(images, scored_prompts).float()
        per_sample = torch.relu(cfg.r_max - r) if cfg.loss == "hinge" else -r
        loss = (out.w * per_sample).mean()
        t_fwd = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        t_bwd = time.perf_counter()
        loss_value, grad_value = loss.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            skipped, bad = skipped + 1, bad + 1
            opt.zero_grad(set_to_none=True)
            if bad >= cfg.max_bad_steps:
                kept = list_checkpoints(run_dir)
                raise NonFiniteError(f"{bad} non-finite steps in a row (last at step {step}); stopped. "
                                     f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower the learning "
                                     f"rate or check the reward.")
            continue
        bad = 0
        opt.step()
        if ema is not None:
            ema.step(params)
        with torch.no_grad():
            held = {n: float(h(images.detach(), scored_prompts).mean()) for n, h in heldout.items()}
        last = {"loss": loss_value, "reward": r.mean().item(), **{f"heldout/{k}": v for k, v in held.items()},
                "grad_norm": grad_value, "skipped": skipped, **out.diagnostics(),
                "time_step": time.perf_counter() - t0, "time_forward": t_fwd - t0, "time_backward": t_bwd - t_fwd}
        for cb in callbacks:
            cb.on_step(step, last)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {"optimizer": opt.state_dict(), "ema": ema.state_dict() if ema else None,
                     "generator": gen.get_state(), "step": step + 1, "skipped": skipped}
            save_checkpoint(run_dir, step + 1, {n: p for n, p in named}, state,
                            {"config": cfg.model_dump(mode="json"), "step": step + 1}, cfg.keep_last)
    if ema is not None:
        ema.copy_to(params)  # evaluate (and save) the EMA weights
    return {"last": last, "skipped": skipped, "steps": cfg.steps}
