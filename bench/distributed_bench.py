"""One run on 1 vs 2 processes on this machine's CPUs (gloo): time per optimizer step and the share spent in
communication, for data-parallel LoRA and FSDP2 full fine-tuning, at the same global batch.

    .venv/bin/python bench/distributed_bench.py --world data/world --out bench/results/distributed_cpu.json

Each configuration is one `flowbp train` run (``--nproc 2`` for two processes) of ``--steps`` optimizer
steps; the first two steps (warm-up) are left out of the medians. ``time_sync`` is LoRA's explicit
all-reduce; FSDP2's reduce-scatter and all-gathers happen inside forward and backward, so for full
fine-tuning the communication shows only in the step time. Two processes on two cores each get one
core (OMP_NUM_THREADS=1), against one process with two threads: this measures the overhead of the
distributed path, not a speed-up a machine with one GPU per process would see.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(world: str, finetune: str, nproc: int, steps: int, method: str, global_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "flowbp_ops.cli", "train", "--method", method, "--world", world, "--out",
               str(out), "--nproc", str(nproc), "--set", f"steps={steps}", "--set", f"batch={global_batch // nproc}",
               "--set", f"global_batch={global_batch}", "--set", f"finetune={finetune}", "--set", "ema=null",
               "--set", "heldout_rewards=[]", "--set", f"checkpoint_every={steps}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    step = statistics.median(r["time_step"] for r in rows)
    sync = statistics.median(r["time_sync"] for r in rows)
    return {"finetune": finetune, "processes": nproc, "global_batch": global_batch, "steps_timed": len(rows),
            "s_per_step": step, "s_sync": sync, "sync_share": sync / step}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", default="data/world")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--method", default="flowbp_sparse")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--out", default="bench/results/distributed_cpu.json")
    a = p.parse_args()
    results = [run(a.world, ft, n, a.steps, a.method, a.global_batch) for ft in ("lora", "full") for n in (1, 2)]
    Path(a.out).write_text(json.dumps({"method": a.method, "cpus": os.cpu_count(), "results": results}, indent=2))
    print("| fine-tuning | processes | s/step (median) | all-reduce s | share |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['finetune']} | {r['processes']} | {r['s_per_step']:.3f} | {r['s_sync']:.4f} | "
              f"{100 * r['sync_share']:.1f}% |")


if __name__ == "__main__":
    main()
