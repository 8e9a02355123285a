"""Train the default world's reward models on rendered data (see :mod:`flowbp_ops.rewards.world`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_ops.rewards.world import HEADS, ConvNet, save_net
from flowbp_ops.world import digits

# name -> (architecture, which half of the digit bitmaps, seed offset)
REWARD_NETS = {
    "align": (dict(width=32, depth=3), 0, 0),
    "align_heldout": (dict(width=16, depth=4), 1, 101),
    "quality": (dict(width=32, depth=3, heads={"real": 1}), 0, 7),
    "quality_heldout": (dict(width=24, depth=2, heads={"real": 1}), 1, 211),
}


def degrade(images: Tensor, g: torch.Generator) -> Tensor:
    """Corrupt each clean render in one of six ways (the quality critics' negatives)."""
    out = images.clone()
    kinds = torch.randint(0, 6, (len(images),), generator=g)
    for i, k in enumerate(kinds.tolist()):
        x = out[i]
        if k == 0:  # sensor noise
            x = x + (0.1 + 0.3 * torch.rand(1, generator=g)) * torch.randn(x.shape, generator=g)
        elif k == 1:  # blur
            x = F.interpolate(F.avg_pool2d(x[None], 4), scale_factor=4, mode="bilinear")[0]
        elif k == 2:  # washed out
            x = 0.4 * x + 0.3
        elif k == 3:  # clipped, oversaturated
            x = x * 3.0
        elif k == 4:  # stray blob
            r, c = torch.randint(0, 24, (2,), generator=g).tolist()
            x[:, r:r + 8, c:c + 8] += torch.rand(3, 1, 1, generator=g)
        else:  # two digits on top of each other
            x = x + images[int(torch.randint(0, len(images), (1,), generator=g))].roll(6, dims=2)
        out[i] = x.clamp(0, 1)
    return out


def train_reward_nets(out_dir: str | Path, steps: int, batch: int, seed: int, progress=None) -> dict[str, float]:
    """Train and save the four reward nets; returns each one's held-out accuracy on fresh renders."""
    bitmaps, labels = digits.load_digit_bitmaps()
    specs = digits.all_specs()  # judges see every combination: they are not the generator
    accuracy = {}
    for name, (arch, half, offset) in REWARD_NETS.items():
        g = torch.Generator().manual_seed(seed + offset)
        torch.manual_seed(seed + offset)
        keep = np.arange(len(bitmaps)) % 2 == half
        net = ConvNet(**arch)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        # render one pool up front (rendering per step would cost more than the training)
        pool, pool_specs, _ = digits.sample_dataset(specs, min(8192, steps * batch), seed * 100_003 + offset,
                                                    bitmaps[keep], labels[keep])
        for step in range(steps):
            pick = torch.randint(0, len(pool), (batch,), generator=g)
            imgs, chosen = pool[pick], [pool_specs[i] for i in pick.tolist()]
            if "real" in net.heads:
                fake = degrade(imgs, g)
                logits = net(torch.cat([imgs, fake]))["real"][:, 0]
                target = torch.cat([torch.ones(batch), torch.zeros(batch)])
                loss = F.binary_cross_entropy_with_logits(logits, target)
            else:
                out = net(imgs)
                y = torch.tensor([s.labels() for s in chosen])
                loss = sum(F.cross_entropy(out[k], y[:, j]) for j, k in enumerate(HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                progress(f"reward:{name}", step + 1, steps, loss.item())
        net.eval()
        accuracy[name] = _accuracy(net, specs, bitmaps[~keep], labels[~keep], seed + offset)
        save_net(net, Path(out_dir) / name)
    return accuracy


@torch.no_grad()
def _accuracy(net: ConvNet, specs, bitmaps, labels, seed: int) -> float:
    """All-attributes-right rate (classifiers) or real-vs-degraded accuracy (critics) on unseen digits."""
    imgs, chosen, _ = digits.sample_dataset(specs, 512, 999_983 + seed, bitmaps, labels)
    if "real" in net.heads:
        fake = degrade(imgs, torch.Generator().manual_seed(seed))
        logits = net(torch.cat([imgs, fake]))["real"][:, 0]
        return float(((logits > 0) == torch.cat([torch.ones(512), torch.zeros(512)]).bool()).float().mean())
    out = net(imgs)
    y = torch.tensor([s.labels() for s in chosen])
    right = torch.stack([out[k].argmax(-1) == y[:, j] for j, k in enumerate(HEADS)]).all(0)
    return float(right.float().mean())
