"""The fast no-grad path (merged LoRA, torch.compile) and the measured execution decisions: same values, same
gradients, weights restored bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import sd35_sigmas
from peft import LoraConfig

from flowbp_ops.backbones.sd3 import SD3Velocity, random_conditioning, tiny_sd3_transformer
from flowbp_ops.methods import get_method
from flowbp_ops.surrogate import CFGCond, Denoiser, build_plan, surrogate_step
from flowbp_ops.surrogate.config import Execution
from flowbp_ops.surrogate.runtime import Runtime
from flowbp_ops.training import fast_rollout
from flowbp_ops.training.fast_rollout import MergedLoRA, fast_denoiser, lora_layers

B = 2


@pytest.fixture
def lora_dit():
    tr = tiny_sd3_transformer(0)
    tr.requires_grad_(False)
    torch.manual_seed(1)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make the merge trivial
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return tr


def inputs(tr, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = tr.config
    x = torch.randn(B, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = CFGCond(random_conditioning(tr, B, seed=seed), random_conditioning(tr, B, seed=seed + 9))
    return x, cond


def base_weights(tr):
    return {id(layer): layer.get_base_layer().weight.data for layer in lora_layers(tr)}


def test_merged_forward_equals_the_adapter_and_restores_the_weights_bit_for_bit(lora_dit):
    x, cond = inputs(lora_dit)
    vel = SD3Velocity(lora_dit)
    s = torch.full((B,), 0.6)
    before = {k: (w, w.clone()) for k, w in base_weights(lora_dit).items()}
    with torch.no_grad():
        plain = vel(x, s, cond.pos)
        merged = MergedLoRA(lora_dit)
        with merged():
            folded = vel(x, s, cond.pos)
            assert all(layer.merged for layer in lora_layers(lora_dit))
        again = vel(x, s, cond.pos)
        bare = SD3Velocity(tiny_sd3_transformer(0))(x, s, cond.pos)  # the same weights without the adapter
    assert not torch.allclose(plain, bare, atol=1e-3)  # the adapter matters
    assert torch.allclose(folded, plain, atol=1e-5, rtol=1e-4) and (folded - plain).abs().max() > 0
    assert torch.equal(again, plain)  # the unmerged path is untouched
    for layer in lora_layers(lora_dit):
        w = layer.get_base_layer().weight.data
        original, copy = before[id(layer)]
        same_memory = w.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
        assert same_memory and torch.equal(w, copy) and not layer.merged


def test_merged_weights_follow_an_optimizer_step(lora_dit):
    merged = MergedLoRA(lora_dit)
    merged.refresh()
    first = [m.clone() for m in merged._merged]
    params = [p for p in lora_dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, cond = inputs(lora_dit)
    SD3Velocity(lora_dit)(x, torch.full((B,), 0.5), cond.pos).square().mean().backward()
    opt.step()
    merged.refresh()
    for layer, m, old in zip(merged.layers, merged._merged, first):
        a = layer.active_adapters[0]
        expect = layer.get_base_layer().weight + layer.get_delta_weight(a)
        assert not torch.equal(m, old) and torch.allclose(m, expect, atol=1e-6)


@pytest.mark.parametrize("method", ["flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "refl", "draft_lv"])
def test_a_step_on_the_fast_path_has_the_adapter_gradient(lora_dit, method):
    x, cond = inputs(lora_dit, seed=3)
    sig = sd35_sigmas(8)
    plan = build_plan(get_method(method, "tiny", 8), sig, 5)
    params = [p for p in lora_dit.parameters() if p.requires_grad]
    slow = Denoiser(SD3Velocity(lora_dit), cfg_scale=3.5)
    fast = fast_denoiser(slow, lora_dit, Execution())
    assert fast.no_grad_model is not None

    def grads(den):
        out = surrogate_step(den, plan, x, cond)
        return out, torch.autograd.grad(out.y.square().mean() * out.w.mean(), params)

    o1, g1 = grads(slow)
    o2, g2 = grads(fast)
    assert torch.allclose(o1.cache.x[-1], o2.cache.x[-1], atol=1e-4)
    flat1, flat2 = torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])
    assert flat1.norm() > 0 and torch.allclose(flat1, flat2, rtol=1e-3, atol=1e-5 * flat1.abs().max())


def test_compiled_rollout_equals_eager_on_cpu(lora_dit):
    x, cond = inputs(lora_dit, seed=4)
    slow = Denoiser(SD3Velocity(lora_dit), cfg_scale=3.5)
    fast = fast_denoiser(slow, lora_dit, Execution(compile_rollout=True))
    assert fast.no_grad_model.compiled is not None
    with torch.no_grad():
        a, b = slow(x, 0.7, cond), fast(x, 0.7, cond)
        c = fast(x, 0.3, cond)  # the same compiled graph for another σ
    assert fast.no_grad_model.compiled is not None  # it compiled: no fallback
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.allclose(c, slow(x, 0.3, cond), atol=1e-4, rtol=1e-4)


def test_a_failing_compile_falls_back_to_eager_and_says_so(lora_dit, monkeypatch, caplog):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler\nlong trace")
        return run

    monkeypatch.setattr(fast_rollout.torch, "compile", broken)
    x, cond = inputs(lora_dit)
    slow = Denoiser(SD3Velocity(lora_dit), cfg_scale=3.5)
    fast = fast_denoiser(slow, lora_dit, Execution(compile_rollout=True, merged_rollout=False))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        v = fast(x, 0.5, cond)
        assert torch.equal(v, slow(x, 0.5, cond))
    assert fast.no_grad_model.compiled is None
    assert "torch.compile failed (RuntimeError: no C++ compiler)" in caplog.text


# -- measured decisions ---------------------------------------------------------------------------------


def test_checkpointing_is_chosen_only_when_the_activations_do_not_fit(lora_dit, monkeypatch):
    from flowbp_ops.surrogate import compose

    x, cond = inputs(lora_dit, seed=6)
    sig = sd35_sigmas(10)
    plan = build_plan(get_method("flowbp_sparse", "tiny", 10), sig, 2)
    params = [p for p in lora_dit.parameters() if p.requires_grad]
    den = Denoiser(SD3Velocity(lora_dit), cfg_scale=3.5)

    def run(free: int, mode: str):
        monkeypatch.setattr(compose, "free_bytes", lambda device: free)
        rt = Runtime()
        p = build_plan(get_method("flowbp_sparse", "tiny", 10, overrides={"execution.mode": mode}), sig, 2)
        out = surrogate_step(den, p, x, cond, runtime=rt)
        g = torch.autograd.grad(out.y.square().mean(), params)
        return out, rt, torch.cat([t.flatten() for t in g])

    roomy, rt1, g1 = run(1 << 40, "one_pass")
    per = next(iter(rt1.per_forward.values()))
    assert per > 0 and not roomy.checkpointed and "no checkpointing" in rt1.log[-1]
    tight, rt2, g2 = run(int(len(plan.active) * per * 0.8), "one_pass")  # one fits, all do not
    assert tight.checkpointed and "checkpointing" in rt2.log[-1]
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)
    batched, rt3, g3 = run(int(2.6 * per), "batched")  # the first step alone (measured), then two per call
    assert batched.checkpointed and batched.grad_calls == 1 + -(-(len(plan.active) - 1) // 2)
    assert torch.allclose(g1, g3, rtol=1e-3, atol=1e-6 * g1.abs().max())


def test_auto_mode_tries_both_then_keeps_the_faster():
    rt = Runtime(trials=2)
    seen = []
    for seconds in {"one_pass": 2.0, "batched": 1.0}, {"one_pass": 2.2, "batched": 0.9}:
        for _ in range(2):
            m = rt.mode("auto")
            seen.append(m)
            rt.record(m, seconds[m])
    assert sorted(seen) == ["batched", "batched", "one_pass", "one_pass"]
    assert rt.mode("auto") == "batched" and rt.mode("one_pass") == "one_pass"
    assert "execution.mode=auto: batched" in rt.log[-1]
