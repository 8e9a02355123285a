"""The training loop: any method preset on any backbone and reward, on one process or many.

One optimizer step: the method's plan (one draw, the same on every process), then for each
micro-batch of this process (``training.batches``): its prompts and noise, the surrogate step
(one-pass rollout + composition), decode, score, ``loss = mean w·relu(r_max − r)`` (or ``−w·r``)
divided by the number of micro-batches, backward; then the gradients meet across processes
(``training.distributed``), clip, AdamW, EMA. LoRA through peft or full fine-tuning (FSDP2 when
there are several processes). Non-finite steps are skipped and counted; too many in a row stop the
run with the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from flowbp_ops.backbones.table import get_backbone
from flowbp_ops.methods import get_method
from flowbp_ops.policy.config import get_policy, is_policy
from flowbp_ops.rewards.base import get_reward
from flowbp_ops.surrogate.compose import surrogate_step
from flowbp_ops.surrogate.config import ConfigError
from flowbp_ops.surrogate.plan import build_plan
from flowbp_ops.surrogate.runtime import Runtime
from flowbp_ops.training import batches
from flowbp_ops.training.callbacks import Callback
from flowbp_ops.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from flowbp_ops.training.config import TrainConfig
from flowbp_ops.training.distributed import Dist, fsdp_shard
from flowbp_ops.training.ema import EMA

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


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
    """One training run on this process (one of ``dist.world``). Building it checks and loads everything that
    can refuse (method, rewards, prompts, the batch layout, the trainable weights); nothing is written before
    :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, backbone, prompts: list[str], reward_kwargs: dict | None = None,
                 dist: Dist = Dist(), eval_prompts: list[str] | None = None, judge=None):
        if not prompts:
            raise ValueError("training needs a non-empty prompt list (the prompt set's train split is empty)")
        self.cfg, self.backbone, self.prompts, self.dist = cfg, backbone, prompts, dist
        self.layout = batches.Layout.of(cfg.global_batch, cfg.batch, dist.world)
        self.policy = get_policy(cfg.method, cfg.method_overrides) if is_policy(cfg.method) else None
        if self.policy is not None:  # the policy-gradient family (flowbp_ops.policy): no surrogate plan
            self.policy.check(cfg.rollout_steps, cfg.batch)
            if cfg.checkpoint_every % self.policy.inner_steps:
                raise ConfigError(f"train.checkpoint_every={cfg.checkpoint_every} is not a multiple of "
                                  f"policy.inner_steps={self.policy.inner_steps}: a run resumes at a checkpoint, "
                                  "which must start a sampled batch's inner steps")
            self.method = get_method("custom", cfg.backbone, cfg.rollout_steps)  # execution settings only
        else:
            self.method = get_method(cfg.method, cfg.backbone, cfg.rollout_steps, cfg.method_overrides)
            self.method.check(cfg.rollout_steps)
        self.sigmas = backbone.sigmas(cfg.rollout_steps)
        self.state_dtype = torch.bfloat16 if cfg.numerics == "authors" else torch.float32
        if cfg.numerics == "authors":  # timesteps in bf16, and the Euler steps between them
            self.sigmas = torch.from_numpy(self.sigmas).to(torch.bfloat16).double().numpy()
        self.eval_prompts = (eval_prompts or [])[: cfg.ema_eval_prompts]
        self.sample_prompts = (eval_prompts or [])[: cfg.checkpoint_samples]  # drawn at every checkpoint
        self.judge = judge  # a held-out judge (``judge.metrics(images, prompts)``) for the EMA evaluations
        self._evaluated: tuple[int, torch.Tensor] | None = None  # (step, images) of the last EMA evaluation
        self.device = getattr(backbone, "device", torch.device("cpu"))
        # reward models live where the images are decoded
        reward_kwargs = {"device": self.device, **(reward_kwargs or {})}
        self.reward = get_reward(cfg.reward, **reward_kwargs)
        self.heldout = {n: get_reward(n, **reward_kwargs) for n in cfg.heldout_rewards}
        self.pretrain = None  # the base model's training data, for the pre-training loss (the default world)
        if cfg.pretraining():
            from flowbp_ops.world.pretrain import WorldRenders

            self.pretrain = WorldRenders(backbone.world_dir)
        attach_trainable(backbone, cfg)
        self.sharded = cfg.finetune == "full" and dist.active
        if self.sharded:
            fsdp_shard(backbone.transformer, cfg.precision)
        if cfg.gradient_checkpointing:
            backbone.transformer.enable_gradient_checkpointing()
        self.named = [(n, p) for n, p in backbone.transformer.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        if not self.sharded:
            dist.broadcast_(self.params)  # replicated weights start as rank 0's
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        self.ema = EMA(self.params, cfg.ema, cfg.ema_warmup) if cfg.ema is not None else None
        if self.policy is not None:
            from flowbp_ops.policy.step import PolicyStep

            self.policy_step = PolicyStep.for_run(self.policy, self.sigmas, backbone.transformer, self.params,
                                                  lora=cfg.finetune == "lora")
        self.step, self.skipped = 0, 0
        self.runtime = Runtime()  # checkpointing and the auto mode, measured on the first steps

    # -- checkpoints --------------------------------------------------------------------------
    def _optimizer_state(self):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.backbone.transformer, self.opt)  # by parameter name (FQN)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This process's view of the run's tensors (weights, AdamW state, EMA) by name, and the optimizer's
        state dict they belong to (AdamW's state is created empty when the optimizer has not stepped yet)."""
        osd = self._optimizer_state()
        tensors = {f"model.{n}": p.detach() for n, p in self.named}
        tensors.update({f"optim.{fqn}.{k}": v for fqn, st in osd["state"].items() for k, v in st.items()
                        if isinstance(v, torch.Tensor)})
        if self.ema is not None:
            tensors.update({f"ema.{n}": s for (n, _), s in zip(self.named, self.ema.shadow)})
        return tensors, osd

    def restore(self, checkpoint: Path, meta: dict) -> int:
        """Weights, AdamW and EMA from ``checkpoint`` (one that ``RunDir.resume_point`` chose for this config, on any
        number of processes); returns its step. Data order and noise follow from the step alone."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        tensors, osd = self.state_tensors()
        load_checkpoint(checkpoint, tensors)
        set_optimizer_state_dict(self.backbone.transformer, self.opt, osd)
        self.step, self.skipped = int(meta["step"]), int(meta["skipped"])
        if self.ema is not None:
            self.ema.steps = int(meta["ema_steps"])
        return self.step

    def _ema_eval_due(self) -> bool:
        every = self.cfg.ema_eval_every
        return bool(self.ema and self.eval_prompts and every and (self.step == 1 or self.step % every == 0))

    @torch.no_grad()
    def evaluate_ema(self) -> dict[str, float]:
        """The EMA weights on a fixed held-out subset (the same prompts and noise every time): the training
        reward and the held-out rewards, as the authors log it at step 1 and every 50 steps (spec §6.12)."""
        from flowbp_ops.sampling import generate

        with self.evaluated_weights():
            images = generate(self.backbone, self.eval_prompts, self.cfg.rollout_steps, self.cfg.guidance, seed=42)
            self._evaluated = (self.step, images)
            out = {"ema_eval/reward": float(self.reward(images, self.eval_prompts).mean())}
            out.update({f"ema_eval/{n}": float(h(images, self.eval_prompts).mean()) for n, h in self.heldout.items()})
            if self.judge is not None:
                out.update({f"ema_eval/{k}": v for k, v in self.judge.metrics(images, self.eval_prompts).items()})
        return out

    @contextlib.contextmanager
    def evaluated_weights(self):
        """The weights a run is evaluated and saved with: the EMA's when it keeps one (swapped in, then back)."""
        if self.ema is not None:
            self.ema.swap(self.params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap(self.params)

    @torch.no_grad()
    def checkpoint_samples(self) -> torch.Tensor | None:
        """The evaluated weights' images of the first ``checkpoint_samples`` held-out prompts (the same noise at
        every checkpoint); every process takes part (FSDP2 gathers weights in the forward)."""
        from flowbp_ops.sampling import generate

        if not self.sample_prompts:
            return None
        n = len(self.sample_prompts)
        if self._evaluated and self._evaluated[0] == self.step and len(self._evaluated[1]) >= n:
            return self._evaluated[1][:n].float().cpu()  # this step's EMA evaluation drew them (same prompts, noise)
        batch = get_backbone(self.cfg.backbone).eval_batch  # 512² real images: a few at a time
        with self.evaluated_weights():
            return generate(self.backbone, self.sample_prompts, self.cfg.rollout_steps, self.cfg.guidance, seed=42,
                            batch_size=batch).float().cpu()

    def trained_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP2 the whole transformer's weights gathered on rank 0 (a collective: every rank calls it; None
        elsewhere); None when the module holds them whole (save it directly)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.backbone.transformer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.dist.main else None

    def _save(self, run_dir: Path) -> None:
        tensors, _ = self.state_tensors()
        meta = {"config": self.cfg.model_dump(mode="json"), "step": self.step, "skipped": self.skipped,
                "ema_steps": self.ema.steps if self.ema else 0, "global_batch": self.layout.global_batch}
        save_checkpoint(run_dir, self.step, tensors, meta, self.cfg.keep_last, self.dist, self.sharded)

    # -- one optimizer step ---------------------------------------------------------------------
    def _micro_batch(self, denoiser, plan, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        """Forward and backward of one micro-batch of this process; returns its loss and summed metrics."""
        cfg, backbone, layout = self.cfg, self.backbone, self.layout
        qs = batches.slots(layout, micro, self.dist.rank)
        prompts = [self.prompts[i] for i in batches.prompt_indices(cfg.seed, self.step, layout, qs, len(self.prompts))]
        if self.policy is not None:  # a policy method's G consecutive slots share a prompt
            prompts = [prompts[i - i % self.policy.group_size] for i in range(len(prompts))]
        x0 = batches.noise(cfg.seed, self.step, qs, backbone.latent_shape(1)[1:]).to(self.device, self.state_dtype)
        cond = backbone.conditioning(prompts, cfg.guidance)
        if self.sharded:  # FSDP2 reduce-scatters once, after the last micro-batch
            backbone.transformer.set_requires_gradient_sync(micro == layout.accumulation - 1)
        authors = cfg.numerics == "authors"
        if self.policy is not None:
            return self._policy_micro_batch(denoiser, prompts, x0, cond, qs)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = surrogate_step(denoiser, plan, x0, cond, sample_seeds=batches.sample_seeds(cfg.seed, self.step, qs),
                                 state_dtype=self.state_dtype, runtime=self.runtime)
            images = backbone.decode(out.y, dtype=self.state_dtype)
            scored = prompts * (1 + plan.lv_copies)
        with torch.autocast(self.device.type, dtype=torch.float16 if authors else torch.bfloat16,
                            enabled=authors or cfg.precision == "bf16"):  # the authors score under fp16 autocast
            r = self.reward(images, scored).float()
        per_sample = {"hinge": lambda: torch.relu(cfg.r_max - r), "negative": lambda: -r,
                      "log_hinge": lambda: torch.relu(math.log(cfg.r_max) - torch.log(r.clamp_min(1e-12)))}[cfg.loss]()
        loss = (out.w * per_sample).mean()
        if cfg.cfg_grad_compensate and cfg.guidance:  # the authors' CFG gradient compensation (spec §6.6)
            loss = loss / cfg.guidance
        (loss / layout.accumulation).backward()
        pretrain = self._pretrain_backward(qs)
        sums = self._scores(r, images, scored)
        diag = out.diagnostics()
        # velocity evaluations per image (a CFG pair counted once; backward passes not counted): matched compute
        diag["forwards"] = plan.rollout_steps + (plan.lv_copies if out.mode == "one_pass" else out.grad_forwards)
        self.plan_info = {k: v for k, v in diag.items() if not isinstance(v, (int, float))}  # the plan: same on all
        numeric = {f"diag:{k}": float(v) for k, v in diag.items() if isinstance(v, (int, float))}
        return loss.detach(), {**sums, **numeric, **pretrain}, len(scored)

    def _policy_micro_batch(self, denoiser, prompts: list[str], x0: torch.Tensor, cond, qs: list[int]):
        """A policy-gradient micro-batch (``flowbp_ops.policy.step``)."""
        cfg, backbone = self.cfg, self.backbone
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, diag, images, r, prompts = self.policy_step(
                self._plain, denoiser, lambda y: backbone.decode(y, dtype=self.state_dtype), self.reward, prompts, x0,
                cond, batches.sample_seeds(cfg.seed, self.step, qs), batches.plan_seed(cfg.seed, self.step),
                1.0 / self.layout.accumulation, qs[0], self.step)
        pretrain = self._pretrain_backward(qs)
        self.plan_info = {"mode": self.policy.family}
        return loss, {**self._scores(r, images, prompts), **{f"diag:{k}": v for k, v in diag.items()}, **pretrain}, \
            len(prompts)

    def _pretrain_backward(self, qs: list[int]) -> dict[str, float]:
        """The default world's regulariser (ReFL's pre-training loss), for every method alike."""
        if self.pretrain is None:
            return {}
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            fm = self._pretraining_loss(qs)
        (cfg.pretraining() * fm / self.layout.accumulation).backward()
        return {"diag:pretrain_loss": float(fm.detach())}

    def _scores(self, r: torch.Tensor, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Summed training reward and (when due) held-out rewards of a micro-batch's images."""
        heldout = self.heldout if self._heldout_due() else {}
        with torch.no_grad():
            return {"reward": float(r.sum()), **{f"heldout/{n}": float(h(images.detach(), prompts).sum())
                                                 for n, h in heldout.items()}}

    def _heldout_due(self) -> bool:
        done = self.step + 1  # steps done once this one is
        return self.step == 0 or done % self.cfg.heldout_every == 0 or done == self.cfg.steps

    def _pretraining_loss(self, qs: list[int]) -> torch.Tensor:
        """The base model's flow-matching loss on fresh renders of its training scenes (ReFL's pre-training loss);
        data, noise and σ are functions of (seed, step, slot), like everything else a step draws."""
        from flowbp_ops.world.base_model import encode_images, flow_matching_loss

        images, prompts = self.pretrain.batch(self.cfg.seed, self.step, qs)
        x = encode_images(self.backbone.vae, images.to(self.device))
        cond = self.backbone.encode_prompts(prompts)
        eps, sigma = [], []
        for seed in batches.sample_seeds(self.cfg.seed, self.step, qs):  # one generator per slot: any sharding
            g = torch.Generator().manual_seed(seed ^ 0xF10)
            eps.append(torch.randn(x.shape[1:], generator=g))
            sigma.append(torch.sigmoid(torch.randn((), generator=g)))
        eps, sigma = torch.stack(eps).to(self.device), torch.stack(sigma).to(self.device)
        return flow_matching_loss(self.backbone.transformer, x, cond["tokens"], cond["pooled"], eps, sigma)

    def fit(self, run_dir: str | Path, callbacks: Iterable[Callback] = (), stop_after: int | None = None
            ) -> dict[str, Any]:
        """Train ``backbone.transformer`` in place from :attr:`step`; checkpoints under ``run_dir/checkpoints``.
        Callbacks run on rank 0 only, with metrics over the whole global batch."""
        cfg, dist, layout = self.cfg, self.dist, self.layout
        from flowbp_ops.training.fast_rollout import fast_denoiser

        run_dir = Path(run_dir)
        self._plain = self.backbone.denoiser(cfg.guidance)
        denoiser = fast_denoiser(self._plain, self.backbone.transformer, self.method.execution)
        bad, last, told = 0, {}, 0
        while self.step < cfg.steps:
            step = self.step
            if stop_after is not None and step >= stop_after:
                break
            t0 = time.perf_counter()
            plan = None if self.policy else build_plan(self.method, self.sigmas,
                                                       seed=batches.plan_seed(cfg.seed, step))
            self.opt.zero_grad(set_to_none=True)
            loss_sum, totals, n_scored = 0.0, {}, 0
            for micro in range(layout.accumulation):
                loss, sums, n = self._micro_batch(denoiser, plan, micro)
                loss_sum += float(loss)
                n_scored += n
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + v
            t_fwd = time.perf_counter()
            if not self.sharded:
                dist.average_gradients(self.params)
            t_sync = time.perf_counter() - t_fwd  # LoRA's all-reduce (FSDP2 reduce-scatters inside the backward)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            grad_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            t_bwd = time.perf_counter()
            keys = sorted(totals)
            summed = dist.sum([loss_sum, n_scored, *[totals[k] for k in keys]], self.device)
            micro_batches = layout.accumulation * dist.world
            loss_value, n_all = summed[0] / micro_batches, summed[1]
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                self.skipped, bad, self.step = self.skipped + 1, bad + 1, step + 1
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
                self.ema.update(self.params)
            metrics = {k.removeprefix("diag:"): v / (micro_batches if k.startswith("diag:") else n_all)
                       for k, v in zip(keys, summed[2:])}
            last = {"loss": loss_value, "reward": metrics.pop("reward"), **metrics, **self.plan_info,
                    "grad_norm": grad_value,
                    "skipped": self.skipped, "time_step": time.perf_counter() - t0,
                    "time_forward_backward": t_fwd - t0, "time_sync": t_sync, "time_clip": t_bwd - t_fwd - t_sync}
            self.step = step + 1
            self.runtime.record(self.plan_info.get("mode", ""), last["time_step"])
            for line in self.runtime.log[told:]:  # the measured execution decisions, once each
                log.info("%s", line)
            told = len(self.runtime.log)
            if self._ema_eval_due():
                last.update(self.evaluate_ema())
            if dist.main:
                for cb in callbacks:
                    cb.on_step(step, last)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._save(run_dir)
                samples = self.checkpoint_samples()
                for cb in callbacks if dist.main else ():
                    if hasattr(cb, "on_checkpoint"):
                        cb.on_checkpoint(self.step, run_dir, samples)
        if self.ema is not None:
            self.ema.copy_to(self.params)  # evaluate (and save) the EMA weights
        return {"last": last, "skipped": self.skipped, "steps": cfg.steps}


def train(cfg: TrainConfig, backbone, prompts: list[str], run_dir: str | Path, callbacks: Iterable[Callback] = (),
          resume: bool = False, stop_after: int | None = None, reward_kwargs: dict | None = None,
          dist: Dist = Dist(), eval_prompts: list[str] | None = None, judge=None) -> dict[str, Any]:
    """Train ``backbone.transformer`` in place into ``run_dir`` (started over); with ``resume`` from its newest
    intact checkpoint."""
    from flowbp_ops.training.run_dir import RunDir

    trainer = Trainer(cfg, backbone, prompts, reward_kwargs, dist, eval_prompts, judge)
    RunDir(run_dir).begin(trainer, "resume" if resume else "overwrite", dist=dist)
    return trainer.fit(run_dir, callbacks, stop_after)
