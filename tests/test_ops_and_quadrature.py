import numpy as np
import pytest
import torch
from conftest import sd35_sigmas

from flowbp_ops.methods import get_method
from flowbp_ops.surrogate import bridge, build_plan, connector, scale_grad
from flowbp_ops.surrogate.quadrature import active_supports, lagrange_weights, support_indices


def test_operators_keep_forward_values_bit_for_bit_and_route_gradients():
    torch.manual_seed(0)
    x = torch.randn(64) * 1e3
    x_hat = (x + 1e-3 * torch.randn(64)).requires_grad_()
    y = connector(x_hat, x)
    assert torch.equal(y, x)  # bit for bit, not merely close
    y.sum().backward()
    assert torch.equal(x_hat.grad, torch.ones(64))

    v = torch.randn(8, requires_grad=True)
    out = scale_grad(v, 0.25)
    assert torch.equal(out, v.detach())
    out.sum().backward()
    assert torch.allclose(v.grad, torch.full((8,), 0.25))

    v.grad = None
    out = bridge(v, 0.3)
    assert torch.equal(out, v.detach())
    out.sum().backward()
    assert torch.allclose(v.grad, torch.full((8,), 0.3))
    assert not bridge(v, 0.0).requires_grad


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_lagrange_weights_integrate_polynomials_of_degree_below_order_exactly(order):
    sig = sd35_sigmas(25)
    rng = np.random.default_rng(order)
    for a, b in [(0, 25), (3, 9), (10, 25), (24, 25), (5, 6 + order)]:
        supports = support_indices(a, b, order)
        if len(supports) < order:  # interval too short for `order` distinct supports
            continue
        W = lagrange_weights(sig[supports], sig[a], sig[b])
        for degree in range(order):
            coef = rng.normal(size=degree + 1)
            poly = np.polynomial.Polynomial(coef)
            exact = poly.integ()(sig[b]) - poly.integ()(sig[a])
            quad = float(np.dot(W, poly(sig[supports])))
            assert quad == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_lagrange_order_1_is_leapalign_leap():
    sig = sd35_sigmas(25)
    for k, j in [(0, 1), (3, 17), (20, 25)]:
        assert lagrange_weights(sig[[k]], sig[k], sig[j])[0] == pytest.approx(sig[j] - sig[k], abs=1e-15)
    # and as whole plans: LeapAlign == FlowBP-Lagrange with order 1, one active support
    cfg_leap = get_method("leapalign", "sd35")
    cfg_lag1 = cfg_leap.with_overrides({"weights.rule": "lagrange", "weights.order": 1})
    for seed in range(5):
        p1, p2 = build_plan(cfg_leap, sig, seed), build_plan(cfg_lag1, sig, seed)
        assert [(t.index, t.active) for s in p1.segments for t in s.terms] == \
               [(t.index, t.active) for s in p2.segments for t in s.terms]
        for s1, s2 in zip(p1.segments, p2.segments):
            for t1, t2 in zip(s1.terms, s2.terms):
                assert t1.weight == pytest.approx(t2.weight, abs=1e-15)


def test_lagrange_supports_and_active_supports_follow_the_spec():
    sig = sd35_sigmas(25)
    plan = build_plan(get_method("flowbp_lagrange", "sd35"), sig, 7)
    for seg in plan.segments:
        idx = [t.index for t in seg.terms]
        assert idx == sorted(set(np.rint(np.linspace(seg.start, seg.end - 1, 3)).astype(int).tolist()))
        act = [t for t in seg.terms if t.active]
        assert act[0].index == seg.start and act[0].scale == 1.0
        assert len(act) <= 2 and all(t.scale == 0.25 for t in act[1:])
    assert len(plan.active) <= 4


def test_support_positions_and_which_supports_are_active():
    # linspace over the interval's own positions 0..L−1, rounded half to even, then + start (spec §6.1)
    assert support_indices(1, 19, 3) == [1, 9, 18]  # positions 0, 8.5 → 8, 17 (absolute rounding gave 10)
    assert support_indices(0, 4, 3) == [0, 2, 3]
    assert support_indices(5, 7, 3) == [5, 6]
    assert support_indices(0, 12, 5) == [0, 3, 6, 8, 11]
    # "midpoint": the support nearest the interval's middle; "sequential": the next ones
    assert active_supports([0, 3, 6, 8, 11], 2, "midpoint") == [0, 6]
    assert active_supports([0, 3, 6, 8, 11], 2, "sequential") == [0, 3]
    assert active_supports([0, 3, 6, 8, 11], 3, "sequential") == [0, 3, 6]
    assert active_supports([1, 10, 18], 2, "midpoint") == [1, 10]
    assert active_supports([1, 10, 18], 1, "midpoint") == [1]
