"""The pipeline's settings: one schema for ``params.yaml`` (DVC), Dagster run config and the CLI.

Each section is a pydantic model; ``params.yaml`` holds the values, the Dagster ``Config``
classes are generated from these models (``pipelines/config.py``) and the CLI's ``--set``
validates through them. A setting is defined once, here (training: ``TrainConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowbp_ops.surrogate.config import ConfigError
from flowbp_ops.training.config import TrainConfig
from flowbp_ops.world.config import WorldConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptParams(_Section):
    source: str = Field("default", description="default, a local file, s3://bucket/key or hf://datasets/owner/name/file")
    column: str = Field("prompt", description="field or column holding the prompt in .jsonl/.json/.csv files")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    eval_source: str | None = Field(None, description="a separate held-out prompt file (then no random split)")
    seed: int = 0


class RewardParams(_Section):
    source: str = Field("default", description="default (train the world's reward nets), or a folder URI "
                                               "holding one sub-folder per reward")
    sha256: str | None = Field(None, description="expected checksum of a fetched source")
    models: dict[str, str] = Field(default_factory=dict, description="per reward: a URI to fetch into rewards/<name>")
    checksums: dict[str, str] = Field(default_factory=dict, description="per reward: the expected SHA-256")
    tokenizers: dict[str, str] = Field(default_factory=dict, description="per reward published as a .pt checkpoint "
                                       "(hpsv2, imagereward): a tokenizer folder URI to convert it with")


class BaseModelParams(_Section):
    source: str = Field("default", description="default (train the small world model), hf://owner/name[@rev], "
                                               "s3://bucket/prefix or a local diffusers pipeline folder")
    revision: str | None = Field(None, description="hub revision to pin (a commit hash); S3: expected SHA-256")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="weights of a real backbone (VAE decodes in fp32)")
    resolution: int = Field(512, ge=8, description="image side of a real backbone, pixels")
    max_sequence_length: int | None = Field(None, ge=1, description="text tokens (None: the adapter's default)")


class RolloutParams(_Section):
    n_steps: int = Field(20, ge=1)
    guidance: float | None = 4.0
    n_prompts: int = Field(200, ge=1, description="held-out prompts rolled out with the base model (the eval set)")
    seed: int = 42
    shard_size: int = Field(50, ge=1)


class EvalParams(_Section):
    """Evaluation runs on the cached rollouts' prompts, noise, steps and guidance (section ``rollouts``)."""

    rewards: list[str] = Field(default_factory=lambda: ["align", "align_heldout", "quality", "quality_heldout"])
    grid_prompts: int = Field(8, ge=1, description="prompts in the sample grid")
    diversity_seeds: int = Field(4, ge=2, description="samples per prompt for the diversity monitor")
    judge_url: str | None = Field(None, description="a served VLM judge's OpenAI-compatible base URL (e.g. "
                                  "http://127.0.0.1:8000/v1): adds judge/alignment and judge/quality (1-5)")
    judge_model: str = Field("CodeGoat24/UnifiedReward-qwen-7b", description="the model name the judge serves")


class PromoteParams(_Section):
    model_name: str = "flowbp-default"
    metric: str = Field("reward/align", description="the evaluation metric that picks the best variant")
    min_improvement: float = Field(0.0, description="training reward must beat the base model by more than this")
    heldout_tolerance_sd: float = Field(0.5, ge=0, description="held-out rewards may fall at most this many "
                                        "standard deviations of the base model's scores")
    min_diversity_ratio: float = Field(0.5, ge=0, description="sample diversity must keep this fraction of the base's")


class TrackingParams(_Section):
    tracking_uri: str = Field("sqlite:///mlflow/mlflow.db", description="MLflow store (or http://server:5000)")
    artifact_location: str = Field("mlflow/artifacts", description="artifact root of new experiments (or s3://...)")
    experiment: str = "flowbp"


class Params(_Section):
    world_dir: str = "data/world"
    data_dir: str = "data"
    device: str = Field("cpu", description="where training and evaluation run (cuda on a GPU executor)")
    world: WorldConfig = WorldConfig()
    prompts: PromptParams = PromptParams()
    rewards: RewardParams = RewardParams()
    base_model: BaseModelParams = BaseModelParams()
    rollouts: RolloutParams = RolloutParams()
    train: TrainConfig = TrainConfig()
    methods: list[str] = Field(default_factory=lambda: ["refl", "drtune", "flowbp_sparse", "flowbp_bridge",
                                                        "flowbp_lagrange"])
    eval: EvalParams = EvalParams()
    promote: PromoteParams = PromoteParams()
    tracking: TrackingParams = TrackingParams()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        from flowbp_ops.methods import METHODS

        unknown = [m for m in value if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not value:
            raise ValueError("give at least one method")
        return value

    @model_validator(mode="after")
    def _backbone_matches_base_model(self) -> "Params":
        default_model, default_backbone = self.base_model.source == "default", self.train.backbone == "default"
        if default_model != default_backbone:
            raise ValueError(f"base_model.source={self.base_model.source!r} with train.backbone="
                             f"{self.train.backbone!r}: the default world's model trains as backbone 'default', "
                             "a real model as sd35, flux1 or flux2 (see `flowbp preset --list`)")
        return self

    def train_config(self, method: str) -> TrainConfig:
        return self.train.model_copy(update={"method": method})


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read ``params.yaml`` (missing file: the defaults) and apply ``section.key=value`` overrides."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return params_from(data, overrides, str(path))


def params_from(data: dict[str, Any], overrides: list[str] = (), origin: str = "params") -> Params:
    """Validated ``Params`` from a settings dict with ``section.key=value`` overrides on top."""
    from flowbp_ops.surrogate.config import parse_override

    for item in overrides:
        key, value = parse_override(item)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                    for e in exc.errors())) from None


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
