"""Dagster as its users expect it: the project found from pyproject.toml by `dg` and plain `dagster`, definitions
that load without torch, the library's log records in Dagster's event log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DAGSTER_HOME": "", "DO_NOT_TRACK": "1"}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "DAGSTER_HOME"}
    return subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_definitions_load_without_torch():
    probe = ("import sys, pipelines.definitions as d; "
             "print(len(list(d.defs.resolve_all_asset_keys())), 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = _run(sys.executable, "-c", probe)
    assert out.returncode == 0, out.stderr[-2000:]
    n, torch_loaded, diffusers_loaded = out.stdout.split()[-3:]
    assert int(n) >= 8 and torch_loaded == "False" and diffusers_loaded == "False"


def test_dg_and_dagster_find_the_project_from_pyproject():
    bin_dir = Path(sys.executable).parent
    dg = _run(str(bin_dir / "dg"), "check", "defs")
    assert dg.returncode == 0 and "All definitions loaded successfully" in dg.stdout + dg.stderr, dg.stderr[-2000:]
    plain = _run(str(bin_dir / "dagster"), "definitions", "validate")  # no -m: [tool.dagster] names the module
    assert plain.returncode == 0 and "passed validation" in plain.stdout + plain.stderr, plain.stderr[-2000:]


def test_the_library_never_imports_the_orchestration_layer():
    """flowbp_ops is the library; pipelines/ (Dagster) builds on it. `flowbp pipeline run` reaches the orchestration
    layer through its entry point, not an import."""
    import ast

    found = []
    for path in (ROOT / "flowbp_ops").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("pipelines", "dagster")]
    assert found == []
    out = _run(sys.executable, "-m", "flowbp_ops.cli", "pipeline", "run", "--help")
    assert out.returncode == 0 and "materialize the default chain" in out.stdout, out.stderr[-2000:]


def test_the_instance_settings_are_written_in_one_place(tmp_path):
    """scripts/install.sh and a chain without $DAGSTER_HOME write the same dagster.yaml: the library's loggers
    managed, the gpu pool limited."""
    import yaml

    from pipelines.instance import write_instance

    conf = yaml.safe_load(write_instance(tmp_path / "dagster.yaml", 3).read_text())
    assert conf["python_logs"]["managed_python_loggers"] == ["flowbp_ops"]
    assert conf["concurrency"]["pools"]["default_limit"] == 3 and conf["telemetry"]["enabled"] is False
    assert "pipelines.instance" in (ROOT / "scripts" / "install.sh").read_text()


def test_a_broken_pipeline_plugin_is_said_and_leaves_the_other_commands(monkeypatch, capsys):
    import importlib.metadata

    from flowbp_ops.cli import main

    broken = importlib.metadata.EntryPoint("run", "pipelines.no_such_module:add_run_command",
                                           "flowbp.pipeline_commands")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [broken])
    assert main(["methods", "--json"]) == 0  # everything else works
    capsys.readouterr()
    assert main(["pipeline", "run"]) == 2
    err = capsys.readouterr().err
    assert "does not load" in err and "bash scripts/install.sh" in err and len(err.strip().splitlines()) == 1
