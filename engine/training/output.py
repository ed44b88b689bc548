"""The trained LoRA as one `.safetensors` file: kohya-ss sd-scripts' keys (A1111, ComfyUI and diffusers' kohya
converter read them), kohya's `ss_*` metadata (what model sites and UIs show) and refgen's training record."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..images import write_atomic
from ..provenance import package_versions


def kohya_state_dict(unet, alpha: float, text_encoders: tuple = ()) -> dict[str, torch.Tensor]:
    """peft's trained factors -> kohya-ss sd-scripts' SDXL names, the layout A1111, ComfyUI, model sites and
    diffusers' own kohya converter read: `lora_unet_<SGM module path>`, `lora_te1_` / `lora_te2_` +
    `text_model_...`, each with `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`."""
    from peft import get_peft_model_state_dict

    named = [(lambda module: sd_scripts_unet_name(module, unet.config), unet)]
    named += [(lambda module, prefix=f"lora_te{number}": sd_scripts_text_name(module, prefix), encoder)
              for number, encoder in enumerate(text_encoders, start=1)]
    state: dict[str, torch.Tensor] = {}
    for name_of, model in named:
        for key, value in get_peft_model_state_dict(model).items():
            module, factor = key.rsplit(".lora_", 1)
            name = name_of(module)
            state[f"{name}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value.detach().float().cpu().contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def sd_scripts_unet_name(module: str, config) -> str:
    """A diffusers UNet attention-block module -> its sd-scripts LoRA name, numbered as Stability's original
    (SGM) UNet numbers its blocks: input_blocks.0 is conv_in, each down level has layers_per_block [resnet,
    transformer] blocks plus a downsampler block; middle_block.1 is the transformer; each up level has
    layers_per_block + 1 blocks. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (SDXL)."""
    parts = module.split(".")
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block
    per_level = list(per_level) if isinstance(per_level, (list, tuple)) else [per_level] * levels
    if parts[0] == "mid_block" and parts[1] == "attentions":
        block, rest = "middle_block.1", parts[3:]
    elif parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
        level, index = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            block = f"input_blocks.{1 + sum(per_level[i] + 1 for i in range(level)) + index}.1"
        else:
            up_per_level = [count + 1 for count in reversed(per_level)]
            block = f"output_blocks.{sum(up_per_level[:level]) + index}.1"
        rest = parts[4:]
    else:
        raise ValueError(f"{module} is not inside a UNet attention block: sd-scripts has no name for it here")
    return "lora_unet_" + ".".join([block, *rest]).replace(".", "_")


def sd_scripts_text_name(module: str, prefix: str) -> str:
    """A CLIP text-encoder module -> `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` (transformers 5
    dropped CLIPTextModel's `text_model` level; sd-scripts' names keep it)."""
    path = module if module.startswith("text_model.") else f"text_model.{module}"
    return f"{prefix}_{path.replace('.', '_')}"


def training_metadata(request, images, report, steps: int, class_images: list = ()) -> dict[str, str]:
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
        "class_images": [{"path": str(image.path), "sha256": image.sha256} for image in class_images],
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
        "ss_text_encoder_lr": str(request.text_encoder_learning_rate if request.train_text_encoder else 0),
        "ss_network_train_unet_only": str(not request.train_text_encoder),
        "ss_train_batch_size": str(request.batch_size),
        "ss_gradient_accumulation_steps": str(request.gradient_accumulation),
        "ss_gradient_checkpointing": str(request.gradient_checkpointing),
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if request.optimizer == "adamw8bit" else "torch.optim.AdamW",
        "ss_mixed_precision": request.precision,
        "ss_seed": str(request.seed),
        "ss_num_train_images": str(len(images)),
        "ss_num_reg_images": str(len(class_images)),
        "ss_prior_loss_weight": str(request.prior_loss_weight if class_images else 1.0),
        "ss_output_name": request.name,
        "ss_tag_frequency": json.dumps({request.name: tags}),
        "ss_trigger_words": json.dumps([request.trigger]),
        "refgen_training": json.dumps(refgen, sort_keys=True),
    }


def save_lora(unet, request, images, report, steps: int, path: Path, text_encoders: tuple = (),
              class_images: list = ()) -> Path:
    from safetensors.torch import save

    data = save(kohya_state_dict(unet, request.network_alpha, text_encoders),
                metadata=training_metadata(request, images, report, steps, class_images))
    return write_atomic(path, data)
