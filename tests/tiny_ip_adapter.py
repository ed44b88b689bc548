"""A tiny IP-Adapter for the tiny SDXL in the published h94/IP-Adapter layout: the product's builders
(engine/tiny/adapters.py, which documents the layout), plus the helpers the layout tests share."""

from __future__ import annotations

import torch

from engine.tiny.adapters import IP_NUM_TOKENS as NUM_TOKENS  # noqa: F401
from engine.tiny.adapters import (  # noqa: F401
    build_tiny_image_encoder,
    resampler_state_dict,
    save_tiny_ip_adapter,
    save_tiny_ip_adapter_plus,
    tiny_ip_adapter_plus_state_dict,
    tiny_ip_adapter_state_dict,
)


def fresh_pipe(model_dir):
    """diffusers' own SDXL pipeline on the tiny weights, with no adapter loaded yet."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_np(pipe, **kwargs):
    """A fixed 64x64, 2-step, seed-7 run of `pipe` (an adapter's effect is the only difference)."""
    return pipe("a portrait", negative_prompt="", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(7), **kwargs).images


def resampler_keys(prefix: str, depth: int) -> set[str]:
    """The key names of IP-Adapter's Resampler layout (without `latents`: FaceID's has none), for layout tests."""
    keys = {f"{prefix}.{m}.{p}" for m in ("proj_in", "proj_out", "norm_out") for p in ("weight", "bias")}
    for layer in range(depth):
        block = f"{prefix}.layers.{layer}"
        keys |= {f"{block}.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
        keys |= {f"{block}.0.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
        keys |= {f"{block}.1.0.weight", f"{block}.1.0.bias", f"{block}.1.1.weight", f"{block}.1.3.weight"}
    return keys
