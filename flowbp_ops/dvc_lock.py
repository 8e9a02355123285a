"""What Dagster produced, recorded for DVC: ``dvc commit`` of the stage it materialized, so that the next
``dvc repro`` finds every output up to date and runs nothing.

DVC only knows what it ran itself (``dvc.lock``); a stage Dagster materialized looks to it as never run, and the
next ``dvc repro`` would rebuild the whole chain. Committing records the outputs, dependencies and parameters as
they are now; that is true only when the stage ran with the checkout's ``params.yaml`` and ``dvc.yaml`` is the
one generated for it, so otherwise nothing is committed and the reason is returned.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from flowbp_ops.locks import exclusive
from flowbp_ops.params import Params, load_params
from flowbp_ops.stages.graph import Stage, dvc_yaml

log = logging.getLogger(__name__)


def _value(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def commit(stage: Stage, method: str | None, params: Params, repo: str | Path = ".") -> dict:
    """``dvc commit`` the stage (``stage@method`` when per method) in the DVC checkout ``repo``, when the run's
    settings are the checkout's; ``{"committed": name}`` or ``{"skipped": why}``."""
    repo = Path(repo).resolve()
    dvc = repo / "scripts" / "dvc"
    if not ((repo / "dvc.yaml").exists() and (repo / ".dvc").is_dir() and dvc.exists()):
        return {"skipped": f"{repo} is not a DVC checkout of flowbp"}
    checkout = load_params(repo / "params.yaml")
    if (repo / "dvc.yaml").read_text() != dvc_yaml(checkout):
        return {"skipped": "dvc.yaml is not the one generated for params.yaml (flowbp pipeline dvc-yaml)"}
    ran, kept = params.model_dump(mode="json"), checkout.model_dump(mode="json")
    # where the outputs went (world_dir, data_dir) as well as what they were made with
    differ = [k for k in (*stage.params, "world_dir", "data_dir") if _value(ran, k) != _value(kept, k)]
    if differ:
        return {"skipped": f"ran with settings other than params.yaml's ({', '.join(differ)}): dvc repro reruns it"}
    name = f"{stage.name}@{method}" if stage.per_method else stage.name
    # variants materialized side by side commit one at a time (DVC refuses a second process on its repo lock)
    with exclusive(repo / ".dvc" / "tmp" / "flowbp-commit.lock", "dvc commit", wait=True):
        done = subprocess.run([str(dvc), "commit", "--force", name], cwd=repo, capture_output=True, text=True,
                              timeout=900)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["dvc commit failed"])[-1]
        log.warning("dvc commit %s failed: %s", name, reason)
        return {"skipped": f"dvc commit failed: {reason}"}
    log.info("dvc commit %s: recorded in dvc.lock", name)
    return {"committed": name}
