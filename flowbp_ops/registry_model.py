"""The registered model: a pyfunc that loads the base model plus the trained adapter and draws images.

    model = mlflow.pyfunc.load_model("models:/flowbp-default@champion")
    images = model.predict(["a small red 7 on the left"], params={"steps": 20, "guidance": 4.0, "seed": 42})

``predict`` returns uint8 images (B, H, W, 3). The default world's generator is not a
diffusers pipeline (its text encoder is MiniLM), so it is wrapped here; the real backbones
can use ``mlflow.diffusers`` the same way with their pipelines.
"""

from __future__ import annotations

import mlflow.pyfunc


class FlowbpImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from flowbp_ops.adapters import load_lora
        from flowbp_ops.backbones.default import DefaultBackbone

        self.backbone = DefaultBackbone(context.artifacts["base"])
        load_lora(self.backbone.transformer, context.artifacts["adapter"])

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
