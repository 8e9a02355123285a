"""The fault catalogue: bad input and faults tried as a user would, each asserting the refusal (one line, the
exit code, a message that names the problem), that nothing was lost and that nothing was written elsewhere.

Every fault is registered with its class and expected behaviour; ``python -m tests.test_faults`` prints the
table the README's reliability section holds, and a test checks that the README is up to date with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flowbp_ops.world.config import WorldConfig

ROOT = Path(__file__).resolve().parents[1]
FLOWBP = [sys.executable, "-m", "flowbp_ops.cli"]
CATALOGUE: list[tuple[str, str, str, str]] = []  # (class, id, fault, behaviour)
CLASSES = {1: "writes outside the destination", 2: "data lost on a refused command", 3: "shell injection",
           4: "settings that cannot work", 5: "integrity", 6: "concurrency", 7: "services", 8: "promotion",
           9: "secrets", 10: "README commands", 11: "tracebacks"}


def fault(cls: int, what: str, behaviour: str):
    def deco(fn):
        CATALOGUE.append((CLASSES[cls], fn.__name__.removeprefix("test_"), what, behaviour))
        return fn
    return deco


# ---------------------------------------------------------------------------------------------------
# a prepared workspace (smoke world, one trained and evaluated variant), copied fresh for every fault
# ---------------------------------------------------------------------------------------------------

PARAMS = {
    "world_dir": "data/world", "data_dir": "data",
    "world": WorldConfig.smoke().model_dump(),
    "rollouts": {"n_steps": 3, "n_prompts": 4, "shard_size": 3},
    "train": {"steps": 4, "batch": 2, "rollout_steps": 4, "checkpoint_every": 1, "keep_last": 2, "finetune": "lora",
              "heldout_rewards": ["align_heldout"]},
    "methods": ["refl"],
    "eval": {"grid_prompts": 2, "diversity_seeds": 2, "diversity_prompts": 2},
    "tracking": {"tracking_uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts"},
}
SKIP_STATE = (".flowbp-locks", "mlflow.db", ".mlflow.db.lock", "mlartifacts")


def cli(*args: str) -> tuple[int, str]:
    """``flowbp ARGS`` in this process (the workspace is the working directory): exit code and stderr."""
    import contextlib
    import io

    from flowbp_ops.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith(("flowbp: error:", "flowbp ")) or "error:" in lines[-1], err
    return lines[-1]


def state(root: Path) -> dict[str, str]:
    """Every file under ``root`` (but lock files and the MLflow store) with its SHA-256."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part in SKIP_STATE for part in p.relative_to(root).parts):
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    old = Path.cwd()
    os.chdir(root)
    try:
        for stage in ("prompt_sets", "reward_models", "base_model", "prompt_embeddings", "base_rollouts"):
            assert cli("stage", stage)[0] == 0, stage
        for stage in ("trained_variant", "evaluation"):
            code, err = cli("stage", stage, "--method", "refl")
            assert code == 0, err
        assert cli("stage", "method_comparison")[0] == 0
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def ws(prepared, tmp_path, monkeypatch):
    """A fresh copy of the prepared workspace as the working directory; ``tmp_path`` around it stays empty."""
    work = tmp_path / "ws"
    shutil.copytree(prepared, work, symlinks=True)
    monkeypatch.chdir(work)
    yield work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"], "something was written outside the workspace"


def refused(code: int, err: str, pattern: str, expected_code: int = 2) -> str:
    line = one_line(err)
    assert code == expected_code, err
    assert re.search(pattern, line, re.I), line
    return line


# ---------------------------------------------------------------------------------------------------
# settings refused at load, for every command: one parametrized table
# ---------------------------------------------------------------------------------------------------

SETTINGS = [
    # (id, class, argv, message, behaviour)
    ("params_file_missing", 4, ["stage", "prompt_sets", "--params", "typo.yaml"], r"params file typo\.yaml not found",
     "refused before any stage runs (no default build starts)"),
    ("lr_infinite", 4, ["stage", "trained_variant", "--method", "refl", "--set", "train.lr=Infinity"],
     r"train\.lr: .*finite", "refused at load"),
    ("guidance_nan", 4, ["stage", "base_rollouts", "--set", "rollouts.guidance=NaN"], r"rollouts\.guidance.*finite",
     "refused at load"),
    ("device_unknown", 4, ["stage", "evaluation", "--method", "refl", "--set", "device=gpu0"],
     r"unknown device 'gpu0'", "refused at load, listing the devices"),
    ("reward_unknown", 4, ["stage", "trained_variant", "--method", "refl", "--set", "train.reward=nosuch"],
     r"unknown reward 'nosuch'", "refused at load, listing the rewards; the run's checkpoints stay"),
    ("composite_reward_bad_weight", 4, ["stage", "trained_variant", "--method", "refl", "--set",
                                        "train.reward=align:lots"], r"weight 'lots'", "refused at load"),
    ("eval_reward_unknown", 4, ["stage", "evaluation", "--method", "refl", "--set", 'eval.rewards=["hps"]'],
     r"unknown reward 'hps'", "refused at load"),
    ("eps_negative", 4, ["stage", "trained_variant", "--method", "refl", "--set", "train.eps=-1e-8"],
     r"train\.eps.*greater than 0", "refused at load"),
    ("betas_out_of_range", 4, ["stage", "trained_variant", "--method", "refl", "--set", "train.betas=[0.9,1.0]"],
     r"train\.betas.*\[0, 1\)", "refused at load"),
    ("promote_metric_unknown", 4, ["stage", "promoted_model", "--set", "promote.metric=reward/nosuch"],
     r"promote\.metric='reward/nosuch' is not a metric", "refused at load, listing the metrics evaluation writes"),
    ("method_unknown", 4, ["stage", "method_comparison", "--set", 'methods=["reffl"]'], r"unknown method.*reffl",
     "refused at load"),
    ("method_axis_impossible", 4, ["stage", "trained_variant", "--method", "refl", "--set",
                                   'train.method_overrides=["active.n=99"]'], r"active\.n=99.*1\.\.4",
     "refused at load, naming the field and its range at this N"),
    ("unknown_key", 4, ["stage", "trained_variant", "--method", "refl", "--set", "train.lrr=1"], r"train\.lrr",
     "refused at load"),
    ("wrong_type", 4, ["stage", "trained_variant", "--method", "refl", "--set", "train.steps=many"],
     r"train\.steps.*integer", "refused at load"),
    ("set_without_value", 4, ["stage", "prompt_sets", "--set", "train.lr"], r"expected key=value", "refused"),
    ("set_into_a_value", 4, ["stage", "prompt_sets", "--set", "world_dir.x=1"], r"world_dir is not a section",
     "refused"),
    ("data_dir_is_a_url", 4, ["stage", "method_comparison", "--set", "data_dir=s3://bucket/data"],
     r"data_dir.*local folder", "refused at load"),
    ("world_setting_nan", 4, ["stage", "base_model", "--set", "world.vae_lr=NaN"], r"world\.vae_lr.*finite",
     "refused at load"),
    ("gradcheck_zero_seeds", 4, ["gradcheck", "--method", "refl", "--seeds", "0"], r"--seeds: 0 must be at least 1",
     "argparse refuses it"),
    ("plan_zero_steps", 4, ["plan", "--method", "refl", "--steps", "0"], r"--steps: 0 must be at least 1",
     "argparse refuses it"),
    ("sample_guidance_nan", 4, ["sample", "--guidance", "nan", "--prompt", "a red 7"], r"--guidance.*finite",
     "argparse refuses it (no NaN image is written)"),
    ("train_lr_infinite", 4, ["train", "--method", "refl", "--world", "data/world", "--set", "lr=Infinity"],
     r"lr: .*finite", "refused before training"),
    ("world_build_bad_setting", 4, ["world", "build", "--smoke", "--out", "w2", "--set", "vae_lr=-1"],
     r"vae_lr.*greater than 0", "refused before anything is built"),
    ("tracking_uri_ftp", 7, ["promote", "--rollback", "--set", "tracking.tracking_uri=ftp://host/mlflow"],
     r"not an MLflow store", "refused at load"),
    ("source_scheme_unknown", 7, ["stage", "prompt_sets", "--set", "prompts.source=ftp://host/p.txt"],
     r"ftp:// is not a source", "refused at load"),
    ("s3_source_with_dotdot", 1, ["stage", "prompt_sets", "--set", "prompts.source=s3://b/pfx/../../etc/passwd"],
     r"'\.\.' .*not allowed in an S3 key", "refused at load"),
    ("hub_source_with_dotdot", 1, ["stage", "reward_models", "--set", 'rewards.models={"x": "hf://a/b/../../c"}'],
     r"not allowed in a hub path", "refused at load"),
    ("reward_name_is_a_path", 1, ["stage", "reward_models", "--set", 'rewards.models={"../../x": "data/world"}'],
     r"reward names.*letters", "refused at load (the name becomes a folder)"),
    ("method_name_is_a_path", 1, ["stage", "trained_variant", "--method", "../../etc"], r"needs --method, one of",
     "refused before any path is made from it"),
    ("judge_url_with_credentials", 9, ["stage", "evaluation", "--method", "refl", "--set",
                                       "eval.judge_url=http://bob:hunter2@127.0.0.1:8000/v1"],
     r"carries credentials.*FLOWBP_JUDGE_API_KEY", "refused at load, the password never echoed"),
    ("tracking_uri_with_credentials", 9, ["promote", "--rollback", "--set",
                                          "tracking.tracking_uri=http://bob:hunter2@127.0.0.1:5000"],
     r"carries credentials.*MLFLOW_TRACKING_PASSWORD", "refused at load, the password never echoed"),
    ("s3_uri_with_credentials", 9, ["stage", "prompt_sets", "--set", "prompts.source=s3://AKIA:hunter2@b/p.txt"],
     r"carries credentials", "refused at load, the secret never echoed"),
    ("judge_url_not_http", 7, ["stage", "evaluation", "--method", "refl", "--set", "eval.judge_url=ftp://h/v1"],
     r"eval\.judge_url.*http", "refused at load"),
    ("promote_before_comparison", 8, ["stage", "promoted_model", "--set", "data_dir=fresh"],
     r"no method comparison", "refused, naming the stage to run first"),
    ("promote_unknown_version", 8, ["promote", "--version", "999"], r"no evaluation of version 999",
     "refused, nothing moved"),
    ("evaluate_before_training", 2, ["stage", "evaluation", "--method", "refl", "--set", "data_dir=fresh"],
     r"train the variant first", "refused, naming the stage to run first"),
    ("dvc_stage_variable_missing", 3, ["stage", "trained_variant", "--method-of-dvc-stage"], r"DVC sets DVC_STAGE",
     "refused"),
]
for _id, _cls, _argv, _msg, _behaviour in SETTINGS:
    CATALOGUE.append((CLASSES[_cls], _id, "flowbp " + " ".join(_argv), _behaviour))


@pytest.mark.parametrize("argv,pattern", [pytest.param(a, m, id=i) for i, _, a, m, _ in SETTINGS])
def test_settings_refused(ws, argv, pattern):
    before = state(ws)
    code, err = cli(*argv)
    line = refused(code, err, pattern)
    assert "hunter2" not in err and "AKIA" not in line
    assert state(ws) == before, "a refused command changed the workspace"
    assert not (ws / "w2").exists()
    assert not (ws / "fresh").exists() or [p.name for p in (ws / "fresh").iterdir()] == [".flowbp-locks"]


# ---------------------------------------------------------------------------------------------------
# 1. writes outside the destination
# ---------------------------------------------------------------------------------------------------

def _traversal_bucket(s3_bucket, keys):
    s3, bucket = s3_bucket
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"prompt\n")
    return bucket


@fault(1, "an S3 prefix holding a key pfx/../../../../../outside.txt as a prompt source",
       "refused while listing: nothing is written anywhere")
def test_s3_key_climbs_out_of_the_prompt_folder(ws, s3_bucket):
    bucket = _traversal_bucket(s3_bucket, ["pfx/p.txt", "pfx/../../../../../outside.txt"])
    code, err = cli("stage", "prompt_sets", "--set", f"prompts.source=s3://{bucket}/pfx/")
    refused(code, err, r"refused to write '\.\./\.\./")
    assert not list(Path("/").glob("outside.txt")) and not list(ws.parent.parent.rglob("outside.txt"))
    assert not list(ws.rglob("*.partial-*"))


@fault(1, "reward weights from an S3 prefix whose keys contain ../ (rewards.models)",
       "refused; the rewards folder is unchanged")
def test_s3_key_climbs_out_of_the_reward_folder(ws, s3_bucket):
    bucket = _traversal_bucket(s3_bucket, ["r/config.json", "r/../../escaped.json"])
    before = state(ws)
    code, err = cli("stage", "reward_models", "--set", f'rewards.models={{"pickscore": "s3://{bucket}/r/"}}')
    refused(code, err, r"refused to write")
    assert state(ws) == before and not list(ws.parent.parent.rglob("escaped.json"))


@fault(1, "an S3 key with an empty segment (pfx//etc/x) in a fetched folder", "refused")
def test_s3_key_with_an_empty_segment(ws, s3_bucket):
    bucket = _traversal_bucket(s3_bucket, ["m/a.json", "m//etc/x"])
    code, err = cli("stage", "reward_models", "--set", f'rewards.models={{"clipscore": "s3://{bucket}/m/"}}')
    refused(code, err, r"refused to write '/etc/x'")


@fault(1, "a base model from an S3 prefix with a ../ key", "refused; no backbone.json, no half-fetched folder")
def test_s3_base_model_climbs_out(ws, s3_bucket):
    bucket = _traversal_bucket(s3_bucket, ["sd/model_index.json", "sd/../../../../x.json"])
    code, err = cli("stage", "base_model", "--set", f"base_model.source=s3://{bucket}/sd/", "--set",
                    "train.backbone=sd35")
    refused(code, err, r"refused to write")
    assert (not (ws / "data" / "world" / "backbone.json").exists()
            and not (ws / "data" / "world" / "base_model").exists())


@fault(1, "a symlink inside the destination pointing out, then a key under it", "refused by the confined-path check")
def test_confined_refuses_a_symlink_out(tmp_path):
    from flowbp_ops.storage import SourceError, confined

    (tmp_path / "dest").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dest" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="resolves outside"):
        confined(tmp_path / "dest", "link/x.txt")
    assert confined(tmp_path / "dest", "a/b.txt") == (tmp_path / "dest" / "a" / "b.txt").resolve()


@fault(3, "a generated dvc.yaml for a data_dir with shell characters", "no setting reaches any stage's cmd")
def test_dvc_yaml_commands_carry_no_setting():
    from flowbp_ops.params import Params
    from flowbp_ops.stages.graph import dvc_yaml

    stages = yaml.safe_load(dvc_yaml(Params(data_dir="d;touch x", world_dir="w$(id)")))["stages"]
    for name, body in stages.items():
        cmd = body.get("cmd") or body["do"]["cmd"]
        assert re.fullmatch(r"flowbp stage [a-z_]+( --method-of-dvc-stage)?", cmd), (name, cmd)


# ---------------------------------------------------------------------------------------------------
# 2. nothing lost on a refused or repeated command
# ---------------------------------------------------------------------------------------------------

@fault(2, "trained_variant rerun with a setting that cannot load (a missing world)",
       "refused before the run folder is touched: checkpoints and metrics.jsonl intact")
def test_refused_rerun_keeps_the_checkpoints(ws):
    run = ws / "data" / "runs" / "refl"
    before = state(run)
    assert list((run / "checkpoints").iterdir())
    code, err = cli("stage", "trained_variant", "--method", "refl", "--set", "world_dir=nowhere")
    refused(code, err, r"nowhere")
    assert state(run) == before


@fault(2, "flowbp train twice into the same --out without --resume", "the second is refused; the first run is intact")
def test_train_refuses_to_mix_two_runs(ws):
    args = ["train", "--method", "refl", "--world", "data/world", "--out", "r", "--set", "finetune=lora",
            "--set", "steps=2",
            "--set", "batch=1", "--set", "rollout_steps=4", "--set", 'heldout_rewards=[]']
    assert cli(*args)[0] == 0
    before = state(ws / "r")
    code, err = cli(*args)
    refused(code, err, r"r already holds a run.*--resume.*--overwrite")
    assert state(ws / "r") == before
    assert cli(*args, "--overwrite")[0] == 0
    assert [json.loads(x)["step"] for x in (ws / "r" / "metrics.jsonl").read_text().splitlines()] == [0, 1]


@fault(2, "flowbp train --resume with a changed setting", "refused naming the changed field; the run is intact")
def test_train_resume_with_another_config(ws):
    args = ["train", "--method", "refl", "--world", "data/world", "--out", "r", "--set", "finetune=lora",
            "--set", "steps=2", "--set", "batch=1", "--set", "rollout_steps=4", "--set", "heldout_rewards=[]"]
    assert cli(*args)[0] == 0
    before = state(ws / "r")
    code, err = cli(*args, "--set", "lr=0.003", "--resume")
    refused(code, err, r"cannot resume r: the config changed \(lr: 0\.0001 -> 0\.003\)")
    assert state(ws / "r") == before


def _popen(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([*FLOWBP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(cond, timeout: float = 120, what: str = "") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _holder(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _steps(file: Path) -> list[int]:
    return [json.loads(line)["step"] for line in file.read_text().splitlines() if line.strip()]


@fault(2, "kill -9 of a pipeline training run between two checkpoints, then the same command again",
       "resumes from the last checkpoint; metrics.jsonl has every step once; the killed MLflow run is marked KILLED")
def test_kill_then_rerun_resumes_without_repeated_steps(ws):
    from mlflow import MlflowClient

    sets = ["--set", "train.steps=40", "--set", "train.checkpoint_every=5"]
    proc = _popen("stage", "trained_variant", "--method", "refl", *sets, cwd=ws)
    run = ws / "data" / "runs" / "refl"

    from flowbp_ops.training.checkpoint import list_checkpoints

    def past_a_checkpoint():
        ckpts = list_checkpoints(run)
        return ckpts and (run / "metrics.jsonl").exists() and len(_steps(run / "metrics.jsonl")) >= \
            int(ckpts[-1].name[5:]) + 2
    try:
        _wait_for(past_a_checkpoint, what="a checkpoint and two more steps")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    logged = _steps(run / "metrics.jsonl")
    code, err = cli("stage", "trained_variant", "--method", "refl", *sets)
    assert code == 0, err
    summary = json.loads((ws / "data" / "variants" / "refl" / "summary.json").read_text())
    assert 0 < summary["resumed_from"] < len(logged), (summary["resumed_from"], len(logged))
    assert (_steps(run / "metrics.jsonl") == list(range(40))
            == _steps(ws / "data" / "variants" / "refl" / "metrics.jsonl"))
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    runs = client.search_runs([client.get_experiment_by_name("flowbp").experiment_id],
                              "tags.method = 'refl'", order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FINISHED" and runs[1].info.status == "KILLED"
    assert len(client.get_metric_history(runs[0].info.run_id, "reward")) == 40


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
@fault(5, "the newest checkpoint truncated or with a flipped byte, then the stage rerun",
       "passed over by its checksum; the run resumes from the older intact checkpoint and says so")
def test_damaged_newest_checkpoint_falls_back(ws, how):
    run = ws / "data" / "runs" / "refl"
    older, newest = sorted((run / "checkpoints").glob("step-*"))
    _damage(newest / "state.safetensors", how)
    code, err = cli("stage", "trained_variant", "--method", "refl")
    assert code == 0, err
    summary = json.loads((ws / "data" / "variants" / "refl" / "summary.json").read_text())
    assert summary["resumed_from"] == int(older.name[5:]) and "passed over 1 damaged" in summary["resume"]
    assert _steps(run / "metrics.jsonl") == list(range(PARAMS["train"]["steps"]))


@fault(5, "flowbp train --resume with every checkpoint damaged", "refused: nothing intact to resume, the files stay")
def test_train_resume_with_every_checkpoint_damaged(ws):
    args = ["train", "--method", "refl", "--world", "data/world", "--out", "r", "--set", "finetune=lora",
            "--set", "steps=2",
            "--set", "batch=1", "--set", "rollout_steps=4", "--set", "heldout_rewards=[]"]
    assert cli(*args)[0] == 0
    for ckpt in (ws / "r" / "checkpoints").glob("step-*"):
        _damage(ckpt / "state.safetensors", "flip")
    before = state(ws / "r")
    code, err = cli(*args, "--resume")
    refused(code, err, r"cannot resume r: every checkpoint is damaged")
    assert state(ws / "r") == before


# ---------------------------------------------------------------------------------------------------
# 3. shell injection through DVC
# ---------------------------------------------------------------------------------------------------

@fault(3, "DVC_STAGE carrying shell syntax (trained_variant@refl$(touch marker))",
       "flowbp refuses the method; no shell ever sees it")
def test_dvc_stage_with_shell_syntax(ws, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "trained_variant@refl$(touch marker)")
    code, err = cli("stage", "trained_variant", "--method-of-dvc-stage")
    refused(code, err, r"needs --method, one of")
    assert not (ws / "marker").exists()


@fault(3, "methods: ['refl; touch marker #'] in params.yaml, then scripts/dvc repro",
       "every stage refuses the params file; the command never reaches a shell (no marker)")
def test_dvc_repro_with_a_hostile_method_name(clone):
    work = clone.parent / "hostile"
    shutil.copytree(clone, work, symlinks=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["methods"] = ["refl; touch marker #"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["scripts/dvc", "repro"], cwd=work, capture_output=True, text=True)
    assert done.returncode != 0
    assert "unknown method(s) ['refl; touch marker #']" in done.stdout + done.stderr
    assert not (work / "marker").exists() and not (work / "data" / "world").exists()


# ---------------------------------------------------------------------------------------------------
# 5. integrity
# ---------------------------------------------------------------------------------------------------

@fault(5, "a flipped byte in a trained LoRA, then the evaluation stage",
       "refused: the weights differ from the checksum recorded at training; the old evaluation stays")
def test_flipped_weights_byte_is_not_evaluated(ws):
    _damage(ws / "data" / "variants" / "refl" / "weights" / "pytorch_lora_weights.safetensors", "flip")
    before = state(ws / "data" / "eval")
    code, err = cli("stage", "evaluation", "--method", "refl")
    refused(code, err, r"weights differs from the checksum")
    assert state(ws / "data" / "eval") == before


@fault(5, "the LoRA file replaced by another valid LoRA (manifest edited too)",
       "refused by the summary's checksum: the gates only measure the registered bytes")
def test_replaced_weights_are_not_evaluated(ws):
    from flowbp_ops.integrity import seal

    adapter = ws / "data" / "variants" / "refl" / "weights"
    from safetensors.torch import load_file, save_file

    tensors = {k: v * 2 for k, v in load_file(str(adapter / "pytorch_lora_weights.safetensors")).items()}
    save_file(tensors, str(adapter / "pytorch_lora_weights.safetensors"))
    seal(adapter)
    code, err = cli("stage", "evaluation", "--method", "refl")
    refused(code, err, r"differs from the checksum in .*summary\.json")


@fault(5, "flowbp sample --weights with a flipped byte", "refused naming the changed file; no image written")
def test_sample_refuses_damaged_weights(ws):
    _damage(ws / "data" / "variants" / "refl" / "weights" / "pytorch_lora_weights.safetensors", "flip")
    code, err = cli("sample", "--world", "data/world", "--weights", "data/variants/refl/weights", "--prompt",
                    "a red 7", "--out", "s.png", "--steps", "2")
    refused(code, err, r"changed: pytorch_lora_weights\.safetensors")
    assert not (ws / "s.png").exists()


@fault(5, "a flipped byte in a reward net of the world", "refused when the reward loads, naming the file")
def test_flipped_reward_net_is_refused(ws):
    _damage(ws / "data" / "world" / "rewards" / "align_0.safetensors", "flip")
    code, err = cli("stage", "evaluation", "--method", "refl")
    refused(code, err, r"reward model align_0 .*changed: align_0\.safetensors")


@fault(5, "a flipped byte in the world's transformer", "refused when the backbone loads")
def test_flipped_base_model_is_refused(ws):
    weights = next((ws / "data" / "world" / "transformer").glob("*.safetensors"))
    _damage(weights, "flip")
    code, err = cli("stage", "base_rollouts")
    refused(code, err, r"default world's transformer .*changed")


@fault(5, "a flipped byte in a cached rollout shard", "refused by index.json's checksum")
def test_flipped_rollout_shard_is_refused(ws):
    _damage(next((ws / "data" / "rollouts").glob("shard-*.safetensors")), "flip")
    code, err = cli("stage", "evaluation", "--method", "refl")
    refused(code, err, r"shard is corrupt")


@fault(5, "a flipped byte in a prompt embedding", "refused by the embeddings' manifest, naming the stage to rerun")
def test_flipped_prompt_embedding_is_refused(ws):
    _damage(next((ws / "data" / "embeddings").glob("*.safetensors")), "flip")
    code, err = cli("stage", "trained_variant", "--method", "refl")
    refused(code, err, r"prompt embeddings .*changed: .*flowbp stage prompt_embeddings")


# ---------------------------------------------------------------------------------------------------
# 6. concurrency
# ---------------------------------------------------------------------------------------------------

@fault(6, "two `flowbp stage trained_variant --method refl` at once",
       "the second is refused at once ('already running: pid N'); the first finishes alone")
def test_two_trainings_of_one_variant(ws):
    sets = ["--set", "train.steps=400", "--set", "train.checkpoint_every=50"]
    first = _popen("stage", "trained_variant", "--method", "refl", *sets, cwd=ws)
    lock = ws / "data" / ".flowbp-locks" / "variant@refl.lock"
    try:
        _wait_for(lambda: _holder(lock) == first.pid, what="the first run's lock")
        assert first.poll() is None, first.communicate()
        code, err = cli("stage", "trained_variant", "--method", "refl", *sets)
        refused(code, err, rf"stage trained_variant for refl is already running: pid {first.pid} on ")
        code, err = cli("stage", "evaluation", "--method", "refl")
        refused(code, err, rf"already running: pid {first.pid}")  # evaluation reads what training writes
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel dropped the killed holder's lock: the next run goes ahead
    code, err = cli("stage", "evaluation", "--method", "refl")
    assert code == 0, err


@fault(6, "two `flowbp train` into the same --out at once", "the second is refused naming the first's pid")
def test_two_cli_trainings_into_one_folder(ws):
    args = ["train", "--method", "refl", "--world", "data/world", "--out", "r", "--set", "finetune=lora",
            "--set", "steps=400",
            "--set", "batch=1", "--set", "rollout_steps=4", "--set", "heldout_rewards=[]"]
    first = _popen(*args, cwd=ws)
    try:
        _wait_for(lambda: _holder(ws / "r.lock") == first.pid, what="the first run's lock")
        code, err = cli(*args, "--resume")
        refused(code, err, rf"training into r is already running: pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# ---------------------------------------------------------------------------------------------------
# 7. services
# ---------------------------------------------------------------------------------------------------

class _Stub:
    """An HTTP server on 127.0.0.1 answering every request with one status, content type and body."""

    def __init__(self, status: int, body: str, ctype: str = "text/html"):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@fault(7, "an S3 endpoint that accepts connections and never answers", "fails within the S3 timeout, one line")
def test_s3_endpoint_that_never_answers(ws, silent_port, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent_port}")
    monkeypatch.setenv("FLOWBP_S3_TIMEOUT", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    t0 = time.monotonic()
    code, err = cli("stage", "prompt_sets", "--set", "prompts.source=s3://b/p.txt")
    refused(code, err, r"did not answer in time")
    assert time.monotonic() - t0 < 30


@fault(7, "an S3 endpoint that refuses connections", "one line naming the endpoint variable to check")
def test_s3_endpoint_refused(ws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    code, err = cli("stage", "prompt_sets", "--set", "prompts.source=s3://b/p.txt")
    refused(code, err, r"cannot reach the S3 endpoint.*AWS_ENDPOINT_URL_S3")


@fault(7, "S3 answers 403 AccessDenied (wrong credentials for the prefix)", "one line: S3 refused, check credentials")
def test_s3_access_denied(ws, monkeypatch):
    stub = _Stub(403, "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>", "application/xml")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", stub.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    try:
        code, err = cli("stage", "prompt_sets", "--set", "prompts.source=s3://b/pfx/")
    finally:
        stub.close()
    refused(code, err, r"S3 refused the request \(AccessDenied")
    assert "wrong-secret" not in err


@fault(7, "no AWS credentials anywhere", "one line naming the variables to set")
def test_s3_without_credentials(ws, s3_endpoint, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err = cli("stage", "prompt_sets", "--set", "prompts.source=s3://b/p.txt")
    refused(code, err, r"no AWS credentials found: set AWS_ACCESS_KEY_ID")


@fault(7, "a missing S3 bucket", "one line: no such bucket")
def test_s3_missing_bucket(ws, s3_endpoint):
    code, err = cli("stage", "prompt_sets", "--set", "prompts.source=s3://no-such-bucket-x/pfx/")
    refused(code, err, r"no such bucket")


@fault(7, "a hub source while the hub cannot be reached (HF_HUB_OFFLINE=1)", "one line: not cached, hub unreachable")
def test_hub_source_offline(ws, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli("stage", "prompt_sets", "--set", "prompts.source=hf://datasets/nobody/none/p.txt")
    refused(code, err, r"not in the local hub cache and the hub cannot be reached")


@fault(7, "tracking_uri pointing at a web server that is not MLflow (HTML answers)",
       "one line: answers, but not as an MLflow tracking server")
def test_tracking_uri_not_mlflow(ws):
    stub = _Stub(200, "<html><body>hello</body></html>")
    try:
        code, err = cli("promote", "--rollback", "--set", f"tracking.tracking_uri={stub.url}")
    finally:
        stub.close()
    refused(code, err, r"not as an MLflow tracking server")


@fault(7, "tracking_uri pointing at a server that answers 404 to MLflow's API", "one line: not an MLflow server")
def test_tracking_uri_404(ws):
    stub = _Stub(404, "not found")
    try:
        code, err = cli("promote", "--rollback", "--set", f"tracking.tracking_uri={stub.url}")
    finally:
        stub.close()
    refused(code, err, r"answered HTTP 404 to MLflow's REST API")


@fault(7, "an MLflow server that is down", "fails fast (< 30 s), one line")
def test_tracking_server_down(ws):
    t0 = time.monotonic()
    code, err = cli("promote", "--rollback", "--set", f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}")
    refused(code, err, r"is unreachable")
    assert time.monotonic() - t0 < 30


@fault(7, "a VLM judge that answers HTML", "one line: malformed chat-completions response; the old evaluation stays")
def test_judge_answers_html(ws):
    stub = _Stub(200, "<html>oops</html>")
    before = state(ws / "data" / "eval")
    try:
        code, err = cli("stage", "evaluation", "--method", "refl", "--set", f"eval.judge_url={stub.url}/v1")
    finally:
        stub.close()
    refused(code, err, r"malformed chat-completions response")
    assert state(ws / "data" / "eval") == before


# ---------------------------------------------------------------------------------------------------
# 8. promotion bookkeeping
# ---------------------------------------------------------------------------------------------------

@fault(8, "--rollback twice after three promotions", "each rollback goes one further back (v3 -> v2 -> v1), never "
       "back to the version just rolled back; a third is refused")
def test_rollback_walks_back_the_history(ws):
    from flowbp_ops.params import load_params
    from flowbp_ops.tracking import PromotionError, Tracker

    tracker = Tracker(load_params("params.yaml").tracking)
    name = "flowbp-default"
    run_id = json.loads((ws / "data" / "variants" / "refl" / "summary.json").read_text())["run_id"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    src = tracker.client.get_model_version(name, "1").source
    for _ in range(2):
        mlflow.register_model(src, name)
    ok = {"reward_improved": {"passed": True}}
    for v in ("1", "2", "3"):
        tracker.promote(name, v, ok)
    assert run_id and tracker.alias_version(name, "champion") == "3"
    code, err = cli("promote", "--rollback")
    assert code == 0 and tracker.alias_version(name, "champion") == "2"
    code, err = cli("promote", "--rollback")
    assert code == 0 and tracker.alias_version(name, "champion") == "1"
    code, err = cli("promote", "--rollback")
    refused(code, err, r"no earlier champion to roll back to \(champion: 1\)")
    with pytest.raises(PromotionError, match="failed the gate"):
        tracker.promote(name, "2", {"reward_improved": {"passed": False}})
    assert tracker.alias_version(name, "champion") == "1"


@fault(8, "--rollback to a version whose recorded gates failed", "refused; the champion is unchanged")
def test_rollback_rechecks_gates(ws):
    import mlflow
    from flowbp_ops.params import load_params
    from flowbp_ops.tracking import Tracker

    tracker = Tracker(load_params("params.yaml").tracking)
    name = "flowbp-default"
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    mlflow.register_model(tracker.client.get_model_version(name, "1").source, name)
    ok = {"reward_improved": {"passed": True}}
    tracker.promote(name, "1", ok)
    tracker.promote(name, "2", ok)
    tracker.client.set_model_version_tag(name, "1", "gate.reward_improved", json.dumps({"passed": False}))
    code, err = cli("promote", "--rollback")
    refused(code, err, r"version 1 .* cannot be champion again: gates reward_improved failed")
    assert tracker.alias_version(name, "champion") == "2"


@fault(8, "--rollback with no registered model", "one line: no registered model, what to run first")
def test_rollback_without_a_model(ws):
    code, err = cli("promote", "--rollback", "--set", "promote.model_name=never-registered")
    refused(code, err, r"no registered model 'never-registered'")


# ---------------------------------------------------------------------------------------------------
# 9. secrets (the rest are in the settings table)
# ---------------------------------------------------------------------------------------------------

@fault(9, "a judge_url with credentials in a Dagster run's config", "the asset fails before the judge is called or "
       "the URL logged; the message names FLOWBP_JUDGE_API_KEY")
def test_dagster_refuses_credentials_in_the_run_config(ws, monkeypatch):
    import dagster as dg

    from pipelines import config as pconfig

    monkeypatch.setenv("FLOWBP_PARAMS", str(ws / "params.yaml"))
    pconfig.defaults.cache_clear()
    try:
        from pipelines.definitions import ASSETS, RESOURCES

        res = dg.materialize(ASSETS, selection=[dg.AssetKey("evaluation")], resources=RESOURCES, partition_key="refl",
                             run_config={"ops": {"evaluation": {"config": {"eval": {
                                 "judge_url": "http://bob:hunter2@127.0.0.1:1/v1"}}}}},
                             raise_on_error=False, instance=dg.DagsterInstance.ephemeral())
    finally:
        pconfig.defaults.cache_clear()
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    error, message = failure.event_specific_data.error, ""
    while error is not None:  # the op's exception is the cause of Dagster's step error
        message, error = message + error.message, error.cause
    assert "FLOWBP_JUDGE_API_KEY" in message and "hunter2" not in message


# ---------------------------------------------------------------------------------------------------
# 11. tracebacks
# ---------------------------------------------------------------------------------------------------

@fault(11, "a weights folder holding a file that is not safetensors (no manifest)",
       "one line: not readable safetensors, how to restore")
def test_garbage_safetensors_is_one_line(ws):
    (ws / "junk").mkdir()
    (ws / "junk" / "pytorch_lora_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, err = cli("sample", "--world", "data/world", "--weights", "junk", "--prompt", "a red 7", "--out", "s.png")
    refused(code, err, r"safetensors|header")
    assert not (ws / "s.png").exists()


@fault(11, "a bug inside a command (an unexpected exception)", "one line 'internal error … --debug', exit code 1; "
       "--debug prints the traceback")
def test_internal_error_is_one_line_and_debug_shows_the_traceback(ws, monkeypatch):
    import flowbp_ops.cli as cli_module

    def boom(args):
        raise TypeError("unexpected None")

    monkeypatch.setattr(cli_module, "_cmd_methods", boom)
    code, err = cli("methods")
    refused(code, err, r"internal error \(TypeError: unexpected None\); rerun with --debug", expected_code=1)
    code, err = cli("--debug", "methods")
    assert code == 1 and "Traceback" in err and "unexpected None" in err


@fault(11, "Ctrl-C during a command", "one line, exit code 130")
def test_interrupt_is_one_line(ws, monkeypatch):
    import flowbp_ops.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_cmd_methods", interrupted)
    code, err = cli("methods")
    refused(code, err, r"interrupted", expected_code=130)


@fault(11, "the disk fills up while a stage writes (ENOSPC)", "one line naming the file and 'free disk space'; the "
       "atomic write leaves no partial output")
def test_disk_full_is_one_line(ws, monkeypatch):
    import errno

    import flowbp_ops.prompts as prompts

    real = prompts._write

    def full(out_dir, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

    monkeypatch.setattr(prompts, "_write", full)
    before = state(ws)
    code, err = cli("stage", "prompt_sets")
    refused(code, err, r"No space left on device \(free disk space")
    assert state(ws) == before and real


@fault(11, "an MLflow error from the registry (a version that does not exist)", "one line from MLflow's message")
def test_mlflow_error_is_one_line(ws, monkeypatch):
    from flowbp_ops.tracking import Tracker

    def missing(self, model_name):
        return self.client.get_model_version(model_name, "424242")

    monkeypatch.setattr(Tracker, "rollback", missing)
    code, err = cli("promote", "--rollback")
    refused(code, err, r"^flowbp: error: MLflow: .*424242")


# ---------------------------------------------------------------------------------------------------
# 10. the README's commands from a clean clone
# ---------------------------------------------------------------------------------------------------

def _readme_commands() -> list[str]:
    """Every `flowbp …` command line in the README's bash blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^\.venv/bin/", "", line)
            line = re.sub(r"\s\[--?[^\]]*\]", "", line)  # [--optional flags] in the usage lines
            if line.startswith("flowbp "):
                out.append(line)
    return out


@fault(10, "every `flowbp …` command the README shows", "each parses with the CLI as written (no renamed flag, no "
       "missing command)")
def test_readme_commands_parse():
    import shlex

    from flowbp_ops.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 15
    parser = build_parser()
    for line in commands:
        for alternative in _expand(shlex.split(line)[1:]):
            try:
                parser.parse_args(alternative)
            except SystemExit:
                pytest.fail(f"README command does not parse: {line}")


def _expand(argv: list[str]) -> list[list[str]]:
    """README lines like ``flowbp stage a | b | c`` are several commands; ``[--x]`` marks optional flags."""
    if "|" in argv:
        return [argv[:1] + [name] for name in argv[1:] if name != "|"]
    return [argv]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository as a new user clones it (the tracked files and nothing else), with smoke settings."""
    dest = tmp_path_factory.mktemp("clone") / "flowbp"
    # the working tree's files (committed or not), without what the main job wrote into the checkout (data/)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", ".",
                            ":(exclude)data"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    for venv in (".venv", ".dvc-tool"):  # installed by `bash scripts/install.sh` in a real clone
        (dest / venv).symlink_to(ROOT / venv)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in PARAMS.items():
        if key not in ("world_dir", "data_dir", "tracking"):
            params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=u@example.com", "-c", "user.name=u", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


@fault(10, "`scripts/dvc repro` in a fresh clone, as the README writes it",
       "runs the whole chain (.dvc/ is committed)")
def test_readme_dvc_repro_in_a_fresh_clone(clone):
    work = clone.parent / "repro"
    shutil.copytree(clone, work, symlinks=True)
    done = subprocess.run(["scripts/dvc", "repro"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (work / "data" / "promoted.json").exists() and (work / "dvc.lock").exists()
    dvc_md = subprocess.run(["scripts/dvc", "metrics", "show"], cwd=work, capture_output=True, text=True)
    assert dvc_md.returncode == 0 and "reward_improved" in dvc_md.stdout


# ---------------------------------------------------------------------------------------------------
# the catalogue and the README's reliability table
# ---------------------------------------------------------------------------------------------------

def table() -> str:
    rows = ["| class | fault | what is tried | behaviour |", "|---|---|---|---|"]
    for cls, name, what, behaviour in sorted(CATALOGUE, key=lambda r: (list(CLASSES.values()).index(r[0]), r[1])):
        rows.append(f"| {cls} | `{name}` | {what.replace('|', '&#124;')} | {behaviour} |")
    return "\n".join(rows) + "\n"


def test_the_catalogue_is_large_and_in_the_readme():
    assert len(CATALOGUE) >= 50 and len({name for _, name, _, _ in CATALOGUE}) == len(CATALOGUE)
    assert table() in (ROOT / "README.md").read_text(), ("README's reliability table is stale: "
                                                         "python -m tests.test_faults")


if __name__ == "__main__":
    print(table(), end="")
