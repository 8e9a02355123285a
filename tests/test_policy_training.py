"""The policy-gradient family in flowbp's trainer: Flow-GRPO and DiffusionNFT on the default world (smoke build)."""

from __future__ import annotations

import pytest
import torch

from flowbp_ops.policy.config import POLICY_METHODS, get_policy
from flowbp_ops.surrogate.config import ConfigError
from flowbp_ops.training.config import TrainConfig
from flowbp_ops.training.loop import Trainer, train


def backbone(world):
    from flowbp_ops.backbones.default import DefaultBackbone

    return DefaultBackbone(world)


@pytest.fixture(scope="module")
def prompts(world):
    from flowbp_ops.cli_world import load_prompts

    return load_prompts(world, "train")


def small(method, **kw):
    base = dict(method=method, steps=2, batch=4, rollout_steps=6, checkpoint_every=1, finetune="lora", ema=None,
                heldout_rewards=["align_heldout"], method_overrides=["policy.group_size=2"])
    return TrainConfig(**{**base, **kw})


class Keep:
    def __init__(self):
        self.rows = []

    def on_step(self, step, m):
        self.rows.append(m)


@pytest.mark.parametrize("method", POLICY_METHODS)
def test_every_policy_method_trains_on_the_default_world(world, prompts, tmp_path, method):
    bb = backbone(world)
    before = {n: p.clone() for n, p in bb.transformer.named_parameters()}
    keep = Keep()
    result = train(small(method), bb, prompts, tmp_path, callbacks=[keep], reward_kwargs={"world_dir": world})
    last = result["last"]
    assert result["skipped"] == 0 and last["grad_norm"] > 0 and "heldout/align_heldout" in last
    assert last["mode"] == get_policy(method).family and last["pretrain_loss"] > 0  # the same regulariser as BP
    lora = {n: p for n, p in bb.transformer.named_parameters() if "lora" in n}
    assert any(not torch.equal(p, before[n]) for n, p in lora.items() if n in before) or any(
        p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    # the base weights (named as before the adapter, or as its base layer) are untouched
    params = {n.replace(".base_layer", ""): p for n, p in bb.transformer.named_parameters() if "lora" not in n}
    assert set(params) == set(before) and all(torch.equal(params[n], before[n]) for n in before)
    if method.startswith("flow_grpo"):
        # on policy, the first (and only) inner step's ratio is exactly 1: the SDE steps were sampled by the very
        # function the training forward computes
        assert all(row["ratio_max_dev"] == 0.0 and row["clip_fraction"] == 0.0 for row in keep.rows)
        assert all(row["kl"] == 0.0 for row in keep.rows[:1])  # the adapter starts at zero: the reference itself
        window = get_policy(method).sde_window
        assert all(row["sde_steps"] == (window or 5) for row in keep.rows)


def test_flow_grpo_inner_steps_go_off_policy_where_the_clip_acts(world, prompts, tmp_path):
    """Two optimizer steps on each sampled batch: the first on policy (ratio exactly 1), the second on the same
    trajectory after an update (ratio ≠ 1; with a tight clip some samples are clipped)."""
    keep = Keep()
    cfg = small("flow_grpo_fast", steps=4, checkpoint_every=2, lr=1e-3,
                method_overrides=["policy.group_size=2", "policy.inner_steps=2", "policy.clip=1e-6"])
    train(cfg, backbone(world), prompts, tmp_path, callbacks=[keep], reward_kwargs={"world_dir": world})
    first, second = keep.rows[0::2], keep.rows[1::2]
    assert all(r["ratio_max_dev"] == 0.0 for r in first)
    assert all(r["ratio_max_dev"] > 0.0 for r in second) and any(r["clip_fraction"] > 0 for r in second)
    assert [r["reward"] for r in first] == [r["reward"] for r in second]  # the same sampled batch, scored once


@pytest.fixture
def one_thread():
    """Exactness needs one thread: with two, some CPU kernels of this step (of the direct-gradient methods' too, at
    batch 4) round differently between a run and its resumption (~1e-9 after two steps; measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method,inner", [("flow_grpo_fast", 1), ("flow_grpo_fast", 2), ("diffusion_nft", 1)])
def test_policy_resume_is_exact(world, prompts, tmp_path, one_thread, method, inner):
    cfg = small(method, steps=4, checkpoint_every=2,
                method_overrides=["policy.group_size=2"] + ([f"policy.inner_steps={inner}"] if inner > 1 else []))
    a = backbone(world)
    train(cfg, a, prompts, tmp_path / "a", reward_kwargs={"world_dir": world})
    b = backbone(world)
    train(cfg, b, prompts, tmp_path / "b", stop_after=2, reward_kwargs={"world_dir": world})
    b = backbone(world)
    train(cfg, b, prompts, tmp_path / "b", resume=True, reward_kwargs={"world_dir": world})
    wa = dict(a.transformer.named_parameters())
    for n, p in b.transformer.named_parameters():
        assert torch.equal(p, wa[n]), n


def test_policy_settings_are_refused_with_the_field_named(world, prompts):
    bb = backbone(world)
    with pytest.raises(ConfigError, match="policy.group_size=3 does not divide train.batch=4"):
        Trainer(small("flow_grpo", method_overrides=["policy.group_size=3"]), bb, prompts,
                reward_kwargs={"world_dir": world})
    with pytest.raises(ConfigError, match="unknown setting of a policy method"):
        get_policy("flow_grpo", ["policy.nosuch=1"])
    with pytest.raises(ConfigError, match="policy.clip"):
        get_policy("flow_grpo", ["policy.clip=2"])
    with pytest.raises(ConfigError, match="checkpoint_every=1 is not a multiple of policy.inner_steps=2"):
        Trainer(small("flow_grpo", method_overrides=["policy.group_size=2", "policy.inner_steps=2"]), bb, prompts,
                reward_kwargs={"world_dir": world})
    with pytest.raises(ConfigError, match="policy.inner_steps=2 is invalid for DiffusionNFT"):
        get_policy("diffusion_nft", ["policy.inner_steps=2"]).check(6, 4)
    with pytest.raises(ConfigError, match="policy.sde_window=9 is invalid: allowed is 1..5"):
        Trainer(small("flow_grpo", method_overrides=["policy.group_size=2", "policy.sde_window=9"]), bb, prompts,
                reward_kwargs={"world_dir": world})


@pytest.mark.parametrize("method", ["flow_grpo_fast", "diffusion_nft"])
def test_full_fine_tuning_keeps_a_reference_copy_for_the_kl(world, prompts, tmp_path, method):
    """Full fine-tuning: the KL's reference is a copy of the starting weights, swapped in for the reference
    forwards and out again bit for bit; at the first step the model is its own reference (KL 0), later not."""
    from flowbp_ops.policy.step import WeightsReference

    bb = backbone(world)
    keep = Keep()
    cfg = small(method, finetune="full", steps=3, lr=1e-3, method_overrides=["policy.group_size=2", "policy.kl=0.5"])
    train(cfg, bb, prompts, tmp_path, callbacks=[keep], reward_kwargs={"world_dir": world})
    kls = [row["kl"] for row in keep.rows]
    assert kls[0] == 0.0 and kls[-1] > 0
    params = [p for p in bb.transformer.parameters()]
    ref = WeightsReference(params[:3])
    with torch.no_grad():
        params[0].add_(1.0)
    now = [p.detach().clone() for p in params[:3]]
    with ref():
        assert torch.equal(params[0], ref.start[0])
    assert all(torch.equal(p, n) for p, n in zip(params[:3], now))


def test_the_pipeline_trains_evaluates_and_compares_both_families(world, tmp_path):
    """One params.yaml with a direct-gradient and a policy-gradient method: each gets its family's overrides, both
    are trained, evaluated and tracked by the same stages, and the comparison table holds them side by side."""
    from flowbp_ops.params import params_from
    from flowbp_ops.stages.runner import run_stage
    from flowbp_ops.tracking import Tracker
    from flowbp_ops.world.config import WorldConfig

    methods = ["flowbp_sparse", "diffusion_nft"]
    params = params_from({
        "world_dir": str(world), "data_dir": str(tmp_path / "data"), "world": WorldConfig.smoke().model_dump(),
        "rollouts": {"n_steps": 3, "n_prompts": 4, "shard_size": 3}, "methods": methods,
        "train": {"steps": 2, "batch": 2, "rollout_steps": 4, "checkpoint_every": 1, "heldout_rewards": [],
                  "finetune": "lora", "method_overrides": ["policy.group_size=2", "active.k=2"]},
        "eval": {"grid_prompts": 2, "diversity_seeds": 2, "diversity_prompts": 2},
        "promote": {"min_improvement": 10.0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "artifact_location": str(tmp_path / "art")}})
    assert params.train_config("diffusion_nft").method_overrides == ["policy.group_size=2"]
    assert params.train_config("flowbp_sparse").method_overrides == ["active.k=2"]
    tracker = Tracker(params.tracking)
    run_stage("prompt_embeddings", params)
    run_stage("base_rollouts", params)
    for m in methods:
        run_stage("trained_variant", params, m, tracker=tracker)
        meta, checks = run_stage("evaluation", params, m, tracker=tracker)
        assert meta["n_prompts"] == 4 and {c["name"] for c in checks} >= {"reward_improved", "heldout_judge_improved"}
    run_stage("method_comparison", params, tracker=tracker)
    table = (tmp_path / "data" / "comparison" / "table.md").read_text()
    assert "`flowbp_sparse`" in table and "`diffusion_nft`" in table
    summary = (tmp_path / "data" / "variants" / "diffusion_nft" / "summary.json").read_text()
    assert '"diffusion_nft"' in summary
