"""The no-grad forwards of a training step at the hardware's speed: LoRA folded into the weights, optionally compiled.

A step's rollout (and the detached negative CFG branch) runs without gradient, so it needs the adapted model's
values, not its graph. Two things make those forwards cheaper (``execution.merged_rollout``, ``compile_rollout``):

* **merged weights**: each LoRA layer's ``W + s·B·A`` is computed once per optimizer step into a tensor of its
  own, and the layer is pointed at it for the no-grad call (peft's ``merged`` state: the base layer alone runs).
  The original ``W`` is never written: leaving the context points the layer back at the very same tensor, so the
  gradient forwards see the base weights bit for bit (peft's own unmerge subtracts the delta back, which rounds).
  Under several processes each holds whole LoRA weights (their gradients are averaged), so merging is local;
  full fine-tuning (FSDP2) has no adapter and nothing to merge.
* **torch.compile** of the no-grad velocity function: Inductor, and on a GPU CUDA graphs (``reduce-overhead``:
  a step's no-grad shapes are static, and the merged weights are rewritten in place so their addresses stay).
  If compiling fails the rollout goes on eager and the log says why, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from flowbp_ops.surrogate.config import Execution
from flowbp_ops.surrogate.rollout import Denoiser

log = logging.getLogger(__name__)


def lora_layers(module: torch.nn.Module) -> list:
    """peft LoRA layers with at least one active adapter (what a merge folds in)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer) and m.active_adapters]


class MergedLoRA:
    """A context in which every LoRA layer of ``module`` computes with ``W + ΔW`` and no adapter branch."""

    def __init__(self, module: torch.nn.Module):
        self.layers = lora_layers(module)
        self._merged: list[torch.Tensor] = []
        self._stamp: tuple | None = None
        dora = [n for n, m in module.named_modules() if getattr(m, "use_dora", {}) and any(m.use_dora.values())]
        if dora:
            raise ValueError(f"merged_rollout does not support DoRA layers ({dora[0]}, ...); set "
                             "execution.merged_rollout=false")

    def _adapter_params(self):
        return [p for layer in self.layers for a in layer.active_adapters
                for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute ``W + ΔW`` when an adapter weight changed since the last merge (an optimizer step, a resume)."""
        stamp = tuple((p.data_ptr(), p._version) for p in self._adapter_params())
        if stamp == self._stamp:
            return
        for n, layer in enumerate(self.layers):
            w = layer.get_base_layer().weight
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            merged = (w.float() + delta.float()).to(w.dtype)
            if n < len(self._merged):
                self._merged[n].copy_(merged)  # in place: a compiled graph keeps the same addresses
            else:
                self._merged.append(merged)
        self._stamp = stamp

    @contextlib.contextmanager
    def __call__(self):
        self.refresh()
        originals = []
        try:
            for layer, merged in zip(self.layers, self._merged):
                base = layer.get_base_layer()
                originals.append(base.weight.data)
                base.weight.data = merged
                layer.merged_adapters = list(layer.active_adapters)  # peft: the base layer alone answers
            yield
        finally:
            for layer, original in zip(self.layers, originals):
                layer.get_base_layer().weight.data = original  # the same tensor: restored bit for bit
                layer.merged_adapters = []


class NoGradVelocity:
    """The velocity function used without gradient: on merged weights, compiled when asked, else as is."""

    def __init__(self, model, merged: MergedLoRA | None, compile_mode: str | None):
        self.model, self.merged = model, merged
        self.compiled, self.cudagraphs = None, compile_mode == "reduce-overhead"
        if compile_mode is not None:
            self.compiled = torch.compile(model.__call__, dynamic=False,
                                          mode=None if compile_mode == "default" else compile_mode)

    def __call__(self, x, sigma, cond):
        with self.merged() if self.merged is not None else contextlib.nullcontext():
            if self.compiled is not None:
                try:  # a CUDA graph's output is overwritten by its next replay: keep a copy
                    out = self.compiled(x, sigma, cond)
                    return out.clone() if self.cudagraphs else out
                except Exception as exc:  # noqa: BLE001 - Inductor's failures have no common type
                    log.warning("compile_rollout: torch.compile failed (%s: %s); the no-grad forwards run eager",
                                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    self.compiled = None
            return self.model(x, sigma, cond)


def fast_denoiser(denoiser: Denoiser, transformer: torch.nn.Module, execution: Execution) -> Denoiser:
    """``denoiser`` whose no-grad calls take the fast path ``execution`` asks for (unchanged when it asks none)."""
    merged = MergedLoRA(transformer) if execution.merged_rollout and lora_layers(transformer) else None
    if merged is None and not execution.compile_rollout:
        return denoiser
    mode = None
    if execution.compile_rollout:
        mode = "reduce-overhead" if next(transformer.parameters()).device.type == "cuda" else "default"
    return dataclasses.replace(denoiser, no_grad_model=NoGradVelocity(denoiser.model, merged, mode))
