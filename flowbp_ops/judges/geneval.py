"""GenEval compositional scoring (Ghosh et al., 2023) with a pluggable object detector.

The prompts and their requirements come from the shipped ``data/geneval_metadata.jsonl``: one
JSON object per line with a ``tag`` (single_object, two_object, counting, colors, position,
color_attr), ``include`` requirements (``class``, ``count``, optional ``color``, optional
``position = [relation, index of the include entry it is relative to]``), optional ``exclude``
requirements (``class``, ``count``) and the ``prompt``.

The rules follow GenEval's ``evaluate_images.py``: keep detections above a score threshold
(stricter for counting), require at least ``count`` of each included class, check the colour
and relative position of the ``count`` highest-scoring ones, and fail when an excluded class
appears ``count`` times or more. Exact counts come from the metadata pairing "include n" with
"exclude n + 1". The official detector is Mask2Former (mmdetection) with CLIP colour
classification; we cannot ship it, so plug in any :class:`Detector`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NotRequired, Protocol, Sequence, TypedDict

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

METADATA_PATH = Path(__file__).resolve().parent.parent / "data" / "geneval_metadata.jsonl"
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


class Detection(TypedDict):
    label: str  # a COCO class name as used in the metadata, e.g. "potted plant"
    score: float
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, y grows downwards
    color: NotRequired[str | None]  # one of COLORS; required for prompts that ask for a colour


class Detector(Protocol):
    """Images (B, 3, H, W) in [0, 1] -> per image, every detection (NMS already applied)."""

    def __call__(self, images: Tensor) -> list[list[Detection]]: ...


class GenEvalMetadataError(ValueError):
    """A metadata line that does not follow the GenEval format."""


@dataclass(frozen=True)
class GenEvalEntry:
    tag: str
    prompt: str
    include: tuple[dict, ...]
    exclude: tuple[dict, ...] = ()
    line: int = 0  # 1-based line in the metadata file, for messages


@dataclass(frozen=True)
class GenEvalRules:
    threshold: float = 0.3  # GenEval's THRESHOLD
    counting_threshold: float = 0.9  # counting prompts only: stray low-confidence boxes would break counts
    max_objects: int = 16  # per class and image
    position_margin: float = 0.1  # fraction of the summed box sizes an offset must exceed


@dataclass
class GenEvalResult:
    correct: list[bool]  # per image, in input order
    reasons: list[str]  # per image, why it failed ("" when correct)
    tags: list[str]
    prompts: list[str]
    tag_accuracy: dict[str, float] = field(default_factory=dict)
    overall: float = float("nan")  # mean of the tag accuracies, as GenEval reports


def entry_from(obj: object, lineno: int = 0) -> GenEvalEntry:
    """One metadata line (a parsed JSON object) as an entry; a clear error naming what does not follow the format."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise GenEvalMetadataError(f"line {lineno}: {what}")

    need(isinstance(obj, dict), "expected a JSON object")
    need(obj.get("tag") in TAGS, f"tag {obj.get('tag')!r} is not one of {TAGS}")
    need(isinstance(obj.get("prompt"), str) and obj["prompt"].strip() != "", "missing or empty 'prompt'")
    need(not set(obj) - {"tag", "prompt", "include", "exclude"},
         f"unknown keys {sorted(set(obj) - {'tag', 'prompt', 'include', 'exclude'})}")
    include, exclude = obj.get("include"), obj.get("exclude", [])
    need(isinstance(include, list) and len(include) > 0, "'include' must be a non-empty list")
    need(isinstance(exclude, list), "'exclude' must be a list")
    for kind, reqs in (("include", include), ("exclude", exclude)):
        allowed = {"class", "count", "color", "position"} if kind == "include" else {"class", "count"}
        for i, req in enumerate(reqs):
            where = f"{kind}[{i}]"
            need(isinstance(req, dict), f"{where} must be an object")
            need(not set(req) - allowed, f"{where} has unknown keys {sorted(set(req) - allowed)}")
            need(isinstance(req.get("class"), str) and req["class"] != "", f"{where} needs a 'class' name")
            count = req.get("count")
            need(isinstance(count, int) and not isinstance(count, bool) and count >= 1,
                 f"{where} needs an integer 'count' >= 1, got {count!r}")
            if "color" in req:
                need(req["color"] in COLORS, f"{where} color {req['color']!r} is not one of {COLORS}")
            if "position" in req:
                pos = req["position"]
                need(isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                     and isinstance(pos[1], int) and 0 <= pos[1] < i,
                     f"{where} position must be [relation in {RELATIONS}, index of an earlier include], got {pos!r}")
    return GenEvalEntry(obj["tag"], obj["prompt"], tuple(include), tuple(exclude), lineno)


def load_metadata(path: str | Path = METADATA_PATH) -> list[GenEvalEntry]:
    """Every entry of a GenEval metadata JSONL file; blank lines are skipped."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GenEvalMetadataError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
            try:
                entries.append(entry_from(obj, lineno))
            except GenEvalMetadataError as exc:
                raise GenEvalMetadataError(f"{path}: {exc}") from None
    return entries


def select_by_tag(entries: Iterable[GenEvalEntry], tags: str | Iterable[str]) -> list[GenEvalEntry]:
    """The entries whose tag is one of ``tags`` (file order kept)."""
    wanted = {tags} if isinstance(tags, str) else set(tags)
    if unknown := wanted - set(TAGS):
        raise ValueError(f"unknown GenEval tags {sorted(unknown)}; known: {TAGS}")
    return [e for e in entries if e.tag in wanted]


def keep_detections(detections: Sequence[Detection], tag: str,
                    rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """Per class, the confident detections sorted by score (highest first), at most max_objects."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in detections:
        box = d.get("box")
        if not isinstance(d.get("label"), str) or "score" not in d or box is None or len(box) != 4:
            raise ValueError(f"a detection needs a 'label', a 'score' and a 4-number 'box', got {d!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"detection box must be (x0, y0, x1, y1) with x0<=x1, y0<=y1, got {box!r}")
        if float(d["score"]) > threshold:
            by_class[d["label"]].append(d)
    return {c: sorted(ds, key=lambda d: -float(d["score"]))[: rules.max_objects] for c, ds in by_class.items()}


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below") from the box centres.

    The centre offset on each axis shrinks by ``margin`` x (the summed box sizes), so touching or
    overlapping objects are not called left/right; a relation holds when that axis carries more
    than half of the (unshrunk) offset's direction.
    """
    a, b = np.asarray(box_a, dtype=float).reshape(2, 2), np.asarray(box_b, dtype=float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    size = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - margin * size, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def check_image(entry: GenEvalEntry, detections: Sequence[Detection],
                rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """Whether one image satisfies its entry, and why not (GenEval's ``evaluate``)."""
    objects = keep_detections(detections, entry.tag, rules)
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []  # per include entry, its objects when it passed
    for req in entry.include:
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])[:n]
        ok = len(found) >= n
        if not ok:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if ok and "color" in req:
            if any(d.get("color") is None for d in found):
                raise ValueError(f"line {entry.line} ({entry.prompt!r}) needs colours but the detector gave "
                                 f"a {cls!r} detection without 'color'; GenEval classifies the colour of each "
                                 "detected object (CLIP on its crop), so the detector must fill it in")
            hits = sum(str(d["color"]).lower() == req["color"] for d in found)
            if hits < n:
                ok = False
                reasons.append(f"expected {req['color']} {cls}>={n}, found {hits} {req['color']} "
                               f"({', '.join(str(d['color']) for d in found)})")
        if ok and "position" in req:
            relation, target = req["position"]
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            else:
                for obj in found:
                    for tgt in matched[target]:
                        rels = relative_position(obj["box"], tgt["box"], rules.position_margin)
                        if relation not in rels:
                            ok = False
                            reasons.append(f"expected {cls} {relation} {tgt['label']}, found "
                                           f"{' and '.join(sorted(rels)) or 'no clear relation'}")
                            break
                    if not ok:
                        break
        matched.append(found if ok else None)
    for req in entry.exclude:
        if len(objects.get(req["class"], [])) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return not reasons, "; ".join(reasons)


def aggregate(tags: Sequence[str], correct: Sequence[bool]) -> tuple[dict[str, float], float]:
    """Per-tag accuracy over images, and their unweighted mean (GenEval's overall score)."""
    if len(tags) != len(correct):
        raise ValueError(f"{len(tags)} tags but {len(correct)} results")
    per: dict[str, list[bool]] = defaultdict(list)
    for t, c in zip(tags, correct):
        per[t].append(bool(c))
    tag_acc = {t: float(np.mean(per[t])) for t in TAGS if t in per}
    return tag_acc, float(np.mean(list(tag_acc.values()))) if tag_acc else float("nan")


def score_geneval(entries: Sequence[GenEvalEntry], images: Tensor, detector: Detector,
                  rules: GenEvalRules = GenEvalRules(), batch_size: int = 16) -> GenEvalResult:
    """Score ``images[i]`` against ``entries[i]`` (repeat an entry for several samples per prompt)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(entries):
        raise ValueError(f"expected images (N, 3, H, W) with N = {len(entries)} entries, got {tuple(images.shape)}")
    correct, reasons = [], []
    for start in range(0, len(entries), batch_size):
        batch = images[start:start + batch_size].detach()
        dets = detector(batch)
        if len(dets) != batch.shape[0]:
            raise ValueError(f"detector returned {len(dets)} detection lists for {batch.shape[0]} images")
        for entry, d in zip(entries[start:start + batch_size], dets):
            ok, why = check_image(entry, d, rules)
            correct.append(ok)
            reasons.append(why)
    tags = [e.tag for e in entries]
    tag_acc, overall = aggregate(tags, correct)
    return GenEvalResult(correct, reasons, tags, [e.prompt for e in entries], tag_acc, overall)
