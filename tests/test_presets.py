"""The authors' recipe as presets: every backbone × method validates and carries the published settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowbp_ops.methods import get_method
from flowbp_ops.presets import get_preset, hpdv2_eval_prompts, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name):
    p = get_preset(name)
    t = p.train
    backbone, method = name.split("/")
    assert (t.method, t.backbone, t.rollout_steps, t.steps, t.lr, t.ema) == (method, backbone, 25, 300, 1e-5, 0.995)
    assert ((t.finetune, t.precision, t.gradient_checkpointing, t.r_max, t.grad_clip)
            == ("full", "bf16", True, 0.55, 1.0))
    get_method(t.method, t.backbone, t.rollout_steps, t.method_overrides).check(t.rollout_steps)
    assert p.methods == [method] and p.base_model.source.startswith("hf://")


def test_preset_specifics_match_the_spec():
    sd, fl = get_preset("sd35/flowbp_lagrange"), get_preset("flux1/flowbp_lagrange")
    assert (sd.rollouts.n_steps, sd.rollouts.guidance, sd.train.batch) == (40, 3.5, 8)
    assert (fl.rollouts.n_steps, fl.rollouts.guidance, fl.train.batch) == (50, 4.0, 8)
    assert get_preset("flux2/draft_lv").train.batch == 2 and get_preset("flux1/refl").train.batch == 4
    # the authors' global batch (spec §6.3): per-GPU × 8 GPUs; FLUX.2 DRaFT-LV also 2 micro-batches
    assert sd.train.global_batch == 64 and get_preset("flux1/refl").train.global_batch == 32
    assert get_preset("flux2/draft_lv").train.global_batch == 32
    prompts = Path(hpdv2_eval_prompts()).read_text().splitlines()
    assert len(prompts) == 400 and all(prompts)  # the file holds 400 distinct prompts (the spec says 399)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("sd35/nope")


def test_preset_cli_writes_a_params_file_the_pipeline_reads(tmp_path, capsys):
    from flowbp_ops.cli import main
    from flowbp_ops.params import load_params

    assert main(["preset", "sd35/flowbp_bridge", "--out", str(tmp_path / "params.yaml")]) == 0
    assert load_params(tmp_path / "params.yaml") == get_preset("sd35/flowbp_bridge")
    assert main(["preset", "bad"]) == 2 and "unknown preset" in capsys.readouterr().err
