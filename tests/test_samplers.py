import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import sd35_sigmas

from flowbp_ops.methods import METHODS, get_method
from flowbp_ops.surrogate import build_plan, samplers


def test_late_biased_single_draw_follows_power_law():
    rng = np.random.default_rng(0)
    N, beta, draws = 10, 2.0, 20000
    counts = np.bincount([samplers.late_biased(1, beta, 0, N, rng)[0] for _ in range(draws)], minlength=N)
    p = (np.arange(N) + 1.0) ** beta
    p /= p.sum()
    assert np.abs(counts / draws - p).max() < 0.01
    # K > 1 without replacement: distinct, and inclusion frequency increases with the index
    rng = np.random.default_rng(1)
    sets = [samplers.late_biased(4, 1.0, 0, 25, rng) for _ in range(4000)]
    assert all(len(set(s)) == 4 for s in sets)
    freq = np.bincount(np.concatenate(sets), minlength=25)
    assert freq[20:].mean() > 2 * freq[:5].mean()


def test_tail_ratio_restricts_the_window():
    cfg = get_method("flowbp_sparse", "sd35", overrides=["active.tail_ratio=0.4"])
    for seed in range(50):
        assert min(build_plan(cfg, sd35_sigmas(25), seed).active) >= 15


def test_dirichlet_segments_means_and_cap():
    rng = np.random.default_rng(0)
    N = 25
    ks, js = zip(*[samplers.jk_dirichlet(N, rng) for _ in range(5000)])
    ks, js = np.array(ks), np.array(js)
    assert (ks >= 0).all() and (ks < js).all() and (js <= N - 2).all()
    len_a = N - js - 1  # rev_j = 1 + len_A
    len_b = js - ks
    conc = np.array([2.5, 6.0, 2.0])
    assert len_a.mean() == pytest.approx(N * conc[0] / conc.sum(), abs=0.5)
    assert len_b.mean() == pytest.approx(N * conc[1] / conc.sum(), abs=0.5)
    rng = np.random.default_rng(0)
    capped = [samplers.jk_dirichlet(N, rng, rev_j_cap=10) for _ in range(5000)]
    assert max(N - j for _, j in capped) <= 10
    assert any(N - j == 10 for _, j in capped)  # the cap binds sometimes


def test_drtune_spacing_and_early_stop():
    rng = np.random.default_rng(0)
    N, K = 25, 3
    ms = []
    for _ in range(3000):
        steps, m = samplers.drtune(K, 0.4, N, rng)
        d = (m + 1) // K
        assert np.all(np.diff(steps) == d) and 0 <= steps[0] and steps[-1] <= m
        ms.append(m)
    assert set(ms) == set(range(N - 10, N))  # m = N − U{1..round(0.4·25)=10}


def test_uniform_last_and_uniform_jk():
    rng = np.random.default_rng(0)
    taus = [samplers.uniform_last(11, 25, rng) for _ in range(5000)]
    assert set(taus) == set(range(14, 25))
    pairs = [samplers.jk_uniform(25, rng) for _ in range(5000)]
    assert all(0 <= k < j <= 24 for k, j in pairs)


def _plan_fingerprint(seeds):
    return {m: [build_plan(get_method(m, "sd35"), sd35_sigmas(25), s).active for s in seeds] for m in METHODS}


def test_identical_seeds_give_identical_plans_across_processes():
    seeds = list(range(6))
    here = _plan_fingerprint(seeds)
    code = ("import json,sys; sys.path.insert(0, 'tests'); from test_samplers import _plan_fingerprint; "
            f"print(json.dumps(_plan_fingerprint({seeds})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert len({tuple(a) for a in here["flowbp_sparse"]}) > 1  # different seeds do differ


def test_bridge_budget_split_follows_the_spec():
    # K_pre = round(K·len_pre/(len_pre+len_post)), at least 1 each side, each side capped by its room
    assert samplers.split_budget(5, 9, 16) == (2, 3)
    assert samplers.split_budget(5, 1, 24) == (1, 4)
    assert samplers.split_budget(5, 24, 1) == (4, 1)
    assert samplers.split_budget(3, 12, 13) == (1, 2)
    cfg = get_method("flowbp_bridge", "sd35")  # K = 5
    for seed in range(40):
        plan = build_plan(cfg, sd35_sigmas(25), seed)
        j = plan.split
        pre = [i for i in plan.active if i < j]
        post = [i for i in plan.active if i > j]
        k_pre, k_post = samplers.split_budget(5, j, 25 - j)
        assert j in plan.active and len(pre) == k_pre and len(post) == k_post - 1
        assert plan.segments[1].start == j and plan.segments[1].alpha == 0.5
