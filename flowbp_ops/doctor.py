"""``flowbp doctor``: one preflight before a long run — each check one PASS / FAIL / SKIP line with the fix.

What a run on real models needs and most often finds missing: a CUDA device with bf16, access to the gated
base models on the hub, S3 credentials and a reachable endpoint (the store, S3 sources), a healthy MLflow
server, the Dagster ``gpu`` pool sized to the GPUs, DVC, and disk for the hub cache. Every network check
has a timeout; nothing is written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

HUB_CACHE_GB = 100  # SD3.5-M, FLUX.1-dev or Klein-9B with their text encoders, and the reward models


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:4s} {self.name}: {self.detail}" + (f" — fix: {self.fix}" if self.fix else "")


def cuda() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("cuda", "SKIP", "no CUDA device (the default world trains on CPUs; real models need GPUs)")
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    if not torch.cuda.is_bf16_supported():
        return Check("cuda", "FAIL", f"{', '.join(names)} without bf16",
                     "use an Ampere or newer GPU, or precision fp32")
    return Check("cuda", "PASS", f"{torch.cuda.device_count()} × {', '.join(names)}, bf16")


def gated_repos(params) -> list[str]:
    """The gated hub repos this run needs: its base model's when that is a gated backbone's; with the default world,
    every gated backbone's (what the recipes in ``flowbp preset`` load)."""
    from flowbp_ops.backbones.table import BACKBONES

    gated = [s.hub_id for s in BACKBONES.values() if s.gated and s.hub_id]
    source = params.base_model.source
    if source == "default":
        return gated
    return [r for r in gated if source.startswith(f"hf://{r}")]


def hub(params) -> Check:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return Check("hub", "SKIP", "HF_HUB_OFFLINE=1: base models and rewards must already be in the hub cache")
    repos = gated_repos(params)
    if not repos:
        return Check("hub", "SKIP", f"base_model.source={params.base_model.source!r} is not a gated hub model")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:
        for repo in repos:
            HfApi().model_info(repo, timeout=10, files_metadata=False)
            HfApi().auth_check(repo)
    except GatedRepoError:
        return Check("hub", "FAIL", f"no access to the gated {repo}", "accept its license on the hub, then "
                     "`huggingface-cli login` (or set HF_TOKEN)")
    except (HfHubHTTPError, OSError) as exc:
        return Check("hub", "FAIL", f"the hub did not answer ({type(exc).__name__})", "check the network or proxy")
    return Check("hub", "PASS", f"access to {', '.join(repos)}")


def s3(params) -> Check:
    from flowbp_ops.store import ENV

    uris = [u for u in (os.environ.get(ENV), params.prompts.source, params.rewards.source,
                        params.base_model.source, *params.rewards.models.values()) if u and u.startswith("s3://")]
    if not uris:
        return Check("s3", "SKIP", f"no S3 store ({ENV}) or S3 source in the settings")
    import boto3

    if boto3.session.Session().get_credentials() is None:
        return Check("s3", "FAIL", "no AWS credentials",
                     "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile)")
    from flowbp_ops.storage import s3_client, s3_errors, split_s3

    try:
        for bucket in dict.fromkeys(split_s3(u)[0] for u in uris):
            with s3_errors(f"s3://{bucket}"):
                s3_client().head_bucket(Bucket=bucket)
    except ValueError as exc:
        return Check("s3", "FAIL", str(exc), "check AWS_ENDPOINT_URL_S3, the bucket names and the credentials")
    return Check("s3", "PASS", f"{len(uris)} S3 location(s) reachable")


def mlflow(params) -> Check:
    from flowbp_ops.tracking import Tracker

    try:
        Tracker(params.tracking).experiment_id()
    except Exception as exc:  # noqa: BLE001 - a doctor reports whatever stops the tracker
        from flowbp_ops.errors import describe

        return Check("mlflow", "FAIL", describe(exc)[0], "start the server or fix tracking.tracking_uri")
    return Check("mlflow", "PASS", f"{params.tracking.tracking_uri} ready, experiment {params.tracking.experiment!r}")


def gpu_pool() -> Check:
    import torch
    import yaml

    home = Path(os.environ.get("DAGSTER_HOME", ".dagster"))
    conf = home / "dagster.yaml"
    limit = ((yaml.safe_load(conf.read_text()) or {}).get("concurrency", {}).get("pools", {})
             .get("default_limit")) if conf.exists() else None
    gpus = torch.cuda.device_count()
    if limit is None:
        return Check("gpu pool", "SKIP", f"no pool limit in {conf} (install.sh writes one)")
    if gpus and limit > gpus:  # two ops on one GPU: out of memory (fewer than the GPUs can be deliberate)
        return Check("gpu pool", "FAIL", f"the gpu pool allows {limit} ops but {gpus} GPUs are visible",
                     f"set concurrency.pools.default_limit: {gpus} in {conf}")
    if not gpus:
        return Check("gpu pool", "PASS", f"{limit} gpu-pool stage(s) at a time on {os.cpu_count()} CPU cores, no GPU")
    return Check("gpu pool", "PASS", f"{limit} GPU op(s) at a time, {gpus} GPU(s)")


def dvc() -> Check:
    root = Path(__file__).resolve().parents[1]
    found = (root / ".dvc-tool" / "bin" / "dvc").exists() or shutil.which("dvc")
    if not found:
        return Check("dvc", "FAIL", "DVC is not installed", "bash scripts/install.sh (it installs DVC into .dvc-tool)")
    return Check("dvc", "PASS", "scripts/dvc runs DVC from its own environment")


def disk() -> Check:
    # where huggingface_hub puts downloads: HF_HUB_CACHE, else HF_HOME/hub
    cache = Path(os.environ.get("HF_HUB_CACHE")
                 or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    probe = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / 2**30
    if free < HUB_CACHE_GB:
        return Check("disk", "FAIL", f"{free:.0f} GB free for the hub cache at {cache}",
                     f"free {HUB_CACHE_GB} GB or point HF_HUB_CACHE at a larger disk (the default world needs ~1 GB)")
    return Check("disk", "PASS", f"{free:.0f} GB free for the hub cache at {cache}")


def run(params) -> list[Check]:
    return [cuda(), hub(params), s3(params), mlflow(params), gpu_pool(), dvc(), disk()]
