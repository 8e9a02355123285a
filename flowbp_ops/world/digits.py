"""The default world's data: scikit-learn's digits as a compositional text-to-image task.

Each image is one 8×8 handwritten digit from ``sklearn.datasets.load_digits`` (real data that
ships inside the package), drawn in a colour, at a size and at a position on a 32×32 black
canvas. Its prompt names all four attributes in templated natural language with paraphrases.
Some (digit, colour, position) combinations never appear in training prompts: the held-out
split asks for exactly those, so evaluation measures composition, not memorisation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIZES = {"small": 14, "large": 24}  # side of the digit in pixels
POSITIONS = ("left", "right")
TEMPLATES = (
    "a {size} {color} {word} on the {position}",
    "the digit {digit} in {color}, {size}, on the {position}",
    "{color} number {word}, drawn {size}, {position} side",
    "a {size} handwritten {digit} coloured {color}, placed {position}",
    "on the {position}: a {color} {word}, {size}",
)
ATTRIBUTES = ("digit", "color", "size", "position")


@dataclass(frozen=True)
class Spec:
    """One image's attributes."""

    digit: int
    color: str
    size: str
    position: str

    def prompt(self, template: int = 0) -> str:
        return TEMPLATES[template % len(TEMPLATES)].format(
            digit=self.digit, word=DIGIT_WORDS[self.digit], color=self.color, size=self.size, position=self.position)

    def labels(self) -> tuple[int, int, int, int]:
        """Class indices per attribute (what the world's classifiers predict)."""
        return (self.digit, list(COLORS).index(self.color), list(SIZES).index(self.size),
                POSITIONS.index(self.position))


def all_specs() -> list[Spec]:
    return [Spec(d, c, s, p) for d, c, s, p in itertools.product(range(10), COLORS, SIZES, POSITIONS)]


def held_out_combos(seed: int = 0, fraction: float = 0.2) -> set[tuple[int, str, str]]:
    """(digit, colour, position) combinations that training never sees; every digit keeps some."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(range(10), COLORS, POSITIONS))
    held = set()
    for d in range(10):  # per digit, so each digit and colour still appears in training
        own = [c for c in combos if c[0] == d]
        for i in rng.choice(len(own), size=max(1, round(fraction * len(own))), replace=False):
            held.add(own[int(i)])
    return held


def split_specs(seed: int = 0) -> tuple[list[Spec], list[Spec]]:
    held = held_out_combos(seed)
    train = [s for s in all_specs() if (s.digit, s.color, s.position) not in held]
    test = [s for s in all_specs() if (s.digit, s.color, s.position) in held]
    return train, test


def load_digit_bitmaps() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8×8 digits in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def render(bitmaps: torch.Tensor, specs: list[Spec]) -> torch.Tensor:
    """Draw 8×8 bitmaps (B, 8, 8) as coloured digits on black 32×32 canvases: (B, 3, 32, 32) in [0, 1]."""
    out = torch.zeros(len(specs), 3, CANVAS, CANVAS)
    for size in SIZES.values():
        idx = [i for i, s in enumerate(specs) if SIZES[s.size] == size]
        if not idx:
            continue
        glyph = F.interpolate(bitmaps[idx, None], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        top = (CANVAS - size) // 2
        for n, i in enumerate(idx):
            left = 1 if specs[i].position == "left" else CANVAS - size - 1
            color = torch.tensor(COLORS[specs[i].color])[:, None, None]
            out[i, :, top:top + size, left:left + size] = glyph[n] * color
    return out


def sample_dataset(specs: list[Spec], n: int, seed: int, bitmaps: np.ndarray, labels: np.ndarray
                   ) -> tuple[torch.Tensor, list[Spec], list[str]]:
    """``n`` (image, spec, prompt) triples: specs drawn from ``specs``, a random matching bitmap and template."""
    rng = np.random.default_rng(seed)
    by_digit = [np.flatnonzero(labels == d) for d in range(10)]
    chosen = [specs[int(i)] for i in rng.integers(0, len(specs), size=n)]
    picks = [int(rng.choice(by_digit[s.digit])) for s in chosen]
    prompts = [s.prompt(int(rng.integers(0, len(TEMPLATES)))) for s in chosen]
    images = render(torch.from_numpy(bitmaps[picks]), chosen)
    return images, chosen, prompts


_WORDS = {w: i for i, w in enumerate(DIGIT_WORDS)} | {str(i): i for i in range(10)}


def parse_prompt(prompt: str) -> Spec:
    """Recover the attributes a default-world prompt names (any template, any word order)."""
    words = prompt.lower().replace(",", " ").replace(":", " ").split()
    found = {
        "digit": [_WORDS[w] for w in words if w in _WORDS],
        "color": [w for w in words if w in COLORS],
        "size": [w for w in words if w in SIZES],
        "position": [w for w in words if w in POSITIONS],
    }
    missing = [k for k, v in found.items() if len(v) != 1]
    if missing:
        raise ValueError(f"prompt {prompt!r} must name exactly one {' and one '.join(missing)} "
                         f"(the default world's prompts name a digit, a colour, a size and a position)")
    return Spec(found["digit"][0], found["color"][0], found["size"][0], found["position"][0])
