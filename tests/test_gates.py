"""The gates on a small but trained default world: an over-trained variant is measured and refused.

The session's smoke world has untrained judges, so what they say of a variant means nothing. Here the world is
trained, small (about a minute and a half on 2 cores): a weak base model, but rewards, critics and a judge that read
images. A variant trained at ten times the recipe's learning rate damages the images (measured here: a realism
critic −0.36 SD, the judge −1.7 points; with twice the world's budget the judge fell 3.3 points); the held-out gates
see it and promotion refuses it.
"""

from __future__ import annotations

import pytest

from flowbp_ops.params import params_from
from flowbp_ops.world.config import WorldConfig

# the stages run on two threads: this world is built for the test alone, never compared with a recorded one
SMALL = WorldConfig(n_images=3000, vae_steps=100, flow_steps=600, reward_steps=150, critic_steps=80,
                    detector_steps=400, threads=2)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from flowbp_ops.world.build import build_world

    out = tmp_path_factory.mktemp("small") / "world"
    build_world(out, SMALL)
    return out


def test_the_judge_reads_renders_of_unseen_handwriting(small_world):
    from flowbp_ops.world import scenes
    from flowbp_ops.world.judge import load_judge

    pool = scenes.balanced(scenes.all_scenes(), 40, seed=9)
    images, chosen, _ = scenes.Renderer(half=0).dataset(pool, len(pool), seed=9, canonical=False)
    right = load_judge(small_world)(images, [s.prompt() for s in chosen])
    assert right.overall > 0.6, right.tag_accuracy  # 400 detector steps; the default world's 1500 read ~97 %
    wrong = load_judge(small_world)(images, [pool[(i + 7) % len(pool)].prompt() for i in range(len(pool))])
    assert wrong.overall < 0.2


def test_an_over_trained_variant_is_refused(small_world, tmp_path):
    from flowbp_ops.stages.runner import run_stage
    from flowbp_ops.tracking import Tracker

    recipe = params_from({}).train.lr
    params = params_from({
        "world_dir": str(small_world), "data_dir": str(tmp_path / "data"), "world": SMALL.model_dump(),
        "methods": ["flowbp_bridge"], "rollouts": {"n_prompts": 120},
        "train": {"steps": 40, "lr": 10 * recipe, "checkpoint_every": 40, "ema_eval_every": None},
        "eval": {"diversity_prompts": 12},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "artifact_location": str(tmp_path / "art")}})
    tracker = Tracker(params.tracking)
    run_stage("prompt_embeddings", params)
    run_stage("base_rollouts", params)
    run_stage("trained_variant", params, "flowbp_bridge", tracker=tracker)
    meta, checks = run_stage("evaluation", params, "flowbp_bridge", tracker=tracker)
    failed = {c["name"] for c in checks if not c["passed"]}
    assert failed & {"heldout_not_collapsed", "heldout_judge_improved"}, meta["gates"]
    gates, promote = meta["gates"], params.promote
    # the refusal is the measurement's: a held-out reward fell past the tolerance, or the judge fell
    assert (gates["heldout_not_collapsed"]["worst_change_sd"] < -promote.heldout_tolerance_sd
            or gates["heldout_judge_improved"]["change"] < -promote.min_judge_gain), gates
    run_stage("method_comparison", params, tracker=tracker)
    promoted, _ = run_stage("promoted_model", params, tracker=tracker)
    assert promoted["promoted"] is None and promoted["passing"] == []
    assert tracker.alias_version(params.promote.model_name, "champion") is None
