"""The default world's judging networks, small CNNs on 32×32 RGB, saved as safetensors + a JSON config.

* :class:`CellParser` reads the scene cell by cell: features pooled over each cell of the 2×2 grid, one shared
  head per cell giving logits over {empty, zero … nine} and over the four colours (the training reward's
  ensemble members, :mod:`flowbp_ops.rewards.world`).
* :class:`GlobalParser` answers the same question from the whole image at once (flattened features, one linear
  map to every cell's logits): another architecture for the held-out twin.
* :class:`Critic`: one logit, clean render vs degraded (the quality critics).
* :class:`Detector`: a CenterNet-style detector on a stride-4 grid (object-centre heatmap, digit and colour
  classes, box size and centre offset), trained on digits at free positions and sizes: it knows nothing of the
  grid and reads generated images the way GenEval's Mask2Former reads photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowbp_ops.world.scenes import COLORS, DIGITS

N_CLASSES = len(DIGITS) + 1  # cell content: empty (index 0) or a digit (index d + 1) ...
MALFORMED = N_CLASSES  # ... or, for parsers that know it, an object that is no clean one-colour digit (index 11)
N_COLORS = len(COLORS)


def _convs(widths: list[int], strides: list[int]) -> nn.Sequential:
    layers, c = [], 3
    for w, s in zip(widths, strides):
        layers += [nn.Conv2d(c, w, 3, stride=s, padding=1), nn.GroupNorm(4, w), nn.SiLU()]
        c = w
    return nn.Sequential(*layers)


class CellParser(nn.Module):
    """Per cell: content logits (B, 4, 11, or 12 with ``malformed``) and colour logits (B, 4, 4)."""

    kind = "cell_parser"

    def __init__(self, width: int = 32, malformed: bool = False):
        super().__init__()
        self.classes = N_CLASSES + int(malformed)
        self.features = _convs([width, 2 * width, 4 * width], [2, 2, 1])  # 32 → 8×8 maps
        self.head = nn.Sequential(nn.Linear(4 * width * 16, 128), nn.SiLU(), nn.Linear(128, self.classes + N_COLORS))
        self.config = {"kind": self.kind, "width": width, "malformed": malformed}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(images * 2 - 1)  # (B, C, 8, 8): each cell is a 4×4 block
        b, c = h.shape[:2]
        cells = h.view(b, c, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, c * 16)
        out = self.head(cells)
        return out[..., :self.classes], out[..., self.classes:]


class GlobalParser(nn.Module):
    """The same outputs from the whole image's features at once."""

    kind = "global_parser"

    def __init__(self, width: int = 24, depth: int = 4):
        super().__init__()
        widths = [width * 2 ** min(i, 2) for i in range(depth)]
        self.features = _convs(widths, [2, 2] + [1] * (depth - 2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * 64, 256), nn.SiLU(),
                                  nn.Linear(256, 4 * (N_CLASSES + N_COLORS)))
        self.config = {"kind": self.kind, "width": width, "depth": depth}
        self.classes = N_CLASSES

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(self.features(images * 2 - 1)).view(-1, 4, N_CLASSES + N_COLORS)
        return out[..., :N_CLASSES], out[..., N_CLASSES:]


class Critic(nn.Module):
    """One logit: a clean render (high) or a degraded image (low)."""

    kind = "critic"

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth)]
        self.features = _convs(widths, [2] * depth)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(widths[-1] * 4, 64), nn.SiLU(),
                                  nn.Linear(64, 1))
        self.config = {"kind": self.kind, "width": width, "depth": depth}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images * 2 - 1))[:, 0]


class Detector(nn.Module):
    """Per stride-4 location (8×8): centre heat logit, digit logits (10), colour logits (4), log-size, offset (2)."""

    kind = "detector"
    STRIDE = 4

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = _convs([width, 2 * width, 2 * width], [2, 2, 1])
        self.context = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.SiLU(),
                                     nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU())
        self.head = nn.Conv2d(2 * width, 1 + len(DIGITS) + N_COLORS + 3, 1)
        self.config = {"kind": self.kind, "width": width}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images * 2 - 1)
        out = self.head(h + self.context(h))
        n = len(DIGITS)
        return {"heat": out[:, 0], "digit": out[:, 1:1 + n], "color": out[:, 1 + n:1 + n + N_COLORS],
                "size": out[:, -3], "offset": out[:, -2:]}


KINDS = {k.kind: k for k in (CellParser, GlobalParser, Critic, Detector)}


def save_net(net: nn.Module, path: Path, extra: dict | None = None) -> None:
    """``path.safetensors`` (weights) and ``path.json`` (architecture, plus e.g. a calibration temperature)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({**net.config, **(extra or {})}, indent=1))


def load_net(path: Path) -> tuple[nn.Module, dict]:
    """The network saved at ``path`` (frozen, eval mode) and its JSON config."""
    from flowbp_ops.integrity import verify
    from flowbp_ops.rewards.base import freeze

    path = Path(path)
    cfg_file, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not weights.exists() or not cfg_file.exists():
        raise FileNotFoundError(f"no reward model at {weights}: build the default world first (flowbp world build)")
    verify(path.parent, f"reward model {path.name}", "rebuild the reward models (flowbp stage reward_models)",
           only=path.name + ".")
    cfg = json.loads(cfg_file.read_text())
    cls = KINDS[cfg["kind"]]
    arch = {k: v for k, v in cfg.items() if k in cls.__init__.__code__.co_varnames}
    net = cls(**arch)
    net.load_state_dict(load_file(str(weights)))
    return freeze(net), cfg


def detector_targets(boxes: list[list[tuple[float, float, float, int, int]]], grid: int = 8
                     ) -> dict[str, Tensor]:
    """Training targets from per-image objects ``(cx, cy, size, digit, colour)`` in pixels: a Gaussian heat per
    centre, and class / size / offset at each centre's location (``mask``)."""
    b = len(boxes)
    heat = torch.zeros(b, grid, grid)
    digit = torch.full((b, grid, grid), -1, dtype=torch.long)
    color = torch.full((b, grid, grid), -1, dtype=torch.long)
    size = torch.zeros(b, grid, grid)
    offset = torch.zeros(b, 2, grid, grid)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    s = Detector.STRIDE
    for i, objs in enumerate(boxes):
        for cx, cy, sz, d, c in objs:
            gx, gy = cx / s - 0.5, cy / s - 0.5
            ix, iy = min(grid - 1, max(0, round(gx))), min(grid - 1, max(0, round(gy)))
            heat[i] = torch.maximum(heat[i], torch.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * 0.6 ** 2)))
            heat[i, iy, ix] = 1.0
            digit[i, iy, ix], color[i, iy, ix], size[i, iy, ix] = d, c, float(torch.log(torch.tensor(sz)))
            offset[i, :, iy, ix] = torch.tensor([gx - ix, gy - iy])
    return {"heat": heat, "digit": digit, "color": color, "size": size, "offset": offset, "mask": digit >= 0}


def detector_loss(out: dict[str, Tensor], t: dict[str, Tensor]) -> Tensor:
    """CenterNet's focal loss on the heat map plus class, size and offset losses at the centres."""
    p = torch.sigmoid(out["heat"]).clamp(1e-4, 1 - 1e-4)
    pos = t["heat"] == 1
    focal = torch.where(pos, -((1 - p) ** 2) * torch.log(p), -((1 - t["heat"]) ** 4) * p ** 2 * torch.log(1 - p))
    loss = focal.sum() / pos.sum().clamp_min(1)
    m = t["mask"]
    if m.any():
        loss = loss + F.cross_entropy(out["digit"].permute(0, 2, 3, 1)[m], t["digit"][m])
        loss = loss + F.cross_entropy(out["color"].permute(0, 2, 3, 1)[m], t["color"][m])
        loss = loss + F.l1_loss(out["size"][m], t["size"][m])
        loss = loss + F.l1_loss(out["offset"].permute(0, 2, 3, 1)[m], t["offset"].permute(0, 2, 3, 1)[m])
    return loss
