"""The exponential moving average of the trained weights (what evaluation sees).

``ema ← ema + (1 − d)·(θ − ema)`` after every optimizer step, starting as a copy of the weights
before training. ``warmup=False`` is the authors' (spec §6.2): the fixed decay d from step 1, so
after 300 steps at 0.995 the EMA still holds ~22 % of the base weights. ``warmup=True`` ramps
``d_t = min(d, (1 + t) / (10 + t))`` (t counted from 0 at the first step: the first update copies θ),
diffusers' EMAModel schedule, which suits short runs on the default world. The shadow tensors are
like the weights (DTensor shards under FSDP2), so the EMA is sharded with them.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.shadow = [p.detach().clone() for p in params]
        self.steps = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        t = self.steps - 1  # t = 0 at the first update
        return 0.0 if t <= 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        self.steps += 1
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach(), weight)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)

    @torch.no_grad()
    def swap(self, params: list[torch.nn.Parameter]) -> None:
        """Exchange the EMA and the trained weights (twice restores both): evaluate the EMA mid-run."""
        for s, p in zip(self.shadow, params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
