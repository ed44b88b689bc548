"""Sample images during training: the same prompts and seeds at every sampling step, so a person can watch
the character appear (and see over-training) by comparing `samples/step-000250-0.png` with later steps."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..images import write_atomic

SAMPLE_STEPS, SAMPLE_GUIDANCE = 25, 5.0


@torch.no_grad()
def write_samples(setup, unet, step: int, run_dir: Path) -> list[Path]:
    """One PNG per sample prompt (seed = sample_seed + its index), through diffusers' SDXL pipeline on the
    base model's components and the LoRA being trained; `<run_dir>/samples/step-<step>-<i>.png`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    request, pipe, device = setup.request, setup.pipe, setup.device
    sampler = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    sampler.set_progress_bar_config(disable=True)
    components = (pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    homes = [next(module.parameters()).device for module in components]  # training text encoders stay on the GPU
    for module in components:
        module.to(device)
    unet.eval()
    written = []
    try:
        for index, prompt in enumerate(request.sample_prompts):
            generator = torch.Generator("cpu").manual_seed(request.sample_seed + index)
            image = sampler(prompt, num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE,
                            height=request.resolution, width=request.resolution, generator=generator).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            written.append(write_atomic(run_dir / "samples" / f"step-{step:06d}-{index}.png", buffer.getvalue()))
    finally:
        unet.train()
        for module, home in zip(components, homes):
            module.to(home)
    return written
