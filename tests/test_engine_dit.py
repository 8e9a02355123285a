"""The engine on a real (small, random-init) SD3-architecture DiT with real CFG."""

from __future__ import annotations

import pytest
import torch
from conftest import CountingField, sd35_sigmas

from flowbp_ops.backbones.sd3 import SD3Velocity, random_conditioning
from flowbp_ops.methods import METHODS, get_method
from flowbp_ops.surrogate import CFGCond, Denoiser, build_plan, surrogate_step
from flowbp_ops.surrogate.rollout import rollout

B = 2
ENDPOINT_METHODS = [m for m in METHODS if get_method(m, "tiny").reward_input.kind == "endpoint"]


def world(model, seed=0, cfg_scale=3.5):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x0 = torch.randn(B, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = random_conditioning(model, B, seed=seed)
    if cfg_scale is not None:
        cond = CFGCond(cond, random_conditioning(model, B, seed=seed + 99))
    u = torch.randn(x0.shape[1:], generator=g)
    return x0, cond, u, Denoiser(SD3Velocity(model), cfg_scale=cfg_scale)


def grads(model, out, u):
    loss = (out.w * -torch.tanh(out.y * u).flatten(1).mean(1)).mean()
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("method", ENDPOINT_METHODS)
@pytest.mark.parametrize("mode", ["one_pass", "two_pass", "batched"])
def test_connector_methods_see_the_cached_endpoint_bit_for_bit(tiny_dit, method, mode):
    x0, cond, u, den = world(tiny_dit, seed=1)
    sig = sd35_sigmas(10)
    cfg = get_method(method, "tiny", 10, overrides={"execution.mode": mode})
    out = surrogate_step(den, build_plan(cfg, sig, 3), x0, cond)
    assert torch.equal(out.y, out.cache.x[10])
    assert out.y.requires_grad
    # the trajectory is the sampler's own: same endpoint as a plain no-grad rollout
    plain = rollout(den, x0, sig, cond)
    assert torch.allclose(out.cache.x[10], plain.x[10], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["two_pass", "batched"])
def test_every_execution_mode_gives_the_one_pass_gradient(tiny_dit, method, mode):
    x0, cond, u, den = world(tiny_dit, seed=2)
    sig = sd35_sigmas(10)
    cfg1 = get_method(method, "tiny", 10, overrides={"execution.mode": "one_pass"})
    cfg2 = cfg1.with_overrides({"execution.mode": mode})
    g1 = grads(tiny_dit, surrogate_step(den, build_plan(cfg1, sig, 4), x0, cond), u)
    out2 = surrogate_step(den, build_plan(cfg2, sig, 4), x0, cond)
    g2 = grads(tiny_dit, out2, u)
    flat1 = torch.cat([g.flatten() for g in g1 if g is not None])
    flat2 = torch.cat([g.flatten() for g in g2 if g is not None])
    assert flat1.norm() > 0 and out2.mode == mode
    assert torch.allclose(flat1, flat2, rtol=1e-3, atol=1e-6 * flat1.abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [6, 13, 24])
def test_grad_forwards_equal_the_active_set_and_one_pass_saves_forwards(tiny_dit, method, n):
    x0, cond, u, _ = world(tiny_dit, seed=3)
    sig = sd35_sigmas(n)
    for mode in ("one_pass", "two_pass", "batched"):
        counter = CountingField(SD3Velocity(tiny_dit))
        den = Denoiser(counter, cfg_scale=3.5)
        calls = CountingField(den)  # denoiser-level forwards (one per step or per batched call; CFG inside)
        # checkpointing fixed: an undecided (auto) step runs its first forward alone to measure it
        cfg = get_method(method, "tiny", n, overrides={"execution.mode": mode, "execution.checkpoint": False})
        plan = build_plan(cfg, sig, n)
        out = surrogate_step(calls, plan, x0, cond)
        assert out.grad_forwards == plan.n_grad_forwards
        assert counter.grad_calls == out.grad_calls
        if mode == "batched":  # the cached-input steps (and LV's copies) in one call, the bridged ones after it
            unbridged = len(plan.active) - len(plan.bridged)
            assert out.grad_calls == (unbridged > 0) + len(plan.bridged) + (plan.lv_copies > 0)
        else:
            assert out.grad_calls == plan.n_grad_forwards
        # one pass: the active forwards replace the rollout's no-grad ones at their steps
        assert calls.calls == plan.rollout_steps + out.grad_calls - (len(plan.active) if mode == "one_pass" else 0)


def saved_bytes(fn, params):
    """Bytes autograd saves for backward while ``fn`` runs (parameters themselves excluded)."""
    param_ptrs = {p.data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("method", ["flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "leapalign", "refl",
                                    "drtune", "draft_lv"])
def test_autograd_memory_does_not_grow_with_steps_for_surrogates(tiny_dit, method):
    x0, cond, u, den = world(tiny_dit, seed=4)
    params = list(tiny_dit.parameters())
    sizes = []
    for n in (12, 24, 48):
        cfg = get_method(method, "tiny", n)
        plan = build_plan(cfg, sd35_sigmas(n), 0)
        if method == "drtune":
            assert len(plan.active) == 3
        sizes.append((len(plan.active), saved_bytes(lambda: surrogate_step(den, plan, x0, cond), params)))
    per_forward = [s / a for a, s in sizes]
    assert max(per_forward) == min(per_forward), sizes  # the same bytes per active step at every N


@pytest.mark.parametrize("checkpoint", [False, True])
def test_full_backprop_memory_grows_linearly(tiny_dit, checkpoint):
    x0, cond, u, den = world(tiny_dit, seed=4)
    params = list(tiny_dit.parameters())
    sizes = {}
    for n in (6, 12, 24):
        cfg = get_method("draft_k", "tiny", n, overrides={"active.k": n, "execution.checkpoint": checkpoint})
        sizes[n] = saved_bytes(lambda: surrogate_step(den, build_plan(cfg, sd35_sigmas(n), 0), x0, cond), params)
    assert sizes[12] == pytest.approx(2 * sizes[6], rel=0.05) and sizes[24] == pytest.approx(4 * sizes[6], rel=0.05)


def test_checkpointing_keeps_the_exact_gradient(tiny_dit):
    x0, cond, u, den = world(tiny_dit, seed=5)
    sig = sd35_sigmas(8)
    flat = []
    for ck in (False, True):
        cfg = get_method("draft_k", "tiny", 8, overrides={"active.k": 8, "execution.checkpoint": ck})
        g = grads(tiny_dit, surrogate_step(den, build_plan(cfg, sig, 0), x0, cond), u)
        flat.append(torch.cat([t.flatten() for t in g if t is not None]))
    assert torch.allclose(flat[0], flat[1], rtol=1e-4, atol=1e-7)


def test_sparse_all_active_is_full_backprop_without_jacobian_factors(tiny_dit):
    """With A = all steps and g = 1: Σ_i h_i ∂θ v(x_i), computed here step by step, independently."""
    n = 8
    x0, cond, u, den = world(tiny_dit, seed=6, cfg_scale=None)
    sig = sd35_sigmas(n)
    cfg = get_method("custom", "tiny", n, overrides={"active.sampler": "explicit", "active.indices": list(range(n))})
    out = surrogate_step(den, build_plan(cfg, sig, 0), x0, cond)
    params = list(tiny_dit.parameters())
    g_engine = torch.autograd.grad((-torch.tanh(out.y * u).flatten(1).mean(1)).mean(), params, allow_unused=True)

    plain = rollout(den, x0, sig, cond)
    y = plain.x[n].clone().requires_grad_()
    dl_dy = torch.autograd.grad((-torch.tanh(y * u).flatten(1).mean(1)).mean(), y)[0]
    total = [torch.zeros_like(p) for p in params]
    for i in range(n):
        v = den(plain.x[i], float(sig[i]), cond)
        gi = torch.autograd.grad(float(sig[i + 1] - sig[i]) * (v * dl_dy).sum(), params, allow_unused=True)
        total = [t + (g if g is not None else 0) for t, g in zip(total, gi)]
    for a, b in zip(g_engine, total):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)
    # and it is not the exact gradient: the Jacobian factors were removed
    exact = get_method("draft_k", "tiny", n, overrides={"active.k": n})
    g_exact = grads(tiny_dit, surrogate_step(den, build_plan(exact, sig, 0), x0, cond), u)
    diff = sum(float((a - b).norm()) for a, b in zip(g_engine, g_exact) if a is not None)
    assert diff > 1e-3 * sum(float(b.norm()) for b in g_exact if b is not None)


def test_stored_rollout_is_composed_two_pass(tiny_dit):
    x0, cond, u, den = world(tiny_dit, seed=7)
    sig = sd35_sigmas(10)
    cache = rollout(den, x0, sig, cond)
    plan = build_plan(get_method("flowbp_lagrange", "tiny", 10), sig, 1)
    out = surrogate_step(den, plan, None, cond, cache=cache)
    assert torch.equal(out.y, cache.x[10]) and out.grad_forwards == len(plan.active)
    short = rollout(den, x0, sig, cond, steps=5)
    with pytest.raises(ValueError, match="cached rollout has 5 of N=10"):
        surrogate_step(den, plan, None, cond, cache=short)


@pytest.mark.parametrize("method", ["draft_k", "alignprop"])
def test_exact_references_differentiate_both_cfg_branches(tiny_dit, method):
    """Under real CFG the references equal autograd through a plain Euler loop of the guided field."""
    n = 6
    x0, cond, u, den = world(tiny_dit, seed=8, cfg_scale=3.5)
    sig = sd35_sigmas(n)
    cfg = get_method(method, "tiny", n, overrides={"active.k": n, "active.k_min": None} if method == "alignprop"
                     else {"active.k": n})
    plan = build_plan(cfg, sig, 0)
    assert plan.active == list(range(n)) and not plan.cfg_detach_neg
    g_engine = grads(tiny_dit, surrogate_step(den, plan, x0, cond), u)
    full = Denoiser(den.model, cfg_scale=3.5, detach_neg=False)
    x = x0.clone()
    for i in range(n):
        x = x + float(sig[i + 1] - sig[i]) * full(x, float(sig[i]), cond)
    loss = (-torch.tanh(x * u).flatten(1).mean(1)).mean()
    g_ref = torch.autograd.grad(loss, list(tiny_dit.parameters()), allow_unused=True)
    for a, b in zip(g_engine, g_ref):
        if b is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-7)
