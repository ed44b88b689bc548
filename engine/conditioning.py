"""Conditioning: everything the denoiser needs, assembled once per request."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


class Guidance:
    """An adapter's share of the denoising (ControlNet residuals, inpainting masks, IP-Adapter embeds).

    The loop calls these hooks at every step and never needs to know which adapter it has; each
    hook does nothing unless the adapter overrides it. How contributions combine: entries of
    `added_cond_kwargs` are merged, and a key several contributions give is summed (residuals of
    ControlNets, T2I-Adapters, IdentityNet).
    """

    def unet_kwargs(self, latent_input: torch.Tensor, timestep: torch.Tensor, step: int, total: int, cond: "Conditioning") -> dict:
        """Extra UNet keyword arguments for this step (computed on the 4-channel latent input)."""
        return {}

    def unet_input(self, latent_input: torch.Tensor) -> torch.Tensor:
        """The tensor the UNet itself sees (an inpainting UNet takes mask and masked-image channels too)."""
        return latent_input

    def after_step(self, latents: torch.Tensor, step: int, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
        """Latents after the scheduler's step (inpainting with a base UNet re-imposes the known region)."""
        return latents


@dataclass(frozen=True)
class Conditioning:
    """Text embeddings, pooled embeddings and SDXL micro-conditioning for a batch.

    When guided, the batch dimension is 2B: the unconditional half first, as diffusers orders it.
    """

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    time_ids: torch.Tensor
    guidance_scale: float
    guided: bool
    contributions: tuple[Guidance, ...] = ()
    guidance_cutoff: Optional[float] = None  # guidance stops after step int(steps x cutoff) of a pass (sampling.py)

    def at_size(self, width: int, height: int) -> "Conditioning":
        """The same text conditioning for another output size (the quality refine pass)."""
        rows = self.time_ids.shape[0]
        time_ids = size_time_ids(width, height, rows, self.time_ids.dtype, self.time_ids.device)
        return replace(self, time_ids=time_ids)


def size_time_ids(width: int, height: int, rows: int, dtype, device) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (as height, width)."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(rows, 1)


def is_guided(unet, guidance_scale: float) -> bool:
    """Classifier-free guidance runs when it has an effect and the UNet is not guidance-distilled."""
    return guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None


def encode_text(
    pipe,
    prompt: str,
    negative_prompt: Optional[str],
    batch: int,
    width: int,
    height: int,
    guidance_scale: float,
    device: torch.device,
) -> Conditioning:
    """Both SDXL text encoders through the container pipeline's encode_prompt (LoRA-aware).

    A negative prompt of None means "zeros" (SDXL's force_zeros_for_empty_prompt), which is what
    the base model was trained to expect; an explicit "" is encoded as text.
    """
    guided = is_guided(pipe.unet, guidance_scale)
    with torch.inference_mode():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=batch,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
        )
    if guided:
        embeds = torch.cat([negative_embeds, embeds])
        pooled = torch.cat([negative_pooled, pooled])
    time_ids = size_time_ids(width, height, embeds.shape[0], embeds.dtype, device)
    return Conditioning(embeds, pooled, time_ids, guidance_scale, guided)
