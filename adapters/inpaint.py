"""Inpainting (Magic Fill): repaint where the mask is white, keep everything else.

Two ways, chosen by the UNet that is loaded:
- base SDXL UNet (4 input channels): after every step the known region is replaced by the init
  image's latents noised to the next timestep, so only the masked region is generated;
- an SDXL inpainting UNet (9 input channels): the UNet also sees the mask and the latents of the
  masked image, as it was trained to.
Either way the decoded image is composited back onto the init image, so pixels outside the mask
are exactly the input's. `feather` softens the seam inside the mask edge only (never outside).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageFilter

from engine.adapter import Context, Prepared
from engine.conditioning import Guidance
from engine.errors import InvalidImageError
from engine.images import load_rgb
from engine.loading import INPAINT_CHANNELS
from engine.provenance import image_record, replay_image
from engine.request import GenerationRequest, ResolvedRequest
from engine.sampling import Start
from engine.vae import cover


class Inpainting:
    """Inpainting, an Adapter (engine/adapter.py): the request's mask over its init image. An inpainting
    UNet (Engine.load_inpaint_unet) serves masked requests when one is loaded."""

    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional["PreparedInpaint"]:
        if request.mask_image is None:
            refuse_unmasked(ctx.pipe.unet)
            return None
        mask = load_rgb(request.mask_image, "mask").convert("L")
        check_mask_size(mask, ctx.init_image)
        return PreparedInpaint(mask, ctx.init_image, request.mask_feather, image_record(request.mask_image, mask), ctx.inpaint_unet)

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional["PreparedInpaint"]:
        if resolved.mask_image is None:
            refuse_unmasked(ctx.pipe.unet)
            return None
        mask = replay_image(resolved.mask_image, "mask").convert("L")
        return PreparedInpaint(mask, ctx.init_image, resolved.mask_feather, resolved.mask_image, ctx.inpaint_unet)


def refuse_unmasked(unet) -> None:
    if unet.config.in_channels == INPAINT_CHANNELS:
        raise ValueError("this model is an inpainting model: give an init_image and a mask_image")


class PreparedInpaint(Prepared):
    def __init__(self, mask: Image.Image, init: Image.Image, feather: int, record: dict, inpaint_unet=None):
        self._mask, self._init, self._feather, self._record, self._unet = mask, init, feather, record, inpaint_unet

    def record(self) -> dict:
        return {"mask_image": self._record}

    def unet(self, unet):
        return unet if self._unet is None else self._unet

    def start(self, start: Start) -> tuple[torch.Tensor, Guidance]:
        """Start latents and the mask's guidance. Random draws per image follow diffusers' inpaint order."""
        batch, factor = len(start.generators), start.pipe.vae_scale_factor
        pixels = start.batch_pixels()
        repaint = mask_tensor(cover(self._mask, start.width, start.height))  # the same crop as the init image
        small = latent_mask(repaint, pixels.shape[2] // factor, pixels.shape[3] // factor)
        small = small.repeat(batch, 1, 1, 1).to(start.device, start.dtype)
        nine_channels = start.unet.config.in_channels == INPAINT_CHANNELS
        from_noise = start.denoise >= 1.0
        known = None if (nine_channels and from_noise) else start.encode(pixels)
        latents, noise = start.noised(None if from_noise else known)
        if nine_channels:
            return latents, InpaintGuidance(small, start.guided, masked_latents=start.encode(masked_pixels(pixels, repaint)))
        return latents, InpaintGuidance(small, start.guided, known_latents=known, noise=noise)

    def decoded(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels outside the mask are exactly the init image's."""
        height, width = pixels.shape[1:3]
        return composite(pixels, cover(self._init, width, height), cover(self._mask, width, height), self._feather)


def check_mask_size(mask: Image.Image, init: Image.Image) -> None:
    if mask.size != init.size:
        raise InvalidImageError(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is {init.size[0]}x{init.size[1]}: "
            "they must be the same size"
        )


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, 1, H, W) with 1 = repaint, from a mask already fitted to the output size (binarised at 0.5)."""
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]


def masked_pixels(init_pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The init image with the region to repaint blanked (what an inpainting UNet is shown)."""
    return init_pixels * (mask < 0.5)


def latent_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(mask, size=(latent_height, latent_width))


class InpaintGuidance(Guidance):
    """The mask's contribution to the loop, for either kind of UNet."""

    def __init__(self, mask: torch.Tensor, guided: bool, known_latents=None, noise=None, masked_latents=None):
        self._mask = mask  # (B, 1, h, w) at latent size
        self._known = known_latents  # base UNet: clean latents of the init image
        self._noise = noise  # base UNet: the noise the start latents were made with
        self._masked = masked_latents  # inpainting UNet: latents of the masked image
        self._guided = guided

    def unet_input(self, latent_input: torch.Tensor) -> torch.Tensor:
        if self._masked is None:
            return latent_input
        repeat = 2 if self._guided else 1
        return torch.cat([latent_input, self._mask.repeat(repeat, 1, 1, 1), self._masked.repeat(repeat, 1, 1, 1)], dim=1)

    def after_step(self, latents: torch.Tensor, step: int, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
        if self._known is None:
            return latents
        known = self._known
        if step < len(timesteps) - 1:
            known = scheduler.add_noise(known, self._noise, timesteps[step + 1 : step + 2])
        return (1 - self._mask) * known + self._mask * latents


def composite_weights(mask: Image.Image, feather: int) -> np.ndarray:
    """(H, W, 1) weights of the generated image: 1 inside the mask, 0 outside, softened inward by `feather` px."""
    binary = (np.asarray(mask.convert("L"), dtype=np.float32) >= 127.5).astype(np.float32)
    if feather <= 0:
        return binary[..., None]
    blurred = Image.fromarray((binary * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(feather))
    inward = np.minimum(binary, np.clip((np.asarray(blurred, dtype=np.float32) / 255.0 - 0.5) * 2.0, 0.0, 1.0))
    return inward[..., None]


def composite(generated: np.ndarray, init: Image.Image, mask: Image.Image, feather: int) -> np.ndarray:
    """Generated pixels inside the mask, the init image's own pixels outside it. (N, H, W, 3) floats."""
    weights = composite_weights(mask, feather)
    original = np.asarray(init.convert("RGB"), dtype=np.float32)[None] / 255.0
    return (original * (1.0 - weights) + generated * weights).astype(np.float32)
