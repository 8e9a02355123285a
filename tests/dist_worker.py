"""A training run on the smoke world, run by tests/test_distributed.py alone or under torchrun.

    python tests/dist_worker.py WORLD RUN_DIR OUT.safetensors '{"method": ..., "steps": 1, ...}' [--resume]
        [--stop-after K]

Rank 0 writes OUT: every trained parameter (``weight.<name>``) and its gradient after the last step
(``grad.<name>``), gathered whole from FSDP2 shards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from safetensors.torch import save_file

    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.prompts import load_prompt_set
    from flowbp_ops.training import distributed
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import train

    p = argparse.ArgumentParser()
    p.add_argument("world")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist, device = distributed.setup("cpu")
    cfg = TrainConfig(**json.loads(a.config))
    backbone = DefaultBackbone(a.world, device=device)
    prompts = load_prompt_set(Path(a.world) / "prompts", "train")
    train(cfg, backbone, prompts, a.run_dir, resume=a.resume, stop_after=a.stop_after,
          reward_kwargs={"world_dir": a.world}, dist=dist)
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731  (a collective)
    out = {}
    for name, param in backbone.transformer.named_parameters():
        if param.requires_grad:
            out[f"weight.{name}"] = whole(param.detach()).contiguous()
            if param.grad is not None:
                out[f"grad.{name}"] = whole(param.grad).contiguous()
    if dist.main:
        save_file(out, a.out)
    distributed.teardown()


if __name__ == "__main__":
    main()
