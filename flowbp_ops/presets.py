"""The authors' final recipe (spec section 4) as presets: ``<backbone>/<method>``, e.g. ``sd35/flowbp_lagrange``.

A preset is a whole ``Params`` (pipeline settings): 25-step training rollouts at 512×512, the
backbone's guidance, the method's published hyperparameters (``flowbp_ops.methods`` presets
per backbone), their per-GPU batch and global batch (× 8 GPUs: reached on fewer processes by gradient
accumulation, `train.global_batch`), full fine-tuning in bf16 with gradient checkpointing, AdamW
(0.9, 0.999, 1e-8), lr 1e-5, weight decay 1e-4, clip 1.0, EMA 0.995, 300 steps, the hinge at
r_max = 0.55 on HPSv2.1; evaluation on the 400 HPDv2 eval prompts shipped in
``flowbp_ops/data`` with 40 steps CFG 3.5 (SD3.5) or 50 steps guidance 4.0 (FLUX). LoRA instead
of full fine-tuning: ``--set train.finetune=lora``.
"""

from __future__ import annotations

from importlib import resources

from flowbp_ops.backbones.table import BACKBONES as _TABLE
from flowbp_ops.methods import METHODS
from flowbp_ops.params import Params
from flowbp_ops.rewards.base import BUILTIN as REWARDS

# the per-GPU batch (spec section 4, in the backbone table) on the authors' 8 GPUs; the global batch is their
# product (spec §6.3), times the backbone's extra micro-batches (FLUX.2 DRaFT-LV: 2). A run on G processes with
# room for `batch` each accumulates global / (G·batch).
AUTHORS_GPUS = 8
BACKBONES = {n: s for n, s in _TABLE.items() if s.hub_id}
# trained on HPSv2.1, held out on PickScore and ImageReward, evaluated on those, CLIPScore and HPSv3
RECIPE_REWARDS = ("hpsv2", "pickscore", "imagereward", "clipscore", "hpsv3")

def hpdv2_eval_prompts() -> str:
    return str(resources.files("flowbp_ops") / "data" / "hpdv2_eval_prompts.txt")


def preset_names() -> list[str]:
    return [f"{b}/{m}" for b in BACKBONES for m in METHODS if m != "custom"]


def describe(name: str) -> str:
    """One line of what a preset follows: global batch, EMA rule, numerics, evaluation grid."""
    p = get_preset(name)
    t = p.train
    micro = t.global_batch // (t.batch * AUTHORS_GPUS)
    return (f"{name:28s} global batch {t.global_batch} (= {t.batch}/GPU × {AUTHORS_GPUS} GPUs"
            f"{f' × {micro} micro-batches' if micro > 1 else ''}), EMA {t.ema} "
            f"{'with warm-up' if t.ema_warmup else 'fixed from step 1'}, numerics {t.numerics}, evaluation "
            f"{p.rollouts.n_steps} steps on the {p.rollouts.grid} grid"
            f"{', CFG gradient compensation' if t.cfg_grad_compensate else ''}")


def get_preset(name: str) -> Params:
    backbone, _, method = name.partition("/")
    spec = BACKBONES.get(backbone)
    if spec is None or method not in spec.batch:
        methods = sorted({m for s in BACKBONES.values() for m in s.batch})
        raise ValueError(f"unknown preset {name!r}: presets are <backbone>/<method>, backbone one of "
                         f"{', '.join(BACKBONES)}, method one of {', '.join(methods)}")
    hub_id, eval_steps, guidance = spec.hub_id, spec.eval_steps, spec.guidance
    batch = spec.batch[method]
    global_batch = batch * AUTHORS_GPUS * spec.micro_batches.get(method, 1)
    return Params.model_validate({
        "world_dir": f"data/{backbone}",
        # SD3.5: T5 at 512 tokens for training and evaluation, as the authors (spec §6.8; joint attention has no
        # padding mask, so the length changes outputs); FLUX: their pipelines' 512 already
        "base_model": {"source": f"hf://{hub_id}", "max_sequence_length": 512},
        # training prompts: the user's file (the authors used HPDv2's train split, not shipped here)
        "prompts": {"source": "", "eval_source": hpdv2_eval_prompts()},
        # the published reward models (and, for a bare checkpoint, its base model's tokenizer): the reward table's
        "rewards": {"source": "", "models": {n: REWARDS[n].checkpoint for n in RECIPE_REWARDS},
                    "tokenizers": {n: REWARDS[n].tokenizer for n in RECIPE_REWARDS if REWARDS[n].tokenizer}},
        # evaluation sampling as the authors: SD3.5 on the scheduler's own grid (spec §6.9), FLUX on the training grid
        "rollouts": {"n_steps": eval_steps, "guidance": guidance, "n_prompts": 400, "shard_size": 8,
                     "grid": spec.eval_grid},
        "train": {"method": method, "backbone": backbone, "steps": 300, "batch": batch, "global_batch": global_batch,
                  "rollout_steps": 25,
                  "guidance": guidance, "reward": "hpsv2", "heldout_rewards": ["pickscore", "imagereward"],
                  "loss": "hinge", "r_max": 0.55, "finetune": "full", "lr": 1e-5, "weight_decay": 1e-4,
                  "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0, "precision": "bf16",
                  "ema": 0.995, "ema_warmup": False,  # a copy of the base weights, the fixed decay from step 1
                  "numerics": "authors",  # bf16 latents / noise / timesteps, bf16 decode, fp16 reward (spec §6.10)
                  # the CFG gradient compensation: on in the FLUX.2 Lagrange config only (spec §6.6)
                  "cfg_grad_compensate": method in spec.cfg_grad_compensate,
                  "gradient_checkpointing": True, "checkpoint_every": 50},
        "methods": [method],
        "eval": {"rewards": list(RECIPE_REWARDS)},
        "promote": {"model_name": f"flowbp-{backbone}"},
    })
