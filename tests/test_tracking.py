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
    adapter = tmp_path / "weights"
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


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Variants trained side by side open the embedded store at the same moment; MLflow creates the tables on first
    use, and two creators at once fail ("table ... already exists"). Each round: a fresh store, 4 processes."""
    import subprocess
    import sys

    code = ("import sys; from flowbp_ops.params import TrackingParams; from flowbp_ops.tracking import Tracker; "
            "t = Tracker(TrackingParams(tracking_uri=f'sqlite:///{sys.argv[1]}', artifact_location=sys.argv[2])); "
            "t.experiment_id()")
    for round_ in range(3):
        db = tmp_path / f"r{round_}" / "m.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(tmp_path / "art")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        outs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
        assert all(rc == 0 for rc, _ in outs), [o[-800:] for rc, o in outs if rc]
