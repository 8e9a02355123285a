"""Active-set samplers (axis 2), exactly as the spec's methods draw their steps.

All draws of one plan come from one ``numpy.random.Generator`` seeded with the plan's seed
(PCG64 is platform-independent), so identical seeds give identical plans in every process
and on every rank. Indices are forward (sampling-order) indices ``0..N-1``; ``rev = N − i``.
"""

from __future__ import annotations

import numpy as np

Rng = np.random.Generator


def uniform_last(n: int, N: int, rng: Rng) -> int:
    """ReFL: ``τ = N − rev``, ``rev ~ U{1..n}``."""
    return N - int(rng.integers(1, n + 1))


def late_biased(k: int, beta: float, lo: int, hi: int, rng: Rng, origin: int = 0) -> list[int]:
    """K distinct indices of ``[lo, hi)`` without replacement, ``P(i) ∝ (i − origin + 1)^β`` (late = near the
    image). ``origin = 0``: the absolute step (Sparse); Bridge counts from the window start before the split and
    from ``j + 1`` after it (spec §6.5)."""
    idx = np.arange(lo, hi)
    if k <= 0 or len(idx) == 0:
        return []
    p = (idx - origin + 1.0) ** beta
    return sorted(int(i) for i in rng.choice(idx, size=min(k, len(idx)), replace=False, p=p / p.sum()))


def drtune(k: int, early_stop_ratio: float, N: int, rng: Rng, lo: int = 0) -> tuple[list[int], int]:
    """DRTune: stop ``m = N − U{1..round(r·N)}``; ``K`` steps ``s, s+d, …`` in ``[lo, m]``, ``d = ⌊(m+1−lo)/K⌋``
    (``lo``: the tail window's start, 0 without one)."""
    m = N - int(rng.integers(1, round(early_stop_ratio * N) + 1))
    d = (m + 1 - lo) // k
    s = int(rng.integers(lo, m - (k - 1) * d + 1))
    return [s + t * d for t in range(k)], m


def jk_uniform(N: int, rng: Rng, span: int | None = None) -> tuple[int, int]:
    """LeapAlign: ``rev_k > rev_j`` distinct and uniform in ``{1..span}`` (span defaults to N)."""
    span = N if span is None else span
    rev_j, rev_k = sorted(int(r) for r in rng.choice(np.arange(1, span + 1), size=2, replace=False))
    return N - rev_k, N - rev_j


def jk_dirichlet(
    N: int, rng: Rng, concentration: tuple[float, float, float] = (2.5, 6.0, 2.0), rev_j_cap: int | None = None,
    span: int | None = None,
) -> tuple[int, int]:
    """FlowBP-Lagrange's (k, j): segment lengths A (near the image), B (k–j gap), C (near noise).

    Range ``n = max_idx − min_idx`` with ``min_idx = 1``, ``max_idx = span + 1`` (``span``: the tail window,
    N without one); lengths are ``round(Dir(...)·n)`` with the rounding remainder on the segment of the
    largest proportion (spec §6.11), each clamped ≥ 1 and fixed again there; an optional cap on ``rev_j``
    moves A's overflow to C.
    """
    min_idx, n = 1, N if span is None else span
    props = rng.dirichlet(concentration)
    largest = int(np.argmax(props))
    lengths = np.rint(props * n).astype(int)
    lengths[largest] += n - lengths.sum()
    lengths = np.maximum(lengths, 1)
    lengths[largest] += n - lengths.sum()
    len_a, len_b, len_c = (int(x) for x in lengths)
    if rev_j_cap is not None and min_idx + len_a > rev_j_cap:
        overflow = min_idx + len_a - rev_j_cap
        len_a, len_c = len_a - overflow, len_c + overflow
    rev_j = min_idx + len_a
    rev_k = min_idx + len_a + len_b
    return N - rev_k, N - rev_j


def jk_midpoint(N: int, rng: Rng, span: int | None = None) -> tuple[int, int]:
    """``k ~ U{N−span..N−2}`` and ``j`` the midpoint of ``[k, N)``."""
    k = int(rng.integers(N - (N if span is None else span), N - 1))
    return k, k + max(1, (N - k) // 2)


def split_budget(k: int, len_pre: int, len_post: int) -> tuple[int, int]:
    """FlowBP-Bridge: ``K_pre = round(K·len_pre/(len_pre+len_post))``, at least 1 each side.

    Each side is also capped by the room it has (``j`` itself is the first post step), so a
    split drawn near an end never asks for more distinct steps than exist.
    """
    k_pre = min(max(1, round(k * len_pre / (len_pre + len_post))), k - 1)
    k_post = k - k_pre
    return min(k_pre, len_pre), min(k_post, len_post)
