"""Every backbone, declared once: what the CLI, the settings, the method presets, the recipes, the loader, the
evaluation, ``flowbp doctor`` and the tests read about a model family (its diffusers pipeline, LoRA targets,
sigma schedule, hub id, recipe, evaluation grid and batch, held-out judge). Adding a backbone: a module with
its implementation (a ``PipelineBackbone`` subclass naming the row) and a row here.

The implementation, the tiny pipeline and the judge are named as ``module:attribute`` and imported only when
used, so settings are checked against this table without importing diffusers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from flowbp_ops.judges.geneval import TAGS as GENEVAL_TAGS
from flowbp_ops.surrogate.config import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    schedule: str  # "static" | "flux1" | "flux2": how the sigma grid is built (flowbp_ops.backbones.schedules)
    shift: float = 1.0  # the static shift
    hyper_from: str = ""  # whose published method hyperparameters it uses (flowbp_ops.methods); "": its own
    implementation: str | None = None  # "module:Class" that loads and runs it (None: the default world's, a test's)
    hub_id: str | None = None  # the published model the recipe trains
    eval_steps: int | None = None  # the recipe's evaluation sampling steps
    guidance: float | None = None  # the recipe's guidance (evaluation and training rollouts)
    # the authors' per-GPU batch per method (spec section 4) and extra micro-batches (spec §6.3)
    batch: dict[str, int] = field(default_factory=dict)
    micro_batches: dict[str, int] = field(default_factory=dict)
    tiny: str | None = None  # "module:function" building a random-init pipeline of this architecture (tests)
    pipeline_class: str | None = None  # the diffusers pipeline it loads (checked in model_index.json before download)
    lora_targets: tuple[str, ...] | str = ()  # the modules a LoRA adapter wraps (peft's target_modules)
    refuse: dict[str, str] = field(default_factory=dict)  # a model_index.json flag -> why that model is refused
    gated: bool = False  # the hub repo needs an accepted licence and a token (`flowbp doctor` checks access)
    eval_grid: str = "training"  # the recipe's evaluation sigma grid: "training" or the scheduler's own
    eval_batch: int = 4  # images per evaluation batch (512² real images decode in fp32)
    cfg_grad_compensate: tuple[str, ...] = ()  # methods whose recipe compensates the CFG gradient (spec §6.6)
    # the world's held-out judge ("module:function" of world_dir) and what it measures, the headline first (the
    # default promotion metric); a real backbone has none built in (serve a VLM judge: eval.judge_url)
    judge: str | None = None
    judge_metrics: tuple[str, ...] = ()

    def implementation_class(self):
        if self.implementation is None:
            raise ConfigError(f"backbone {self.name!r}: a real base model needs train.backbone = one of "
                              f"{', '.join(REAL)}")
        return _load(self.implementation)

    @property
    def hyperparameters(self) -> str:
        return self.hyper_from or self.name


def _load(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


# the attention projections of the joint blocks (image and text streams), as diffusers' SD3 LoRA recipe
_SD3_LORA = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# double-stream attention as FLUX.1, plus the single-stream blocks' fused input projection and their output
# projection (a plain Linear named `attn.to_out` there, a ModuleList in the double-stream blocks): peft takes
# a regex over full module names
_FLUX2_LORA = (r".*(?:\.(?:" + "|".join(t.replace(".", r"\.") for t in _SD3_LORA + ("to_qkv_mlp_proj",))
               + r")|single_transformer_blocks\.\d+\.attn\.to_out)$")
# per-GPU batches (spec section 4); DRaFT-K and AlignProp (exact references, not in the recipe) as DRaFT-LV
_B = ("refl", "flowbp_sparse", "drtune", "flowbp_bridge", "flowbp_lagrange", "leapalign", "draft_lv", "draft_k",
      "alignprop")
BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in [
    BackboneSpec("sd35", "Stable Diffusion 3.5 Medium (static shift 3, real CFG)", "static", shift=3.0,
                 implementation="flowbp_ops.backbones.sd35:SD35Backbone",
                 hub_id="stabilityai/stable-diffusion-3.5-medium",
                 eval_steps=40, guidance=3.5, batch=dict(zip(_B, (8, 8, 8, 8, 8, 8, 4, 4, 4))),
                 tiny="flowbp_ops.backbones.tiny:tiny_sd35_pipeline", pipeline_class="StableDiffusion3Pipeline",
                 lora_targets=_SD3_LORA, gated=True, eval_grid="scheduler"),
    BackboneSpec("flux1", "FLUX.1-dev (dynamic mu shift, guidance embedding)", "flux1",
                 implementation="flowbp_ops.backbones.flux1:Flux1Backbone", hub_id="black-forest-labs/FLUX.1-dev",
                 eval_steps=50, guidance=4.0, batch=dict(zip(_B, (4, 4, 4, 8, 8, 8, 4, 4, 4))),
                 tiny="flowbp_ops.backbones.tiny:tiny_flux1_pipeline", pipeline_class="FluxPipeline",
                 lora_targets=_SD3_LORA, gated=True),
    BackboneSpec("flux2", "FLUX.2-Klein-base (empirical mu shift, real CFG)", "flux2",
                 implementation="flowbp_ops.backbones.flux2:Flux2Backbone",
                 hub_id="black-forest-labs/FLUX.2-klein-base-9B",
                 eval_steps=50, guidance=4.0, batch=dict(zip(_B, (4, 4, 4, 4, 4, 4, 2, 2, 2))),
                 micro_batches={"draft_lv": 2}, tiny="flowbp_ops.backbones.tiny:tiny_flux2_pipeline",
                 # the 9B models carry the FLUX non-commercial licence (accepted on the hub; a check of an
                 # ungated repo passes all the same)
                 pipeline_class="Flux2KleinPipeline", lora_targets=_FLUX2_LORA, gated=True,
                 cfg_grad_compensate=("flowbp_lagrange",),
                 refuse={"is_distilled": "a step-distilled Klein (no CFG): fine-tune the base model, e.g. "
                                         "hf://black-forest-labs/FLUX.2-klein-base-9B"}),
    # the default world's small model and the random-init DiT of tests and gradcheck are SD3 architectures with
    # real CFG: they borrow SD3.5's hyperparameters
    BackboneSpec("default", "the default world's small SD3-architecture model (static shift 3)", "static",
                 shift=3.0, hyper_from="sd35", lora_targets=_SD3_LORA, eval_batch=64,
                 judge="flowbp_ops.world.judge:load_judge",
                 judge_metrics=("geneval/overall",) + tuple(f"geneval/{t}" for t in GENEVAL_TAGS)),
    BackboneSpec("tiny", "small random-init SD3-architecture DiT (tests, gradcheck)", "static", shift=3.0,
                 hyper_from="sd35", lora_targets=_SD3_LORA),
]}
REAL = tuple(n for n, s in BACKBONES.items() if s.implementation)


def lora_targets(name: str) -> list[str] | str:
    """peft's ``target_modules`` for this backbone: module names, or one regex over full names."""
    targets = get_backbone(name).lora_targets
    return targets if isinstance(targets, str) else list(targets)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None


def judge_for(name: str, world_dir):
    """The held-out judge of a backbone's world (the default world's GenEval-style judge), else None (plug a real
    GenEval detector into :func:`flowbp_ops.judges.geneval.score_geneval`, or serve a VLM judge)."""
    spec = get_backbone(name)
    return _load(spec.judge)(world_dir) if spec.judge else None


def tiny_pipeline(name: str, seed: int = 0):
    spec = get_backbone(name)
    if spec.tiny is None:
        raise ValueError(f"backbone {name!r} has no tiny pipeline (the real ones: {', '.join(REAL)})")
    return _load(spec.tiny)(seed)
