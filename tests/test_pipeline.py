"""The pipeline: params schema, prompt sets, the stage graph (Dagster = dvc.yaml), the whole chain
through Dagster on a smoke world with MLflow runs and the registry, promotion gates and rollback."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from flowbp_ops.params import Params, load_params
from flowbp_ops.prompts import PromptSetError, prepare_prompt_set
from flowbp_ops.surrogate.config import ConfigError
from flowbp_ops.world.config import WorldConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "world": WorldConfig.smoke().model_dump(),
    "rollouts": {"n_steps": 3, "n_prompts": 4, "shard_size": 3},
    "train": {"steps": 2, "batch": 2, "rollout_steps": 4, "checkpoint_every": 1, "heldout_rewards": ["align_heldout"],
              "finetune": "lora"},
    "methods": ["flowbp_sparse", "refl"],
    "eval": {"grid_prompts": 2, "diversity_seeds": 2, "diversity_prompts": 2},
    # a smoke world's judges are untrained, so whether a variant "improves" is chance: an unreachable bar makes
    # the blocking gate's behaviour certain
    "promote": {"min_improvement": 10.0},
}


def smoke_params(root: Path) -> dict:
    return {**SMOKE, "world_dir": str(root / "data" / "world"), "data_dir": str(root / "data"),
            "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db",
                         "artifact_location": str(root / "mlartifacts")}}


def test_params_defaults_overrides_and_errors(tmp_path):
    committed = load_params(ROOT / "params.yaml")
    assert committed == Params()  # params.yaml holds exactly the schema's defaults
    p = load_params(ROOT / "params.yaml", ["train.lr=3e-4", "methods=[\"refl\"]"])
    assert p.train.lr == 3e-4 and p.methods == ["refl"] and p.train_config("drtune").method == "drtune"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_params(bad)
    bad.write_text("train: {nope: 1}\n")
    with pytest.raises(ConfigError, match="train.nope"):
        load_params(bad)
    bad.write_text("methods: [made_up]\n")
    with pytest.raises(ConfigError, match="made_up"):
        load_params(bad)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_prompt_sets_from_files_and_s3(tmp_path, s3_bucket):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "A  cat"}\n{"prompt": "a cat"}\n{"prompt": "a dog "}\n{"prompt": ""}\n'
                   + "".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(20)))
    meta = prepare_prompt_set(str(src), tmp_path / "out", eval_fraction=0.25, seed=3)
    train = (tmp_path / "out" / "train.txt").read_text().splitlines()
    test = (tmp_path / "out" / "test.txt").read_text().splitlines()
    assert meta["n_raw"] == 24 and meta["n_duplicates_or_empty"] == 2 and len(train) + len(test) == 22
    assert not set(train) & set(test) and "A cat" in train + test and "a dog" in train + test
    prepare_prompt_set(str(src), tmp_path / "again", eval_fraction=0.25, seed=3)
    assert (tmp_path / "again" / "test.txt").read_text().splitlines() == test  # fixed seed, same split
    csv = tmp_path / "p.csv"
    csv.write_text("id,caption\n1,red\n2,blue\n3,green\n")
    with pytest.raises(PromptSetError, match="no column 'prompt'"):
        prepare_prompt_set(str(csv), tmp_path / "c")
    assert prepare_prompt_set(str(csv), tmp_path / "c", column="caption")["n_train"] == 2
    for name, text, msg in [("e.txt", "\n  \n", "0 usable prompt"), ("m.json", "{not json", "malformed JSON"),
                            ("o.json", '{"a": 1}', "JSON list"),
                            ("n.jsonl", '{"prompt": 3}\n', "not a prompt string")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(PromptSetError, match=msg):
            prepare_prompt_set(str(tmp_path / name), tmp_path / f"{name}.out")
        assert not (tmp_path / f"{name}.out").exists()
    tr, ev = tmp_path / "train.txt", tmp_path / "eval.txt"
    tr.write_text("one\ntwo\nshared\n")
    ev.write_text("Shared\nthree\n")
    meta = prepare_prompt_set(str(tr), tmp_path / "sep", eval_source=str(ev))  # a separate held-out file
    assert (tmp_path / "sep" / "train.txt").read_text().split() == ["one", "two"]  # the overlap is removed
    assert (tmp_path / "sep" / "test.txt").read_text().splitlines() == ["Shared", "three"]
    with pytest.raises(PromptSetError, match="prompts.source is empty"):
        prepare_prompt_set("", tmp_path / "empty")
    s3, bucket = s3_bucket
    s3.put_object(Bucket=bucket, Key="prompts/eval.txt", Body="one\ntwo\nthree\nfour\n".encode())
    meta = prepare_prompt_set(f"s3://{bucket}/prompts/eval.txt", tmp_path / "s3", eval_fraction=0.5)
    assert meta["n_train"] == 2 and meta["n_test"] == 2 and meta["source"].startswith("s3://")


def test_one_graph_for_dagster_and_dvc():
    from flowbp_ops.stages.graph import STAGES, dvc_yaml
    from pipelines.definitions import ASSETS, defs

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml drifted: run `flowbp pipeline dvc-yaml`"
    graph = defs.resolve_asset_graph()
    for stage in STAGES:
        key = next(a.key for a in ASSETS if a.key.to_user_string() == stage.name)
        parents = {k.to_user_string() for k in graph.get(key).parent_keys}
        assert parents == set(stage.deps), stage.name
        assert (graph.get(key).partitions_def is not None) == stage.per_method
    dvc = yaml.safe_load(dvc_yaml())["stages"]
    assert set(dvc) == {s.name for s in STAGES}
    assert dvc["trained_variant"]["foreach"] == "${methods}"
    assert "data/variants/${item}/weights" in dvc["evaluation"]["do"]["deps"]
    # training reads the prompt embeddings, never the base rollouts: an evaluation setting retrains nothing
    train_deps, eval_deps = dvc["trained_variant"]["do"]["deps"], dvc["evaluation"]["do"]["deps"]
    assert "data/embeddings" in train_deps and "data/rollouts" not in train_deps
    assert {"data/embeddings", "data/rollouts"} <= set(eval_deps)
    assert "rollouts" not in dvc["trained_variant"]["do"]["params"]
    # evaluation loads the base model (then the variant's weights onto it): a pod pulling its inputs gets it
    assert {"data/world/vae", "data/world/transformer", "data/world/base_model.json"} <= set(eval_deps)
    assert {"base_model", "train.backbone"} <= set(dvc["evaluation"]["do"]["params"])
    # a training run's checkpoints are its working state, never another stage's input
    every_dep = [d for body in dvc.values() for d in body.get("do", body).get("deps", [])]
    assert not [d for d in every_dep if d.startswith("data/runs")], every_dep
    from flowbp_ops.params import params_from
    from flowbp_ops.stages.graph import BY_NAME, resumable_transfers, stage_transfers

    params = params_from({})
    pulled = {k for pairs in stage_transfers(BY_NAME["evaluation"], params, "refl", inputs=True).values()
              for k, _ in pairs}
    assert {"data/world/transformer", "data/variants/refl/weights", "data/rollouts"} <= pulled
    assert not any(k.startswith("data/runs") for k in pulled)
    assert resumable_transfers(BY_NAME["trained_variant"], params, "refl") == [("data/runs/refl",
                                                                                Path("data/runs/refl"))]
    # a preset's params: outputs under its world_dir, and a real base model is a pin, not built weights
    from flowbp_ops.presets import get_preset

    real = yaml.safe_load(dvc_yaml(get_preset("sd35/flowbp_lagrange")))["stages"]
    assert real["base_model"]["outs"] == ["data/sd35/backbone.json"]
    assert real["prompt_sets"]["outs"] == ["data/sd35/prompts"]
    assert "data/sd35/backbone.json" in real["base_rollouts"]["deps"]


def test_dagster_config_is_the_library_schema():
    from flowbp_ops.training.config import TrainConfig
    from pipelines.config import section_config

    cls = section_config("TrainConfig", TrainConfig, TrainConfig())
    assert set(cls.model_fields) == set(TrainConfig.model_fields)
    assert cls.model_fields["lr"].default == TrainConfig().lr
    # the Dagster UI hands 1e-8 back as the string "1e-8" once a partition is picked: the launchpad
    # must accept it and the library's schema must still read it as a number (and refuse non-numbers)
    import dagster as dg

    from pipelines.config import apply, stage_config
    from pipelines.definitions import defs

    ui_config = {"ops": {"trained_variant": {"config": {"train": {"eps": "1e-8"}}}}}
    dg.validate_run_config(defs.get_job_def("variant"), ui_config)
    stage_cls = stage_config("trained_variant", ["train"])
    train_cls = stage_cls.model_fields["train"].annotation
    params = apply(stage_cls(train=train_cls(eps="1e-8")))
    assert params.train.eps == 1e-8 and isinstance(params.train.eps, float)
    with pytest.raises(Exception, match="eps"):
        apply(stage_cls(train=train_cls(eps="tiny")))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(smoke_params(root)))
    from pipelines.instance import write_instance
    from pipelines.run import run_chain

    home = root / "dagster"  # an instance of its own, whose event log the tests read
    home.mkdir()
    write_instance(home / "dagster.yaml", gpu_slots=2)  # as scripts/install.sh writes it
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.1"  # MLflow's own knob: samples within 2 steps
    try:
        result = run_chain(params_file)
    finally:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        os.environ.pop("DAGSTER_HOME")
        if old:
            os.environ["DAGSTER_HOME"] = old
    return root, load_params(params_file), result


def test_chain_materializes_every_stage_and_tracks_in_mlflow(chain):
    from mlflow import MlflowClient

    root, params, result = chain
    assert result["prepare"]["success"] and result["compare_and_promote"]["success"]
    data = root / "data"
    for m in params.methods:
        # on a smoke world nothing improves: the blocking gate says so and the variant run stops there
        checks = result["variants"][m]["checks"]
        assert checks["finite_weights"] is True and checks["reward_improved"] is False
        assert (data / "variants" / m / "weights" / "pytorch_lora_weights.safetensors").exists()
        ev = json.loads((data / "eval" / m / "metrics.json").read_text())
        assert ev["n_prompts"] == 4 and set(ev["gates"]) == {"reward_improved", "heldout_not_collapsed",
                                                             "heldout_judge_improved", "diversity_not_collapsed"}
    assert json.loads((data / "rollouts" / "index.json").read_text())["n_prompts"] == 4
    assert ((data / "comparison" / "curves.png").exists()
            and "flowbp_sparse" in (data / "comparison" / "table.md").read_text())
    promoted = json.loads((data / "promoted.json").read_text())
    assert promoted["promoted"] is None and "no variant passed" in promoted["reason"]

    client = MlflowClient(params.tracking.tracking_uri, params.tracking.tracking_uri)
    exp = client.get_experiment_by_name("flowbp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on model training
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"flowbp_sparse", "refl", "flowbp_sparse/evaluation", "method_comparison"} <= set(runs)
    run, evaluation = runs["flowbp_sparse"], runs["flowbp_sparse/evaluation"]
    assert run.data.tags["dagster.partition"] == "flowbp_sparse" and run.data.tags["dagster.run_id"]
    # what each run read: training the prompt embeddings, its evaluation the base model's rollouts
    assert run.data.tags["embeddings.sha256"] != "none" and len(run.data.tags["mlflow.source.git.commit"]) >= 7
    assert "rollouts.sha256" not in run.data.tags and evaluation.data.tags["rollouts.sha256"] != "none"
    assert run.data.params["train.lr"] == str(params.train.lr) and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "reward")) == params.train.steps
    assert any(k.startswith("system/") for k in run.data.metrics)  # MLflow's system metrics of the training
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weights", "images"} <= arts
    # the samples at each checkpoint (the EMA weights): MLflow's image history, one strip per checkpoint step
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = {int(p.split("+step+")[1].split("+")[0]) for p in images if p.startswith("images/samples+step+")}
    assert steps == set(range(1, params.train.steps + 1)), images  # checkpoint_every: 1
    # the evaluation: its own run, nested under the training run, opened and ended by the evaluation stage
    assert evaluation.data.tags["mlflow.parentRunId"] == run.info.run_id and evaluation.info.status == "FINISHED"
    assert "eval/reward/align" in evaluation.data.metrics and "gate/reward_improved" in evaluation.data.metrics
    assert {"samples", "evaluation"} <= {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    versions = client.search_model_versions("name='flowbp-default'")
    assert {v.tags["method"] for v in versions} == set(params.methods)
    assert {v.run_id for v in versions} == {runs[m].info.run_id for m in params.methods}


def test_library_logging_reaches_the_dagster_event_log(chain):
    """The library logs with stdlib logging (``flowbp_ops.*``); the instance manages those loggers, so the
    prepare run's event log holds the stages' start, progress and end records."""
    import dagster as dg

    root, _, result = chain
    instance = dg.DagsterInstance.from_config(str(root / "dagster"))
    messages = [e.user_message for e in instance.all_logs(result["prepare"]["run_id"])]
    assert any("base_model: started" in m for m in messages), messages[-20:]
    assert any(m.startswith("base_model: flow ") and "/3 (loss" in m for m in messages)
    assert any("reward_models: done in" in m for m in messages)


def test_gpu_stages_run_through_pipes_and_report_back(chain):
    """Training and evaluation ran as their own processes (Dagster Pipes): their per-step log lines, their
    materialization metadata and their asset checks are in the Dagster run."""
    import dagster as dg

    root, params, result = chain
    instance = dg.DagsterInstance.from_config(str(root / "dagster"))
    run_id = result["variants"]["flowbp_sparse"]["run_id"]
    messages = [e.user_message for e in instance.all_logs(run_id)]
    assert any("trained_variant[flowbp_sparse] step 2/2 reward=" in m for m in messages), messages[-20:]
    # the library's own log records, from inside the launched process
    assert any("evaluation[flowbp_sparse]: done in" in m for m in messages), messages[-20:]
    assert any("Launched" in m or "pipes" in m.lower() for m in messages)
    mat = instance.get_latest_materialization_event(dg.AssetKey("trained_variant"))
    assert mat is not None and "weights_sha256" in mat.asset_materialization.metadata
    # users look at the sample grid where MLflow keeps it: the event log links to it, it holds no image bytes
    ev = instance.get_latest_materialization_event(dg.AssetKey("evaluation")).asset_materialization.metadata
    assert isinstance(ev["samples"], dg.UrlMetadataValue) and "/artifacts/samples/samples.png" in ev["samples"].url
    cmp = instance.get_latest_materialization_event(dg.AssetKey("method_comparison")).asset_materialization.metadata
    assert isinstance(cmp["curves"], dg.UrlMetadataValue) and isinstance(cmp["table"], dg.MarkdownMetadataValue)
    assert not any("base64" in str(getattr(v, "value", v)) for m in (ev, cmp) for v in m.values())
    checks = result["variants"]["flowbp_sparse"]["checks"]
    assert set(checks) == {"finite_weights", "reward_improved", "heldout_not_collapsed", "heldout_judge_improved",
                           "diversity_not_collapsed"}
    # partitioned checks: every evaluation carries its method, so each method keeps its own status
    for method in params.methods:
        logs = instance.all_logs(result["variants"][method]["run_id"])
        evaluations = [e.dagster_event.event_specific_data for e in logs
                       if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert len(evaluations) == len(checks) and {ev.partition for ev in evaluations} == {method}


def test_kubernetes_pod_spec_validates(monkeypatch):
    """The cluster path, built and validated by dagster-k8s and the kubernetes client's models (no cluster)."""
    from dagster_k8s.pipes import build_pod_body

    from pipelines.launch import command, pod_spec
    from pipelines.resources import LauncherResource

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    launcher = LauncherResource(mode="kubernetes", image="registry.example/flowbp:1", namespace="ml",
                                env_secrets=["flowbp-s3", "flowbp-mlflow"], node_selector={"gpu": "h100"})
    spec, env = pod_spec(launcher, 8, {"FLOWBP_STORE": "s3://bucket/team", "AWS_SECRET_ACCESS_KEY": "leak"})
    cmd = command("trained_variant", "flowbp_lagrange", 8, python="python")
    pod = build_pod_body("flowbp-train", launcher.image, cmd, env, None, spec)
    container = pod.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "8" and container.image == launcher.image
    assert [e.secret_ref.name for e in container.env_from] == ["flowbp-s3", "flowbp-mlflow"]
    literal = {e.name: e.value for e in container.env}
    assert literal["FLOWBP_STORE"] == "s3://bucket/team" and literal["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert "s3cret-value" not in str(pod.to_dict()) and "leak" not in str(pod.to_dict())
    assert container.command[-6:] == ["--params", "dagster-pipes", "--method", "flowbp_lagrange", "--nproc", "8"]
    assert pod.spec.node_selector == {"gpu": "h100"} and pod.spec.restart_policy == "Never"
    with pytest.raises(ValueError, match="launcher.image"):
        pod_spec(LauncherResource(mode="kubernetes"), 1, {})


def test_promotion_gates_aliases_and_rollback(chain):
    import mlflow
    from flowbp_ops.tracking import PromotionError, Tracker

    root, params, _ = chain
    tracker = Tracker(params.tracking)
    name = params.promote.model_name
    v1, v2 = sorted(str(v.version) for v in tracker.client.search_model_versions(f"name='{name}'"))[:2]
    ok = {"reward_improved": {"passed": True}}
    assert tracker.promote(name, v1, ok)["champion"] == v1
    with pytest.raises(PromotionError, match="reward_improved"):
        tracker.promote(name, v2, {"reward_improved": {"passed": False, "gain": -0.1}})
    assert tracker.alias_version(name, "champion") == v1 and tracker.alias_version(name, "candidate") == v2
    assert tracker.promote(name, v2, ok) == {"champion": v2, "previous": v1, "changed": True}
    assert tracker.rollback(name)["champion"] == v1
    assert tracker.alias_version(name, "champion") == v1
    # the registered model loads by alias and draws images with the trained weights
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = model.predict(["a photo of a red seven"], params={"steps": 2})
    assert images.shape == (1, 32, 32, 3) and images.dtype.name == "uint8"


def test_registered_model_serves_outside_the_repo(chain, tmp_path):
    """`mlflow models serve` of the registered champion, from a folder that is not this checkout, on 127.0.0.1:
    the model carries its base weights, trained weights and code, and answers a request with an image."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from flowbp_ops.tracking import Tracker

    root, params, _ = chain
    tracker = Tracker(params.tracking)
    name = params.promote.model_name
    version = sorted(str(v.version) for v in tracker.client.search_model_versions(f"name='{name}'"))[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking.tracking_uri, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               f"models:/{name}/{version}", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                               str(port), "--workers", "1"], cwd=elsewhere, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        body = json.dumps({"inputs": ["a photo of a red seven"], "params": {"steps": 2}}).encode()
        deadline, answer = time.time() + 180, None
        while time.time() < deadline and answer is None and server.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    answer = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stdout.read()[-3000:] if server.poll() is not None else "no answer"
        import numpy as np

        image = np.asarray(answer["predictions"])
        assert image.shape == (1, 32, 32, 3) and image.min() >= 0 and image.max() <= 255
    finally:  # the server's workers are its children: stop the whole process group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=30)
                break
            except ProcessLookupError:  # the group is gone already
                break
            except subprocess.TimeoutExpired:
                continue


def test_stage_cli_refuses_bad_input(tmp_path, capsys):
    from flowbp_ops.cli import main

    assert main(["stage", "trained_variant", "--params", str(ROOT / "params.yaml")]) == 2
    assert "needs --method" in capsys.readouterr().err
    assert main(["stage", "prompt_sets", "--method", "refl", "--params", str(ROOT / "params.yaml")]) == 2
    assert main(["stage", "evaluation", "--method", "refl", "--set", f"data_dir={tmp_path}"]) == 2
    assert "train the variant first" in capsys.readouterr().err


def test_compute_refuses_a_missing_gpu_and_defers_to_params():
    import torch

    from pipelines.resources import ComputeResource

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ComputeResource(device="cuda").resolve(Params())
        assert ComputeResource(device="cuda").resolve(Params(), local=False)[0] == "cuda"  # a pod has them
    with pytest.raises(ValueError, match="fp32 or bf16"):
        ComputeResource(precision="fp16").resolve(Params())
    # unset, the resource takes params.yaml's device and precision (Dagster runs a params file as DVC does)
    p = Params.model_validate({"train": {"precision": "bf16"}})
    assert (ComputeResource().resolve(p) == ("cpu", "bf16")
            and ComputeResource(precision="fp32").resolve(p)[1] == "fp32")


def test_unreachable_mlflow_server_fails_fast_without_leaking_credentials(tmp_path, capsys):
    import socket
    import time

    from flowbp_ops.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    code = main(["promote", "--rollback", "--params", str(ROOT / "params.yaml"),
                 "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "unreachable" in err and time.perf_counter() - t0 < 30
    # credentials in the URI are refused before anything connects, and never echoed
    code = main(["promote", "--rollback", "--params", str(ROOT / "params.yaml"),
                 "--set", f"tracking.tracking_uri=http://alice:s3cret@127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "MLFLOW_TRACKING_PASSWORD" in err and "s3cret" not in err


def test_reward_weights_fetched_from_s3_with_checksums(tmp_path, s3_bucket):
    from flowbp_ops import stages
    from flowbp_ops.storage import sha256_of

    s3, bucket = s3_bucket
    src = tmp_path / "pickscore"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    for f in src.iterdir():
        s3.upload_file(str(f), bucket, f"rewards/pickscore/{f.name}")
    params = Params.model_validate({"world_dir": str(tmp_path / "world"), "rewards": {
        "source": "", "models": {"pickscore": f"s3://{bucket}/rewards/pickscore/"},
        "checksums": {"pickscore": sha256_of(src)}}})
    meta = stages.reward_models(params)
    assert meta["pickscore.sha256"] == sha256_of(src)
    assert (tmp_path / "world" / "rewards" / "pickscore" / "model.safetensors").read_bytes() == b"weights"
    bad = params.model_copy(update={"rewards": params.rewards.model_copy(
        update={"checksums": {"pickscore": "0" * 64}})})
    with pytest.raises(Exception, match="checksum mismatch"):
        stages.reward_models(bad)


def test_gpu_slots_give_each_concurrent_op_its_own_gpu(tmp_path):
    import threading

    from flowbp_ops.gpu_slots import gpu_slot

    held, release, got = [], threading.Event(), threading.Barrier(3)

    def op():
        with gpu_slot(2, tmp_path) as i:
            held.append(i)
            got.wait()
            release.wait()

    threads = [threading.Thread(target=op) for _ in range(2)]
    for t in threads:
        t.start()
    got.wait()
    assert sorted(held) == [0, 1]  # two ops, two different GPUs
    with pytest.raises(TimeoutError, match="all 2 GPUs"):  # a third waits while both are taken
        with gpu_slot(2, tmp_path, poll_s=0.05, timeout_s=0.3):
            pass
    release.set()
    for t in threads:
        t.join()
    with gpu_slot(2, tmp_path) as i:  # freed when the ops end
        assert i == 0
    with pytest.raises(RuntimeError, match="no GPU"):
        with gpu_slot(0, tmp_path):
            pass
    # `flowbp stage` with device: cuda:auto takes a GPU the same way (none here: a clear error)
    import torch

    from flowbp_ops.cli_pipeline import _placed

    with _placed(Params(device="cpu")) as p:
        assert p.device == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            with _placed(Params(device="cuda:auto")):
                pass


def test_a_training_run_resumes_from_its_checkpoints_and_restarts_on_a_new_config(chain):
    """Checkpoints live in data/runs/<method> (a persistent DVC out), outside the atomically written
    variant: a rerun with the same config and base model resumes; another config starts over."""
    from flowbp_ops import stages

    root, params, _ = chain
    first = json.loads((root / "data" / "variants" / "refl" / "summary.json").read_text())
    assert first["resumed_from"] is None
    again = stages.trained_variant(params, "refl")  # the run had finished: it resumes at its last step
    assert again["resumed_from"] == params.train.steps and again["weights_sha256"] == first["weights_sha256"]
    rows = (root / "data" / "variants" / "refl" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == params.train.steps  # the curve is whole, not just the resumed part
    changed = params.model_copy(update={"train": params.train.model_copy(update={"lr": params.train.lr * 2})})
    assert stages.trained_variant(changed, "refl")["resumed_from"] is None


def test_a_full_fine_tune_is_checked_for_finite_weights(chain, tmp_path):
    """``finite_weights`` (the training stage's blocking check, reported by Dagster from the op or the Pipes
    process) reads every safetensors file of a fully fine-tuned transformer, and fails on one non-finite tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from flowbp_ops.stages.graph import BY_NAME
    from flowbp_ops.stages.runner import run_stage

    root, params, _ = chain
    for sub in ("world", "embeddings"):
        shutil.copytree(root / "data" / sub, tmp_path / "data" / sub)
    full = params.model_copy(update={"world_dir": str(tmp_path / "data" / "world"), "data_dir": str(tmp_path / "data"),
                                     "train": params.train.model_copy(update={"finetune": "full", "steps": 1})})
    meta, checks = run_stage("trained_variant", full, "refl")
    weights = tmp_path / "data" / "variants" / "refl" / "weights"
    (check,) = checks
    assert check["name"] == "finite_weights" and check["passed"], check
    assert check["metadata"]["files"] >= 1 and (weights / "transformer" / "config.json").exists()
    shard = sorted((weights / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, shard)
    (again,) = BY_NAME["trained_variant"].check(full, "refl", meta)
    assert not again["passed"] and again["metadata"]["non_finite"] == [f"transformer/{shard.name}:{name}"]
