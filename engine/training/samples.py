"""Images drawn by the model being trained: samples during training (the same prompts and seeds at every sampling
step, so a person can watch the character appear, and over-training, by comparing `samples/step-000250-0.png`
with later steps), and prior preservation's class images, drawn by the base model before training."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..images import png_data, write_atomic
from .loop import draw_generator

SAMPLE_STEPS, SAMPLE_GUIDANCE = 25, 5.0


def sdxl_sampler(pipe, unet):
    """diffusers' SDXL pipeline over the loaded components and `unet` (the one being trained, LoRA and all)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sampler = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    sampler.set_progress_bar_config(disable=True)
    return sampler


@contextmanager
def on_device(pipe, unet, device, dtype):
    """The VAE and text encoders on `device` in the UNet's working dtype (diffusers' pipeline feeds the text
    encoders' dtype to the UNet) and the UNet in eval mode for the block; then all back as they were. Text
    encoders that are training are already there and are left alone (a cast would round their fp32 LoRAs)."""
    frozen = [m for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if not any(p.requires_grad for p in m.parameters())]
    homes = [(next(module.parameters()).device, next(module.parameters()).dtype) for module in frozen]
    for module in frozen:
        module.to(device, dtype)
    unet.eval()
    try:
        yield
    finally:
        unet.train()
        for module, (home, home_dtype) in zip(frozen, homes):
            module.to(home, home_dtype)


@torch.no_grad()
def write_samples(setup, unet, step: int, run_dir: Path) -> list[Path]:
    """One PNG per sample prompt (seed = sample_seed + its index), through diffusers' SDXL pipeline on the
    base model's components and the LoRA being trained; `<run_dir>/samples/step-<step>-<i>.png`."""
    request = setup.request
    sampler = sdxl_sampler(setup.pipe, unet)
    written = []
    with on_device(setup.pipe, unet, setup.device, setup.dtype):
        for index, prompt in enumerate(request.sample_prompts):
            generator = torch.Generator("cpu").manual_seed(request.sample_seed + index)
            image = sampler(prompt, num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE,
                            height=request.resolution, width=request.resolution, generator=generator).images[0]
            written.append(write_atomic(run_dir / "samples" / f"step-{step:06d}-{index}.png", png_data(image)))
    return written


@torch.no_grad()
def fill_class_images(pipe, unet, request, device, dtype) -> list[Path]:
    """Top the class folder up to num_class_images with the base model's own pictures of class_prompt (as
    diffusers' DreamBooth script does), written atomically as class-NNNN.png; returns the new files."""
    from tqdm.auto import tqdm

    from .data import IMAGE_SUFFIXES

    folder = Path(request.class_images).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    missing = (request.num_class_images or 0) - len(existing)
    if missing <= 0:
        return []
    sampler = sdxl_sampler(pipe, unet)
    names = (f"class-{number:04d}.png" for number in range(10**6) if not (folder / f"class-{number:04d}.png").exists())
    written = []
    with on_device(pipe, unet, device, dtype):
        for index in tqdm(range(missing), desc=f"class images ({request.class_prompt})", unit="image"):
            generator = draw_generator(request.seed, "class-image", len(existing) + index)
            image = sampler(request.class_prompt, num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE,
                            height=request.resolution, width=request.resolution, generator=generator).images[0]
            written.append(write_atomic(folder / next(names), png_data(image)))
    return written
