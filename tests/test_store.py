"""The shared store (S3, moto on 127.0.0.1): outputs pushed and pulled by their place in the graph, checked byte
for byte; two "machines" (two workspaces that share only the store and an MLflow server) run one chain
between them, a training killed on one resuming on the other, and print the one-machine table."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flowbp_ops.storage import SourceError
from flowbp_ops.store import Store, StoreError
from flowbp_ops.world.config import WorldConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(s3_bucket):
    _, bucket = s3_bucket
    return Store(f"s3://{bucket}/store")


def test_push_and_pull_by_key(store, tmp_path):
    src = tmp_path / "a" / "data" / "rollouts"
    src.mkdir(parents=True)
    (src / "index.json").write_text("{}")
    (src / "sub").mkdir()
    (src / "sub" / "shard.bin").write_bytes(b"x" * 1000)
    store.push("data/rollouts", src)
    dest = tmp_path / "b" / "elsewhere" / "rollouts"
    assert store.pull("data/rollouts", dest, needed_by="evaluation")
    assert (dest / "sub" / "shard.bin").read_bytes() == b"x" * 1000
    # a second push sends only what changed and removes what is gone
    (src / "sub" / "shard.bin").unlink()
    (src / "new.txt").write_text("n")
    sent = []
    real = store.s3.upload_file
    store.s3.upload_file = lambda *a, **k: (sent.append(a[2]), real(*a, **k))
    store.push("data/rollouts", src)
    assert sent == [store._key("data/rollouts/new.txt")]
    assert store.pull("data/rollouts", dest) and sorted(p.name for p in dest.rglob("*") if p.is_file()) == \
        ["index.json", "new.txt"]
    # a single file, and an absent key nobody needs
    (tmp_path / "p.json").write_text('{"a": 1}')
    store.push("data/promoted.json", tmp_path / "p.json")
    assert store.pull("data/promoted.json", tmp_path / "q.json") and (tmp_path / "q.json").read_text() == '{"a": 1}'
    assert store.pull("data/nothing", tmp_path / "n") is False and not (tmp_path / "n").exists()


def test_missing_inputs_corrupt_objects_and_unreachable_stores_are_refused(store, s3_bucket, tmp_path, monkeypatch):
    s3, bucket = s3_bucket
    with pytest.raises(StoreError, match=r"stage evaluation\[refl\] .* needs 'data/rollouts'.*not in the store"):
        store.pull("data/rollouts", tmp_path / "r", needed_by="evaluation[refl] (from base_rollouts)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(b"good")
    store.push("data/x", src)
    s3.put_object(Bucket=bucket, Key="store/data/x/f.bin", Body=b"evil")  # replaced behind the manifest's back
    with pytest.raises(StoreError, match="differs from its manifest"):
        store.pull("data/x", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.partial-*"))
    s3.put_object(Bucket=bucket, Key="store/data/y.manifest.json",  # a manifest naming a file outside
                  Body=json.dumps({"key": "data/y", "kind": "folder", "files": {"../../escape": "0" * 64}}).encode())
    with pytest.raises(SourceError, match="refused to write"):
        store.pull("data/y", tmp_path / "y")
    assert not (tmp_path.parent / "escape").exists()
    with pytest.raises(SourceError, match="no such bucket"):
        Store("s3://no-such-bucket-here/p")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="cannot reach the S3 endpoint"):
        Store(f"s3://{bucket}/p")
    assert time.monotonic() - t0 < 30


SMOKE = {
    "world_dir": "data/world", "data_dir": "data",
    "world": WorldConfig.smoke().model_dump(),
    "rollouts": {"n_steps": 3, "n_prompts": 4, "shard_size": 3},
    "train": {"steps": 40, "batch": 2, "rollout_steps": 4, "checkpoint_every": 4, "finetune": "lora",
              "heldout_rewards": ["align_heldout"]},
    "methods": ["refl"], "eval": {"grid_prompts": 2, "diversity_seeds": 2, "diversity_prompts": 2},
}


def _workspace(root: Path, tracking: dict) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({**SMOKE, "tracking": tracking}))
    return root


def _flowbp(cwd: Path, *args: str, env: dict | None = None, popen: bool = False):
    cmd = [sys.executable, "-m", "flowbp_ops.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} in {cwd.name}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_two_machines_share_only_the_store_and_mlflow(s3_bucket, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    _, bucket = s3_bucket
    url, _ = mlflow_server
    store_env = {"FLOWBP_STORE": f"s3://{bucket}/team"}
    tracking = {"tracking_uri": url, "artifact_location": "mlflow-artifacts:/two-machines",
                "experiment": f"two-machines-{bucket}"}
    a, b = _workspace(tmp_path / "A", tracking), _workspace(tmp_path / "B", tracking)
    for stage in ("prompt_sets", "reward_models", "base_model", "prompt_embeddings", "base_rollouts"):
        _flowbp(a, "stage", stage, env=store_env)
    assert not (b / "data").exists()
    # B trains (pulling prompts, rewards and the base model), is killed after a checkpoint went to the store
    trainer = _flowbp(b, "stage", "trained_variant", "--method", "refl", env=store_env, popen=True)
    store = Store(store_env["FLOWBP_STORE"])
    t0 = time.monotonic()
    while True:
        m = store.manifest("data/runs/refl")
        if m and any(f.startswith("checkpoints/step-000004/") for f in m["files"]):
            break
        assert trainer.poll() is None, trainer.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 300, "no checkpoint reached the store"
        time.sleep(0.1)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    # A resumes the run from the store's checkpoints; B evaluates and compares from the store
    summary = _flowbp(a, "stage", "trained_variant", "--method", "refl", env=store_env)
    assert summary["resumed_from"] >= 4 and summary["store"] == store_env["FLOWBP_STORE"]
    _flowbp(b, "stage", "evaluation", "--method", "refl", env=store_env)
    _flowbp(b, "stage", "method_comparison", env=store_env)
    two_machines = (b / "data" / "comparison" / "table.md").read_text()
    steps = [json.loads(line)["step"] for line in (b / "data" / "variants" / "refl" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(40))
    client = MlflowClient(url, url)
    runs = client.search_runs([client.get_experiment_by_name(tracking["experiment"]).experiment_id],
                              "tags.method = 'refl'", order_by=["attributes.start_time ASC"])
    training = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in training] == ["KILLED", "FINISHED"]  # A marked B's dead run
    evaluations = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # B's evaluation, under A's run
    assert [r.data.tags["mlflow.parentRunId"] for r in evaluations] == [training[-1].info.run_id]
    # the same chain on one machine, no store: the same table
    one = _workspace(tmp_path / "one", {"tracking_uri": f"sqlite:///{tmp_path}/one.db",
                                        "artifact_location": str(tmp_path / "one-art")})
    for stage in ("prompt_sets", "reward_models", "base_model", "prompt_embeddings", "base_rollouts"):
        _flowbp(one, "stage", stage)
    for stage in ("trained_variant", "evaluation"):
        _flowbp(one, "stage", stage, "--method", "refl")
    _flowbp(one, "stage", "method_comparison")
    assert two_machines == (one / "data" / "comparison" / "table.md").read_text()
    shutil.rmtree(tmp_path / "one")
