"""The Dagster instance's settings, written in one place: the instance ``scripts/install.sh`` makes for the UI and
the main job (``.dagster/dagster.yaml``), and the temporary one of a chain run without ``$DAGSTER_HOME``.

What they hold: telemetry off; the library's stdlib log records in each run's event log (``flowbp_ops`` among the
managed Python loggers); and the ``gpu`` pool's limit, how many GPU stages run at once on this machine (one per
GPU, or per CPU core without one).

    python -m pipelines.instance .dagster/dagster.yaml --gpu-slots 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def instance_yaml(gpu_slots: int) -> str:
    settings = {"telemetry": {"enabled": False},
                "python_logs": {"managed_python_loggers": ["flowbp_ops"], "python_log_level": "INFO"},
                "concurrency": {"pools": {"default_limit": int(gpu_slots)}}}
    return ("# written by `python -m pipelines.instance` (scripts/install.sh); the gpu pool: GPU stages at once\n"
            + yaml.safe_dump(settings, sort_keys=False))


def write_instance(path: str | Path, gpu_slots: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(instance_yaml(gpu_slots))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the instance's dagster.yaml")
    p.add_argument("--gpu-slots", type=int, required=True, help="GPU stages at once (GPUs, or CPU cores)")
    args = p.parse_args(argv)
    if args.gpu_slots < 1:
        p.error(f"--gpu-slots {args.gpu_slots}: give at least 1")
    print(write_instance(args.path, args.gpu_slots))


if __name__ == "__main__":
    main()
