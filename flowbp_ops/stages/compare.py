"""The last stages: the method comparison over every evaluated variant, and the gated promotion."""

from __future__ import annotations

import json
from typing import Any

from flowbp_ops.atomic import atomic_path
from flowbp_ops.params import Params
from flowbp_ops.stages.paths import paths
from flowbp_ops.surrogate.config import ConfigError


def method_comparison(params: Params, tracker=None) -> dict:
    """The method table and plots over every evaluated variant."""
    from flowbp_ops.comparison import compare

    p = paths(params)
    found = [m for m in params.methods if (p.evaluation(m) / "metrics.json").exists()]
    if not found:
        raise FileNotFoundError(f"no evaluated variants under {p.data / 'eval'}: run the evaluation stage first")
    evals = {m: json.loads((p.evaluation(m) / "metrics.json").read_text()) for m in found}
    curves = {m: [json.loads(line) for line in (p.variant(m) / "metrics.jsonl").read_text().splitlines()]
              for m in found}
    result = compare(evals, curves, p.comparison)
    # the stage's metadata names the variants; their numbers are in comparison.json
    meta = {"variants": found, "columns": result["columns"], "table": result["table"]}
    if tracker is not None:
        run_id = tracker.start_run("method_comparison", {"kind": "comparison"})
        for f in ["table.md", "comparison.json", "comparison.png", "curves.png"]:
            tracker.log_artifact(run_id, p.comparison / f)
        tracker.end_run(run_id)
        meta["run_id"] = run_id
    return meta


def promoted_model(params: Params, tracker) -> dict:
    """Promote the best variant whose gates all pass to ``champion`` (else leave it unchanged)."""
    from flowbp_ops.tracking import PromotionError

    p = paths(params)
    if not (p.comparison / "comparison.json").exists():
        raise FileNotFoundError(f"no method comparison in {p.comparison}: run it first (flowbp stage "
                                "method_comparison, after evaluating the variants)")
    table = json.loads((p.comparison / "comparison.json").read_text())
    metric = params.promote_metric()
    missing = [m for m, v in table["variants"].items() if metric not in v["variant"]]
    if missing:
        raise ConfigError(f"promote.metric={metric!r} was not measured for {', '.join(missing)}: rerun their "
                          "evaluation with the settings that produce it, or pick another metric")
    ranked = sorted(table["variants"], key=lambda m: -table["variants"][m]["variant"][metric])
    passing = [m for m in ranked if all(g["passed"] for g in table["variants"][m]["gates"].values())]
    record: dict[str, Any] = {"metric": metric, "ranking": ranked, "passing": passing}
    if not passing:
        best = ranked[0]
        record.update(promoted=None, reason=f"no variant passed every gate; best by {metric} was {best}")
        version = table["variants"][best].get("model_version")
        if version:
            try:
                tracker.promote(params.promote.model_name, version, table["variants"][best]["gates"])
            except PromotionError as exc:
                record["refusal"] = str(exc)
    else:
        best = passing[0]
        v = table["variants"][best]
        result = tracker.promote(params.promote.model_name, v["model_version"], v["gates"],
                                 reason=f"best {metric} = {v['variant'][metric]:.4f} among passing variants")
        record.update(promoted=best, version=v["model_version"], **result)
    with atomic_path(p.promoted) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return record
