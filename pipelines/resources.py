"""Dagster resources: MLflow tracking, the shared store, compute (device, precision, GPUs per run) and the
launcher of the GPU stages (a local subprocess or a Kubernetes pod, both through Dagster Pipes)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import dagster as dg

from flowbp_ops.params import TrackingParams


class MlflowResource(dg.ConfigurableResource):
    """Where runs and models go. Unset fields come from ``params.yaml``'s ``tracking`` section (the
    embedded store by default); set them to point a deployment at a server, e.g. ``http://mlflow:5000``."""

    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str | None = None
    ui_url: str = "http://127.0.0.1:5000"

    def settings(self, defaults: TrackingParams) -> TrackingParams:
        set_fields = {k: v for k, v in {"tracking_uri": self.tracking_uri, "artifact_location": self.artifact_location,
                                        "experiment": self.experiment}.items() if v is not None}
        return defaults.model_copy(update=set_fields)

    def tracker(self, defaults: TrackingParams):
        from flowbp_ops.tracking import Tracker

        return Tracker(self.settings(defaults))

    def run_url(self, defaults: TrackingParams, run_id: str | None, artifact: str | None = None) -> str | None:
        """The run's page in the MLflow UI (``artifact``: that artifact, opened in its artifact view)."""
        if not run_id:
            return None
        url = f"{self.ui_url}/#/experiments/{self.tracker(defaults).experiment_id()}/runs/{run_id}"
        return url + (f"/artifacts/{artifact}" if artifact else "")


class DvcResource(dg.ConfigurableResource):
    """After each materialization, record it in the DVC checkout's ``dvc.lock`` (``dvc commit``) when the stage ran
    with that checkout's ``params.yaml`` and its outputs are here, so the next ``dvc repro`` does nothing."""

    repo: str = "."
    commit: bool = True

    def record(self, stage, method: str | None, params, local: bool) -> dict:
        if not self.commit:
            return {"skipped": "dvc.commit is off"}
        if not local:
            return {"skipped": "the outputs went to the shared store or a pod, not this checkout"}
        from flowbp_ops.dvc_lock import commit

        return commit(stage, method, params, self.repo)


class StorageResource(dg.ConfigurableResource):
    """The shared store (``s3://bucket/prefix``): each stage pulls its inputs from it and pushes its outputs, so any
    stage runs on any machine (``flowbp_ops/store.py``). Unset: ``$FLOWBP_STORE``, else local files only. The S3
    endpoint and credentials come from the environment (AWS_*), never from here."""

    remote: str | None = None

    def uri(self) -> str | None:
        return self.remote or os.environ.get("FLOWBP_STORE")

    def store(self):
        from flowbp_ops.store import Store

        return Store(self.uri()) if self.uri() else None

    def env(self) -> dict[str, str]:
        return {"FLOWBP_STORE": self.uri()} if self.uri() else {}


class ComputeResource(dg.ConfigurableResource):
    """Device and precision for the GPU stages; unset, they come from ``params.yaml`` (``device``,
    ``train.precision``), so Dagster and DVC run a params file the same way. ``device: cuda:auto`` on a
    multi-GPU node gives each GPU op its own GPUs (``processes`` of them for a training run) through
    ``CUDA_VISIBLE_DEVICES`` of the process it launches; set the ``gpu`` pool limit to match."""

    device: str | None = None
    precision: str | None = None
    processes: int = 1  # GPUs (processes) per training run: >1 trains one run with torchrun
    lock_dir: str = "/tmp/flowbp-gpu-locks"  # flowbp_ops.gpu_slots.LOCK_DIR, shared with `flowbp stage`

    def resolve(self, params, local: bool = True) -> tuple[str, str]:
        """The device and precision; ``local``: the process runs on this machine, whose GPUs are checked."""
        import torch

        device, precision = self.device or params.device, self.precision or params.train.precision
        if local and device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={device} but no CUDA device is visible: run on a GPU "
                               f"executor or set the device (params.yaml or the compute resource) to cpu")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: choose fp32 or bf16")
        return device, precision

    @contextmanager
    def visible_gpus(self, device: str) -> Iterator[tuple[dict[str, str], str]]:
        """The environment and device of the launched process: with ``cuda:auto``, free GPUs of this node held for
        the op and shown to the process as its only ones (it then uses ``cuda``)."""
        if device != "cuda:auto":
            yield {}, device
            return
        import torch

        from flowbp_ops.gpu_slots import gpu_slots

        with gpu_slots(torch.cuda.device_count(), self.processes, self.lock_dir) as ids:
            yield {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}, "cuda"


class LauncherResource(dg.ConfigurableResource):
    """How a GPU stage's process starts: ``subprocess`` (this machine, the default) or ``kubernetes`` (a pod from
    ``image`` with ``nvidia.com/gpu`` = the run's processes; the store's and MLflow's credentials from the
    Kubernetes secrets named in ``env_secrets``, never literal values)."""

    mode: str = "subprocess"
    image: str | None = None
    namespace: str | None = None
    env_secrets: list[str] = []  # Kubernetes secrets whose keys become the pod's environment (AWS_*, MLFLOW_*)
    env_vars: list[str] = ["AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "FLOWBP_STORE"]  # copied by name, if set
    service_account: str | None = None
    node_selector: dict[str, str] = {}

    def run(self, context, stage: str, method: str | None, processes: int, extras: dict, env: dict[str, str]):
        from pipelines.launch import command, run_kubernetes, run_subprocess

        cmd = command(stage, method, processes)
        if self.mode == "subprocess":
            return run_subprocess(context, cmd, extras, env)
        if self.mode == "kubernetes":
            return run_kubernetes(self, context, cmd, extras, env, processes)
        raise ValueError(f"launcher.mode={self.mode!r}: choose subprocess or kubernetes")
