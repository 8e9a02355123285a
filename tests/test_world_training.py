"""The default world (smoke-sized build) and the training loop on it."""

from __future__ import annotations

import json

import pytest
import torch

from flowbp_ops.methods import METHODS
from flowbp_ops.rewards.base import get_reward, register
from flowbp_ops.training.config import TrainConfig
from flowbp_ops.training.loop import NonFiniteError, train
from flowbp_ops.world.build import WorldConfig, build_world


@pytest.fixture(scope="module")
def prompts(world):
    from flowbp_ops.cli_world import load_prompts

    return load_prompts(world, "train")


def backbone(world):
    from flowbp_ops.backbones.default import DefaultBackbone

    return DefaultBackbone(world)


def small(method="flowbp_sparse", **kw):
    base = dict(method=method, steps=3, batch=2, rollout_steps=5, checkpoint_every=1, finetune="lora",
                heldout_rewards=["align_heldout"])
    return TrainConfig(**{**base, **kw})


def test_world_layout_and_refusals(world, tmp_path):
    assert (world / "vae" / "config.json").exists() and (world / "transformer" / "config.json").exists()
    assert {p.name for p in (world / "rewards").iterdir()} >= {"align_0.safetensors", "quality_heldout.json",
                                                               "detector.json"}
    meta = json.loads((world / "world.json").read_text())
    assert meta["n_test_scenes"] > 0 and set(meta["timings"]) >= {"vae_s", "flow_s", "rewards_s"}
    with pytest.raises(FileExistsError):
        build_world(world, WorldConfig.smoke())

    def interrupt(stage, step, total, loss):
        if stage == "flow":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_world(tmp_path / "w2", WorldConfig.smoke(), progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # no half-written world


def test_rewards_are_differentiable_and_refuse_bad_input(world):
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    prompts = ["a photo of a red seven", "a photo of a two left of a six", "a photo of three ones"]
    for name in ["align", "align_heldout", "quality", "quality_heldout", "align:0.7,quality:0.3"]:
        r = get_reward(name, world_dir=world)(images, prompts)
        assert r.shape == (3,) and torch.isfinite(r).all()
        (g,) = torch.autograd.grad(r.sum(), images)
        assert g.abs().sum() > 0
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        get_reward("align", world_dir=world)(torch.rand(3, 32, 32), prompts)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        get_reward("align", world_dir=world)(images, prompts[:2])
    with pytest.raises(ValueError, match="not a default-world prompt"):
        get_reward("align", world_dir=world)(images[:1], ["a seven on the left, small"])
    with pytest.raises(ValueError, match="unknown reward .hps."):
        get_reward("hps", world_dir=world)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "custom"])
def test_every_method_trains_on_the_default_world(world, prompts, tmp_path, method):
    bb = backbone(world)
    before = {n: p.clone() for n, p in bb.transformer.named_parameters()}
    result = train(small(method), bb, prompts, tmp_path, reward_kwargs={"world_dir": world})
    assert result["skipped"] == 0 and torch.isfinite(torch.tensor(result["last"]["loss"]))
    assert "heldout/align_heldout" in result["last"] and result["last"]["active"]
    lora_b = [p for n, p in bb.transformer.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the adapter learned
    frozen = [n for n, _ in bb.transformer.named_parameters() if n in before]
    assert frozen and all(torch.equal(p, before[n]) for n, p in bb.transformer.named_parameters() if n in before)


def test_resume_is_exact(world, prompts, tmp_path):
    cfg = small("flowbp_lagrange", steps=6, checkpoint_every=3)
    a = backbone(world)
    train(cfg, a, prompts, tmp_path / "a", reward_kwargs={"world_dir": world})
    b = backbone(world)
    train(cfg, b, prompts, tmp_path / "b", stop_after=3, reward_kwargs={"world_dir": world})
    b = backbone(world)  # a fresh process would start from the saved world, too
    train(cfg, b, prompts, tmp_path / "b", resume=True, reward_kwargs={"world_dir": world})
    wa = dict(a.transformer.named_parameters())
    for n, p in b.transformer.named_parameters():
        assert torch.equal(p, wa[n]), n


def test_execution_settings_change_the_cost_not_the_training(world, prompts, tmp_path):
    """The merged-LoRA rollout and the batched re-forwards train the same weights as the plain path (within float
    rounding), leave the base weights bit for bit, and ``mode=auto`` settles on one mode after its trials."""
    runs = {}
    for name, over in {"plain": ["execution.merged_rollout=false"], "fast": [],
                       "batched": ["execution.mode=batched"], "auto": ["execution.mode=auto"]}.items():
        bb = backbone(world)
        before = {n: p.clone() for n, p in bb.transformer.named_parameters()}
        logs = []

        class Keep:
            def on_step(self, step, m):
                logs.append(m)

        train(small("flowbp_bridge", steps=5, ema=None, method_overrides=over), bb, prompts, tmp_path / name,
              callbacks=[Keep()], reward_kwargs={"world_dir": world})
        runs[name] = dict(bb.transformer.named_parameters())
        assert all(torch.equal(p, before[n]) for n, p in runs[name].items() if n in before and "lora" not in n)
        modes = [m["mode"] for m in logs]
        if name == "auto":  # two steps of each, then the faster one
            assert sorted(modes[:4]) == ["batched", "batched", "one_pass", "one_pass"] and modes[4] in modes[:4]
        else:
            assert set(modes) == {"batched" if name == "batched" else "one_pass"}
    for name in ("fast", "batched", "auto"):
        for n, p in runs[name].items():
            assert torch.allclose(p, runs["plain"][n], rtol=1e-3, atol=1e-5), (name, n)


class _NaNAfter:
    name = "nan_after_2"
    calls = 0

    def __call__(self, images, prompts):
        _NaNAfter.calls += 1
        r = images.mean((1, 2, 3))
        return r if _NaNAfter.calls <= 2 else r * float("nan")


register("nan_after_2")(lambda **_: _NaNAfter())


def test_non_finite_steps_are_skipped_then_stop_the_run(world, prompts, tmp_path):
    from flowbp_ops.training.checkpoint import list_checkpoints

    cfg = small(steps=10, reward="nan_after_2", max_bad_steps=3, checkpoint_every=1, keep_last=5)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row.*step-000002"):
        train(cfg, backbone(world), prompts, tmp_path, reward_kwargs={"world_dir": world})
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-000001", "step-000002"]
    from flowbp_ops.training.checkpoint import read_meta

    assert read_meta(kept[-1])["step"] == 2  # intact: every file matches its checksum


def test_lora_adapter_round_trip_through_diffusers(world, prompts, tmp_path):
    from flowbp_ops.trained_weights import WEIGHT_NAME, load_lora, save_lora

    trained = backbone(world)
    train(small(steps=2, lr=5e-2), trained, prompts, tmp_path, reward_kwargs={"world_dir": world})
    path = save_lora(trained.transformer, tmp_path / "weights")
    assert path.name == WEIGHT_NAME
    from safetensors.torch import load_file

    assert all(k.startswith("transformer.") for k in load_file(str(path)))
    # the same weights give the same bytes (safetensors' metadata order alone changes from save to save)
    again = [save_lora(trained.transformer, tmp_path / f"again{i}").read_bytes() for i in range(8)]
    assert all(b == path.read_bytes() for b in again)
    fresh = backbone(world)
    x = torch.randn(2, 4, 16, 16)
    cond = fresh.conditioning(["a photo of a red seven"] * 2, None)
    den = fresh.denoiser(None)
    with torch.no_grad():
        base = den(x, 0.5, cond)
        load_lora(fresh.transformer, tmp_path / "weights")
        loaded = den(x, 0.5, cond)
        want = trained.denoiser(None)(x, 0.5, cond)
    assert not torch.allclose(base, loaded)  # the adapter changes the samples
    assert torch.allclose(loaded, want, atol=1e-5)  # and reproduces the trained model


def test_cli_train_sample_evaluate_and_refusals(world, tmp_path, capsys):
    from flowbp_ops.cli import main

    run = tmp_path / "run"
    base = ["train", "--method", "flowbp_lagrange", "--world", str(world), "--out", str(run)]
    for bad, words in [(["--set", "active.k=0"], "active.k"), (["--set", "reward=hps"], "unknown reward 'hps'"),
                       (["--set", "steps=0"], "steps"), (["--set", "nope=1"], "nope")]:
        assert main(base + bad) == 2
        assert words in capsys.readouterr().err and not run.exists()  # refused: nothing written
    assert main(["train", "--method", "refl", "--world", str(tmp_path / "none"), "--out", str(run)]) == 2
    assert "build the default world first" in capsys.readouterr().err and not run.exists()

    assert main(base + ["--set", "steps=2", "--set", "batch=2", "--set", "rollout_steps=4"]) == 0
    assert (run / "weights" / "transformer" / "config.json").exists() and (run / "metrics.jsonl").exists()  # full FT
    assert [f.name for f in sorted((run / "samples").iterdir())] == ["step-000002.png"]  # samples per checkpoint
    capsys.readouterr()
    png = tmp_path / "grid.png"
    assert main(["sample", "--world", str(world), "--weights", str(run / "weights"), "--steps", "3",
                 "--prompt", "a photo of a red seven", "--prompt", "a photo of a blue two and a green six",
                 "--out", str(png)]) == 0
    assert png.exists() and png.stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", "--world", str(world), "--steps", "3", "--limit", "4"]) == 0
    assert "geneval/overall" in json.loads(capsys.readouterr().out)
    assert main(["sample", "--world", str(world), "--weights", str(tmp_path / "nope"), "--prompt", "x"]) == 2


def test_a_world_build_repeats_bit_for_bit(tmp_path):
    """Pinned numerics (one thread count, deterministic kernels): the same seed builds the same bytes."""
    from flowbp_ops.determinism import pin_cpu

    cfg = WorldConfig.smoke()
    pin_cpu(cfg.threads)
    manifests = []
    for name in ("a", "b"):
        build_world(tmp_path / name, cfg)
        manifests.append({sub: json.loads((tmp_path / name / sub / "manifest.json").read_text())["sha256"]
                          for sub in ("vae", "transformer", "rewards")})
    assert manifests[0] == manifests[1]
    build_world(tmp_path / "c", cfg.model_copy(update={"seed": 1}))
    other = json.loads((tmp_path / "c" / "transformer" / "manifest.json").read_text())["sha256"]
    assert other != manifests[0]["transformer"]


class _Flat:
    name = "flat"

    def __call__(self, images, prompts):  # a reward with no gradient: the step's gradient is the pre-training one
        return images.mean((1, 2, 3)) * 0 + 0.5


register("flat")(lambda **_: _Flat())


def test_pretraining_loss_is_the_base_models_flow_matching_loss_on_its_renders(world, prompts, tmp_path):
    """ReFL's regulariser: the step's gradient is λ · ∇ of the rectified-flow loss on renders of the training
    scenes drawn from (seed, step, slot), recomputed here independently."""
    from flowbp_ops.surrogate.plan import build_plan
    from flowbp_ops.training import batches
    from flowbp_ops.training.loop import Trainer, attach_trainable
    from flowbp_ops.world.base_model import encode_images, flow_matching_loss
    from flowbp_ops.world.pretrain import WorldRenders

    a, b = WorldRenders(world).batch(3, 5, [0, 1]), WorldRenders(world).batch(3, 5, [0, 1])
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[1] != WorldRenders(world).batch(3, 6, [0, 1])[1]
    cfg = small("flowbp_sparse", steps=1, reward="flat", ema=None, pretrain_weight=2.0, grad_clip=1e9, seed=3)
    t = Trainer(cfg, backbone(world), prompts, {"world_dir": world})
    t.opt.zero_grad(set_to_none=True)
    plan = build_plan(t.method, t.sigmas, batches.plan_seed(cfg.seed, 0))
    t._micro_batch(t.backbone.denoiser(cfg.guidance), plan, 0)
    got = [p.grad.clone() for p in t.params]
    ref = backbone(world)
    attach_trainable(ref, cfg)
    images, texts = WorldRenders(world).batch(cfg.seed, 0, [0, 1])
    cond = ref.encode_prompts(texts)
    x = encode_images(ref.vae, images)
    eps, sigma = [], []
    for seed in batches.sample_seeds(cfg.seed, 0, [0, 1]):  # one generator per slot, so any sharding draws the same
        g = torch.Generator().manual_seed(seed ^ 0xF10)
        eps.append(torch.randn(x.shape[1:], generator=g))
        sigma.append(torch.sigmoid(torch.randn((), generator=g)))
    eps, sigma = torch.stack(eps), torch.stack(sigma)
    params = [p for p in ref.transformer.parameters() if p.requires_grad]
    want = torch.autograd.grad(2.0 * flow_matching_loss(ref.transformer, x, cond["tokens"], cond["pooled"], eps,
                                                        sigma), params)
    assert any(w.abs().sum() > 0 for w in want)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="pretrain_weight"):
        TrainConfig(backbone="sd35", pretrain_weight=1.0)
    assert TrainConfig(backbone="sd35").pretraining() == 0 and TrainConfig().pretraining() == 1.0


def test_heldout_rewards_are_scored_every_k_steps(world, prompts, tmp_path):
    rows = []

    class Collect:
        def on_step(self, step, m):
            rows.append((step, sorted(k for k in m if k.startswith("heldout/"))))

    cfg = small("refl", steps=7, heldout_every=3, heldout_rewards=["align_heldout", "quality"])
    train(cfg, backbone(world), prompts, tmp_path, callbacks=[Collect()],
          reward_kwargs={"world_dir": world})
    scored = [step for step, keys in rows if keys]
    assert scored == [0, 2, 5, 6]  # step 1, after steps 3 and 6, the last
    assert all(keys == ["heldout/align_heldout", "heldout/quality"]
               for step, keys in rows if step in scored)
