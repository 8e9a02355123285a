"""A variant's trained weights, saved and loaded: a LoRA adapter in diffusers' format
(``pytorch_lora_weights.safetensors`` with ``transformer.`` keys), or a fully fine-tuned ``transformer/``.

Saved through the SD3 pipeline's own ``save_lora_weights`` (so SD3 pipelines' ``load_lora_weights``
read them) and loaded back onto a transformer with diffusers' ``load_lora_adapter``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp_ops.atomic import atomic_path
from flowbp_ops.integrity import seal, verify
from flowbp_ops.storage import canonical_header

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_lora(transformer: torch.nn.Module, out_dir: str | Path, adapter_name: str = "default",
              pipeline_class: str = "StableDiffusion3Pipeline") -> Path:
    """Write the adapter with the matching pipeline's ``save_lora_weights`` (SD3: ``StableDiffusion3Pipeline``,
    FLUX.1: ``FluxPipeline``), so that pipeline's ``load_lora_weights`` reads it."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"the transformer has no LoRA adapter {adapter_name!r} to save")
    meta = {k: (sorted(v) if isinstance(v, set) else v)
            for k, v in transformer.peft_config[adapter_name].to_dict().items()}
    layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    with atomic_path(out_dir) as tmp:
        getattr(diffusers, pipeline_class).save_lora_weights(tmp, transformer_lora_layers=layers,
                                                             transformer_lora_adapter_metadata=meta)
        canonical_header(tmp / WEIGHT_NAME)
        seal(tmp)
    return Path(out_dir) / WEIGHT_NAME



def load_lora(transformer: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = "flowbp") -> None:
    path = Path(adapter_dir)
    if not (path / WEIGHT_NAME).exists():
        raise FileNotFoundError(f"no {WEIGHT_NAME} in {path}: pass the weights/ folder `flowbp train` wrote")
    transformer.load_lora_adapter(str(path), weight_name=WEIGHT_NAME, use_safetensors=True, prefix="transformer",
                                  adapter_name=adapter_name)


def save_trained(backbone, finetune: str, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """A run's trained weights: the LoRA file, or under full fine-tuning the whole transformer
    (``transformer/`` in ``save_pretrained`` layout, the EMA weights when EMA is on). ``state_dict``: the
    transformer's weights gathered from FSDP2 shards (written in the same layout: config + sharded
    safetensors with their index, as diffusers reads them)."""
    if finetune == "lora":
        return save_lora(backbone.transformer, out_dir,
                         pipeline_class=getattr(backbone, "pipeline_class", "StableDiffusion3Pipeline"))
    with atomic_path(out_dir) as tmp:
        if state_dict is None:
            backbone.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        else:
            from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
            from huggingface_hub import save_torch_state_dict

            backbone.transformer.save_config(tmp / "transformer")
            stem = SAFETENSORS_WEIGHTS_NAME.removesuffix(".safetensors")
            save_torch_state_dict(state_dict, tmp / "transformer", filename_pattern=stem + "{suffix}.safetensors",
                                  max_shard_size="10GB")
            assert (tmp / "transformer" / SAFETENSORS_WEIGHTS_NAME).exists() or \
                (tmp / "transformer" / SAFE_WEIGHTS_INDEX_NAME).exists()
        seal(tmp)
    return Path(out_dir) / "transformer"


def load_trained(backbone, trained_dir: str | Path) -> None:
    """Put what ``save_trained`` wrote onto ``backbone``: a LoRA adapter, or a fully fine-tuned transformer;
    its bytes checked against the manifest written with it."""
    path = Path(trained_dir)
    verify(path, "the trained weights", "retrain the variant (or restore it: scripts/dvc checkout)")
    if (path / WEIGHT_NAME).exists():
        load_lora(backbone.transformer, path)
        return
    if not (path / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"{path} holds neither {WEIGHT_NAME} nor transformer/: pass the weights/ folder "
                                "a training run wrote")
    base = backbone.transformer
    cls, dtype, device = type(base), base.dtype, next(base.parameters()).device
    del base
    backbone.transformer = None  # drop the base transformer before the tuned one reaches the device
    if hasattr(backbone, "pipe"):
        backbone.pipe.transformer = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    new = cls.from_pretrained(path / "transformer", torch_dtype=dtype, use_safetensors=True)
    backbone.transformer = new.to(device).eval()
    if hasattr(backbone, "pipe"):  # the real backbones also hand the transformer to their diffusers pipeline
        backbone.pipe.transformer = backbone.transformer
