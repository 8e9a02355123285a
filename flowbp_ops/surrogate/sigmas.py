"""Sigma grids, taken from diffusers' ``FlowMatchEulerDiscreteScheduler`` (spec section 1).

The base grid is ``linspace(1, 1/N, N)``; the scheduler applies the backbone's shift (static
``s`` as SD3.5, or the exponential time shift with ``mu`` as FLUX) and appends ``σ_N = 0``.
We never re-derive the shift by hand.
"""

from __future__ import annotations

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler


def flow_sigmas(n_steps: int, *, shift: float = 1.0, mu: float | None = None, grid: str = "training") -> np.ndarray:
    """The ``N + 1`` sigmas ``σ_0 = 1 > … > σ_N = 0`` as float64.

    ``mu`` given: dynamic (exponential) shifting, as FLUX.1 / FLUX.2 pipelines do.
    Otherwise the static ``shift`` (3.0 for SD3.5; 1.0 = no shift). ``grid="scheduler"`` (static shift only):
    the scheduler's own grid for ``n_steps``, as a pipeline called without sigmas builds it — what the
    authors evaluate SD3.5 on (last nonzero σ ≈ 0.009 at 40 steps), where training uses
    ``shift(linspace(1, 1/N, N))``.
    """
    if n_steps < 1:
        raise ValueError(f"steps={n_steps}: the rollout needs at least 1 step")
    if grid not in ("training", "scheduler"):
        raise ValueError(f"grid={grid!r}: choose training or scheduler")
    if mu is None and grid == "scheduler":
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(num_inference_steps=n_steps)
    elif mu is None:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n_steps, n_steps))
    else:
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n_steps, n_steps), mu=mu)
    sigmas = sched.sigmas.double().numpy()
    assert sigmas.shape == (n_steps + 1,) and sigmas[-1] == 0.0
    return sigmas
