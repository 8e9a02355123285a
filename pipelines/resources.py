"""Dagster resources: MLflow tracking, storage (local directory or S3) and compute (device, precision)."""

from __future__ import annotations

from pathlib import Path


import dagster as dg

from flowbp_ops.params import TrackingParams


class MlflowResource(dg.ConfigurableResource):
    """Where runs and models go. Unset fields come from ``params.yaml``'s ``tracking`` section (the
    embedded store by default); set them to point a deployment at a server, e.g. ``http://mlflow:5000``."""

    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str | None = None
    ui_url: str = "http://127.0.0.1:5000"

    def tracker(self, defaults: TrackingParams):
        from flowbp_ops.tracking import Tracker

        set_fields = {k: v for k, v in {"tracking_uri": self.tracking_uri, "artifact_location": self.artifact_location,
                                        "experiment": self.experiment}.items() if v is not None}
        return Tracker(defaults.model_copy(update=set_fields))

    def run_url(self, tracker, run_id: str | None) -> str | None:
        if not run_id:
            return None
        return f"{self.ui_url}/#/experiments/{tracker.experiment_id()}/runs/{run_id}"


class StorageResource(dg.ConfigurableResource):
    """Stage outputs live under a local ``data`` directory; with ``remote`` (``s3://bucket/prefix``) each
    stage also publishes them there through boto3 (endpoint from ``AWS_ENDPOINT_URL_S3``)."""

    remote: str | None = None

    def publish(self, paths: list[str | Path]) -> list[str]:
        if not self.remote:
            return []
        from flowbp_ops.storage import s3_client, split_s3

        bucket, prefix = split_s3(self.remote.rstrip("/") + "/")
        s3, uris = s3_client(), []
        for path in map(Path, paths):
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for f in files:
                s3.upload_file(str(f), bucket, prefix + _key(f))
            uris.append(f"s3://{bucket}/{prefix}{_key(path)}")
        return uris


def _key(path: Path) -> str:
    """The object key of a local output: its path relative to the working directory (the repo)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix().lstrip("/")


class ComputeResource(dg.ConfigurableResource):
    """Device and precision for training and evaluation; unset, they come from ``params.yaml``
    (``device``, ``train.precision``), so Dagster and DVC run a params file the same way.
    ``device: cuda:auto`` on a multi-GPU node gives each GPU op a GPU of its own (set the ``gpu`` pool
    limit to the number of GPUs); a GPU executor pod with one GPU uses ``cuda``."""

    device: str | None = None
    precision: str | None = None
    lock_dir: str = "/tmp/flowbp-gpu-locks"  # flowbp_ops.gpu_slots.LOCK_DIR, shared with `flowbp stage`

    def resolve(self, params) -> tuple[str, str]:
        import torch

        device, precision = self.device or params.device, self.precision or params.train.precision
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={device} but no CUDA device is visible: run on a GPU "
                               f"executor or set the device (params.yaml or the compute resource) to cpu")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: choose fp32 or bf16")
        return device, precision

    def placed(self, device: str):
        """The device a GPU op runs on, held for the op (``cuda:auto``: a free GPU of this node)."""
        from flowbp_ops.gpu_slots import placed

        return placed(device, self.lock_dir)
