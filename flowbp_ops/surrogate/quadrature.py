"""Integration weights (axis 3): Lagrange quadrature over cached velocity supports.

On an interval ``[a, b)`` of the grid, ``x̂_b = x_a + Σ_s W_s·v_s`` with
``W_s = ∫_{σ_a}^{σ_b} ℓ_s(σ) dσ`` for the Lagrange basis ``ℓ_s`` over the support sigmas.
Weights are computed exactly in float64 (polynomial antiderivatives, in a variable shifted
to ``σ_a`` to keep the monomials well conditioned). With one support the rule is the
single-velocity leap ``σ_b − σ_a`` of LeapAlign.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P


def support_indices(start: int, end: int, order: int, rounding: str = "interval") -> list[int]:
    """``order`` indices spread evenly over the interval's own positions ``p = 0..L−1`` (``L = end − start``):
    ``round(linspace(0, L−1, order))`` with half-to-even rounding, then ``start + p``, the first forced to
    ``start``, deduplicated (spec §6.1; rounding absolute indices picks another middle support on 66 of the
    325 intervals of the 25-step grid)."""
    if end <= start:
        raise ValueError(f"empty interval [{start}, {end})")
    if rounding == "absolute":  # the earlier rule: round the absolute indices
        return sorted(set(int(i) for i in np.rint(np.linspace(start, end - 1, order)).astype(int)))
    positions = np.rint(np.linspace(0, end - start - 1, order)).astype(int)  # np.rint: half to even
    positions[0] = 0
    return sorted(set(start + int(p) for p in positions))


def lagrange_weights(support_sigmas: np.ndarray, sigma_from: float, sigma_to: float) -> np.ndarray:
    """``W_s = ∫_{σ_from}^{σ_to} ℓ_s(σ) dσ`` for each support, in float64.

    Integrates every polynomial of degree < len(supports) exactly (up to float64 rounding).
    """
    s = np.asarray(support_sigmas, dtype=np.float64) - sigma_from
    if len(set(s.tolist())) != len(s):
        raise ValueError(f"support sigmas must be distinct, got {support_sigmas}")
    upper = sigma_to - sigma_from
    weights = np.empty(len(s))
    for i, si in enumerate(s):
        others = np.delete(s, i)
        basis = P.polyfromroots(others) / np.prod(si - others) if len(others) else np.array([1.0])
        antider = P.polyint(basis)
        weights[i] = P.polyval(upper, antider) - P.polyval(0.0, antider)
    return weights


def active_supports(supports: list[int], max_active: int, mode: str) -> list[int]:
    """Which supports get a gradient: the first always; then the middle one(s) or the next ones."""
    first, rest = supports[0], supports[1:]
    if mode == "midpoint":
        mid = (supports[0] + supports[-1]) / 2
        rest = sorted(rest, key=lambda i: (abs(i - mid), i))
    return [first] + sorted(rest[: max_active - 1])
