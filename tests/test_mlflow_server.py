"""A real MLflow tracking server on 127.0.0.1 with artifacts proxied to S3 (moto): a configuration change."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_endpoint):
    import uuid

    from flowbp_ops.storage import s3_client

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_client().create_bucket(Bucket=bucket)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path_factory.mktemp("mlflow") / "server.db"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
                             f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 60 s")
    yield url, bucket
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_runs_and_artifacts_go_through_the_server_to_s3(server, tmp_path):
    from flowbp_ops.params import TrackingParams
    from flowbp_ops.storage import s3_client
    from flowbp_ops.tracking import Tracker

    url, bucket = server
    tracker = Tracker(TrackingParams(tracking_uri=url, artifact_location="mlflow-artifacts:/flowbp"))
    run_id = tracker.start_run("via-server", {"method": "flowbp_sparse"}, params={"train": {"lr": 3e-4}})
    tracker.log_metrics(run_id, {"reward": 0.5}, step=0)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    tracker.log_artifact(run_id, tmp_path / "adapter", "adapter")
    tracker.end_run(run_id)
    run = tracker.client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.0003" and run.data.metrics["reward"] == 0.5
    keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("adapter/pytorch_lora_weights.safetensors") for k in keys)
