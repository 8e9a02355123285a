"""The policy-gradient family's math against independent computations (issue 16's proofs of the objectives)."""

from __future__ import annotations

import math

import pytest
import torch

from flowbp_ops.policy.objectives import (
    clipped_objective,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    nft_loss,
    nft_optimality,
    sde_mean_std,
)


def test_the_sde_step_is_a_gaussian_whose_log_density_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma, sigma_next, a = 0.7, 0.62, 0.7
    mean, std = sde_mean_std(x, v, sigma, sigma_next, a)
    # the drift written out independently: v + s²/(2σ)·(x + (1−σ)v) with s = a·sqrt(σ/(1−σ)), times h
    s2 = a * a * sigma / (1 - sigma)
    assert torch.allclose(mean, x + (sigma_next - sigma) * (v + s2 / (2 * sigma) * (x + (1 - sigma) * v)))
    assert std == pytest.approx(math.sqrt(s2) * math.sqrt(sigma - sigma_next))
    x_next = mean + std * torch.randn(x.shape, generator=g)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    assert torch.allclose(gaussian_log_prob(x_next, mean, std), ref, atol=1e-6)


def test_with_no_noise_the_sde_mean_is_the_euler_step_and_bad_steps_are_refused():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    mean, std = sde_mean_std(x, v, 0.5, 0.4, 0.0)
    assert std == 0.0 and torch.allclose(mean, x - 0.1 * v)
    with pytest.raises(ValueError, match="noise to image"):
        sde_mean_std(x, v, 0.4, 0.5, 0.7)
    with pytest.raises(ValueError, match="0 < σ < 1"):
        sde_mean_std(x, v, 1.0, 0.9, 0.7)


def test_the_sde_keeps_the_flow_marginals_on_a_gaussian_data_distribution():
    """For data x_0 ~ N(0, c²) the flow's exact velocity is linear in x, so an SDE step maps x_σ ~ N(0, m²(σ)) to a
    Gaussian of variance α²·m²(σ) + std² (α: the mean's factor). It must land on the next marginal m²(σ') up to the
    step's O(h²) error at every noise level — and the ODE's drift with the noise added but not the score term
    would not."""
    c2 = 0.25

    def var(s):  # Var x_σ = (1−σ)²c² + σ²
        return (1 - s) ** 2 * c2 + s ** 2

    def velocity(x, s):  # E[ε − x_0 | x_σ] for Gaussian data
        return x * (s - (1 - s) * c2) / var(s)

    one = torch.ones(1, dtype=torch.float64)

    def errors(a, s0, h):
        mean, std = sde_mean_std(one, velocity(one, s0), s0, s0 - h, a)
        step = float(mean) ** 2 * var(s0) + std ** 2
        naive = (1 - h * float(velocity(one, s0))) ** 2 * var(s0) + std ** 2  # the noise without the score term
        return abs(step - var(s0 - h)), abs(naive - var(s0 - h))

    for a in (0.3, 0.7, 1.0):
        for s0 in (0.9, 0.6, 0.3):
            (e1, n1), (e2, n2) = errors(a, s0, 0.01), errors(a, s0, 0.005)
            assert e2 < e1 / 3.5, (a, s0, e1, e2)  # second order: the marginals are kept, up to the step's O(h²)
            assert n2 > n1 / 2.5 and n1 > 2 * e1, (a, s0, n1, n2)  # first order: a drift that leaves them


def test_group_advantages_are_zero_mean_unit_std_per_prompt():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 11.0, 13.0])
    a = group_advantages(r, 4).view(2, 4)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(a.std(1, unbiased=False), torch.ones(2), atol=1e-3)
    assert torch.equal(group_advantages(torch.full((4,), 0.3), 4), torch.zeros(4))  # a tied group teaches nothing
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(r[:7], 4)


def test_the_ratio_is_one_on_policy_and_the_clipped_gradient_vanishes_outside_the_range():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    same = old.clone().requires_grad_(True)
    loss, ratio = clipped_objective(same, old, adv, clip=0.2)
    assert torch.equal(ratio, torch.ones(4))
    (g,) = torch.autograd.grad(loss, same)
    assert torch.allclose(g, -adv / 4)  # d/dlogp of −A·ρ at ρ = 1, over the mean
    # ρ = 1.5 (beyond 1 + c) with A > 0 and ρ = 0.5 (below 1 − c) with A < 0: clipped, no gradient;
    # the same ratios with the other sign of A still pull (the unclipped term is the max there)
    logp = (old + torch.log(torch.tensor([1.5, 0.5, 0.5, 1.5]))).requires_grad_(True)
    loss, ratio = clipped_objective(logp, old, adv, clip=0.2)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0] == 0 and g[1] == 0 and g[2] != 0 and g[3] != 0
    assert torch.allclose(g[2:], -adv[2:] * ratio[2:] / 4)


def test_gaussian_kl_is_the_closed_form():
    m, r = torch.randn(2, 6), torch.randn(2, 6)
    std = 0.3
    p, q = torch.distributions.Normal(m, std), torch.distributions.Normal(r, std)
    assert torch.allclose(gaussian_kl(m, r, std), torch.distributions.kl_divergence(p, q).mean(1), atol=1e-6)


def test_nft_loss_and_gradient_on_a_linear_velocity_field_match_the_closed_form():
    """v_θ(x) = θ·x with scalar θ: the loss is a quadratic in θ, its gradient written out by hand."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.7, 0.9]).view(-1, 1)
    xs = (1 - sigma) * x0 + sigma * eps
    target = eps - x0
    theta_old, beta = 0.8, 0.3
    r = nft_optimality(torch.tensor([2.0, -0.5, 0.0, -3.0]), clip_max=1.0)
    assert torch.allclose(r, torch.tensor([1.0, 0.25, 0.5, 0.0]))
    theta = torch.tensor(1.1, requires_grad=True)
    loss = nft_loss(theta * xs, theta_old * xs, target, r, beta)
    (grad,) = torch.autograd.grad(loss, theta)
    # by hand: pos = ((1−β)θ_old + βθ)x, neg = ((1+β)θ_old − βθ)x
    th = theta.detach()
    pos, neg = ((1 - beta) * theta_old + beta * th) * xs, ((1 + beta) * theta_old - beta * th) * xs
    rr = r.view(-1, 1)
    expect = (rr * (pos - target) ** 2 + (1 - rr) * (neg - target) ** 2).mean()
    d_expect = (rr * 2 * (pos - target) * beta * xs + (1 - rr) * 2 * (neg - target) * (-beta) * xs).mean()
    assert torch.allclose(loss, expect) and torch.allclose(grad, d_expect)
    # r = 1 everywhere: the minimiser of the positive branch moves θ toward the flow-matching optimum
    ones = torch.ones(4)
    t = torch.tensor(0.8, requires_grad=True)
    (g1,) = torch.autograd.grad(nft_loss(t * xs, theta_old * xs, target, ones, beta), t)
    (g_fm,) = torch.autograd.grad(((t * xs - target) ** 2).mean(), t)
    assert torch.allclose(g1, beta * g_fm)  # at θ = θ_old: β times the plain flow-matching gradient
