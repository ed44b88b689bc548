"""The one denoising loop, and the latents it starts from.

Schedulers are diffusers' classes; the UNet is diffusers' model. What is ours is the loop that
combines text guidance and every adapter's contribution in a single UNet call per step.
"""

from __future__ import annotations

import inspect
from decimal import Decimal
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import vae as vae_ops
from .conditioning import Conditioning
from .errors import GenerationCancelled


@dataclass(frozen=True)
class StepInfo:
    """Passed to the per-step callback. Return False from the callback to cancel."""

    step: int  # 0-based
    total: int
    timestep: float
    latents: torch.Tensor
    phase: str = "base"  # "base", or "refine" for quality mode's second pass


StepCallback = Callable[[StepInfo], Optional[bool]]


def initial_noise(shape, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """Noise for a batch, one generator per image, drawn on each generator's device.

    Image i's noise depends only on generator i, so image i of a batch equals a single run
    with that seed.
    """
    single = (1, *shape[1:])
    parts = [torch.randn(single, generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat(parts).to(device)


@dataclass(frozen=True)
class Start:
    """Where one pass begins: what the default start and an adapter's own start (inpainting) draw from."""

    pipe: Any  # its VAE and latent shape
    unet: Any
    scheduler: Any
    timesteps: torch.Tensor
    generators: list[torch.Generator]
    width: int
    height: int
    denoise: float  # 1.0: from pure noise
    guided: bool
    device: torch.device
    dtype: torch.dtype
    init_pixels: Optional[torch.Tensor] = None  # (1 or B, 3, H, W) in [-1, 1], fitted to the output size

    def noised(self, clean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(start latents, the noise they hold): pure noise, or `clean` latents noised to the first timestep.

        Image i's noise comes from generator i alone, so image i equals a single run with its seed.
        """
        factor, batch = self.pipe.vae_scale_factor, len(self.generators)
        shape = (batch, self.pipe.vae.config.latent_channels, self.height // factor, self.width // factor)
        noise = initial_noise(shape, self.generators, self.device, self.dtype)
        if clean is None:
            return noise * self.scheduler.init_noise_sigma, noise
        return self.scheduler.add_noise(clean, noise, self.timesteps[:1].repeat(batch)), noise

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return vae_ops.encode(self.pipe.vae, pixels, self.generators, self.device, self.dtype)

    def batch_pixels(self) -> torch.Tensor:
        """The init pixels once per image of the batch."""
        pixels = self.init_pixels
        return pixels.expand(len(self.generators), -1, -1, -1) if pixels.shape[0] == 1 else pixels

    def latents(self) -> torch.Tensor:
        """txt2img: noise; img2img: the init image's latents noised to the first timestep."""
        if self.init_pixels is None:
            return self.noised()[0]
        return self.noised(self.encode(self.batch_pixels()))[0]


def schedule(scheduler, steps: int, denoise: float, device) -> torch.Tensor:
    """Timesteps to run. img2img (denoise < 1) skips the noisiest steps, as diffusers does.

    The begin index is set even from step 0 (as diffusers' img2img and inpaint pipelines do): without it a
    scheduler finds its first step, and add_noise every step, by searching its timesteps on the host."""
    scheduler.set_timesteps(steps, device=device)
    start = 0 if denoise >= 1.0 else (steps - steps_to_run(steps, denoise)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def steps_to_run(steps: int, denoise: float) -> int:
    """How many of `steps` a partial denoise runs: diffusers' int(steps * strength), counted in decimal
    so that binary rounding never drops a step (0.57 * 100 is 56.99999999999999 in floats). At least
    one step, or nothing would change."""
    return max(1, min(fraction_of_steps(denoise, steps), steps))


def fraction_of_steps(fraction: float, steps: int) -> int:
    """int(steps x fraction) as diffusers counts it, but in decimal: the fraction as the user wrote it."""
    return int(Decimal(repr(fraction)) * steps)


def step_kwargs(scheduler, generators: list[torch.Generator], latents: torch.Tensor, steps: int) -> list[dict]:
    """Each step's extra arguments to scheduler.step: an SDE DPM-Solver's noise, drawn before the loop;
    else the per-image generators for a scheduler that draws its own (Euler a); else nothing."""
    drawn = step_noise(scheduler, generators, latents, steps)
    if drawn is not None:
        return [{"variance_noise": noise} for noise in drawn]
    accepted = inspect.signature(scheduler.step).parameters
    return [{"generator": generators} if "generator" in accepted else {}] * steps


def step_noise(scheduler, generators: list[torch.Generator], latents: torch.Tensor, steps: int) -> Optional[torch.Tensor]:
    """The noise an SDE DPM-Solver step draws, for every step at once: the same per-image CPU generators in
    the same order (so the same values), moved to the device once rather than in every step. None for the
    other schedulers (diffusers' Euler a step takes no noise, only a generator)."""
    if getattr(scheduler.config, "algorithm_type", None) not in ("sde-dpmsolver", "sde-dpmsolver++"):
        return None
    draws = [initial_noise(latents.shape, generators, generators[0].device, torch.float32) for _ in range(steps)]
    return torch.stack(draws).to(latents.device)


def predict_noise(unet, latents, timestep, cond: Conditioning, scheduler, step: int, total: int, guide: bool = True) -> torch.Tensor:
    """One guided UNet evaluation: both CFG halves in one batched call, plus adapter inputs. With `guide` False
    (past the guidance cutoff) the UNet runs on the conditional half alone."""
    latent_input = torch.cat([latents] * 2) if cond.guided else latents
    latent_input = scheduler.scale_model_input(latent_input, timestep)
    kwargs = {
        "encoder_hidden_states": cond.prompt_embeds,
        "added_cond_kwargs": {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids},
    }
    for contribution in cond.contributions:
        _merge(kwargs, contribution.unet_kwargs(latent_input, timestep, step, total, cond))
    for contribution in cond.contributions:
        latent_input = contribution.unet_input(latent_input)
    if cond.guided and not guide:
        return unet(*conditional_half((latent_input, timestep), len(latents)), return_dict=False,
                    **conditional_half(kwargs, len(latents)))[0]
    noise = unet(latent_input, timestep, return_dict=False, **kwargs)[0]
    if not cond.guided:
        return noise
    unconditional, conditional = noise.chunk(2)
    return unconditional + cond.guidance_scale * (conditional - unconditional)


def last_guided_step(total: int, cutoff: Optional[float]) -> int:
    """The last step (0-based) that runs guidance: int(total x cutoff) as diffusers' SDXLCFGCutoffCallback
    counts it, in decimal (as steps_to_run); every step without a cutoff."""
    return total - 1 if cutoff is None else fraction_of_steps(cutoff, total)


def conditional_half(value, batch: int):
    """The conditional rows of every (2 x batch)-row tensor in a nested value; the rest as it is. Each image's
    rows are computed independently (ControlNet residuals, IP-Adapter embeddings), so the conditional half of a
    guided input is what an unguided call takes."""
    if isinstance(value, torch.Tensor):
        return value[batch:] if value.dim() > 0 and value.shape[0] == 2 * batch else value
    if isinstance(value, dict):
        return {key: conditional_half(item, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(conditional_half(item, batch) for item in value)
    return value


def _merge(kwargs: dict, extra: dict) -> None:
    """Fold one contribution into the UNet kwargs: `added_cond_kwargs` entries are merged, and a key that
    several contributions give is summed (residuals: ControlNets, T2I-Adapters, IdentityNet add up)."""
    kwargs["added_cond_kwargs"].update(extra.pop("added_cond_kwargs", {}))
    for key, value in extra.items():
        kwargs[key] = _add(kwargs[key], value) if key in kwargs else value


def _add(left, right):
    if isinstance(left, (list, tuple)):
        return [a + b for a, b in zip(left, right)]
    return left + right


def denoise(
    unet,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    generators: list[torch.Generator],
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Run the scheduler from `latents` over `timesteps`; returns the denoised latents.

    Nothing of ours in the loop reads a tensor's value on the host (on a GPU each read would wait for the
    queued work): the timesteps are read once, before it. The UNet takes the device timestep; the scheduler's
    step the host one (with the begin index set it looks nothing up, and DDIM/PNDM compare it in Python).
    Diffusers' Euler and LMS steps still read their sigmas, which they keep on the CPU (tests/test_host_syncs.py)."""
    host = timesteps.tolist()
    total = len(host)
    extra = step_kwargs(scheduler, generators, latents, total)
    last_guided = last_guided_step(total, cond.guidance_cutoff)
    # The models take float timesteps whatever the scheduler keeps (DDIM/PNDM: int64): one compiled graph serves
    # every scheduler, and the time embedding is the same (it converts them to float first).
    model_timesteps = timesteps.to(torch.float32)
    with torch.inference_mode():
        for step, timestep in enumerate(model_timesteps):
            noise = predict_noise(unet, latents, timestep, cond, scheduler, step, total, guide=step <= last_guided)
            latents = scheduler.step(noise, host[step], latents, return_dict=False, **extra[step])[0]
            for contribution in cond.contributions:
                latents = contribution.after_step(latents, step, timesteps, scheduler)
            if on_step is not None and on_step(StepInfo(step, total, float(host[step]), latents)) is False:
                raise GenerationCancelled(f"cancelled by the step callback after step {step + 1} of {total}")
    return latents
