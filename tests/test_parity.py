"""Parity: our one loop against diffusers' own SDXL pipelines, same tiny weights, same seeds.

This is the proof that the engine samples correctly: max abs pixel difference <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import generators
from engine import GenerationRequest

TOLERANCE = 1e-4


def _diffusers_scheduler(name: str, model_dir):
    """What each scheduler name means, spelled out with diffusers classes (independent of engine code),
    on the model's own scheduler config read from disk."""
    import diffusers

    config = diffusers.EulerDiscreteScheduler.load_config(str(model_dir), subfolder="scheduler")

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "ddim": (diffusers.DDIMScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "pndm": (diffusers.PNDMScheduler, {}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
        "dpm_solver": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
        "dpmpp_2m_sde_karras": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    }
    cls, options = table[name]
    return cls.from_config(config, **options)


def _max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())


@pytest.mark.parametrize(
    "scheduler, seed, width, height, negative",
    [
        ("euler", 0, 64, 64, None),
        ("euler_a", 1, 64, 64, "blurry"),
        ("dpmpp_2m_karras", 2, 96, 64, None),
        ("dpmpp_2m_sde_karras", 3, 64, 96, "ugly, watermark"),
        ("ddim", 4, 64, 64, ""),
        ("heun", 5, 64, 64, None),
        ("lms", 6, 64, 64, "low quality"),
        ("pndm", 7, 64, 64, None),
        ("unipc", 8, 128, 64, None),
        ("dpm_solver", 9, 64, 64, None),
    ],
)
def test_txt2img_matches_diffusers_pipeline(engine, reference_pipe, tiny_model_dir, scheduler, seed, width, height, negative):
    batch, steps, guidance = 2, 5, 6.5
    request = GenerationRequest(
        prompt="a lighthouse at dusk", negative_prompt=negative, width=width, height=height,
        num_images=batch, seed=seed, steps=steps, guidance_scale=guidance, scheduler=scheduler,
    )
    ours = engine.generate(request).pixels

    reference_pipe.scheduler = _diffusers_scheduler(scheduler, tiny_model_dir)
    theirs = reference_pipe(
        prompt="a lighthouse at dusk", negative_prompt=negative, width=width, height=height,
        num_images_per_prompt=batch, num_inference_steps=steps, guidance_scale=guidance,
        generator=generators(seed, batch), output_type="np",
    ).images

    assert _max_diff(ours, theirs) <= TOLERANCE


def test_txt2img_without_guidance_matches(engine, reference_pipe, tiny_model_dir):
    """guidance_scale 1 disables CFG (one UNet half) in both."""
    request = GenerationRequest(prompt="a fox", width=64, height=64, seed=11, steps=4, guidance_scale=1.0, scheduler="euler")
    ours = engine.generate(request).pixels
    reference_pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    theirs = reference_pipe(
        prompt="a fox", width=64, height=64, num_inference_steps=4, guidance_scale=1.0,
        generator=generators(11, 1), output_type="np",
    ).images
    assert _max_diff(ours, theirs) <= TOLERANCE


def _init_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    return Image.fromarray(np.clip(gradient + rng.normal(0, 20, gradient.shape), 0, 255).astype(np.uint8))


# Leonardo's init_strength (closeness to the init image) next to the strength diffusers is given for
# it, both written out as literals: computing one from the other would repeat the engine's arithmetic.
@pytest.mark.parametrize(
    "scheduler, init_strength, diffusers_strength, steps, seed, batch",
    [
        ("euler", 0.5, 0.5, 6, 0, 2),
        ("dpmpp_2m_karras", 0.3, 0.7, 6, 1, 1),
        ("euler_a", 0.7, 0.3, 6, 2, 3),
        ("ddim", 0.2, 0.8, 6, 3, 2),
        ("euler", 0.8, 0.2, 20, 4, 1),  # 4 steps of 20 (a float 1 - 0.8 kept 3)
        ("euler", 0.9, 0.1, 20, 5, 2),  # 2 steps of 20 (a float 1 - 0.9 kept 1)
    ],
)
def test_img2img_matches_diffusers_pipeline(engine, reference_pipe, tiny_model_dir, scheduler, init_strength,
                                            diffusers_strength, steps, seed, batch):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    init = _init_image(64, 64, seed)
    request = GenerationRequest(
        prompt="an oil painting of a cat", width=64, height=64, num_images=batch, seed=seed, steps=steps,
        guidance_scale=5.0, scheduler=scheduler, init_image=init, init_strength=init_strength,
    )
    ours = engine.generate(request).pixels

    img2img = StableDiffusionXLImg2ImgPipeline(**reference_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = _diffusers_scheduler(scheduler, tiny_model_dir)
    theirs = img2img(
        prompt="an oil painting of a cat", image=init, strength=diffusers_strength,
        num_images_per_prompt=batch, num_inference_steps=steps, guidance_scale=5.0,
        generator=generators(seed, batch), output_type="np",
    ).images

    assert _max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("steps", [10, 20, 30, 50])
@pytest.mark.parametrize("tenths", range(1, 10))
def test_img2img_runs_the_steps_a_user_counts_and_the_ones_diffusers_runs(engine, reference_pipe, tiny_model_dir, tenths, steps):
    """init_strength 0.1 ... 0.9 keeps the image that much: of 20 steps, 0.9 runs the last 2, 0.8 the last 4."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from engine.request import resolve
    from engine.sampling import schedule
    from engine.schedulers import build_scheduler

    init_strength, diffusers_strength = float(f"0.{tenths}"), float(f"0.{10 - tenths}")  # the literals a user types
    counted = steps * (10 - tenths) // 10  # integer arithmetic: what a person counts
    resolved = resolve(GenerationRequest(prompt="a cat", width=64, height=64, steps=steps, seed=0,
                                         init_image=_init_image(64, 64), init_strength=init_strength))
    ours = schedule(build_scheduler("euler", reference_pipe.scheduler.config), steps, resolved.denoise, "cpu")

    img2img = StableDiffusionXLImg2ImgPipeline(**reference_pipe.components)
    img2img.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    img2img.scheduler.set_timesteps(steps, device="cpu")
    theirs, count = img2img.get_timesteps(steps, diffusers_strength, "cpu")

    assert len(ours) == count == counted
    assert torch.equal(ours, theirs)


def test_quality_mode_is_txt2img_then_upsampled_img2img_refine(engine, reference_pipe, tiny_model_dir):
    """Quality mode = the txt2img image, upsampled x1.5, denoised again at 0.35 (documented recipe)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    seed, steps = 21, 4
    request = GenerationRequest(prompt="a castle", width=64, height=64, seed=seed, steps=steps, guidance_scale=5.0,
                                scheduler="euler", mode="quality", num_images=2)
    ours = engine.generate(request).pixels

    reference_pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    shared = generators(seed, 2)  # the refine pass continues each image's own random stream
    base = reference_pipe(prompt="a castle", width=64, height=64, num_images_per_prompt=2, num_inference_steps=steps,
                          guidance_scale=5.0, generator=shared, output_type="np").images
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(base).permute(0, 3, 1, 2) * 2 - 1, size=(96, 96), mode="bicubic", align_corners=False
    ).clamp(-1, 1)
    img2img = StableDiffusionXLImg2ImgPipeline(**reference_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    refined = img2img(prompt=["a castle"] * 2, image=upsampled, strength=0.35, num_images_per_prompt=1,
                      num_inference_steps=steps, guidance_scale=5.0, generator=shared, output_type="np").images

    assert ours.shape == (2, 96, 96, 3)
    assert _max_diff(ours, refined) <= TOLERANCE
