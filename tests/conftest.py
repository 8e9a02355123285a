"""Shared fixtures: a velocity field with a known Jacobian, and the tiny SD3-architecture DiT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowbp_ops.backbones.schedules import get_schedule

torch.set_num_threads(2)


class LinearField(torch.nn.Module):
    """``v_θ(x, σ, c) = M x + σ·b + c``: Jacobian ``∂v/∂x = M`` everywhere; θ = (M, b)."""

    def __init__(self, dim: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.M = torch.nn.Parameter(0.5 * torch.randn(dim, dim, generator=g))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x, sigma, cond):
        return x @ self.M.T + sigma[:, None] * self.b + cond


class CountingField:
    """Wraps a velocity function and counts the calls made with gradient enabled."""

    def __init__(self, fn):
        self.fn, self.grad_calls, self.calls = fn, 0, 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        return self.fn(x, sigma, cond)


@pytest.fixture
def linear_field():
    return LinearField()


def sd35_sigmas(n: int) -> np.ndarray:
    return get_schedule("sd35").sigmas(n)


@pytest.fixture(scope="session")
def tiny_dit():
    from flowbp_ops.backbones.sd3 import tiny_sd3_transformer

    return tiny_sd3_transformer(0)
