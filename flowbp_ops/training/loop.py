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
from flowbp_ops.surrogate.config import ConfigError
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


class Trainer:
    """One training run. Building it checks and loads everything that can refuse (method, rewards, prompts,
    the trainable weights); nothing is written before :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, backbone, prompts: list[str], reward_kwargs: dict | None = None):
        if not prompts:
            raise ValueError("training needs a non-empty prompt list (the prompt set's train split is empty)")
        self.cfg, self.backbone, self.prompts = cfg, backbone, prompts
        self.method = get_method(cfg.method, cfg.backbone, cfg.rollout_steps, cfg.method_overrides)
        self.method.check(cfg.rollout_steps)
        self.sigmas = backbone.sigmas(cfg.rollout_steps)
        self.device = getattr(backbone, "device", torch.device("cpu"))
        # reward models live where the images are decoded
        reward_kwargs = {"device": self.device, **(reward_kwargs or {})}
        self.reward = get_reward(cfg.reward, **reward_kwargs)
        self.heldout = {n: get_reward(n, **reward_kwargs) for n in cfg.heldout_rewards}
        self.named = attach_trainable(backbone, cfg)
        if cfg.gradient_checkpointing:
            backbone.transformer.enable_gradient_checkpointing()
        self.params = [p for _, p in self.named]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        self.ema = EMAModel(self.params, decay=cfg.ema) if cfg.ema is not None else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.skipped = 0, 0

    def restore(self, checkpoint: Path) -> int:
        """Weights, AdamW, EMA and RNG state from ``checkpoint`` (written by this config); returns its step."""
        weights, state, meta = load_checkpoint(checkpoint)
        if meta["config"] != self.cfg.model_dump(mode="json"):
            raise ValueError(f"the checkpoint in {checkpoint} was written by a different config; resume with the "
                             "same one")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(weights[n])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.gen.set_state(state["generator"])
        self.step, self.skipped = state["step"], state["skipped"]
        return self.step

    def fit(self, run_dir: str | Path, callbacks: Iterable[Callback] = (), stop_after: int | None = None
            ) -> dict[str, Any]:
        """Train ``backbone.transformer`` in place from :attr:`step`; checkpoints under ``run_dir/checkpoints``."""
        cfg, backbone, device, gen = self.cfg, self.backbone, self.device, self.gen
        run_dir = Path(run_dir)
        denoiser = backbone.denoiser(cfg.guidance)
        bad, last = 0, {}
        for step in range(self.step, cfg.steps):
            if stop_after is not None and step >= stop_after:
                break
            t0 = time.perf_counter()
            idx = torch.randint(0, len(self.prompts), (cfg.batch,), generator=gen)
            batch_prompts = [self.prompts[i] for i in idx.tolist()]
            x0 = torch.randn(backbone.latent_shape(cfg.batch), generator=gen).to(device)  # CPU RNG: any device
            plan = build_plan(self.method, self.sigmas, seed=cfg.seed * 1_000_003 + step)
            cond = backbone.conditioning(batch_prompts, cfg.guidance)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = surrogate_step(denoiser, plan, x0, cond)
                images = backbone.decode(out.y)
                scored_prompts = batch_prompts * (1 + plan.lv_copies)
                r = self.reward(images, scored_prompts).float()
            per_sample = torch.relu(cfg.r_max - r) if cfg.loss == "hinge" else -r
            loss = (out.w * per_sample).mean()
            t_fwd = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            t_bwd = time.perf_counter()
            loss_value, grad_value = loss.item(), grad_norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                self.skipped, bad = self.skipped + 1, bad + 1
                self.opt.zero_grad(set_to_none=True)
                if bad >= cfg.max_bad_steps:
                    kept = list_checkpoints(run_dir)
                    raise NonFiniteError(f"{bad} non-finite steps in a row (last at step {step}); stopped. "
                                         f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower the learning "
                                         f"rate or check the reward.")
                continue
            bad = 0
            self.opt.step()
            if self.ema is not None:
                self.ema.step(self.params)
            with torch.no_grad():
                held = {n: float(h(images.detach(), scored_prompts).mean()) for n, h in self.heldout.items()}
            last = {"loss": loss_value, "reward": r.mean().item(), **{f"heldout/{k}": v for k, v in held.items()},
                    "grad_norm": grad_value, "skipped": self.skipped, **out.diagnostics(),
                    "time_step": time.perf_counter() - t0, "time_forward": t_fwd - t0, "time_backward": t_bwd - t_fwd}
            for cb in callbacks:
                cb.on_step(step, last)
            self.step = step + 1
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                state = {"optimizer": self.opt.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                         "generator": gen.get_state(), "step": self.step, "skipped": self.skipped}
                save_checkpoint(run_dir, self.step, dict(self.named), state,
                                {"config": cfg.model_dump(mode="json"), "step": self.step}, cfg.keep_last)
        if self.ema is not None:
            self.ema.copy_to(self.params)  # evaluate (and save) the EMA weights
        return {"last": last, "skipped": self.skipped, "steps": cfg.steps}


def train(cfg: TrainConfig, backbone, prompts: list[str], run_dir: str | Path, callbacks: Iterable[Callback] = (),
          resume: bool = False, stop_after: int | None = None, reward_kwargs: dict | None = None) -> dict[str, Any]:
    """Train ``backbone.transformer`` in place; with ``resume`` from the newest intact checkpoint of ``run_dir``."""
    from flowbp_ops.training.run_dir import RunDir

    trainer = Trainer(cfg, backbone, prompts, reward_kwargs)
    if resume:
        point = RunDir(run_dir).resume_point(cfg.model_dump(mode="json"))
        if point.checkpoint is None:
            raise ConfigError(f"cannot resume {run_dir}: {point.reason}; resume with the settings it was started "
                              "with, or start it over")
        trainer.restore(point.checkpoint)
    return trainer.fit(run_dir, callbacks, stop_after)
