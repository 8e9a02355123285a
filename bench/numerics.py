"""The authors' numerics against float32 states on the default world (spec §6.10).

    .venv/bin/python bench/numerics.py --world data/world --steps 60 --out bench/results/numerics.json

Trains the same run twice — ``train.numerics=fp32_state`` and ``authors`` (bf16 latents, noise and timesteps
in the rollout, bf16 VAE decode, the reward under fp16 autocast) — from the same seed, then samples the 200
held-out prompts with each trained model (20 steps, CFG 4, float32 sampling) and scores them. Reported: the
training reward at the end (moving average of the last 10 steps), the held-out rewards, the median step time,
and the largest difference of the two runs' first-step losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def run(world: str, numerics: str, steps: int, method: str) -> dict:
    import torch

    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.sampling import generate
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import Trainer

    rows = []

    class Rows:
        def on_step(self, step, m):
            rows.append(m)

    cfg = TrainConfig(method=method, steps=steps, numerics=numerics, ema_eval_every=None, heldout_rewards=[])
    backbone = DefaultBackbone(world)
    trainer = Trainer(cfg, backbone, load_prompt_set(Path(world) / "prompts", "train"), {"world_dir": world})
    with tempfile.TemporaryDirectory() as tmp:
        trainer.fit(tmp, callbacks=[Rows()])
    prompts = load_prompt_set(Path(world) / "prompts", "test")[:200]
    with torch.no_grad():
        images = generate(backbone, prompts, 20, 4.0, seed=42)
        held = {n: float(get_reward(n, world_dir=world)(images, prompts).mean())
                for n in ("align", "align_heldout", "quality_heldout")}
    return {"numerics": numerics, "first_loss": rows[0]["loss"], "final_train_reward":
            statistics.fmean(r["reward"] for r in rows[-10:]), "heldout": held,
            "s_per_step": statistics.median(r["time_step"] for r in rows[2:])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", default="data/world")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="flowbp_sparse")
    p.add_argument("--out", default="bench/results/numerics.json")
    a = p.parse_args()
    results = [run(a.world, n, a.steps, a.method) for n in ("fp32_state", "authors")]
    Path(a.out).write_text(json.dumps({"method": a.method, "steps": a.steps, "results": results}, indent=2))
    print("| numerics | first loss | train reward (last 10) | align | align_heldout | quality_heldout | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        h = r["heldout"]
        print(f"| {r['numerics']} | {r['first_loss']:.4f} | {r['final_train_reward']:.3f} | {h['align']:.3f} | "
              f"{h['align_heldout']:.3f} | {h['quality_heldout']:.3f} | {r['s_per_step']:.3f} |")


if __name__ == "__main__":
    main()
