"""The registered model: a pyfunc that loads the base model plus the trained weights and draws images.

    model = mlflow.pyfunc.load_model("models:/flowbp-default@champion")
    images = model.predict(["a photo of a red seven"], params={"steps": 20, "guidance": 4.0, "seed": 42})

``predict`` returns uint8 images (B, H, W, 3). Used for the default world's model (not a
diffusers pipeline: its text encoder is MiniLM) and for fully fine-tuned real backbones (MLflow's
diffusers flavour holds LoRA adapters only); a real backbone's LoRA goes through that flavour.
"""

from __future__ import annotations

import mlflow.pyfunc
import torch


class FlowbpImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        from flowbp_ops.backbones.loading import RECORD, load_backbone
        from flowbp_ops.trained_weights import load_trained

        base = Path(context.artifacts["base"])
        # the default model ships its weights; a real backbone only its pin (hub id + commit, or path)
        kind = json.loads((base / RECORD).read_text())["backbone"] if (base / RECORD).exists() else "default"
        device = "cuda" if kind != "default" and torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(kind, base, device=device, disk_cache=False)
        # "adapter": the artifact's name in versions registered before the variant folder was called weights/
        weights = context.artifacts.get("weights") or context.artifacts["adapter"]
        load_trained(self.backbone, weights)  # a LoRA, or a fully fine-tuned transformer

    def predict(self, context, model_input, params: dict | None = None):
        from flowbp_ops.sampling import generate

        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame with a prompt column
            prompts = list(model_input["prompt"] if "prompt" in model_input.columns else model_input.iloc[:, 0])
        else:
            prompts = [model_input] if isinstance(model_input, str) else list(model_input)
        images = generate(self.backbone, [str(p) for p in prompts], int(params.get("steps", 20)),
                          params.get("guidance", 4.0), seed=int(params.get("seed", 42)))
        return (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
