"""Train the default world's judges on rendered scenes (what they are for: :mod:`flowbp_ops.rewards.world`).

The training reward must be hard to hack: a generator trained against it follows its gradient, so wherever
the reward can be raised without drawing the right scene, training will find it. Five things close those
doors, each measured in ``bench/world_rewards.py``:

* **augmentation** — shifts across cell borders, brightness, sensor noise and blur: nuisances a generator can
  vary must not move the score;
* **adversarial training** (a signed-gradient step in pixel space, ε = ``adv_eps``): a robust classifier's input
  gradient points at the digit and colour, not at imperceptible patterns (perceptually aligned gradients);
* **realistic negatives**: a quarter of the objects drawn malformed the ways the base model's own samples fail
  (one digit shading into two colours, two digits in one place, a part missing, a smear, a colour off the
  palette, a faint ghost) and labelled "malformed", so a cell scores only for a clean one-colour digit;
* **an ensemble** of members from different seeds, combined by a geometric mean: raising the reward means
  convincing all of them;
* **calibration**: each member's temperature fit on fresh renders, so a probability means what it says.

The held-out twin is trained plainly (augmentation only), with another architecture, seed and half of the
handwriting; the GenEval-style detector on digits at free positions and sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_ops.world import nets, scenes


@dataclass(frozen=True)
class Recipe:
    """How a scene parser is trained: augmented, adversarial examples (ε, L∞; 0: none), and the share of objects
    drawn malformed (0: none; the parser then has no malformed class)."""

    augment: bool = True
    adv_eps: float = 0.0
    malformed: float = 0.0


ROBUST = Recipe(augment=True, adv_eps=0.05, malformed=0.25)  # the training reward's members (ε: world.adv_eps)
# name -> (net, which half of the digit bitmaps, seed offset, recipe)
PARSERS = {
    "align_0": (lambda: nets.CellParser(32, malformed=True), 0, 0, ROBUST),
    "align_1": (lambda: nets.CellParser(32, malformed=True), 0, 1, ROBUST),
    "align_2": (lambda: nets.CellParser(32, malformed=True), 0, 2, ROBUST),
    "align_heldout": (lambda: nets.GlobalParser(24, 4), 1, 101, Recipe()),
}
CRITICS = {"quality": (lambda: nets.Critic(32, 3), 0, 7), "quality_heldout": (lambda: nets.Critic(24, 2), 1, 211)}
DETECTOR = ("detector", lambda: nets.Detector(32), 1, 307)


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Shift (±2 px, zero fill), brightness (×0.75–1.2), sensor noise (σ ≤ 0.08) and, for a quarter, blur."""
    b = len(x)
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, b), generator=g)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(b)])
    x = x * (0.75 + 0.45 * torch.rand(b, 1, 1, 1, generator=g))
    x = x + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    blur = torch.rand(b, generator=g) < 0.25
    if blur.any():
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    return x.clamp(0, 1)


def parser_loss(net, x: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every cell's content (empty or digit) and, where a digit is drawn, its colour."""
    content, color = net(x)
    y_content, y_color = labels[..., 0] + 1, labels[..., 1]
    loss = F.cross_entropy(content.reshape(-1, content.shape[-1]), y_content.reshape(-1))
    drawn = y_color >= 0
    return loss + F.cross_entropy(color[drawn], y_color[drawn])


def adversarial(net, x: Tensor, labels: Tensor, eps: float, g: torch.Generator) -> Tensor:
    """Images within ε (L∞) of ``x`` that raise the parser's loss: one signed-gradient step from a random start
    (the "fast" adversarial training of Wong et al., 2020, at a third of PGD's cost)."""
    delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(parser_loss(net, (x + delta).clamp(0, 1), labels), delta)
    delta = (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def render_pool(half: int, n: int, seed: int, malformed: float = 0.0) -> tuple[Tensor, Tensor]:
    """``n`` renders of every scene at any placement, tags equally often (judges see every combination: they are
    not the generator); with ``malformed`` > 0, that share of the objects is drawn malformed (:func:`malform`) and
    labelled :data:`~flowbp_ops.world.nets.MALFORMED` (no colour)."""
    pool = scenes.balanced(scenes.all_scenes(), per_tag=max(1, n // len(scenes.TAGS)), seed=seed)
    renderer = scenes.Renderer(half)
    if not malformed:
        images, _, labels = renderer.dataset(pool, n, seed, canonical=False)
        return images, labels
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in rng.integers(0, len(pool), size=n):
        lay = scenes.layout(pool[int(i)], rng, canonical=False)
        digit, color = scenes.cell_labels(lay)
        places = [renderer.place(cell, rng) for cell in lay.cells]
        patches = []
        for cell, d, c, (_, _, size) in zip(lay.cells, lay.digits, lay.colors, places):
            if rng.random() < malformed:
                patches.append(malform(renderer, d, c, size, rng))
                digit[cell], color[cell] = nets.MALFORMED - 1, -1  # content class = digit + 1
            else:
                patches.append(scenes.paint(renderer.glyph(d, rng), size, c))
        images.append(scenes.draw(patches, [(top, left) for top, left, _ in places]))
        labels.append(list(zip(digit, color)))
    return torch.stack(images), torch.tensor(labels)


def malform(renderer: scenes.Renderer, digit: int, color: str, size: int, rng: np.random.Generator) -> Tensor:
    """An object that is no clean one-colour digit, in one of the ways the base model fails (seen in its samples):
    a digit shading from one colour into another, two digits on top of each other, a digit with a part missing, a
    smear, a colour off the palette, a faint ghost."""
    glyph = renderer.glyph(digit, rng)
    kind = int(rng.integers(6))
    if kind == 4:  # a colour off the palette: a random hue at least 0.35 (RGB distance) from all four
        palette = torch.tensor(list(scenes.COLORS.values()))
        while True:
            rgb = torch.from_numpy(rng.random(3)).float()
            rgb = rgb / rgb.max()
            if torch.cdist(rgb[None], palette).min() > 0.35:
                break
        return scenes.paint(glyph, size, rgb)
    if kind == 5:  # a faint ghost
        return scenes.paint(glyph, size, color) * (0.2 + 0.3 * float(rng.random()))
    if kind == 0:  # two colours blended across the glyph
        other = [k for k in scenes.COLORS if k != color][int(rng.integers(3))]
        ramp = torch.linspace(0, 1, size)
        ramp = ramp[:, None].expand(size, size) if rng.random() < 0.5 else ramp[None, :].expand(size, size)
        return scenes.paint(glyph, size, color) * (1 - ramp) + scenes.paint(glyph, size, other) * ramp
    if kind == 1:  # two different digits in one place
        second = renderer.glyph(int((digit + rng.integers(1, 10)) % 10), rng)
        return torch.maximum(scenes.paint(glyph, size, color), scenes.paint(second, size, color))
    patch = scenes.paint(glyph, size, color)
    if kind == 2:  # a part missing: the top, bottom, left or right 40-60 % erased
        cut = int(size * (0.4 + 0.2 * rng.random()))
        side = int(rng.integers(4))
        region = [(slice(None, cut), slice(None)), (slice(size - cut, None), slice(None)),
                  (slice(None), slice(None, cut)), (slice(None), slice(size - cut, None))][side]
        patch[:, region[0], region[1]] = 0
        return patch
    return F.avg_pool2d(F.avg_pool2d(patch[None], 3, 1, 1), 3, 1, 1)[0] * 1.6  # a smear


def train_parser(net, half: int, seed: int, recipe: Recipe, steps: int, batch: int, progress=None,
                 name: str = "parser") -> dict:
    """Train a scene parser; returns its calibration temperature and accuracies on unseen handwriting."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = render_pool(half, min(12_000, steps * batch), 1_000 * seed + half, recipe.malformed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=g)
        x, y = (augment(images[pick], g) if recipe.augment else images[pick]), labels[pick]
        if recipe.adv_eps:  # half of each batch adversarial
            k = batch // 2
            x = torch.cat([x[:k], adversarial(net, x[k:], y[k:], recipe.adv_eps, g)])
        loss = parser_loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(f"reward:{name}", step + 1, steps, loss.item())
    net.eval()
    val_x, val_y = render_pool(1 - half, 1024, 999_983 + seed, recipe.malformed)  # handwriting it never saw
    temperature = calibrate(net, val_x, val_y)
    return {"temperature": temperature, **parser_accuracy(net, val_x, val_y)}


@torch.no_grad()
def calibrate(net, x: Tensor, labels: Tensor) -> float:
    """The temperature minimising the negative log-likelihood of every cell's content and colour."""
    content, color = net(x)
    y_content, y_color = labels[..., 0] + 1, labels[..., 1]
    drawn = y_color >= 0

    def nll(t: float) -> float:
        return float(F.cross_entropy(content.reshape(-1, content.shape[-1]) / t, y_content.reshape(-1))
                     + F.cross_entropy(color[drawn] / t, y_color[drawn]))

    grid = np.exp(np.linspace(math.log(0.25), math.log(8.0), 61))
    return float(min(grid, key=nll))


@torch.no_grad()
def parser_accuracy(net, x: Tensor, labels: Tensor) -> dict[str, float]:
    content, color = net(x)
    y_content, y_color = labels[..., 0] + 1, labels[..., 1]
    cells = content.argmax(-1) == y_content
    colors = (color.argmax(-1) == y_color) | (y_color < 0)
    return {"cell_accuracy": float(cells.float().mean()),
            "scene_accuracy": float((cells & colors).all(1).float().mean())}


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
        else:  # two scenes on top of each other
            x = x + images[int(torch.randint(0, len(images), (1,), generator=g))].roll(5, dims=2)
        out[i] = x.clamp(0, 1)
    return out


def train_critic(net, half: int, seed: int, steps: int, batch: int, progress=None, name: str = "critic") -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, _ = render_pool(half, min(8192, steps * batch), 1_000 * seed + half)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    net.train()
    target = torch.cat([torch.ones(batch), torch.zeros(batch)])
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        loss = F.binary_cross_entropy_with_logits(net(torch.cat([x, degrade(x, g)])), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(f"reward:{name}", step + 1, steps, loss.item())
    net.eval()
    val, _ = render_pool(1 - half, 512, 999_983 + seed)
    with torch.no_grad():
        logits = net(torch.cat([val, degrade(val, torch.Generator().manual_seed(seed))]))
    right = (logits > 0) == torch.cat([torch.ones(512), torch.zeros(512)]).bool()
    return {"accuracy": float(right.float().mean())}


def free_scenes(renderer: scenes.Renderer, n: int, seed: int) -> tuple[Tensor, list]:
    """``n`` canvases of 1–4 digits at free positions and sizes (10–16 px, boxes apart), half of them laid out on
    the grid like the world's scenes; per image its objects ``(cx, cy, size, digit, colour)``."""
    rng = np.random.default_rng(seed)
    colors, every = list(scenes.COLORS), scenes.all_scenes()
    images, boxes = [], []
    for i in range(n):
        if i % 2:
            s = every[int(rng.integers(len(every)))]
            lay = scenes.layout(s, rng, canonical=False)
            places = [renderer.place(cell, rng) for cell in lay.cells]
            digits, cols = list(lay.digits), list(lay.colors)
        else:
            k, places = int(rng.integers(1, 5)), []
            for _ in range(60):
                if len(places) == k:
                    break
                size = int(rng.integers(10, 17))
                top, left = int(rng.integers(0, 33 - size)), int(rng.integers(0, 33 - size))
                if all(top + size <= t or t + s <= top or left + size <= lf or lf + s <= left for t, lf, s in places):
                    places.append((top, left, size))
            digits = [int(rng.integers(10)) for _ in places]
            cols = [colors[int(rng.integers(len(colors)))] for _ in places]
        patches = [scenes.paint(renderer.glyph(d, rng), s, c) for d, (_, _, s), c in zip(digits, places, cols)]
        images.append(scenes.draw(patches, [(top, left) for top, left, _ in places]))
        boxes.append([(left + s / 2, top + s / 2, s, d, colors.index(c))
                      for (top, left, s), d, c in zip(places, digits, cols)])
    return torch.stack(images), boxes


def train_detector(net, half: int, seed: int, steps: int, batch: int, progress=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    renderer = scenes.Renderer(half)
    images, boxes = free_scenes(renderer, min(12_000, steps * batch), 1_000 * seed + half)
    targets = nets.detector_targets(boxes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=g)
        x = images[pick]
        x = x * (0.8 + 0.4 * torch.rand(batch, 1, 1, 1, generator=g))
        x = (x + 0.05 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)
        loss = nets.detector_loss(net(x), {k: v[pick] for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress("reward:detector", step + 1, steps, loss.item())
    net.eval()
    return {}


def train_reward_nets(out_dir: str | Path, cfg, progress=None) -> dict[str, dict]:
    """Train and save every judge of the world (``cfg``: a :class:`~flowbp_ops.world.config.WorldConfig`); returns
    each one's measurements on unseen handwriting."""
    # each net's seed: 1000 × the world seed + its own offset, so two world seeds share no ensemble member
    out_dir, seed = Path(out_dir), 1000 * cfg.seed
    report: dict[str, dict] = {}
    for name, (make, half, offset, recipe) in PARSERS.items():
        if recipe.adv_eps:
            recipe = Recipe(recipe.augment, cfg.adv_eps, recipe.malformed)
        torch.manual_seed(seed + offset)
        net = make()
        report[name] = train_parser(net, half, seed + offset, recipe, cfg.reward_steps, cfg.reward_batch, progress,
                                    name)
        nets.save_net(net, out_dir / name, {"temperature": report[name]["temperature"], "recipe": vars(recipe)})
    for name, (make, half, offset) in CRITICS.items():
        torch.manual_seed(seed + offset)
        net = make()
        report[name] = train_critic(net, half, seed + offset, cfg.critic_steps, cfg.reward_batch, progress, name)
        nets.save_net(net, out_dir / name)
    name, make, half, offset = DETECTOR
    torch.manual_seed(seed + offset)
    net = make()
    report[name] = train_detector(net, half, seed + offset, cfg.detector_steps, cfg.detector_batch, progress)
    nets.save_net(net, out_dir / name)
    return report
