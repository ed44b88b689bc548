"""VAE encode/decode with the fp16 safety net.

SDXL's original VAE overflows in fp16 (its config says force_upcast): the engine keeps it in fp32
(keep_in_work_dtype); the fp16-fix VAE and bf16 decode in half precision. A half-precision decode that
yields NaN/inf is retried once in fp32 before it is reported.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import NonFiniteOutputError


def cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to the output size, so an init image (and its mask) is never distorted."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.LANCZOS)


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) * 2.0 - 1.0


def pixels_to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images (rounded like diffusers)."""
    return [Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in pixels]


def _needs_upcast(vae) -> bool:
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def keep_in_work_dtype(vae) -> None:
    """A VAE that overflows in fp16 (SDXL's original: force_upcast) is kept in fp32 once, at load, rather than
    cast there and back on every call; the fp16-fix VAE and bf16 stay in half precision."""
    if _needs_upcast(vae):
        vae.to(dtype=torch.float32)


def _run_in(vae, dtype, fn):
    """Call fn with the VAE temporarily in `dtype` (restored afterwards)."""
    original = vae.dtype
    if original == dtype:
        return fn()
    vae.to(dtype=dtype)
    try:
        return fn()
    finally:
        vae.to(dtype=original)


def encode(vae, pixels: torch.Tensor, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents; image i's latent sample uses generator i.

    `device` is the execution device: with model offload the VAE's weights sit on the CPU until
    its hook moves them, so the weights' device is not where the work happens.
    """
    work_dtype = torch.float32 if _needs_upcast(vae) else vae.dtype

    def run():
        with torch.inference_mode():
            batch = pixels.to(device=device, dtype=work_dtype)
            samples = [
                vae.encode(batch[i : i + 1]).latent_dist.sample(generator=generators[i]) for i in range(len(generators))
            ]
            return torch.cat(samples)

    latents = _run_in(vae, work_dtype, run)
    return (latents * vae.config.scaling_factor).to(dtype)


def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> (B, H, W, 3) float32 pixels in [0, 1]. Raises NonFiniteOutputError.

    The VAE runs in the dtype it is kept in (keep_in_work_dtype): no weight casts per call. Whether the latents
    and the pixels are finite is read in one host read, after the decode."""
    images = _decode(vae, latents, vae.dtype)
    latents_finite, images_finite = torch.stack([torch.isfinite(latents).all(), torch.isfinite(images).all()]).tolist()
    if not latents_finite:
        raise NonFiniteOutputError(
            "the sampler produced NaN/inf latents; try dtype=bfloat16 or float32, fewer LoRAs, or another scheduler"
        )
    if not images_finite and vae.dtype != torch.float32:  # a half-precision VAE overflowed: once more in fp32
        images = _run_in(vae, torch.float32, lambda: _decode(vae, latents, torch.float32))
        images_finite = bool(torch.isfinite(images).all())
    if not images_finite:
        raise NonFiniteOutputError("the VAE produced NaN/inf pixels even in float32")
    pixels = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    black = [index for index, frame in enumerate(pixels) if frame.max() < 1.0 / 255]
    if black:
        raise NonFiniteOutputError(f"image(s) {black} decoded all black; this is a numerical failure, not a result")
    return pixels


def _decode(vae, latents, dtype) -> torch.Tensor:
    with torch.inference_mode():
        scaled = latents.to(dtype=dtype) / vae.config.scaling_factor
        return vae.decode(scaled, return_dict=False)[0]
