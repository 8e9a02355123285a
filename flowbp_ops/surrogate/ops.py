"""The three gradient-routing operators of the spec (section 1, notation).

Each is written so that its *forward value is bit-for-bit* the value the spec says it
has: ``a + (b - sg(b))`` adds an exact zero (``b - b == 0`` in IEEE arithmetic), while
the textbook form ``b + sg(a - b)`` would round. That is what lets the reward see the
cached endpoint exactly.
"""

from __future__ import annotations

from torch import Tensor


def sg(x: Tensor) -> Tensor:
    """Stop-gradient."""
    return x.detach()


def connector(x_hat: Tensor, x: Tensor) -> Tensor:
    """``conn(x̂, x) = x̂ + sg(x − x̂)``: the value of the cached latent ``x``, the gradient of ``x̂``."""
    x_hat = x_hat.to(x.dtype)
    return sg(x) + (x_hat - sg(x_hat))


def scale_grad(v: Tensor, c: float) -> Tensor:
    """``scale(v, c) = sg(v) + c·(v − sg(v))``: value of ``v``, gradient times ``c``."""
    if c == 1.0:
        return v
    return sg(v) + c * (v - sg(v))


def bridge(x: Tensor, alpha: float) -> Tensor:
    """``bridge(x, α) = α·x + (1 − α)·sg(x)``: value of ``x``, gradient times ``α``."""
    if alpha == 0.0:
        return sg(x)
    return scale_grad(x, alpha)


def per_sample_mean_abs(a: Tensor, b: Tensor) -> Tensor:
    """``mean|a − b|`` over all but the batch dimension (the connector residual ``d``)."""
    return (sg(a) - sg(b)).abs().flatten(1).mean(dim=1)


__all__ = ["sg", "connector", "scale_grad", "bridge", "per_sample_mean_abs"]
