"""GenEval in miniature: the world's detector read by GenEval's own rules (:mod:`flowbp_ops.judges.geneval`).

The detector (:class:`flowbp_ops.world.nets.Detector`, trained on digits at free positions and sizes, on the
half of the handwriting the training reward never saw) turns each image into boxes with a digit label, a
colour and a score; every prompt becomes its GenEval metadata line; ``score_geneval`` applies GenEval's rules
(thresholds, exact counts, colours, relative positions from box centres). Evaluation only: it has no gradient
and is never trained against.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_ops.judges.geneval import Detection, GenEvalResult, GenEvalRules, entry_from, score_geneval
from flowbp_ops.world import nets, scenes


class WorldDetector:
    """Images (B, 3, 32, 32) in [0, 1] → per image its detections (peaks of the centre heat map)."""

    def __init__(self, net: nets.Detector, min_score: float = 0.05):
        self.net, self.min_score = net, min_score

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[list[Detection]]:
        out = self.net(images.float())
        heat = torch.sigmoid(out["heat"])
        peaks = (heat == F.max_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0]) & (heat > self.min_score)
        size, s = out["size"].exp(), nets.Detector.STRIDE
        colors = list(scenes.COLORS)
        result = []
        for b in range(len(images)):
            dets = []
            for y, x in peaks[b].nonzero().tolist():
                cx = (x + 0.5 + float(out["offset"][b, 0, y, x])) * s
                cy = (y + 0.5 + float(out["offset"][b, 1, y, x])) * s
                half = float(size[b, y, x]) / 2
                dets.append({"label": scenes.DIGITS[int(out["digit"][b, :, y, x].argmax())],
                             "score": float(heat[b, y, x]), "box": (cx - half, cy - half, cx + half, cy + half),
                             "color": colors[int(out["color"][b, :, y, x].argmax())]})
            result.append(dets)
        return result


# GenEval's thresholds are Mask2Former's; this detector's calibrated centre scores put real objects above 0.5
RULES = GenEvalRules(threshold=0.3, counting_threshold=0.5)


class WorldJudge:
    """``judge(images, prompts)`` → :class:`GenEvalResult` (per image correct or why not, per tag, overall)."""

    def __init__(self, detector: WorldDetector, rules: GenEvalRules = RULES):
        self.detector, self.rules = detector, rules

    def __call__(self, images: Tensor, prompts: list[str]) -> GenEvalResult:
        entries = [entry_from(scenes.parse_prompt(p).geneval()) for p in prompts]
        return score_geneval(entries, images.detach().float().cpu(), self.detector, self.rules, batch_size=256)

    def metrics(self, images: Tensor, prompts: list[str]) -> dict[str, float]:
        """``geneval/overall`` (GenEval's headline: the mean of the tag accuracies) and ``geneval/<tag>``."""
        result = self(images, prompts)
        return {"geneval/overall": result.overall, **{f"geneval/{t}": a for t, a in result.tag_accuracy.items()}}


def load_judge(world_dir: str | Path) -> WorldJudge:
    """The world's judge (on the CPU: it reads images after they are generated, without gradient)."""
    net, _ = nets.load_net(Path(world_dir) / "rewards" / "detector")
    return WorldJudge(WorldDetector(net))
