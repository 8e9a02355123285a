"""Starting a GPU stage's process through Dagster Pipes: the command, a local subprocess, or a Kubernetes pod.

The process is ``python -m flowbp_ops.cli stage NAME [--method M] --params dagster-pipes`` (under torchrun with
``--nproc G`` when a training run has several GPUs): its settings arrive as Pipes extras, its log lines,
materialization and asset checks go back through Pipes.
"""

from __future__ import annotations

import os
import sys

import dagster as dg

from flowbp_ops.cli_pipeline import PIPES_PARAMS


def command(stage: str, method: str | None, processes: int, python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "flowbp_ops.cli", "stage", stage, "--params", PIPES_PARAMS]
    if method:
        cmd += ["--method", method]
    if processes > 1:
        cmd += ["--nproc", str(processes)]
    return cmd


def run_subprocess(context, cmd: list[str], extras: dict, env: dict[str, str]) -> list:
    client = dg.PipesSubprocessClient()
    return client.run(command=cmd, context=context, extras=extras, env=env).get_results()


def pod_spec(launcher, processes: int, env: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """The base pod spec and the literal environment of a GPU stage's pod: GPUs as resource limits, credentials
    only as references to Kubernetes secrets (``envFrom``), the store and endpoint settings by value."""
    if not launcher.image:
        raise ValueError("launcher.mode=kubernetes needs launcher.image (an image with flowbp installed)")
    literal = {k: os.environ[k] for k in launcher.env_vars if os.environ.get(k)}
    literal.update({k: v for k, v in env.items()
                    if not k.startswith(("AWS_SECRET", "AWS_ACCESS", "MLFLOW_TRACKING_P"))})
    literal.pop("CUDA_VISIBLE_DEVICES", None)  # the pod sees exactly the GPUs it was given
    container = {
        "resources": {"limits": {"nvidia.com/gpu": str(processes)}, "requests": {"nvidia.com/gpu": str(processes)}},
        "env_from": [{"secret_ref": {"name": s}} for s in launcher.env_secrets],
    }
    spec: dict = {"containers": [container], "restart_policy": "Never"}
    if launcher.service_account:
        spec["service_account_name"] = launcher.service_account
    if launcher.node_selector:
        spec["node_selector"] = dict(launcher.node_selector)
    return spec, literal


def run_kubernetes(launcher, context, cmd: list[str], extras: dict, env: dict[str, str], processes: int) -> list:
    from dagster_k8s import PipesK8sClient

    spec, literal = pod_spec(launcher, processes, env)
    cmd = ["python", *cmd[1:]]  # the image's interpreter
    return PipesK8sClient().run(context=context, image=launcher.image, command=cmd, namespace=launcher.namespace,
                                env=literal, base_pod_spec=spec, extras=extras).get_results()
