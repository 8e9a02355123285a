"""Each method's gradient against its closed form from the spec, on ``v = M x + σ b + c``.

Unified gradient (spec section 2):
    ∇θ L = w·∂ℓ/∂y·[ Σ_{i∈A} c_i ω_i ∂θ v(x_i) + α·c_j ω_j·J_j·Σ_{i∈A,i<j} c_i ω_i ∂θ v(x_i) ]
with J = M. The weights ω, scales c and trajectory weights w below are recomputed from the
spec's formulas, not read from the plan; only the random draw (A, k, j, m) is taken from it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LinearField, sd35_sigmas

from flowbp_ops.methods import get_method
from flowbp_ops.surrogate import Denoiser, build_plan, surrogate_step

N, B, D = 12, 2, 3


def setup(seed=0):
    field = LinearField(D, seed)
    g = torch.Generator().manual_seed(100 + seed)
    x0 = torch.randn(B, D, generator=g)
    cond = 0.3 * torch.randn(B, D, generator=g)
    u = torch.randn(D, generator=g)
    return field, x0, cond, u


def engine_grad(field, cfg, sigmas, x0, cond, u, seed):
    plan = build_plan(cfg, sigmas, seed)
    out = surrogate_step(Denoiser(field), plan, x0, cond)
    loss = (out.w * (out.y @ u)).mean()
    gM, gb = torch.autograd.grad(loss, [field.M, field.b])
    return plan, out, gM, gb


def closed_form(field, xs_at, sig, cot):
    """Σ_i cot_i ⊗ x_i for M and Σ_i σ_i cot_i for b (∂θ v of the linear field)."""
    gM = torch.zeros_like(field.M)
    gb = torch.zeros_like(field.b)
    for i, (x_in, lam) in cot.items():
        gM += (lam[:, :, None] * x_in[:, None, :]).sum(0)
        gb += float(sig[i]) * lam.sum(0)
    return gM, gb


def lagrange_w(sig, supports, a, b):
    """Independent weights: Gauss–Legendre integral of the product-form Lagrange basis."""
    nodes, wts = np.polynomial.legendre.leggauss(8)
    s = 0.5 * (sig[b] - sig[a]) * nodes + 0.5 * (sig[b] + sig[a])
    out = []
    for p in supports:
        basis = np.ones_like(s)
        for q in supports:
            if q != p:
                basis *= (s - sig[q]) / (sig[p] - sig[q])
        out.append(0.5 * (sig[b] - sig[a]) * np.dot(wts, basis))
    return out


def mean_abs(a, b):
    return (a - b).abs().mean(dim=1)


def check(gM, gb, eM, eb):
    assert torch.allclose(gM, eM, rtol=1e-4, atol=1e-6), (gM, eM)
    assert torch.allclose(gb, eb, rtol=1e-4, atol=1e-6), (gb, eb)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backbone", ["sd35", "flux1"])
def test_sparse(seed, backbone):
    field, x0, cond, u = setup(seed)
    sig = sd35_sigmas(N)
    cfg = get_method("flowbp_sparse", backbone, overrides=["active.k=3"])
    plan, out, gM, gb = engine_grad(field, cfg, sig, x0, cond, u, seed)
    h = np.diff(sig)
    A = plan.active
    g = 1 + cfg.weights.eta * (np.abs(h).sum() / np.abs(h[A]).sum() - 1)
    xs = out.cache.x
    eM, eb = closed_form(field, xs, sig, {i: (xs[i], (g * h[i] / B) * u.expand(B, D)) for i in A})
    check(gM, gb, eM, eb)
    assert torch.equal(out.y, out.cache.x[N])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_bridge_single_nested_term_and_alpha_zero_removes_it(seed, alpha):
    field, x0, cond, u = setup(seed)
    sig = sd35_sigmas(N)
    cfg = get_method("flowbp_bridge", "flux1", overrides={"active.k": 4, "bridge.alpha": alpha})
    plan, out, gM, gb = engine_grad(field, cfg, sig, x0, cond, u, seed)
    h = np.diff(sig)
    A, j = plan.active, plan.split
    assert j in A
    g = 1 + cfg.weights.eta * (np.abs(h).sum() / np.abs(h[A]).sum() - 1)
    MT_u = field.M.detach().T @ u
    xs = out.cache.x
    cot = {}
    for i in A:
        lam = u + (alpha * g * h[j] * MT_u if i < j else 0)
        cot[i] = (xs[i], (g * h[i] / B) * lam.expand(B, D))
    check(gM, gb, *closed_form(field, xs, sig, cot))
    if alpha == 0.0:  # and α = 0 is exactly the direct terms
        direct = closed_form(field, xs, sig, {i: (xs[i], (g * h[i] / B) * u.expand(B, D)) for i in A})
        check(gM, gb, *direct)


@pytest.mark.parametrize("seed", range(4))
def test_leapalign(seed):
    field, x0, cond, u = setup(seed)
    sig = sd35_sigmas(N)
    cfg = get_method("leapalign", "flux1")
    plan, out, gM, gb = engine_grad(field, cfg, sig, x0, cond, u, seed)
    (k, j), alpha, tau = plan.active, 0.3, 0.1
    xs, vs = out.cache.x, out.cache.v
    d_j = mean_abs(xs[k] + (sig[j] - sig[k]) * vs[k], xs[j])
    d_0 = mean_abs(xs[j] - sig[j] * vs[j], xs[N])
    w = 1.0 / (d_j.clamp_min(tau) + d_0.clamp_min(tau))
    MT_u = field.M.detach().T @ u
    cot = {k: (xs[k], (w[:, None] / B) * (sig[j] - sig[k]) * (u + alpha * (-sig[j]) * MT_u)),
           j: (xs[j], (w[:, None] / B) * (-sig[j]) * u.expand(B, D))}
    check(gM, gb, *closed_form(field, xs, sig, cot))
    assert torch.allclose(out.w, w) and torch.allclose(out.d_j, d_j) and torch.allclose(out.d_0, d_0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backbone", ["sd35", "flux1"])
def test_lagrange(seed, backbone):
    field, x0, cond, u = setup(seed)
    sig = sd35_sigmas(N)
    cfg = get_method("flowbp_lagrange", backbone)
    plan, out, gM, gb = engine_grad(field, cfg, sig, x0, cond, u, seed)
    xs, vs = out.cache.x, out.cache.v
    alpha, tau, j = 0.1, cfg.trajectory_weight.tau, plan.split
    seg1, seg2 = plan.segments
    k = seg1.start
    W1 = lagrange_w(sig, [t.index for t in seg1.terms], k, j)
    W2 = lagrange_w(sig, [t.index for t in seg2.terms], j, N)
    xhat_j = xs[k] + sum(W * vs[t.index] for W, t in zip(W1, seg1.terms))
    xhat_N = xs[j] + sum(W * vs[t.index] for W, t in zip(W2, seg2.terms))
    w = 1.0 / (mean_abs(xhat_j, xs[j]).clamp_min(tau) + mean_abs(xhat_N, xs[N]).clamp_min(tau))
    act = [(W, t) for seg, Ws in [(seg1, W1), (seg2, W2)] for W, t in zip(Ws, seg.terms) if t.active]
    # the rescale per interval (spec §6.7): Σ_supports |W| / Σ_active |W| of that interval
    g = {seg.start: 1 + cfg.weights.eta * (sum(abs(W) for W in Ws) / sum(abs(W) for W, t in zip(Ws, seg.terms)
                                                                         if t.active) - 1)
         for seg, Ws in [(seg1, W1), (seg2, W2)]}
    c = {t.index: g[k if t.index < j else j] * (1.0 if t.index in (k, j) else 0.25) for _, t in act}
    W_of = {t.index: W for W, t in act}
    MT_u = field.M.detach().T @ u
    cot = {}
    for i in c:
        lam = u + (alpha * c[j] * W_of[j] * MT_u if i < j else 0)
        cot[i] = (xs[i], (w[:, None] / B) * c[i] * W_of[i] * lam)
    check(gM, gb, *closed_form(field, xs, sig, cot))
    assert torch.equal(out.y, xs[N])


@pytest.mark.parametrize("seed", range(4))
def test_refl_and_drtune_posterior_means(seed):
    field, x0, cond, u = setup(seed)
    sig = sd35_sigmas(N)
    h = np.diff(sig)
    plan, out, gM, gb = engine_grad(field, get_method("refl", "sd35"), sig, x0, cond, u, seed)
    (tau,) = plan.active
    xs, vs = out.cache.x, out.cache.v
    assert torch.allclose(out.y, xs[tau] - sig[tau] * vs[tau])
    check(gM, gb, *closed_form(field, xs, sig, {tau: (xs[tau], (-sig[tau] / B) * u.expand(B, D))}))

    plan, out, gM, gb = engine_grad(field, get_method("drtune", "sd35", overrides=["active.k=2"]), sig, x0, cond, u,
                                    seed)
    m = plan.segments[-1].start
    xs, vs = out.cache.x, out.cache.v
    assert torch.allclose(out.y, xs[m] - sig[m] * vs[m])
    cot = {i: (xs[i], ((h[i] if i < m else -sig[m]) / B) * u.expand(B, D)) for i in plan.active}
    check(gM, gb, *closed_form(field, xs, sig, cot))


def test_draft_lv_copies(linear_field):
    field, x0, cond, u = setup(1)
    sig = sd35_sigmas(N)
    plan, out, gM, gb = engine_grad(field, get_method("draft_lv", "sd35"), sig, x0, cond, u, 3)
    assert plan.active == [N - 1] and out.grad_forwards == 3 and out.y.shape == (3 * B, D)
    s = sig[N - 1]
    xs = out.cache.x
    y0 = xs[N - 1] - s * out.cache.v[N - 1]
    gen = torch.Generator().manual_seed(plan.seed)
    inputs = [xs[N - 1]] + [(1 - s) * y0 + s * torch.randn(y0.shape, generator=gen) for _ in range(2)]
    eM = sum(closed_form(field, None, sig, {N - 1: (x_in, (-s / (3 * B)) * u.expand(B, D))})[0] for x_in in inputs)
    eb = sum(closed_form(field, None, sig, {N - 1: (x_in, (-s / (3 * B)) * u.expand(B, D))})[1] for x_in in inputs)
    check(gM, gb, eM, eb)


@pytest.mark.parametrize("method, k", [("draft_k", 1), ("draft_k", 4), ("draft_k", N), ("alignprop", None)])
def test_exact_references_chain_the_jacobians(method, k):
    """DRaFT-K / AlignProp: Σ_i h_i [Π_{l>i}(I + h_l J_l)] ∂θ v(x_i), the spec's full backprop."""
    field, x0, cond, u = setup(2)
    sig = sd35_sigmas(N)
    cfg = get_method(method, "sd35", n_steps=N, overrides={"active.k": k} if k else None)
    plan, out, gM, gb = engine_grad(field, cfg, sig, x0, cond, u, 5)
    h = np.diff(sig)
    M = field.M.detach()
    xs = out.cache.x
    mu, cot = u.clone(), {}
    for i in reversed(plan.active):
        cot[i] = (xs[i], (h[i] / B) * mu.expand(B, D))
        mu = mu + h[i] * (M.T @ mu)
    check(gM, gb, *closed_form(field, xs, sig, cot))
    # and independently: autograd through a plain Euler loop that keeps the graph
    start = plan.active[0]
    x = xs[start].clone()
    for i in range(start, N):
        x = x + float(h[i]) * field(x, torch.full((B,), float(sig[i])), cond)
    rM, rb = torch.autograd.grad((x @ u).mean(), [field.M, field.b])
    check(gM, gb, rM, rb)
