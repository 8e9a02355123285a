"""A real backbone through the user's paths: `flowbp train --preset` and the pipeline's stages, on a
tiny SD3.5-architecture pipeline saved to disk (the base model) and a tiny CLIP (the reward), both
fetched like real weights; the adapter registered with MLflow's diffusers flavour."""

from __future__ import annotations

import json

import pytest
import torch

from flowbp_ops.surrogate.config import ConfigError


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from flowbp_ops.backbones.tiny import CLIP_VOCAB, _clip_tokenizer, save_tiny

    root = tmp_path_factory.mktemp("real")
    save_tiny("sd35", root / "sd35-pipe")
    save_tiny("flux1", root / "flux1-pipe")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(CLIP_VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8))
    clip.save_pretrained(root / "clip", safe_serialization=True)
    _clip_tokenizer(32).save_pretrained(root / "clip")
    (root / "prompts.txt").write_text("a red cat\na blue dog\na small seven\na cat on the left\n")
    (root / "eval.txt").write_text("a blue cat\na red dog on the right\n")
    return root


def overrides(root, work) -> list[str]:
    return [f"world_dir={work}/world", f"data_dir={work}/data", f"base_model.source={root}/sd35-pipe",
            "base_model.dtype=fp32", "base_model.resolution=32", "base_model.max_sequence_length=16",
            f"prompts.source={root}/prompts.txt", f"prompts.eval_source={root}/eval.txt",
            f'rewards.models={{"clipscore": "{root}/clip"}}', "train.reward=clipscore", "train.heldout_rewards=[]",
            "train.steps=1", "train.batch=2", "train.rollout_steps=4", "train.finetune=lora", "train.ema=null",
            "train.precision=fp32", "train.gradient_checkpointing=false", "train.checkpoint_every=1",
            "rollouts.n_steps=3", "rollouts.n_prompts=2", 'eval.rewards=["clipscore"]', "eval.grid_prompts=2",
            "eval.diversity_seeds=2", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            f"tracking.artifact_location={work}/mlartifacts"]


def test_train_preset_fetches_pins_and_trains_a_real_backbone(sources, tmp_path, capsys):
    from flowbp_ops.cli import main

    sets = [f"--set={s}" for s in overrides(sources, tmp_path)]
    assert main(["train", "--preset", "sd35/flowbp_sparse", "--out", str(tmp_path / "run"), *sets]) == 0, \
        capsys.readouterr().err
    record = json.loads((tmp_path / "world" / "backbone.json").read_text())
    assert record["backbone"] == "sd35" and record["pipeline"] == "StableDiffusion3Pipeline"
    assert (tmp_path / "world" / "rewards" / "clipscore" / "model.safetensors").exists()
    assert (tmp_path / "run" / "weights" / "pytorch_lora_weights.safetensors").exists()
    # a model of another family for this preset is refused, naming both
    bad = [s.replace("sd35-pipe", "flux1-pipe") for s in sets]
    assert main(["train", "--preset", "sd35/flowbp_sparse", "--out", str(tmp_path / "bad"), *bad]) == 2
    err = capsys.readouterr().err
    assert "FluxPipeline" in err and "StableDiffusion3Pipeline" in err and not (tmp_path / "bad").exists()
    assert main(["train", "--preset", "sd35/nope"]) == 2 and "unknown preset" in capsys.readouterr().err
    assert main(["train", "--preset", "sd35/refl", "--world", "elsewhere"]) == 2  # the preset places the world
    assert "--set world_dir" in capsys.readouterr().err


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_pipeline_stages_on_a_real_backbone_register_a_loadable_model(sources, tmp_path, finetune, stub):
    import mlflow
    from flowbp_ops import stages
    from flowbp_ops.params import params_from
    from flowbp_ops.presets import get_preset
    from flowbp_ops.tracking import Tracker

    sets = overrides(sources, tmp_path) + [f"train.finetune={finetune}"]
    if finetune == "full":
        sets += ["train.ema=0.995"]  # the authors' recipe: full fine-tuning, EMA evaluated and saved
    else:  # and a served VLM judge (a local stub of the OpenAI API) scoring the evaluation's images
        sets += [f"eval.judge_url={stub.base_url}"]
        stub.reply = lambda text: "Alignment Score: 4.5\nQuality Score: 2"
    params = params_from(get_preset("sd35/refl").model_dump(mode="json"), sets)
    for stage in (stages.prompt_sets, stages.reward_models, stages.base_model, stages.prompt_embeddings,
                  stages.base_rollouts):
        stage(params)
    tracker = Tracker(params.tracking)
    summary = stages.trained_variant(params, "refl", tracker, {})
    adapter = tmp_path / "data" / "variants" / "refl" / "weights"
    assert (adapter / ("transformer/config.json" if finetune == "full"
                       else "pytorch_lora_weights.safetensors")).exists()
    ev = stages.evaluation(params, "refl", tracker)  # loads the trained weights onto the pinned base model
    assert "reward/clipscore" in ev["variant"] and set(ev["gates"]) >= {"reward_improved"}
    if finetune == "lora":  # base and tuned images of both held-out prompts went to the judge
        assert ev["variant"]["judge/alignment"] == 4.5 and ev["base"]["judge/quality"] == 2.0
        assert len(stub.requests) == 2 * params.rollouts.n_prompts
    version = tracker.client.get_model_version(params.promote.model_name, summary["model_version"])
    assert version.tags["base_model"] == str(sources / "sd35-pipe") and version.tags["method"] == "refl"
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    uri = f"models:/{params.promote.model_name}/{summary['model_version']}"
    if finetune == "lora":  # MLflow's diffusers flavour: base model + adapter → a diffusers pipeline
        model = mlflow.diffusers.load_model(uri)
        assert model.base_model == str(sources / "sd35-pipe")
        pipe = model.load_pipeline(device="cpu", torch_dtype=torch.float32)
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())  # the adapter is applied
    else:  # flowbp's pyfunc: the pinned base model with the fine-tuned transformer, at the trained settings
        images = mlflow.pyfunc.load_model(uri).predict(["a red cat"], params={"steps": 2})
        assert images.shape == (1, 32, 32, 3) and images.dtype.name == "uint8"
    with pytest.raises(ConfigError, match="train.backbone"):
        params_from(params.model_dump(mode="json"), ["train.backbone=default"])


def test_prompt_embeddings_stage_keeps_text_encoders_off_training(sources, tmp_path):
    """Every prompt is encoded once by the prompt_embeddings stage; the stages after it load the pipeline
    without its text encoders and read exactly those embeddings; a prompt that is not there is refused,
    naming the stage to rerun, never encoded silently."""
    from flowbp_ops import stages
    from flowbp_ops.backbones.pipeline import text_encoder_components
    from flowbp_ops.params import params_from
    from flowbp_ops.presets import get_preset

    params = params_from(get_preset("sd35/refl").model_dump(mode="json"), overrides(sources, tmp_path))
    stages.prompt_sets(params), stages.base_model(params)
    with pytest.raises(ConfigError, match="flowbp stage prompt_embeddings"):
        stages.backbone_of(params, from_embeddings=True)  # not written yet
    meta = stages.prompt_embeddings(params)
    prompts = stages.prompts_read(params)
    assert meta["prompts"] == len(prompts) == 4 + 2 + 1 and "" in prompts  # train, held-out, the CFG negative
    full = stages.backbone_of(params)
    light = stages.backbone_of(params, from_embeddings=True)
    names = text_encoder_components(type(full.pipe))
    assert names == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert all(getattr(light.pipe, n) is None for n in names) and all(getattr(full.pipe, n) is not None for n in names)
    got, want = light.encode_prompts(["a red cat", ""]), full._encode(["a red cat", ""])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].cpu()) for k in got)
    with pytest.raises(ConfigError, match="not among the embeddings.*flowbp stage prompt_embeddings"):
        light.encode_prompts(["a prompt no stage encoded"])
    assert light.cache.misses == 0
