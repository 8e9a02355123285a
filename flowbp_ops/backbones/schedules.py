"""Which sigma grid each backbone samples on, exactly as its diffusers pipeline builds it.

SD3.5 uses a static shift of 3; FLUX.1-dev a dynamic ``mu`` linear in the image sequence
length; FLUX.2-Klein an empirical ``mu`` that also depends on the number of steps. The
``mu`` formulas are the pipelines' own functions, imported, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp_ops.surrogate.sigmas import flow_sigmas


@dataclass(frozen=True)
class BackboneSchedule:
    name: str
    description: str
    kind: str  # "static" | "flux1" | "flux2"
    shift: float = 1.0
    latent_downsample: int = 16  # pixels per packed token side (VAE factor x patch size)

    def image_seq_len(self, resolution: int) -> int:
        return (resolution // self.latent_downsample) ** 2

    def mu(self, n_steps: int, resolution: int = 512) -> float | None:
        seq = self.image_seq_len(resolution)
        if self.kind in ("flux1", "flux2"):
            # the pipeline modules import transformers' image processors, which warn about torchvision
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        if self.kind == "flux1":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            return float(calculate_shift(seq, 256, 4096, 0.5, 1.15))
        if self.kind == "flux2":
            from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

            return float(compute_empirical_mu(image_seq_len=seq, num_steps=n_steps))
        return None

    def sigmas(self, n_steps: int, resolution: int = 512, grid: str = "training") -> np.ndarray:
        """The training grid, or (``grid="scheduler"``) the one the pipeline samples on by default: for FLUX the
        same (their pipelines pass ``linspace(1, 1/N, N)``), for SD3.5 the scheduler's own."""
        mu = self.mu(n_steps, resolution)
        return flow_sigmas(n_steps, shift=self.shift, mu=mu, grid=grid if mu is None else "training")


def get_schedule(name: str) -> BackboneSchedule:
    from flowbp_ops.backbones.table import BACKBONES

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    return BackboneSchedule(spec.name, spec.description, spec.schedule, spec.shift)
