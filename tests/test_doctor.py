"""``flowbp doctor``: each preflight check one line, a fix with every FAIL, exit code 2 when anything fails."""

from __future__ import annotations

import yaml


def _params(tmp_path, **extra) -> str:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db",
                                              "artifact_location": str(tmp_path / "art")}, **extra}))
    return str(p)


def test_doctor_reports_every_check_with_its_fix(tmp_path, monkeypatch, capsys):
    from flowbp_ops.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("FLOWBP_STORE", raising=False)
    code = main(["doctor", "--params", _params(tmp_path)])
    lines = {line.split()[1].rstrip(":"): line for line in capsys.readouterr().out.strip().splitlines()}
    assert set(lines) == {"cuda", "hub", "s3", "mlflow", "gpu", "dvc", "disk"}
    assert lines["hub"].startswith("SKIP") and lines["s3"].startswith("SKIP") and lines["mlflow"].startswith("PASS")
    assert lines["dvc"].startswith("PASS") and lines["gpu"].startswith("PASS")
    fails = [line for line in lines.values() if line.startswith("FAIL")]
    assert all("— fix:" in line for line in fails) and code == (2 if fails else 0)


def test_doctor_checks_s3_and_mlflow_for_real(tmp_path, s3_bucket, monkeypatch, capsys):
    from flowbp_ops.cli import main

    _, bucket = s3_bucket
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWBP_STORE", f"s3://{bucket}/store")
    assert main(["doctor", "--params", _params(tmp_path)]) in (0, 2)
    assert "PASS s3: 1 S3 location(s) reachable" in capsys.readouterr().out
    monkeypatch.setenv("FLOWBP_STORE", "s3://no-such-bucket-anywhere/x")
    assert main(["doctor", "--params", _params(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "FAIL s3:" in out and "no such bucket" in out and "fix: check AWS_ENDPOINT_URL_S3" in out
    # an MLflow server that is down: one FAIL line, not a traceback
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("FLOWBP_STORE")
    assert main(["doctor", "--params", _params(tmp_path), "--set",
                 f"tracking.tracking_uri=http://127.0.0.1:{port}"]) == 2
    assert "FAIL mlflow:" in capsys.readouterr().out


def test_doctor_asks_the_hub_for_the_gated_repos_the_run_needs():
    from flowbp_ops.doctor import gated_repos
    from flowbp_ops.params import params_from
    from flowbp_ops.presets import get_preset

    assert gated_repos(get_preset("sd35/flowbp_lagrange")) == ["stabilityai/stable-diffusion-3.5-medium"]
    assert gated_repos(get_preset("flux2/flowbp_lagrange")) == ["black-forest-labs/FLUX.2-klein-base-9B"]
    local = params_from({"base_model": {"source": "/models/sd35"}, "train": {"backbone": "sd35"}})
    assert gated_repos(local) == []  # a local folder needs no hub access
    # the default world: the gated models the recipes would load, so a user learns it before switching
    every_gated = {"stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev",
                   "black-forest-labs/FLUX.2-klein-base-9B"}
    assert set(gated_repos(params_from({}))) == every_gated
