"""After the base pass: quality/ultra mode's refine at the larger size, and the plain `upscale=` step."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .request import ResolvedRequest, default_upscaler
from .tiling import blend_tiles

# pixels (B, 3, h, w) in [-1, 1], whole picture or one tile -> refined and decoded (B, h, w, 3) in [0, 1]
RefinePass = Callable[[torch.Tensor, bool], np.ndarray]


def refine(pixels: np.ndarray, resolved: ResolvedRequest, native_size: int, align: int, esrgan, run: RefinePass) -> np.ndarray:
    """Quality/ultra: upsample, then denoise lightly again so detail is added at the new size.

    Up to 1.5x the model's native size the refine is one pass over the whole picture (with the request's
    ControlNets); beyond it, overlapping native-size tiles are refined one after another and blended.
    `esrgan(reference)` gives a loaded upscaler.
    """
    width, height = resolved.refined_size
    if resolved.refine_upsampler == "esrgan":
        pixels = esrgan(refine_upscaler(resolved)).upscale_pixels(pixels)
    upsampled = resize_pixels(pixels, width, height) * 2 - 1
    if max(width, height) <= int(native_size * 1.5):
        return run(upsampled, True)
    tile = (min(height, native_size), min(width, native_size))
    one_tile = lambda part: torch.from_numpy(run(part, False)).permute(0, 3, 1, 2)  # noqa: E731 - (B, 3, h, w) in [0, 1]
    blended = blend_tiles(upsampled, tile, overlap=native_size // 4, run=one_tile, align=align)
    return blended.permute(0, 2, 3, 1).numpy()


def upscale(pixels: np.ndarray, resolved: ResolvedRequest, esrgan) -> np.ndarray:
    """The plain `upscale=` step: ESRGAN only, resized to the exact factor when the model's differs."""
    upscaler = esrgan(upscale_upscaler(resolved))
    height, width = pixels.shape[1] * resolved.upscale, pixels.shape[2] * resolved.upscale
    return resize_pixels(upscaler.upscale_pixels(pixels), width, height).permute(0, 2, 3, 1).numpy()


def upscalers_used(resolved: ResolvedRequest) -> list[str]:
    """The ESRGAN models a request runs, by reference (for provenance)."""
    used = [refine_upscaler(resolved)] if resolved.refine_upsampler == "esrgan" else []
    return used + ([upscale_upscaler(resolved)] if resolved.upscale else [])


def refine_upscaler(resolved: ResolvedRequest) -> str:
    """Ultra mode's ESRGAN: the request's, else the x2 default (the refine goes up 2x)."""
    return resolved.upscaler or default_upscaler(2)


def upscale_upscaler(resolved: ResolvedRequest) -> str:
    """The `upscale=` step's ESRGAN: the request's, else the default of its factor."""
    return resolved.upscaler or default_upscaler(resolved.upscale)


def resize_pixels(pixels: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(B, H, W, 3) floats -> (B, 3, height, width) in [0, 1] (bicubic; unchanged when already that size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    if tensor.shape[2:] == (height, width):
        return tensor
    return torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
