"""The authors' recipe, rule by rule (spec §6): each test computes the rule independently and fails under the
earlier rule (shown in the test where the difference is the point)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from flowbp_ops.methods import get_method
from flowbp_ops.surrogate import samplers
from flowbp_ops.surrogate.plan import build_plan
from flowbp_ops.surrogate.quadrature import lagrange_weights, support_indices
from tests.conftest import sd35_sigmas


def _supports(start: int, end: int, order: int) -> list[int]:
    """§6.1 independently: Python's round() is half-to-even, over the interval's own positions."""
    pos = [round(x) for x in np.linspace(0, end - start - 1, order).tolist()]
    pos[0] = 0
    return sorted({start + p for p in pos})


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_1_lagrange_supports_on_every_interval_of_the_25_step_grid(order):
    intervals = [(s, e) for s in range(25) for e in range(s + 1, 26)]
    assert len(intervals) == 325
    assert all(support_indices(s, e, order) == _supports(s, e, order) for s, e in intervals)
    if order == 3:  # the earlier rule (absolute indices rounded) differs on 66 of them, as the spec says
        old = [sorted({round(x) for x in np.linspace(s, e - 1, 3).tolist()}) for s, e in intervals]
        assert sum(o != _supports(s, e, 3) for o, (s, e) in zip(old, intervals)) == 66


def test_2_ema_is_a_copy_of_the_base_with_the_fixed_decay_from_step_1():
    from diffusers.training_utils import EMAModel

    from flowbp_ops.training.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], 0.995, warmup=False)
    with torch.no_grad():
        p.fill_(1.0)  # the weights jump to 1 and stay: the EMA keeps 0.995^t of the base
    for _ in range(300):
        ema.update([p])
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 0.995 ** 300))  # 22 % base left, as §6.2 says
    assert abs(0.995 ** 300 - 0.222) < 0.001
    # the warm-up option is diffusers' EMAModel schedule, step for step (the default world's runs)
    q, r = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    mine, theirs = EMA([q], 0.95, warmup=True), EMAModel([r], decay=0.95)
    for t in range(1, 30):
        with torch.no_grad():
            q.fill_(float(t))
            r.fill_(float(t))
        mine.update([q])
        theirs.step([r])
        assert torch.allclose(mine.shadow[0], theirs.shadow_params[0]), t


def test_2_presets_use_the_authors_ema_and_the_default_world_its_warm_up():
    from flowbp_ops.params import Params
    from flowbp_ops.presets import get_preset, preset_names

    assert all(not get_preset(n).train.ema_warmup and get_preset(n).train.ema == 0.995 for n in preset_names())
    assert Params().train.ema_warmup  # the default world's short runs keep the ramp


def test_4_the_tail_window_is_ceil_and_every_sampler_honours_it():
    cfg = get_method("flowbp_lagrange", "flux2", 25)
    assert cfg.active.tail_ratio == 0.7 and cfg.window(25) == 18  # reverse indices [1, 19)
    assert get_method("flowbp_sparse", "sd35", overrides=["active.tail_ratio=0.7"]).window(15) == 11  # round: 10
    sig = sd35_sigmas(25)
    ks, js = Counter(), Counter()
    for seed in range(600):
        plan = build_plan(cfg, sig, seed)
        k, j = plan.segments[0].start, plan.split
        ks[k] += 1
        js[j] += 1
        assert k >= 7 and 25 - k <= 18, (seed, k)  # the earlier rule drew k from the whole grid
    assert min(ks) == 7  # the window's edge is reached
    # the same (k, j) as the Dirichlet rule over span 18 computed here
    for seed in range(200):
        rng = np.random.default_rng(seed)
        props = rng.dirichlet((2.5, 6.0, 2.0))
        lengths = np.rint(props * 18).astype(int)
        lengths[np.argmax(props)] += 18 - lengths.sum()
        lengths = np.maximum(lengths, 1)
        lengths[np.argmax(props)] += 18 - lengths.sum()
        k, j = 25 - (1 + lengths[0] + lengths[1]), 25 - (1 + lengths[0])
        plan = build_plan(cfg, sig, seed)
        assert (plan.segments[0].start, plan.split) == (k, j), seed
    # the uniform jk sampler and ReFL's τ inside the window too
    for method in ("leapalign", "refl"):
        c = get_method(method, "sd35", overrides=["active.tail_ratio=0.4"])
        assert all(min(build_plan(c, sig, s).active) >= 25 - 10 for s in range(300)), method


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(i, 0) - q.get(i, 0)) for i in set(p) | set(q))


def test_5_bridge_late_bias_counts_from_j_plus_1_after_the_split_and_from_the_window_start_before():
    cfg = get_method("flowbp_bridge", "sd35", overrides=["active.tail_ratio=0.6"])  # K=5, β=4, window [10, 25)
    sig = sd35_sigmas(25)
    post, pre = {}, {}
    for seed in range(6000):
        d = build_plan(cfg, sig, seed).draw
        j = d["split"]
        if len(d["post"]) == 1:
            post.setdefault(j, Counter())[d["post"][0]] += 1
        if len(d["pre"]) == 1:
            pre.setdefault(j, Counter())[d["pre"][0]] += 1
    beta = 4.0

    def check(observed: dict[int, Counter], lo_of, origin_new, origin_old) -> None:
        j, counts = max(observed.items(), key=lambda kv: sum(kv[1].values()))
        n = sum(counts.values())
        idx = list(range(*lo_of(j)))
        emp = {i: counts[i] / n for i in idx}
        rule = lambda o: {i: (i - o + 1) ** beta / sum((x - o + 1) ** beta for x in idx) for i in idx}  # noqa: E731
        new, old = _tv(emp, rule(origin_new(j))), _tv(emp, rule(origin_old))
        assert n > 150 and new < 0.08 and old > 2 * new, (j, n, new, old)

    check(post, lambda j: (j + 1, 25), lambda j: j + 1, 0)
    check(pre, lambda j: (10, j), lambda j: 10, 0)


def test_6_cfg_gradient_compensation_divides_the_loss_by_the_guidance(world):
    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import Trainer

    prompts = load_prompt_set(world / "prompts", "train")
    norms = {}
    for comp in (False, True):
        cfg = TrainConfig(method="flowbp_lagrange", steps=1, batch=2, rollout_steps=4, heldout_rewards=[], ema=None,
                          guidance=4.0, grad_clip=1e9, cfg_grad_compensate=comp, ema_eval_every=None,
                          pretrain_weight=0)  # the compensation divides the reward loss alone
        t = Trainer(cfg, DefaultBackbone(world), prompts, {"world_dir": world})
        norms[comp] = t.fit(world.parent / f"cfgcomp-{comp}")["last"]["grad_norm"]
    assert norms[False] > 0 and math.isclose(norms[True] * 4.0, norms[False], rel_tol=1e-4)
    from flowbp_ops.presets import get_preset, preset_names

    assert [n for n in preset_names() if get_preset(n).train.cfg_grad_compensate] == ["flux2/flowbp_lagrange"]


def test_7_lagrange_rescale_is_per_interval():
    sig = sd35_sigmas(25)
    cfg = get_method("flowbp_lagrange", "flux1")  # η = 0.5
    for seed in range(50):
        plan = build_plan(cfg, sig, seed)
        for seg, factor in zip(plan.segments, plan.rescales):
            W = lagrange_weights(np.array([sig[t.index] for t in seg.terms]), sig[seg.start], sig[seg.end])
            act = sum(abs(w) for w, t in zip(W, seg.terms) if t.active)
            assert math.isclose(factor, 1 + 0.5 * (np.abs(W).sum() / act - 1), rel_tol=1e-12)
        assert plan.rescales[0] != plan.rescales[1] or seed > 45  # two intervals, two factors (the earlier: one g)


def test_8_sd35_encodes_with_t5_at_512_tokens():
    from flowbp_ops.backbones.sd35 import SD35Backbone
    from flowbp_ops.presets import get_preset

    assert SD35Backbone.default_max_sequence_length == 512
    assert get_preset("sd35/flowbp_lagrange").base_model.max_sequence_length == 512


def test_9_sd35_evaluates_on_the_schedulers_own_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowbp_ops.backbones.schedules import get_schedule
    from flowbp_ops.presets import get_preset

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(40)  # what StableDiffusion3Pipeline does without sigmas
    ours = get_schedule("sd35").sigmas(40, grid="scheduler")
    assert np.allclose(ours, sched.sigmas.double().numpy()) and abs(ours[-2] - 0.009) < 0.0005
    assert abs(get_schedule("sd35").sigmas(40)[-2] - 0.0714) < 0.001  # training's grid stays
    assert np.allclose(get_schedule("flux1").sigmas(50, grid="scheduler"), get_schedule("flux1").sigmas(50))
    assert (get_preset("sd35/refl").rollouts.grid == "scheduler"
            and get_preset("flux1/refl").rollouts.grid == "training")


@pytest.mark.parametrize("numerics", ["fp32_state", "authors"])
def test_10_both_numerics_train(world, numerics, monkeypatch):
    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.surrogate import compose
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import Trainer

    seen = []
    real = compose.surrogate_step
    monkeypatch.setattr("flowbp_ops.training.loop.surrogate_step",
                        lambda *a, **k: (lambda out: (seen.append(out.cache.x[-1].dtype), out)[1])(real(*a, **k)))
    cfg = TrainConfig(method="flowbp_sparse", steps=2, batch=2, rollout_steps=4, heldout_rewards=[], ema=None,
                      numerics=numerics, ema_eval_every=None)
    t = Trainer(cfg, DefaultBackbone(world), load_prompt_set(world / "prompts", "train"), {"world_dir": world})
    last = t.fit(world.parent / f"num-{numerics}")["last"]
    assert math.isfinite(last["loss"]) and last["grad_norm"] > 0
    assert set(seen) == {torch.bfloat16 if numerics == "authors" else torch.float32}
    if numerics == "authors":  # the timesteps are bf16 values
        assert all(float(torch.tensor(s).to(torch.bfloat16)) == s for s in t.sigmas)


def test_11_dirichlet_rounding_remainder_goes_to_the_largest_proportion():
    def rule(rng, on_props: bool) -> tuple[int, int]:
        props = rng.dirichlet((2.5, 6.0, 2.0))
        lengths = np.rint(props * 25).astype(int)
        target = np.argmax(props) if on_props else np.argmax(lengths)
        lengths[target] += 25 - lengths.sum()
        lengths = np.maximum(lengths, 1)
        lengths[np.argmax(props) if on_props else np.argmax(lengths)] += 25 - lengths.sum()
        return 25 - (1 + lengths[0] + lengths[1]), 25 - (1 + lengths[0])

    differs = 0
    for seed in range(3000):
        ours = samplers.jk_dirichlet(25, np.random.default_rng(seed))
        assert ours == rule(np.random.default_rng(seed), True), seed
        differs += ours != rule(np.random.default_rng(seed), False)
    assert differs > 0  # the earlier rule (argmax of the rounded lengths) gives other pairs on some draws


def test_12_the_authors_diagnostics_are_logged(world, tmp_path):
    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import Trainer

    rows = []

    class Rows:
        def on_step(self, step, m):
            rows.append(m)

    cfg = TrainConfig(method="flowbp_lagrange", steps=4, batch=2, rollout_steps=6, heldout_rewards=["align_heldout"],
                      ema=0.9, ema_eval_every=2, ema_eval_prompts=3, method_overrides=["weights.eta=0.5"])
    prompts = load_prompt_set(world / "prompts", "train")
    t = Trainer(cfg, DefaultBackbone(world), prompts, {"world_dir": world},
                eval_prompts=load_prompt_set(world / "prompts", "test"))
    t.fit(tmp_path, callbacks=[Rows()])
    for m in rows:
        assert {"d_j", "d_0", "w", "rescale_0", "rescale_1", "d_j_leap", "k", "j"} <= set(m)
        assert m["rescale_0"] >= 1 and 0 <= m["k"] < m["j"] < 6
    assert [("ema_eval/reward" in m) for m in rows] == [True, True, False, True]  # steps 1, 2, 4
    assert "ema_eval/align_heldout" in rows[0]
    from flowbp_ops.comparison import plot_kj

    counts = plot_kj([(int(m["k"]), int(m["j"])) for m in rows], 6, tmp_path / "kj.png")
    assert sum(counts.values()) == 4 and (tmp_path / "kj.png").stat().st_size > 1000
