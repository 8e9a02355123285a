"""Gradients of one surrogate step of a small FLUX.1 / FLUX.2 transformer, whole or FSDP2-sharded (run by
tests/test_distributed.py alone and under torchrun; the batch is split over the ranks).

    python tests/fsdp_grad_worker.py flux1|flux2 OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def main() -> None:
    import diffusers
    from gpu_fullsize import SMOKE
    from safetensors.torch import save_file

    from flowbp_ops.backbones.schedules import get_schedule
    from flowbp_ops.methods import get_method
    from flowbp_ops.surrogate.compose import surrogate_step
    from flowbp_ops.surrogate.plan import build_plan
    from flowbp_ops.surrogate.rollout import CFGCond, Denoiser
    from flowbp_ops.training import distributed
    from flowbp_ops.training.distributed import fsdp_shard

    arch, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist, _ = distributed.setup("cpu")
    torch.manual_seed(0)
    config, g, batch = SMOKE[arch], torch.Generator().manual_seed(1), 4
    if arch == "flux1":
        from flowbp_ops.backbones.flux1 import FluxVelocity

        model = diffusers.FluxTransformer2DModel(**config)
        ids = torch.zeros(16, 3)
        ids[:, 1], ids[:, 2] = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
        x0 = torch.randn(batch, 16, 64, generator=g)
        cond = {"tokens": torch.randn(batch, 8, config["joint_attention_dim"], generator=g),
                "pooled": torch.randn(batch, config["pooled_projection_dim"], generator=g),
                "txt_ids": torch.zeros(batch, 8, 3)}
        make = lambda: Denoiser(FluxVelocity(model, ids, 4.0), cfg_scale=None)  # noqa: E731
    else:
        from flowbp_ops.backbones.flux2 import Flux2Velocity

        model = diffusers.Flux2Transformer2DModel(**config)
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
        txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
        x0 = torch.randn(batch, 16, config["in_channels"], generator=g)
        one = lambda: {"tokens": torch.randn(batch, 8, config["joint_attention_dim"], generator=g),  # noqa: E731
                       "txt_ids": txt[None].expand(batch, -1, -1)}
        cond = CFGCond(one(), one())
        make = lambda: Denoiser(Flux2Velocity(model, ids[None]), cfg_scale=4.0)  # noqa: E731
    if dist.active:
        fsdp_shard(model, "fp32")
    part = slice(dist.rank * batch // dist.world, (dist.rank + 1) * batch // dist.world)
    pick = lambda c: {k: v[part] for k, v in c.items()}  # noqa: E731
    cond = CFGCond(pick(cond.pos), pick(cond.neg)) if isinstance(cond, CFGCond) else pick(cond)
    plan = build_plan(get_method("flowbp_lagrange", arch, 6), get_schedule(arch).sigmas(6, 64), 0)
    surrogate_step(make(), plan, x0[part], cond).y.pow(2).mean().backward()
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {n: whole(p.grad).contiguous() for n, p in model.named_parameters() if p.grad is not None}
    if dist.main:
        save_file(grads, out)
    distributed.teardown()


if __name__ == "__main__":
    main()
