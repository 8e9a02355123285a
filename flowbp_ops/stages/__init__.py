"""The pipeline's stages as library functions: what a Dagster asset, a DVC stage and ``flowbp stage`` each run.

Every stage reads ``Params`` (``params.yaml``), writes its outputs atomically under
``params.world_dir`` / ``params.data_dir`` and returns metadata (counts, checksums, timings, run ids).
The graph (order, inputs, outputs, checks, jobs) is declared once in ``graph.py``; ``runner.py`` runs
a stage with its lock and the shared store.
"""

from flowbp_ops.stages.compare import method_comparison, promoted_model
from flowbp_ops.stages.evaluate import evaluation, gates
from flowbp_ops.stages.paths import Paths, paths
from flowbp_ops.stages.prepare import (
           backbone_of,
           base_model,
           base_rollouts,
           eval_prompts,
           prompt_embeddings,
           prompt_sets,
           prompts_read,
           reward_models,
)
from flowbp_ops.stages.train import finite_weights, trained_variant, verified_variant

__all__ = ["Paths", "paths", "prompt_sets", "reward_models", "base_model", "prompt_embeddings", "prompts_read",
           "base_rollouts", "eval_prompts", "backbone_of", "trained_variant", "verified_variant", "finite_weights",
           "evaluation", "gates",
           "method_comparison", "promoted_model"]
