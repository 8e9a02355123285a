"""MLflow: one run per trained variant, its weights as a registered model, promotion by alias.

The default store is embedded (``sqlite:///mlflow/mlflow.db``, artifacts under
``mlflow/artifacts``); a server (``http://host:5000``, with S3 artifacts through boto3) is a
change of ``tracking.tracking_uri`` / ``tracking.artifact_location`` in ``params.yaml``.

Promotion uses registry aliases, never stages: ``candidate`` marks the version under review,
``champion`` the one in use. ``promote`` moves ``champion`` only when every gate passes and
records the gates as version tags; the model keeps the previous champion in a tag so that
``rollback`` can restore it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

import mlflow
from flowbp_ops.params import TrackingParams
from mlflow import MlflowClient

CANDIDATE, CHAMPION = "candidate", "champion"
# MLflow 3's UI opens an experiment on its GenAI views unless the experiment says it is model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class PromotionError(ValueError):
    pass


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_hash(path: str, lock_file: str | Path = "dvc.lock") -> str:
    """The md5 DVC recorded for ``path`` in ``dvc.lock`` ('untracked' when DVC has not run it)."""
    import yaml

    lock = Path(lock_file)
    if not lock.exists():
        return "untracked"
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5", "untracked")
    return "untracked"


SERVER_TIMEOUT_S = 10


def _check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """Fail fast with a clear message instead of MLflow's minutes of retries against a dead server, and refuse a
    URL that answers but is not an MLflow server (its REST API is asked for one experiment)."""
    import urllib.error
    import urllib.request

    from flowbp_ops.errors import redact

    safe = redact(uri)
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(probe)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:  # MLflow's own basic-auth variables
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read(1 << 16)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConnectionError(f"MLflow tracking server {safe} refused the credentials (HTTP {exc.code}): set "
                                  "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
                                  ) from None
        raise ConnectionError(f"{safe} answered HTTP {exc.code} to MLflow's REST API: it is not an MLflow tracking "
                              "server; set tracking.tracking_uri to one (mlflow server ...)") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"MLflow tracking server {safe} is unreachable ({reason}); start it "
                              "(mlflow server ...) or set tracking.tracking_uri to the embedded store "
                              "sqlite:///mlflow/mlflow.db") from None
    try:
        json.loads(body)["experiments"] if body.strip() not in (b"", b"{}") else None
    except (ValueError, KeyError, TypeError):
        raise ConnectionError(f"{safe} answered, but not as an MLflow tracking server (no JSON from its REST API); "
                              "set tracking.tracking_uri to an MLflow server") from None


class Tracker:
    def __init__(self, cfg: TrackingParams = TrackingParams()):
        self.cfg = cfg
        uri, db = cfg.tracking_uri, None
        if uri.startswith("sqlite:///"):
            # absolute: MLflow keeps one store per URI string, and a relative one would follow the first cwd
            db = Path(uri[len("sqlite:///"):]).resolve()
            db.parent.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{db}"
        if uri.startswith(("http://", "https://")):
            _check_server(uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        if db is None:
            self.client = MlflowClient(uri, uri)
            return
        # variants trained side by side: the first to open a new store creates its tables alone (the client and
        # its first queries of both stores are where MLflow creates them)
        from flowbp_ops.locks import exclusive

        with exclusive(db.parent / f".{db.name}.lock", "creating the MLflow store", wait=True):
            self.client = MlflowClient(uri, uri)
            self.client.search_experiments(max_results=1)
            self.client.search_registered_models(max_results=1)

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
                for k, v in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        loc = self.cfg.artifact_location
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", loc):  # a local folder, not s3:// or mlflow-artifacts:/
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        try:
            return self.client.create_experiment(self.cfg.experiment, artifact_location=loc, tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it in between
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, name: str, tags: dict[str, str], params: dict | None = None, parent: str | None = None) -> str:
        """A run in the experiment, tagged with the git commit (MLflow's own tag); ``parent``: nested under it."""
        std = {"mlflow.source.git.commit": git_commit(), **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(self.experiment_id(), run_name=name,
                                     tags={**std, **{k: str(v) for k, v in tags.items()}})
        for k, v in flatten(params or {}).items():
            self.client.log_param(run.info.run_id, k, json.dumps(v) if isinstance(v, (list, dict)) else v)
        return run.info.run_id

    def system_metrics(self, run_id: str, interval: float = 10.0):
        """A context in which MLflow samples CPU, memory, disk and GPU use into ``run_id`` (``system/*``)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1)

        class _Monitor:
            def __enter__(self):
                monitor.start()

            def __exit__(self, *exc):
                monitor.finish()

        return _Monitor()

    def log_image(self, run_id: str, image, key: str, step: int) -> None:
        """An image (H, W, 3 uint8) under ``key`` at ``step``: MLflow's image history, browsable by step."""
        self.client.log_image(run_id, image, key=key, step=step)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def end_stale_runs(self, run_dir: str) -> list[str]:
        """Mark KILLED the runs still RUNNING for ``run_dir``: the caller holds that run's lock, so whatever
        started them has died (kill -9, a lost pod) without ending them."""
        runs = self.client.search_runs([self.experiment_id()], "attributes.status = 'RUNNING'", max_results=1000)
        stale = [r.info.run_id for r in runs if r.data.tags.get("flowbp.run_dir") == run_dir]
        for run_id in stale:
            self.client.set_terminated(run_id, "KILLED")
        return stale

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if rows:
            self.client.log_batch(run_id, metrics=rows)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        self.client.log_figure(run_id, figure, name)

    # -- the registry ------------------------------------------------------------------------

    def register_variant(self, run_id: str, model_name: str, base_dirs: dict[str, Path], weights_dir: Path,
                         tags: dict[str, str]) -> str:
        """Log base + trained weights (LoRA or transformer) as a pyfunc model in ``run_id`` and register it;
        returns the version."""
        import numpy as np
        from mlflow.models import infer_signature

        import flowbp_ops.registry_model_code as code

        signature = infer_signature(["a prompt"], np.zeros((1, 32, 32, 3), dtype=np.uint8),
                                    params={"steps": 20, "guidance": 4.0, "seed": 42})
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            base.mkdir()
            for name, src in base_dirs.items():  # model folders, or a real backbone's pin (backbone.json)
                shutil.copytree(src, base / name) if Path(src).is_dir() else shutil.copyfile(src, base / name)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=code.__file__,  # models from code: nothing pickled
                    artifacts={"base": str(base), "weights": str(weights_dir)},
                    signature=signature, pip_requirements=["flowbp"], metadata={"flowbp": tags})
        mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
        return str(mv.version)

    def register_adapter(self, run_id: str, model_name: str, base_model: str, adapter_dir: Path,
                         tags: dict[str, str], revision: str | None = None) -> str:
        """A real backbone's adapter through MLflow's diffusers flavour (base model by hub id and commit, or
        path; the adapter's weights as artifacts); returns the registered version.

        The flavour asks the hub for the base model's latest commit when it logs: offline it records none, and
        after a newer upload it records the wrong one. The model was trained on the pinned commit, so that is
        the revision recorded (``load_pipeline`` then loads exactly that base)."""
        from unittest import mock

        import mlflow.diffusers

        # the flavour's one resolution hook (mlflow 3.17): answered with the pin instead of a hub query
        pin = mock.patch.object(mlflow.diffusers, "_resolve_base_model_revision", lambda _base: revision)
        with mlflow.start_run(run_id=run_id), pin if revision else contextlib.nullcontext():
            info = mlflow.diffusers.log_model(str(adapter_dir), base_model=base_model, name="model",
                                              metadata={"flowbp": tags})
        mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
        return str(mv.version)

    def alias_version(self, model_name: str, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(model_name, alias).version)
        except MlflowException:
            return None

    def _model(self, model_name: str):
        try:
            return self.client.get_registered_model(model_name)
        except MlflowException:
            raise PromotionError(f"no registered model {model_name!r} in {self.cfg.tracking_uri}: train and "
                                 "evaluate a variant first (flowbp stage trained_variant / evaluation, or the "
                                 "pipeline)") from None

    def _history(self, model_name: str) -> list[str]:
        """The champions before the current one, oldest first (a registered-model tag)."""
        return json.loads(self._model(model_name).tags.get("champion_history", "[]"))

    def promote(self, model_name: str, version: str, gates: dict[str, dict], reason: str = "") -> dict:
        """Set ``candidate``; move ``champion`` to ``version`` only if every gate passed."""
        self._model(model_name)
        self.client.set_registered_model_alias(model_name, CANDIDATE, version)
        for gate, result in gates.items():
            self.client.set_model_version_tag(model_name, version, f"gate.{gate}", json.dumps(result))
        failed = [g for g, r in gates.items() if not r.get("passed")]
        if failed:
            self.client.set_model_version_tag(model_name, version, "promotion", f"refused: {', '.join(failed)}")
            raise PromotionError(f"version {version} of {model_name} failed the gate(s) {', '.join(failed)}: "
                                 f"{json.dumps({g: gates[g] for g in failed})}; champion unchanged "
                                 f"({self.alias_version(model_name, CHAMPION)})")
        previous = self.alias_version(model_name, CHAMPION)
        if previous == version:
            return {"champion": version, "previous": previous, "changed": False}
        self.client.set_registered_model_alias(model_name, CHAMPION, version)
        if previous:
            history = self._history(model_name) + [previous]
            self.client.set_registered_model_tag(model_name, "champion_history", json.dumps(history))
        self.client.set_model_version_tag(model_name, version, "promotion",
                                          f"champion (was {previous or 'none'}){': ' + reason if reason else ''}")
        return {"champion": version, "previous": previous, "changed": True}

    def rollback(self, model_name: str) -> dict:
        """Restore the champion before the current one. Each rollback goes one further back in the history (it never
        flips back to the version just rolled back), and the restored version's recorded gates must still pass."""
        history = self._history(model_name)
        current = self.alias_version(model_name, CHAMPION)
        if not history:
            raise PromotionError(f"{model_name} has no earlier champion to roll back to "
                                 f"(champion: {current or 'none'})")
        previous = history[-1]
        mv = self.client.get_model_version(model_name, previous)
        gates = {k.removeprefix("gate."): json.loads(v) for k, v in mv.tags.items() if k.startswith("gate.")}
        failed = [g for g, r in gates.items() if not r.get("passed")]
        if not gates or failed:
            raise PromotionError(
                f"version {previous} of {model_name} cannot be champion again: "
                f"{'gates ' + ', '.join(failed) + ' failed' if failed else 'no gate results recorded'}"
                f"; champion unchanged ({current})")
        self.client.set_registered_model_alias(model_name, CHAMPION, previous)
        self.client.set_registered_model_tag(model_name, "champion_history", json.dumps(history[:-1]))
        if current:
            self.client.set_model_version_tag(model_name, current, "promotion", f"rolled back to {previous}")
        return {"champion": previous, "previous": current, "history": history[:-1]}
