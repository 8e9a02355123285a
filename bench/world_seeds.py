"""The main job on 3 world seeds: how much the default world's table moves when everything built from a seed moves.

    .venv/bin/python bench/world_seeds.py [--seeds 0 1 2] [--work /tmp/world-seeds]

Each seed runs ``flowbp pipeline run`` (the main job, through Dagster, exactly as ``scripts/run-default.sh``)
with ``world.seed=S`` in its own data folder, MLflow store and Dagster instance: the prompt split, the renders,
the base model, the reward models and the judge are all rebuilt from that seed. A world seed changes every
float of the world, which is what another machine's CPU kernels do too: the spread over seeds is the
tolerance to expect between machines. Writes ``bench/results/world_seeds/``: each seed's comparison table,
promotion record and wall time, and a summary with mean ± spread per variant and per column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_seed(seed: int, work: Path, extra: list[str]) -> dict:
    folder = work / f"seed{seed}"
    if (folder / "done.json").exists():
        return json.loads((folder / "done.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "dagster").mkdir(parents=True)
    (folder / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\nconcurrency:\n  pools:\n"
                                                     f"    default_limit: {os.cpu_count()}\n")  # as install.sh
    sets = [f"world.seed={seed}", f"data_dir={folder}/data", f"world_dir={folder}/data/world",
            f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db", f"tracking.artifact_location={folder}/artifacts",
            *extra]
    env = {**os.environ, "DAGSTER_HOME": str(folder / "dagster"), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    cmd = [str(ROOT / ".venv" / "bin" / "flowbp"), "pipeline", "run", "--params", str(ROOT / "params.yaml")]
    for s in sets:
        cmd += ["--set", s]
    with open(folder / "log.txt", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"seed {seed}: the main job failed (exit {code}); see {folder / 'log.txt'}")
    comparison = json.loads((folder / "data" / "comparison" / "comparison.json").read_text())
    out = {"seed": seed, "seconds": time.perf_counter() - t0,
           "promoted": json.loads((folder / "data" / "promoted.json").read_text()),
           "base": next(iter(comparison["variants"].values()))["base"],
           "variants": {m: {"variant": v["variant"], "delta": v["delta"], "gates": v["gates"]}
                        for m, v in comparison["variants"].items()},
           "table": comparison["table"]}
    (folder / "done.json").write_text(json.dumps(out, indent=1))
    return out


def _ms(values: list[float]) -> str:
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def summarize(results: list[dict], out: Path) -> str:
    cols = ["geneval/overall", "reward/align", "reward/align_heldout", "reward/quality", "reward/quality_heldout"]
    lines = [f"| variant ({len(results)} world seeds) | " + " | ".join(c.split("/")[-1] for c in cols)
             + " | gates passed |", "|" + "---|" * (len(cols) + 2)]
    lines.append("| base model | " + " | ".join(_ms([r["base"][c] for r in results]) for c in cols) + " | |")
    for m in results[0]["variants"]:
        cells = [f"{_ms([r['variants'][m]['variant'][c] for r in results])} "
                 f"(Δ {_ms([r['variants'][m]['delta'][c] for r in results])})" for c in cols]
        passed = sum(all(g["passed"] for g in r["variants"][m]["gates"].values()) for r in results)
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {passed}/{len(results)} |")
    champions = []
    for r in results:
        best = r["promoted"].get("promoted")
        gates = r["variants"][best]["gates"] if best else {}
        champions.append({"seed": r["seed"], "champion": best, "minutes": r["seconds"] / 60,
                          "judge_gain": r["variants"][best]["delta"]["geneval/overall"] if best else None,
                          "heldout_change_sd": gates["heldout_not_collapsed"]["change_sd"] if best else None})
    lines += ["", "| world seed | champion | judge gain (points) | worst held-out reward change (SD of the base) | "
              "main job |", "|---|---|---|---|---|"]
    for c in champions:
        if c["champion"] is None:
            lines.append(f"| {c['seed']} | none passed the gates | | | {c['minutes']:.1f} min |")
            continue
        lines.append(f"| {c['seed']} | `{c['champion']}` | {100 * c['judge_gain']:+.1f} | "
                     f"{min(c['heldout_change_sd'].values()):+.2f} | {c['minutes']:.1f} min |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps({"champions": champions, "runs": results}, indent=1))
    for r in results:
        (out / f"seed{r['seed']}.md").write_text(r["table"])
    return table


def figures(results: list[dict], work: Path, out: Path) -> None:
    """Each seed's comparison plot and its champion's sample grid (base vs tuned, same noise) beside the table."""
    for r in results:
        data = work / f"seed{r['seed']}" / "data"
        best = r["promoted"].get("promoted") or r["promoted"].get("ranking", [None])[0]
        for src, name in ((data / "comparison" / "comparison.png", "comparison"),
                          (data / "eval" / str(best) / "samples.png", "samples")):
            if src.exists():
                shutil.copy(src, out / f"seed{r['seed']}_{name}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", default="/tmp/flowbp-world-seeds", help="where each seed's data, MLflow and Dagster go")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_seeds"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every main job")
    args = p.parse_args()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, Path(args.work), args.set))
        done = results[-1]
        print(f"seed {seed}: {done['seconds'] / 60:.1f} min, champion {done['promoted'].get('promoted')}", flush=True)
    print(summarize(results, Path(args.out)))
    figures(results, Path(args.work), Path(args.out))


if __name__ == "__main__":
    main()
