"""The trained LoRA as one `.safetensors` file: kohya keys (A1111, ComfyUI and diffusers' kohya converter read
them), kohya's `ss_*` metadata (what model sites and UIs show) and refgen's training record."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..images import write_atomic
from ..provenance import package_versions


def kohya_state_dict(unet, alpha: float) -> dict[str, torch.Tensor]:
    """peft's state dict -> kohya keys (`lora_unet_<diffusers module path>.lora_down.weight`, `.lora_up`,
    `.alpha`) through diffusers' own converter, the way its training script's --output_kohya_format does.
    The converter writes alpha = rank; the request's alpha replaces it."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict

    peft_state = {f"unet.{key}": value for key, value in get_peft_model_state_dict(unet).items()}
    state = convert_state_dict_to_kohya(peft_state)
    return {key: (torch.tensor(alpha) if key.endswith(".alpha") else value.detach().float().cpu().contiguous())
            for key, value in state.items()}


def training_metadata(request, images, report, steps: int) -> dict[str, str]:
    """kohya's ss_* keys (strings, as sd-scripts writes them) and refgen's record of the run."""
    tags: dict[str, int] = {}
    for image in images:
        for tag in (part.strip() for part in image.caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    refgen = {
        "request": request.model_dump(mode="json"),
        "seed": request.seed,
        "steps": steps,
        "dataset": [{"path": str(image.path), "sha256": image.sha256, "caption": image.caption,
                     "bucket": list(image.bucket), "crop": image.crop} for image in images],
        "crop": report.crop,
        "skipped": report.skipped,
        "duplicates": report.duplicates,
        "packages": package_versions(),
    }
    return {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": request.base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(request.rank),
        "ss_network_alpha": str(request.network_alpha),
        "ss_resolution": f"({request.resolution}, {request.resolution})",
        "ss_enable_bucket": str(request.bucketing),
        "ss_bucket_info": json.dumps({"buckets": report.buckets}),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_epoch": str(request.epochs or 0),
        "ss_learning_rate": str(request.learning_rate),
        "ss_unet_lr": str(request.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_network_train_unet_only": "True",
        "ss_train_batch_size": str(request.batch_size),
        "ss_gradient_accumulation_steps": str(request.gradient_accumulation),
        "ss_gradient_checkpointing": str(request.gradient_checkpointing),
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if request.optimizer == "adamw8bit" else "torch.optim.AdamW",
        "ss_mixed_precision": request.precision,
        "ss_seed": str(request.seed),
        "ss_num_train_images": str(len(images)),
        "ss_output_name": request.name,
        "ss_tag_frequency": json.dumps({request.name: tags}),
        "ss_trigger_words": json.dumps([request.trigger]),
        "refgen_training": json.dumps(refgen, sort_keys=True),
    }


def save_lora(unet, request, images, report, steps: int, path: Path) -> Path:
    from safetensors.torch import save

    data = save(kohya_state_dict(unet, request.network_alpha), metadata=training_metadata(request, images, report, steps))
    return write_atomic(path, data)
