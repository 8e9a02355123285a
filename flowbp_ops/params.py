"""The pipeline's settings: one schema for ``params.yaml`` (DVC), Dagster run config and the CLI.

Each section is a pydantic model; ``params.yaml`` holds the values, the Dagster ``Config``
classes are generated from these models (``pipelines/config.py``) and the CLI's ``--set``
validates through them. A setting is defined once, here (training: ``TrainConfig``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowbp_ops.backbones.table import REAL
from flowbp_ops.surrogate.config import ConfigError
from flowbp_ops.training.config import RewardSpec, TrainConfig
from flowbp_ops.world.config import WorldConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _uri(what: str):
    """A field validator: the value is a source URI flowbp can read (scheme, shape, no credentials)."""
    def check(cls, value):
        from flowbp_ops.uris import check_source

        if isinstance(value, dict):
            return {k: check_source(v, f"{what}.{k}") for k, v in value.items()}
        return value if value in (None, "", "default") else check_source(value, what)

    return field_validator(what.split(".")[-1])(classmethod(check))


DEVICE = re.compile(r"^(cpu|mps|cuda|cuda:\d+|cuda:auto)$")


class PromptParams(_Section):
    source: str = Field("default", description="default, a local file, s3://bucket/key or hf://datasets/owner/name/file")
    column: str = Field("prompt", description="field or column holding the prompt in .jsonl/.json/.csv files")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    eval_source: str | None = Field(None, description="a separate held-out prompt file (then no random split)")
    seed: int = 0

    _source = _uri("prompts.source")
    _eval_source = _uri("prompts.eval_source")


class RewardParams(_Section):
    source: str = Field("default", description="default (train the world's reward nets), or a folder URI "
                                               "holding one sub-folder per reward")
    sha256: str | None = Field(None, description="expected checksum of a fetched source")
    models: dict[str, str] = Field(default_factory=dict, description="per reward: a URI to fetch into rewards/<name>")
    checksums: dict[str, str] = Field(default_factory=dict, description="per reward: the expected SHA-256")
    tokenizers: dict[str, str] = Field(default_factory=dict, description="per reward published as a .pt checkpoint "
                                       "(hpsv2, imagereward): a tokenizer folder URI to convert it with")

    _source = _uri("rewards.source")
    _models = _uri("rewards.models")
    _tokenizers = _uri("rewards.tokenizers")

    @field_validator("models", "checksums", "tokenizers")
    @classmethod
    def _reward_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not re.fullmatch(r"[A-Za-z0-9_-]+", k)]  # a folder name under rewards/
        if bad:
            raise ValueError(f"reward names {bad}: use letters, digits, '_' and '-' only")
        return value


class BaseModelParams(_Section):
    source: str = Field("default", description="default (train the small world model), hf://owner/name[@rev], "
                                               "s3://bucket/prefix or a local diffusers pipeline folder")
    revision: str | None = Field(None, description="hub revision to pin (a commit hash); S3: expected SHA-256")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16",
                                                   description="weights of a real backbone (VAE decodes in fp32)")
    resolution: int = Field(512, ge=8, description="image side of a real backbone, pixels")
    max_sequence_length: int | None = Field(None, ge=1, description="text tokens (None: the backbone's default)")

    _source = _uri("base_model.source")


class RolloutParams(_Section):
    n_steps: int = Field(20, ge=1)
    guidance: float | None = Field(4.0, ge=0)
    grid: Literal["training", "scheduler"] = Field("training", description="the sigma grid of the evaluation "
                                                   "(base rollouts and variants): training's, or the pipeline "
                                                   "scheduler's own (the authors' SD3.5 evaluation)")
    n_prompts: int = Field(600, ge=1, description="held-out prompts rolled out with the base model (the eval set)")
    seed: int = 42
    shard_size: int = Field(50, ge=1)


class EvalParams(_Section):
    """Evaluation runs on the base rollouts' prompts, noise, steps and guidance (section ``rollouts``)."""

    rewards: list[RewardSpec] = Field(default_factory=lambda: ["align", "align_heldout", "quality", "quality_heldout"])
    grid_prompts: int = Field(8, ge=1, description="prompts in the sample grid")
    diversity_prompts: int = Field(24, ge=1, description="distinct held-out prompts of the diversity monitor")
    diversity_seeds: int = Field(4, ge=2, description="samples per prompt for the diversity monitor")
    judge_url: str | None = Field(None, description="a served VLM judge's OpenAI-compatible base URL (e.g. "
                                  "http://127.0.0.1:8000/v1): adds judge/alignment and judge/quality (1-5)")
    judge_model: str = Field("CodeGoat24/UnifiedReward-qwen-7b", description="the model name the judge serves")

    @field_validator("judge_url")
    @classmethod
    def _judge_url(cls, value: str | None) -> str | None:
        from flowbp_ops.uris import check_http_url

        return value if value is None else check_http_url(value, "eval.judge_url")


class PromoteParams(_Section):
    model_name: str = "flowbp-default"
    metric: str | None = Field(None, description="the evaluation metric that picks the best variant (None: the "
                                                 "held-out judge's — geneval/overall on the default world, "
                                                 "judge/alignment with eval.judge_url — else the training reward)")
    min_improvement: float = Field(0.0, description="training reward must beat the base model by more than this")
    heldout_tolerance_sd: float = Field(0.25, ge=0, description="held-out rewards may fall at most this many "
                                        "standard deviations of the base model's scores")
    min_judge_gain: float = Field(0.0, description="the held-out judge's score must change by at least this much")
    min_diversity_ratio: float = Field(0.5, ge=0, description="sample diversity must keep this fraction of the base's")


class TrackingParams(_Section):
    tracking_uri: str = Field("sqlite:///mlflow/mlflow.db", description="MLflow store (or http://server:5000)")
    artifact_location: str = Field("mlflow/artifacts", description="artifact root of new experiments (or s3://...)")
    experiment: str = Field("flowbp", min_length=1)

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        from flowbp_ops.uris import check_tracking_uri

        return check_tracking_uri(value)

    @field_validator("artifact_location")
    @classmethod
    def _artifacts(cls, value: str) -> str:
        from flowbp_ops.uris import no_credentials

        no_credentials(value, "tracking.artifact_location")
        return value


class Params(_Section):
    world_dir: str = "data/world"
    data_dir: str = "data"
    device: str = Field("cpu", description="where training and evaluation run: cpu, cuda, cuda:N, cuda:auto (a free "
                                           "GPU of this node per process) or mps")
    world: WorldConfig = WorldConfig()
    prompts: PromptParams = PromptParams()
    rewards: RewardParams = RewardParams()
    base_model: BaseModelParams = BaseModelParams()
    rollouts: RolloutParams = RolloutParams()
    train: TrainConfig = TrainConfig()
    # two baselines and the paper's two FlowBP variants: an even count fills both lanes of a 2-core machine (every
    # method is in `flowbp methods` and the paper in miniature, bench/miniature.py)
    methods: list[str] = Field(default_factory=lambda: ["refl", "drtune", "flowbp_bridge", "flowbp_lagrange"])
    eval: EvalParams = EvalParams()
    promote: PromoteParams = PromoteParams()
    tracking: TrackingParams = TrackingParams()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        from flowbp_ops.methods import ALL_METHODS

        unknown = [m for m in value if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
        if not value:
            raise ValueError("give at least one method")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:N, cuda:auto or mps")
        return value

    @field_validator("world_dir", "data_dir")
    @classmethod
    def _folder(cls, value: str) -> str:
        if not value.strip() or "\0" in value or "://" in value:
            raise ValueError(f"{value!r}: give a local folder")
        return value

    @model_validator(mode="after")
    def _methods_fit_the_run(self) -> "Params":
        """Every method's axes (with train.method_overrides) on this run's N, and a metric evaluation makes."""
        for method in dict.fromkeys([*self.methods, self.train.method]):
            try:
                self.train_config(method).check_method()
            except ConfigError as exc:
                raise ValueError(f"train.method_overrides do not fit method {method} at train.rollout_steps="
                                 f"{self.train.rollout_steps}: {exc}") from None
        if self.promote_metric() not in self.metrics():
            raise ValueError(f"promote.metric={self.promote.metric!r} is not a metric the evaluation writes; "
                             f"choose from {', '.join(self.metrics())}")
        return self

    def judge_metric(self) -> str | None:
        """The held-out judge's headline metric, if this run has a judge (the world's, else a served VLM)."""
        from flowbp_ops.backbones.table import get_backbone

        built_in = get_backbone(self.train.backbone).judge_metrics
        return built_in[0] if built_in else "judge/alignment" if self.eval.judge_url else None

    def promote_metric(self) -> str:
        return self.promote.metric or self.judge_metric() or f"reward/{self.train.reward}"

    def metrics(self) -> list[str]:
        """The evaluation's per-variant metric names (what promotion can rank by)."""
        from flowbp_ops.rewards.base import parse_spec

        names = list(dict.fromkeys([self.train.reward, *self.eval.rewards]))
        out = [f"reward/{n}" for n in names] + ["diversity"]
        from flowbp_ops.backbones.table import get_backbone

        out += list(get_backbone(self.train.backbone).judge_metrics)  # the world's judge (GenEval in miniature)
        if self.eval.judge_url:
            out += ["judge/alignment", "judge/quality"]
        assert all(parse_spec(n) for n in names)
        return out

    @model_validator(mode="after")
    def _backbone_matches_base_model(self) -> "Params":
        default_model, default_backbone = self.base_model.source == "default", self.train.backbone == "default"
        if default_model != default_backbone:
            raise ValueError(f"base_model.source={self.base_model.source!r} with train.backbone="
                             f"{self.train.backbone!r}: the default world's model trains as backbone 'default', "
                             f"a real model as {' or '.join(REAL)} (see `flowbp preset --list`)")
        return self

    def train_config(self, method: str) -> TrainConfig:
        """``method``'s run: ``train`` with the method overrides of its family (``policy.*`` for the policy-gradient
        methods, the four axes for the others), so one params.yaml trains both families side by side."""
        from flowbp_ops.policy.config import is_policy

        own = [o for o in self.train.method_overrides if o.strip().startswith("policy.") == is_policy(method)]
        return self.train.model_copy(update={"method": method, "method_overrides": own})


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read ``params.yaml`` and apply ``section.key=value`` overrides; everything is validated here, before
    any stage reads, deletes or writes a file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found: give an existing file with --params (the repository's "
                          "params.yaml, or one from `flowbp preset NAME --out FILE`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (world_dir, train, ...), got {type(data).__name__}")
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
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {p} is not a section")
        node[leaf] = value
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        from flowbp_ops.errors import fields

        raise ConfigError(f"{origin}: {fields(exc)}") from None


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
