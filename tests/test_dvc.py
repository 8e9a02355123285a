"""``dvc repro`` of the generated dvc.yaml on a fresh repository: the whole chain, then nothing, then
only what a changed parameter touches (through ``dvc exp run -S``); metrics and plots readable."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import SMOKE

ROOT = Path(__file__).resolve().parents[1]
DVC = ROOT / "scripts" / "dvc"


def sh(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if not (ROOT / ".dvc-tool" / "bin" / "dvc").exists():
        pytest.fail("dvc is not installed: run `bash scripts/install.sh` (it installs DVC into .dvc-tool)")
    repo = tmp_path_factory.mktemp("dvcrepo")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {**SMOKE, "methods": ["flowbp_sparse"]}.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("mlflow/\n")
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "ci@example.com"], repo)
    sh(["git", "config", "user.name", "ci"], repo)
    sh([str(DVC), "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo)
    return repo


def test_repro_runs_the_chain_then_nothing(repo):
    first = sh([str(DVC), "repro"], repo)
    assert ran(first) == {"prompt_sets", "reward_models", "base_model", "prompt_embeddings", "base_rollouts",
                          "trained_variant@flowbp_sparse", "evaluation@flowbp_sparse", "method_comparison",
                          "promoted_model"}
    assert (repo / "data" / "variants" / "flowbp_sparse" / "weights" / "pytorch_lora_weights.safetensors").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert "trained_variant@flowbp_sparse" in lock and lock["base_rollouts"]["outs"][0]["path"] == "data/rollouts"
    summary = json.loads((repo / "data" / "variants" / "flowbp_sparse" / "summary.json").read_text())
    assert summary["run_id"] and summary["model_version"]
    second = sh([str(DVC), "repro"], repo)
    assert ran(second) == set()
    metrics = sh([str(DVC), "metrics", "show", "--json"], repo)
    assert "reward_improved" in metrics
    sh([str(DVC), "plots", "show", "-o", "plots_out"], repo)
    page = (repo / "plots_out" / "index.html").read_text()
    assert "samples.png" in page  # the sample grid is an image plot, comparable across experiments


def test_a_parameter_reruns_only_what_depends_on_it(repo):
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "reproduced"], repo)
    out = sh([str(DVC), "exp", "run", "-S", "train.lr=0.002"], repo)
    assert ran(out) == {"trained_variant@flowbp_sparse", "evaluation@flowbp_sparse", "method_comparison",
                        "promoted_model"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.002
    assert "0.002" in sh([str(DVC), "exp", "show", "--json"], repo)
    # an evaluation setting re-rolls the base model's rollouts and re-evaluates: no variant is retrained
    out = sh([str(DVC), "exp", "run", "-S", "rollouts.seed=7"], repo)
    assert ran(out) == {"base_rollouts", "evaluation@flowbp_sparse", "method_comparison", "promoted_model"}


def test_outputs_push_to_and_pull_from_an_s3_remote(repo, s3_bucket):
    import os

    s3, bucket = s3_bucket
    sh([str(DVC), "remote", "add", "-d", "store", f"s3://{bucket}/dvc"], repo)
    sh([str(DVC), "remote", "modify", "store", "endpointurl", os.environ["AWS_ENDPOINT_URL_S3"]], repo)
    sh([str(DVC), "push"], repo)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="dvc/")["KeyCount"] > 0
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "rollouts")
    sh([str(DVC), "pull"], repo)
    assert (repo / "data" / "rollouts" / "index.json").exists() and ran(sh([str(DVC), "repro"], repo)) == set()


def test_after_a_dagster_run_dvc_repro_does_nothing(tmp_path_factory, monkeypatch):
    """Dagster materializes the chain in a DVC checkout and records each stage in dvc.lock (``dvc commit``):
    the next ``dvc repro`` finds everything up to date."""
    from pipelines.run import run_chain

    repo = tmp_path_factory.mktemp("dagster-then-dvc")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "scripts").mkdir()
    shutil.copy(DVC, repo / "scripts" / "dvc")
    for tool in (".venv", ".dvc-tool"):  # installed by `bash scripts/install.sh` in a real checkout
        (repo / tool).symlink_to(ROOT / tool)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {**SMOKE, "methods": ["flowbp_sparse"]}.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("mlflow/\ndagster/\n.venv\n.dvc-tool\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], [str(DVC), "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        sh(cmd, repo)
    (repo / "dagster").mkdir()
    (repo / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DAGSTER_HOME", str(repo / "dagster"))
    result = run_chain(repo / "params.yaml")
    assert result["success"], result
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prompt_sets", "reward_models", "base_model", "prompt_embeddings", "base_rollouts",
                         "trained_variant@flowbp_sparse", "evaluation@flowbp_sparse", "method_comparison",
                         "promoted_model"}
    again = sh([str(DVC), "repro"], repo)
    assert ran(again) == set(), again


def test_a_run_elsewhere_is_not_committed(tmp_path):
    """Outputs written under another data_dir (or made with other settings) are not the checkout's: dvc.lock is
    left alone and the reason is said."""
    from flowbp_ops.dvc_lock import commit
    from flowbp_ops.params import load_params
    from flowbp_ops.stages.graph import BY_NAME

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "scripts").mkdir()
    shutil.copy(DVC, tmp_path / "scripts" / "dvc")
    params = load_params(ROOT / "params.yaml")
    moved = params.model_copy(update={"data_dir": str(tmp_path / "elsewhere")})
    assert "data_dir" in commit(BY_NAME["base_rollouts"], None, moved, tmp_path)["skipped"]
    reseeded = params.model_copy(update={"world": params.world.model_copy(update={"seed": 7})})
    assert "world.seed" in commit(BY_NAME["base_model"], None, reseeded, tmp_path)["skipped"]
    assert not (tmp_path / "dvc.lock").exists()
