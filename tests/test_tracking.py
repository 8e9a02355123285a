"""MLflow details a registry user relies on."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from flowbp_ops.params import TrackingParams
from flowbp_ops.tracking import Tracker


def test_a_hub_lora_records_the_pinned_base_revision_offline(tmp_path, monkeypatch):
    """The diffusers flavour asks the hub for the base model's latest commit; offline it would record none (and
    after a newer upload, the wrong one). The registered model records the commit the run was pinned to."""
    import mlflow.diffusers
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tracker = Tracker(TrackingParams(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_location=str(tmp_path / "a")))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"transformer.proj.lora_A.weight": torch.zeros(2, 4)}, str(adapter / "pytorch_lora_weights.safetensors"))
    run_id = tracker.start_run("lora", {"method": "refl"})
    pin = "0123456789abcdef0123456789abcdef01234567"
    version = tracker.register_adapter(run_id, "flowbp-sd35", "stabilityai/stable-diffusion-3.5-medium", adapter,
                                       {"method": "refl"}, revision=pin)
    local = mlflow.artifacts.download_artifacts(f"models:/flowbp-sd35/{version}", dst_path=str(tmp_path / "dl"))
    flavor = yaml.safe_load(open(f"{local}/MLmodel"))["flavors"]["diffusers"]
    assert flavor["base_model"] == "stabilityai/stable-diffusion-3.5-medium" and flavor["base_model_revision"] == pin
    assert mlflow.diffusers.load_model(f"models:/flowbp-sd35/{version}").base_model_revision == pin
