"""The default world's task: GenEval in miniature, drawn with scikit-learn's handwritten digits.

A scene is a 32×32 black canvas holding up to four objects, one per cell of a 2×2 grid; an
object is one 8×8 handwritten digit from ``sklearn.datasets.load_digits`` (real data that ships
inside the package), drawn 12–14 px tall in one of four colours at a jittered place in its cell.
Prompts follow GenEval's six templates and mean what GenEval's rules check
(:mod:`flowbp_ops.judges.geneval`), with digit words as the object classes:

=============  ==========================================  ====================================
tag            prompt                                      scene
=============  ==========================================  ====================================
single_object  a photo of a seven                          one seven, any colour
two_object     a photo of a three and a seven              a three and a seven
counting       a photo of three fives                      exactly three fives
colors         a photo of a red seven                      one red seven
position       a photo of a three left of a seven          the three left of the seven
color_attr     a photo of a red three and a blue seven     a red three and a blue seven
=============  ==========================================  ====================================

A prompt describes the whole scene: nothing else is drawn. The held-out split holds out whole
combinations (digit pairs, a digit in a colour, a digit at a count), so evaluation measures
composition, not memory; every digit and colour still appears in training.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flowbp_ops.judges.geneval import TAGS  # GenEval's six tags, in its order

CANVAS, CELL = 32, 16
GRID = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) of each cell
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines")
COLORS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
COUNTS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
SIZES = (12, 13, 14)  # glyph side in pixels


def _a(word: str) -> str:
    return ("an " if word == "eight" else "a ") + word  # "a one", "an eight"


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: its objects ``(digit, colour or None)`` in prompt order, and for ``position``
    the relation of ``objects[0]`` to ``objects[1]``."""

    tag: str
    objects: tuple[tuple[int, str | None], ...]
    relation: str | None = None

    def prompt(self) -> str:
        (d0, c0), *rest = self.objects
        w0 = DIGITS[d0]
        if self.tag == "single_object":
            return f"a photo of {_a(w0)}"
        if self.tag == "colors":
            return f"a photo of {_a(c0)} {w0}"
        if self.tag == "counting":
            return f"a photo of {COUNTS[len(self.objects)]} {PLURALS[d0]}"
        (d1, c1), = rest
        if self.tag == "two_object":
            return f"a photo of {_a(w0)} and {_a(DIGITS[d1])}"
        if self.tag == "position":
            return f"a photo of {_a(w0)} {self.relation} {_a(DIGITS[d1])}"
        return f"a photo of {_a(c0)} {w0} and {_a(c1)} {DIGITS[d1]}"

    def geneval(self) -> dict:
        """The scene as a GenEval metadata line (``include`` / ``exclude``, class names = digit words)."""
        words = [DIGITS[d] for d, _ in self.objects]
        if self.tag == "counting":
            n = len(self.objects)
            return {"tag": self.tag, "include": [{"class": words[0], "count": n}],
                    "exclude": [{"class": words[0], "count": n + 1}], "prompt": self.prompt()}
        include = [{"class": w, "count": 1, **({"color": c} if c else {})} for w, (_, c) in zip(words, self.objects)]
        if self.tag == "position":  # GenEval: the relative's target first, then the object related to it
            include = [include[1], {**include[0], "position": [self.relation, 0]}]
        return {"tag": self.tag, "include": include, "prompt": self.prompt()}

    def keys(self) -> set[tuple]:
        """The combinations this scene exercises (what the held-out split holds out)."""
        digits = [d for d, _ in self.objects]
        if self.tag in ("two_object", "position", "color_attr"):
            return {("pair", *sorted(digits))}
        if self.tag == "colors":
            return {("colour", digits[0], self.objects[0][1])}
        if self.tag == "counting":
            return {("count", digits[0], len(digits))}
        return set()


def all_scenes() -> list[Scene]:
    """Every prompt of the world (1,025), tag by tag."""
    out = [Scene("single_object", ((d, None),)) for d in range(10)]
    pairs = [(a, b) for a, b in itertools.permutations(range(10), 2)]
    out += [Scene("two_object", ((a, None), (b, None))) for a, b in pairs if a < b]
    out += [Scene("counting", ((d, None),) * n) for d in range(10) for n in COUNTS]
    out += [Scene("colors", ((d, c),)) for d in range(10) for c in COLORS]
    out += [Scene("position", ((a, None), (b, None)), rel) for a, b in pairs for rel in RELATIONS]
    out += [Scene("color_attr", ((a, c0), (b, c1))) for a, b in pairs if a < b
            for c0, c1 in itertools.permutations(COLORS, 2)]
    return out


def held_out_keys(seed: int = 0, fraction: float = 0.2) -> set[tuple]:
    """A ``fraction`` of the digit pairs, of the (digit, colour) and of the (digit, count) combinations."""
    rng = np.random.default_rng(seed)
    groups = [[("pair", a, b) for a, b in itertools.combinations(range(10), 2)],
              [("colour", d, c) for d in range(10) for c in COLORS],
              [("count", d, n) for d in range(10) for n in COUNTS]]
    held = set()
    for group in groups:
        held |= {group[int(i)] for i in rng.choice(len(group), size=round(fraction * len(group)), replace=False)}
    return held


def split_scenes(seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out) scenes. Single objects have no combination to hold out: they are in both (as in GenEval,
    which asks for single objects the model was trained on)."""
    held = held_out_keys(seed)
    scenes = all_scenes()
    train = [s for s in scenes if not (s.keys() & held)]
    test = [s for s in scenes if s.keys() & held or s.tag == "single_object"]
    return train, test


def balanced(scenes: list[Scene], per_tag: int, seed: int = 0) -> list[Scene]:
    """``per_tag`` scenes of each tag (cycling a tag's scenes when it has fewer, as GenEval draws several images per
    prompt), interleaved tag by tag so that any prefix is balanced too."""
    rng = np.random.default_rng(seed)
    by_tag = []
    for tag in TAGS:
        own = [s for s in scenes if s.tag == tag]
        if own:
            order = [own[int(i)] for i in rng.permutation(len(own))]
            by_tag.append([order[i % len(order)] for i in range(per_tag)])
    return [s for row in zip(*by_tag) for s in row]


# -- prompts back to scenes ------------------------------------------------------------------------------------
_W = "|".join(DIGITS)
_C = "|".join(COLORS)
_PATTERNS = [
    ("single_object", re.compile(rf"an? ({_W})")),
    ("colors", re.compile(rf"an? ({_C}) ({_W})")),
    ("counting", re.compile(rf"({'|'.join(COUNTS.values())}) ({'|'.join(PLURALS)})")),
    ("two_object", re.compile(rf"an? ({_W}) and an? ({_W})")),
    ("position", re.compile(rf"an? ({_W}) ({'|'.join(RELATIONS)}) an? ({_W})")),
    ("color_attr", re.compile(rf"an? ({_C}) ({_W}) and an? ({_C}) ({_W})")),
]


def parse_prompt(prompt: str) -> Scene:
    """The scene a default-world prompt asks for (GenEval's templates, case and spacing free)."""
    text = " ".join(prompt.lower().replace(",", " ").split())
    text = text.removeprefix("a photo of ").removeprefix("an image of ")
    for tag, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if not m:
            continue
        g = m.groups()
        if tag == "single_object":
            return Scene(tag, ((DIGITS.index(g[0]), None),))
        if tag == "colors":
            return Scene(tag, ((DIGITS.index(g[1]), g[0]),))
        if tag == "counting":
            n = [k for k, v in COUNTS.items() if v == g[0]][0]
            return Scene(tag, ((PLURALS.index(g[1]), None),) * n)
        if tag == "two_object":
            return Scene(tag, ((DIGITS.index(g[0]), None), (DIGITS.index(g[1]), None)))
        if tag == "position":
            return Scene(tag, ((DIGITS.index(g[0]), None), (DIGITS.index(g[2]), None)), g[1])
        return Scene(tag, ((DIGITS.index(g[1]), g[0]), (DIGITS.index(g[3]), g[2])))
    raise ValueError(f"prompt {prompt!r} is not a default-world prompt: write one of GenEval's templates with digit "
                     "words and the colours red, green, blue or yellow, e.g. 'a photo of a red three and a blue "
                     "seven', 'a photo of two fives', 'a photo of a four left of a nine'")


# -- drawing ---------------------------------------------------------------------------------------------------
def load_digit_bitmaps() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8×8 digits in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@dataclass(frozen=True)
class Layout:
    """Where each object of a scene is drawn: per object its cell, digit and colour."""

    cells: tuple[int, ...]
    digits: tuple[int, ...]
    colors: tuple[str, ...]


def layout(scene: Scene, rng: np.random.Generator, canonical: bool = True) -> Layout:
    """Cells and colours for a scene; colours at random where the prompt leaves them open.

    ``canonical`` (how the generator's training images are drawn): objects in reading order, in prompt order; a
    positioned pair side by side (left/right) or one over the other (above/below) from the first cell. Otherwise
    (how the judges' training images are drawn) any placement that satisfies the prompt, at random, so the
    judges read a scene wherever its objects are.
    """
    n = len(scene.objects)
    if canonical:
        if scene.tag == "position":
            first, second = (0, 1) if scene.relation in ("left of", "above") else (1, 0)
            step = 1 if scene.relation in ("left of", "right of") else 2  # the next cell along a row or a column
            cells = (first * step, second * step)
        else:
            cells = tuple(range(n))
    else:
        options = assignments(scene)
        cells = options[int(rng.integers(len(options)))][0]
    colors = tuple(c if c else list(COLORS)[int(rng.integers(len(COLORS)))] for _, c in scene.objects)
    return Layout(tuple(cells), tuple(d for d, _ in scene.objects), colors)


def cell_labels(lay: Layout) -> tuple[list[int], list[int]]:
    """Per cell: the digit drawn there (−1: empty) and its colour index (−1: empty)."""
    digit, color = [-1] * 4, [-1] * 4
    for cell, d, c in zip(lay.cells, lay.digits, lay.colors):
        digit[cell], color[cell] = d, list(COLORS).index(c)
    return digit, color


def paint(glyph: torch.Tensor, size: int, color: str | torch.Tensor) -> torch.Tensor:
    """An 8×8 glyph resized to ``size`` and coloured (a palette name, or any RGB): a (3, size, size) patch."""
    g = F.interpolate(glyph[None, None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    rgb = torch.tensor(COLORS[color]) if isinstance(color, str) else color
    return g * rgb[:, None, None]


def draw(patches: list[torch.Tensor], places: list[tuple[int, int]]) -> torch.Tensor:
    """One (3, 32, 32) black canvas with each patch drawn at ``(top, left)`` (overlaps keep the brighter)."""
    out = torch.zeros(3, CANVAS, CANVAS)
    for patch, (top, left) in zip(patches, places):
        h, w = patch.shape[1:]
        out[:, top:top + h, left:left + w] = torch.maximum(out[:, top:top + h, left:left + w], patch)
    return out


class Renderer:
    """Draws scenes from one set of bitmaps (``half``: 0 or 1 keeps every other bitmap, so two models can learn from
    disjoint handwriting; None keeps all)."""

    def __init__(self, half: int | None = None):
        bitmaps, labels = load_digit_bitmaps()
        keep = np.ones(len(labels), bool) if half is None else np.arange(len(labels)) % 2 == half
        self.bitmaps = torch.from_numpy(bitmaps[keep])
        self.by_digit = [np.flatnonzero(labels[keep] == d) for d in range(10)]

    def glyph(self, digit: int, rng: np.random.Generator) -> torch.Tensor:
        return self.bitmaps[int(rng.choice(self.by_digit[digit]))]

    @staticmethod
    def place(cell: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """(top, left, size) of an object in ``cell``: a glyph size of :data:`SIZES`, jittered inside the cell."""
        size = int(rng.choice(SIZES))
        row, col = GRID[cell]
        top, left = (int(rng.integers(0, CELL - size + 1)) for _ in range(2))
        return row * CELL + top, col * CELL + left, size

    def scene(self, lay: Layout, rng: np.random.Generator) -> torch.Tensor:
        places = [self.place(cell, rng) for cell in lay.cells]
        patches = [paint(self.glyph(d, rng), size, c) for d, (_, _, size), c in zip(lay.digits, places, lay.colors)]
        return draw(patches, [(top, left) for top, left, _ in places])

    def dataset(self, scenes: list[Scene], n: int, seed: int, canonical: bool = True
                ) -> tuple[torch.Tensor, list[Scene], torch.Tensor]:
        """``n`` renders of scenes drawn from ``scenes``: images (n, 3, 32, 32), their scenes, and per cell the digit
        and colour labels (n, 4, 2), −1 where a cell is empty (``canonical``: see :func:`layout`)."""
        rng = np.random.default_rng(seed)
        chosen = [scenes[int(i)] for i in rng.integers(0, len(scenes), size=n)]
        images, labels = [], []
        for s in chosen:
            lay = layout(s, rng, canonical)
            images.append(self.scene(lay, rng))
            labels.append(list(zip(*cell_labels(lay))))
        return torch.stack(images), chosen, torch.tensor(labels)


def _related(relation: str, a: int, b: int) -> bool:
    """Whether cell ``a`` is ``relation`` of cell ``b`` (GenEval's rule on centres: a diagonal counts for both)."""
    (ra, ca), (rb, cb) = GRID[a], GRID[b]
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def assignments(scene: Scene) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every way of placing the scene's objects in distinct cells that satisfies it: (cells, content classes
    (digit + 1), colour indices or −1 for any colour). Identical objects (counting) are placed once per set of
    cells, so the placements are disjoint events."""
    n = len(scene.objects)
    classes = tuple(d + 1 for d, _ in scene.objects)
    colors = tuple(list(COLORS).index(c) if c else -1 for _, c in scene.objects)
    if scene.tag == "counting":
        places = list(itertools.combinations(range(4), n))
    else:
        places = [p for p in itertools.permutations(range(4), n)
                  if scene.relation is None or _related(scene.relation, p[0], p[1])]
    return [(p, classes, colors) for p in places]
