"""A real MLflow tracking server on 127.0.0.1 with artifacts proxied to S3 (moto): a configuration change."""

from __future__ import annotations


def test_runs_and_artifacts_go_through_the_server_to_s3(mlflow_server, tmp_path):
    from flowbp_ops.params import TrackingParams
    from flowbp_ops.storage import s3_client
    from flowbp_ops.tracking import Tracker

    url, bucket = mlflow_server
    tracker = Tracker(TrackingParams(tracking_uri=url, artifact_location="mlflow-artifacts:/flowbp"))
    run_id = tracker.start_run("via-server", {"method": "flowbp_sparse"}, params={"train": {"lr": 3e-4}})
    tracker.log_metrics(run_id, {"reward": 0.5}, step=0)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    tracker.log_artifact(run_id, tmp_path / "weights", "weights")
    tracker.end_run(run_id)
    run = tracker.client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.0003" and run.data.metrics["reward"] == 0.5
    keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("weights/pytorch_lora_weights.safetensors") for k in keys)
