"""Where a pipeline's stage outputs live: under ``world_dir`` (what the world or the base model is) and
``data_dir``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowbp_ops.params import Params


@dataclass(frozen=True)
class Paths:
    world: Path
    data: Path

    @property
    def prompts(self) -> Path:
        return self.world / "prompts"

    @property
    def rewards(self) -> Path:
        return self.world / "rewards"

    @property
    def embeddings(self) -> Path:
        """Every prompt encoded once by the base model's text encoders (the ``prompt_embeddings`` stage)."""
        return self.data / "embeddings"

    @property
    def rollouts(self) -> Path:
        return self.data / "rollouts"

    def variant(self, method: str) -> Path:
        return self.data / "variants" / method

    def run(self, method: str) -> Path:
        """A training run's checkpoints and per-step metrics: kept when the run fails, so it resumes."""
        return self.data / "runs" / method

    def evaluation(self, method: str) -> Path:
        return self.data / "eval" / method

    @property
    def comparison(self) -> Path:
        return self.data / "comparison"

    @property
    def promoted(self) -> Path:
        return self.data / "promoted.json"


def paths(params: Params) -> Paths:
    return Paths(Path(params.world_dir), Path(params.data_dir))
