"""One micro-batch of a policy-gradient method: sample G images per prompt, score them, backpropagate the objective.

The trainer (``training.loop``) owns everything around it — data order, micro-batches, processes, clipping, AdamW,
EMA, checkpoints, resume — exactly as for the direct-gradient methods; this module only replaces the surrogate step.
Every draw (the SDE's noise, which steps are stochastic or trained, the forward-process σ and ε) is a function of
(seed, step, slot), so a run resumes exactly and is the same on any number of processes.

* **Flow-GRPO**: the sampler is the SDE at the chosen steps and the ODE elsewhere; the SDE steps run on the very
  function the training forward uses (no merged weights there), so the ratio is exactly 1 on policy. The ODE steps
  take the fast no-grad path. Training re-forwards each trained SDE step with gradient through the guided velocity
  (both CFG branches), one backward per step (memory of one forward).
* **DiffusionNFT**: ODE sampling (the fast path), then for each trained σ the conditional velocity alone (no CFG)
  of the current weights with and without gradient, on the forward process of the generated image.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch

from flowbp_ops.policy.config import PolicyConfig
from flowbp_ops.policy.objectives import (
    clipped_objective,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    nft_loss,
    nft_optimality,
    sde_mean_std,
)
from flowbp_ops.surrogate.rollout import CFGCond, Denoiser, euler_step, rollout


@contextlib.contextmanager
def lora_reference(transformer: torch.nn.Module):
    """The base model: the LoRA adapter switched off (diffusers' peft integration), switched back on after."""
    transformer.disable_lora()
    try:
        yield
    finally:
        transformer.enable_lora()


class WeightsReference:
    """Full fine-tuning's reference: a frozen copy of the starting weights (one more copy of the trained weights in
    memory), swapped in for the no-grad reference forwards. The swap writes the parameters in place, so every step
    runs its reference forward before the gradient forward that saves them."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.start = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def __call__(self):
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.start):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self.params, current):
                    p.copy_(c)


def _generators(seeds: list[int], salt: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s) ^ salt) for s in seeds]


def _draw(gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(like.device, like.dtype)


@dataclasses.dataclass
class PolicyStep:
    cfg: PolicyConfig
    sigmas: np.ndarray  # σ_0..σ_N
    reference: Any  # a context factory in which the model computes as the reference (None: no KL term)
    sampled: dict[int, dict] = dataclasses.field(default_factory=dict)  # Flow-GRPO's batch per micro-batch slot

    @classmethod
    def for_run(cls, cfg: PolicyConfig, sigmas: np.ndarray, transformer: torch.nn.Module,
                params: list[torch.nn.Parameter], lora: bool) -> "PolicyStep":
        """A run's step; the KL's reference is the adapter switched off (LoRA) or the starting weights."""
        reference = None
        if cfg.kl:
            reference = (lambda: lora_reference(transformer)) if lora else WeightsReference(params)
        return cls(cfg, sigmas, reference)

    def steps(self, plan_seed: int) -> tuple[list[int], list[int]]:
        """(SDE steps, trained steps) of this optimizer step: the same on every process and micro-batch."""
        rng = np.random.default_rng(plan_seed)
        n = len(self.sigmas) - 1
        candidates = list(range(1, n))  # σ_0 = 1: no finite SDE noise there
        w = self.cfg.sde_window
        if w is not None:  # Flow-GRPO-Fast: a window in the first half, where the image's layout is decided
            start = int(rng.integers(1, max(1, n // 2 - w + 1) + 1))
            candidates = list(range(start, min(start + w, n)))
        k = self.cfg.train_steps
        trained = sorted(rng.choice(candidates, size=min(k, len(candidates)), replace=False).tolist()) \
            if k is not None else candidates
        return candidates, trained

    def __call__(self, denoiser: Denoiser, fast: Denoiser, decode, reward, prompts: list[str], x0: torch.Tensor,
                 cond: Any, seeds: list[int], plan_seed: int, scale: float, slot: int, step: int) -> tuple:
        """Backpropagate ``scale`` × the objective of the micro-batch starting at ``slot``; returns (loss,
        diagnostics, images, rewards, prompts scored). Flow-GRPO's later inner steps train on the batch the cycle's
        first step sampled (its trajectory, log-probabilities under the sampling weights, advantages, prompts and
        conditioning) instead of sampling."""
        if self.cfg.family != "flow_grpo":
            return (*self._nft(denoiser, fast, decode, reward, prompts, x0, cond, seeds, plan_seed, scale), prompts)
        inner = self.cfg.inner_steps
        reuse = self.sampled.get(slot) if inner > 1 and step % inner else None
        out = self._grpo(denoiser, fast, decode, reward, prompts, x0, cond, seeds, plan_seed, scale, reuse)
        if inner > 1:
            self.sampled[slot] = out[-1]
        return (*out[:-1], out[-1]["prompts"])

    def _advantages(self, r: torch.Tensor) -> torch.Tensor:
        return group_advantages(r.detach(), self.cfg.group_size).clamp(-self.cfg.adv_clip, self.cfg.adv_clip)

    # -- Flow-GRPO ---------------------------------------------------------------------------------------------
    def _grpo(self, denoiser, fast, decode, reward, prompts, x0, cond, seeds, plan_seed, scale, sampled):
        cfg, sig = self.cfg, self.sigmas
        den = dataclasses.replace(denoiser, detach_neg=False)  # π_θ's mean goes through both CFG branches
        if sampled is None:
            sampled = self._sample_sde(den, fast, decode, reward, prompts, x0, cond, seeds, plan_seed)
        xs, logp_old, stds, sde, trained = (sampled[k] for k in ("xs", "logp_old", "stds", "sde", "trained"))
        images, r, adv, cond = sampled["images"], sampled["r"], sampled["adv"], sampled["cond"]
        total, ratios, clipped, kls = 0.0, [], [], []
        use_kl = bool(cfg.kl) and self.reference is not None
        for j in trained:
            x, x_next, std = xs[j], xs[j + 1].float(), stds[j]
            if use_kl:  # before the gradient forward: a full fine-tune's reference swaps the weights in place
                with torch.no_grad(), self.reference():
                    ref, _ = sde_mean_std(x, den(x, float(sig[j]), cond).float(), float(sig[j]), float(sig[j + 1]),
                                          cfg.noise_level)
            with torch.enable_grad():
                mean, _ = sde_mean_std(x, den(x, float(sig[j]), cond).float(), float(sig[j]), float(sig[j + 1]),
                                       cfg.noise_level)
                loss, ratio = clipped_objective(gaussian_log_prob(x_next, mean, std), logp_old[j], adv, cfg.clip)
                if use_kl:
                    kl = gaussian_kl(mean, ref, std).mean()
                    loss = loss + cfg.kl * kl
                    kls.append(float(kl.detach()))
                (scale * loss / len(trained)).backward()
            total += float(loss.detach()) / len(trained)
            ratios.append(ratio.detach())
            clipped.append(((ratio - 1).abs() > cfg.clip).float().mean())
        ratio = torch.cat(ratios)
        forwards = len(sig) - 1 + len(trained) * (1 + bool(kls))  # velocity evaluations per image
        diag = {"forwards": float(forwards), "ratio_mean": float(ratio.mean()),
                "ratio_max_dev": float((ratio - 1).abs().max()),
                "clip_fraction": float(torch.stack(clipped).mean()), "sde_steps": float(len(sde)),
                "trained_steps": float(len(trained)), "adv_abs": float(adv.abs().mean()),
                **({"kl": sum(kls) / len(kls)} if kls else {})}
        return torch.tensor(total), diag, images, r, sampled

    def _sample_sde(self, den, fast, decode, reward, prompts, x0, cond, seeds, plan_seed) -> dict:
        """The SDE at this step's stochastic steps (on ``den``, the training forward's own function), the ODE on
        the fast path elsewhere; the trajectory, log-probabilities, rewards and advantages."""
        cfg, sig = self.cfg, self.sigmas
        sde, trained = self.steps(plan_seed)
        gens = _generators(seeds, 0x5DE)
        xs, logp_old, stds = [x0.detach()], {}, {}
        with torch.no_grad():
            for i in range(len(sig) - 1):
                x = xs[-1]
                if i in sde:
                    mean, std = sde_mean_std(x, den(x, float(sig[i]), cond).float(), float(sig[i]),
                                             float(sig[i + 1]), cfg.noise_level)
                    x_next = (mean + std * _draw(gens, tuple(x.shape[1:]), mean)).to(x.dtype)
                    logp_old[i], stds[i] = gaussian_log_prob(x_next.float(), mean, std), std
                else:
                    x_next = euler_step(x, float(sig[i + 1] - sig[i]), fast(x, float(sig[i]), cond))
                xs.append(x_next)
            images = decode(xs[-1])
            r = reward(images, prompts).float()
        return {"xs": xs, "logp_old": logp_old, "stds": stds, "sde": sde, "trained": trained, "images": images,
                "r": r, "adv": self._advantages(r), "cond": cond, "prompts": prompts}

    # -- DiffusionNFT ------------------------------------------------------------------------------------------
    def _nft(self, denoiser, fast, decode, reward, prompts, x0, cond, seeds, plan_seed, scale):
        cfg, sig = self.cfg, self.sigmas
        with torch.no_grad():
            x = rollout(fast, x0.detach(), sig, cond, state_dtype=x0.dtype).x[-1]  # the sampler's own ODE rollout
            images = decode(x)
            r = reward(images, prompts).float()
        opt = nft_optimality(self._advantages(r), cfg.adv_clip)
        rng = np.random.default_rng(plan_seed)
        times = rng.choice(np.arange(1, len(sig) - 1), size=min(cfg.nft_timesteps, len(sig) - 2), replace=False)
        pos = cond.pos if isinstance(cond, CFGCond) else cond  # no CFG at training: the conditional velocity
        model, gens = denoiser.model, _generators(seeds, 0x4F7)
        x_img = x.float()
        total, kls = 0.0, []
        for t in sorted(times.tolist()):
            s = float(sig[t])
            eps = _draw(gens, tuple(x.shape[1:]), x_img)
            xt = ((1 - s) * x_img + s * eps).to(x.dtype)
            target = eps - x_img
            sv = torch.full((x.shape[0],), s, device=x.device)
            use_kl = bool(cfg.kl) and self.reference is not None
            with torch.no_grad():
                v_old = model(xt, sv, pos).float()
                if use_kl:  # before the gradient forward (see WeightsReference)
                    with self.reference():
                        v_ref = model(xt, sv, pos).float()
            with torch.enable_grad():
                v = model(xt, sv, pos).float()
                loss = nft_loss(v, v_old, target, opt.to(v.device), cfg.beta)
                if use_kl:
                    kl = ((v - v_ref) ** 2).mean()
                    loss = loss + cfg.kl * kl
                    kls.append(float(kl.detach()))
                (scale * loss / len(times)).backward()
            total += float(loss.detach()) / len(times)
        diag = {"forwards": float(len(sig) - 1 + len(times) * (2 + bool(kls))), "nft_r_mean": float(opt.mean()),
                "trained_steps": float(len(times)),
                **({"kl": sum(kls) / len(kls)} if kls else {})}
        return torch.tensor(total), diag, images, r
