"""How fast the engine runs its models: `eager`, `compiled` or `max` (Engine.load(speed=...)).

compiled: the UNet, the VAE decoder and every ControlNet through torch.compile with fullgraph=True and
dynamic=False, in channels_last, with inductor settings from diffusers' published "fast diffusion" recipe
(CUDA: max-autotune with CUDA graphs; CPU: inductor's defaults).
max: compiled, plus fused QKV projections (the engine unfuses them while a LoRA is active, since peft's
LoRA layers wrap to_q/to_k/to_v and a fused processor would skip them).

Compiled graphs are specialised to a shape: one per (size, batch, CFG on/off, adapter set). dynamo keeps
them all (up to `recompile_limit`, raised here so that a server never drops a shape it has seen), and
inductor's cache on disk (<refgen cache>/torch unless TORCHINDUCTOR_CACHE_DIR is set) lets a second process
load the compiled kernels instead of compiling them again.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .errors import RefgenError

SPEEDS = ("eager", "compiled", "max")

# diffusers' "accelerate inference of text-to-image diffusion models" recipe, as inductor options.
CUDA_OPTIONS = {
    "max_autotune": True,  # what mode="max-autotune" sets, with the CUDA graphs below
    "triton.cudagraphs": True,
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}
# On a CPU inductor's defaults: 0.92 of diffusers eager's time (full-size SDXL, bf16, 128 px, 4 steps, paired runs,
# benchmarks/RESULTS.md), and a second process loads the compiled graphs from the cache (16 s instead of ~100 s).
# Freezing the weights into the graph was no faster for a whole generation (0.885 in one unpaired run), and
# AOTAutograd's cache refuses frozen graphs by design, so every process start would trace and freeze again.
# Speed(options={"freezing": True}) still asks for it.
CPU_OPTIONS: dict = {}


class SpeedError(RefgenError, ValueError):
    """A speed setting that cannot work with the other load options."""


@dataclass(frozen=True)
class Speed:
    """What a speed mode does to the loaded models. `backend` is torch.compile's (a callable for tests)."""

    name: str = "eager"
    compile: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    quantize: Optional[str] = None  # "int8" | "fp8": the UNet's Linear layers through torchao (engine/quantize.py)
    backend: Any = "inductor"
    options: dict = field(default_factory=dict)
    recompile_limit: int = 64  # graphs kept per model: sizes x batches x CFG on/off x adapter sets

    def compiling(self):
        """The dynamo settings every call of a compiled model runs under (none when nothing is compiled)."""
        if not self.compile:
            return nullcontext()
        return torch._dynamo.config.patch(recompile_limit=self.recompile_limit,
                                          accumulated_recompile_limit=max(256, 4 * self.recompile_limit))


def speed_for(speed: Union[str, Speed], device: torch.device, offload: bool = False, quantize: Optional[str] = None) -> Speed:
    """The Speed for a mode name on this device (a Speed is taken as given). auto: compiled on a GPU without
    offload, else eager. quantize: int8 | fp8 Linear layers in the UNet, with any mode."""
    if speed == "auto":  # compiled where it pays and is safe: a GPU holding its weights
        speed = "compiled" if device.type == "cuda" and not offload else "eager"
    if isinstance(speed, Speed):
        plan = speed
    elif speed not in SPEEDS:
        raise SpeedError(f"speed must be auto or one of {', '.join(SPEEDS)}, not {speed!r}")
    elif speed == "eager":
        plan = Speed()
    else:
        options = CUDA_OPTIONS if device.type == "cuda" else CPU_OPTIONS
        plan = Speed(speed, compile=True, channels_last=True, fuse_qkv=speed == "max", options=dict(options))
    if quantize:
        from .quantize import check_quantization

        check_quantization(quantize, device)
        plan = replace(plan, quantize=quantize)
    if plan.compile and offload:
        raise SpeedError("offload moves weights between devices on every call, which compiled graphs cannot follow: "
                         "use speed='eager' with offload=True")
    return plan


def apply_speed(pipe, speed: Speed) -> None:
    """Prepare the loaded pipeline's UNet and VAE decoder for this speed (the models are changed in place)."""
    prepare_unet(pipe.unet, speed)
    prepare_module(pipe.vae.decoder, speed)


def prepare_unet(unet, speed: Speed):
    """A UNet (the model's, or an inpainting UNet loaded later) for this speed: fused, then quantized (torchao
    quantizes the fused projections too), then compiled (torchao's tensors must exist when dynamo traces)."""
    if speed.fuse_qkv:
        unet.fuse_qkv_projections()
    if speed.quantize:
        from .quantize import quantize_unet

        quantize_unet(unet, speed.quantize, unet.device)
    return prepare_module(unet, speed)


def prepare_module(module: torch.nn.Module, speed: Speed) -> torch.nn.Module:
    """channels_last and torch.compile (in place: the module stays the object adapters know) as the speed says."""
    if speed.channels_last:
        module.to(memory_format=torch.channels_last)
    if speed.compile:
        use_persistent_cache()
        options = {"options": dict(speed.options)} if speed.options and isinstance(speed.backend, str) else {}
        module.compile(backend=speed.backend, fullgraph=True, dynamic=False, **options)
    return module


def use_persistent_cache() -> Path:
    """Inductor's compiled kernels and graphs kept in refgen's cache folder, so that a second process start
    loads them rather than compiling again. A TORCHINDUCTOR_CACHE_DIR the user set is kept."""
    from .paths import cache_dir

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "torch")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


@contextmanager
def unfused_attention(unet) -> Iterator[None]:
    """The UNet's attention with separate q/k/v projections for the block (LoRA layers wrap those); the fused
    processors come back after. The unfused processors are made once and kept, so a compiled UNet sees the
    same objects on every LoRA request and does not recompile."""
    fused = getattr(unet, "original_attn_processors", None) is not None and _fused_processors(unet)
    if not fused:
        yield
        return
    unet.set_attn_processor(dict(unet.original_attn_processors))  # as fuse_qkv_projections saved them (diffusers empties the dict)
    try:
        yield
    finally:
        unet.set_attn_processor(fused)


def _fused_processors(unet) -> Optional[dict]:
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    processors = unet.attn_processors
    return processors if any(isinstance(p, FusedAttnProcessor2_0) for p in processors.values()) else None


__all__ = ["SPEEDS", "Speed", "SpeedError", "speed_for", "apply_speed", "prepare_unet", "prepare_module", "unfused_attention",
           "use_persistent_cache"]
