"""Inpainting (Magic Fill): parity with diffusers' SDXL inpaint pipeline, and the preserved outside."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from conftest import generators
from engine import Engine, GenerationRequest, InvalidImageError
from test_parity import TOLERANCE, _diffusers_scheduler, _init_image, _max_diff

PROMPT = "a red door in a stone wall"


def _mask(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) rectangle in the middle, black (keep) around it."""
    canvas = np.zeros((height, width), np.uint8)
    canvas[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(canvas, mode="L")


def _composited(generated: np.ndarray, init: Image.Image, mask: Image.Image) -> np.ndarray:
    """What refgen promises: generated inside the (binary) mask, the input's own pixels outside."""
    inside = (np.asarray(mask, dtype=np.float32) >= 127.5)[None, ..., None]
    return np.where(inside, generated, np.asarray(init, dtype=np.float32)[None] / 255.0)


def _request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, width=64, height=64, steps=5, guidance_scale=5.0, scheduler="euler", seed=8, mask_feather=0)
    return GenerationRequest(**{**base, **fields})


@pytest.fixture(scope="module")
def inpaint_unet_dir(tmp_path_factory):
    from engine.tiny import build_tiny_unet

    folder = tmp_path_factory.mktemp("inpaint") / "unet"
    build_tiny_unet(seed=5, in_channels=9).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def inpaint_engine(tiny_model_dir, inpaint_unet_dir):
    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    engine.load_inpaint_unet(inpaint_unet_dir)
    return engine


def _diffusers_inpaint(reference_pipe, tiny_model_dir, batch, init, mask, strength, unet=None):
    from diffusers import StableDiffusionXLInpaintPipeline

    components = dict(reference_pipe.components)
    if unet is not None:
        components["unet"] = unet
    pipe = StableDiffusionXLInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    # One init image per output, so that image i is encoded with generator i (refgen's per-image seeds).
    return pipe(prompt=[PROMPT] * batch, image=[init] * batch, mask_image=[mask] * batch, strength=strength,
                width=64, height=64, num_inference_steps=5, guidance_scale=5.0, generator=generators(8, batch),
                output_type="np").images


# init_strength (closeness, Leonardo) and the literal strength diffusers is given for it.
@pytest.mark.parametrize("batch, init_strength, strength", [(1, None, 1.0), (2, None, 1.0), (2, 0.4, 0.6), (1, 0.8, 0.2)])
def test_base_unet_inpainting_matches_diffusers(engine, reference_pipe, tiny_model_dir, batch, init_strength, strength):
    init, mask = _init_image(64, 64, 1), _mask()
    ours = engine.generate(_request(num_images=batch, init_image=init, mask_image=mask, init_strength=init_strength)).pixels
    theirs = _diffusers_inpaint(reference_pipe, tiny_model_dir, batch, init, mask, strength)
    assert _max_diff(ours, _composited(theirs, init, mask)) <= TOLERANCE


@pytest.mark.parametrize("init_strength, strength", [(None, 1.0), (0.3, 0.7)])
def test_inpainting_unet_matches_diffusers(inpaint_engine, reference_pipe, tiny_model_dir, inpaint_unet_dir, init_strength, strength):
    from diffusers import UNet2DConditionModel

    init, mask = _init_image(64, 64, 2), _mask()
    ours = inpaint_engine.generate(_request(num_images=2, init_image=init, mask_image=mask, init_strength=init_strength)).pixels
    unet = UNet2DConditionModel.from_pretrained(str(inpaint_unet_dir))
    theirs = _diffusers_inpaint(reference_pipe, tiny_model_dir, 2, init, mask, strength, unet=unet)
    assert _max_diff(ours, _composited(theirs, init, mask)) <= TOLERANCE


def test_pixels_outside_the_mask_are_preserved_exactly_even_with_feathering(engine):
    init, mask = _init_image(64, 64, 3), _mask()
    result = engine.generate(_request(num_images=2, init_image=init, mask_image=mask, mask_feather=6))
    outside = np.asarray(mask) == 0
    for image in result.images:
        assert np.array_equal(np.asarray(image)[outside], np.asarray(init)[outside])
    inside = np.asarray(mask) == 255
    assert np.abs(np.asarray(result.images[0], np.int16)[inside] - np.asarray(init, np.int16)[inside]).mean() > 5


def test_the_inpainting_unet_is_used_only_for_masked_requests(inpaint_engine, engine):
    plain = _request(prompt="a field")
    assert np.array_equal(inpaint_engine.generate(plain).pixels, engine.generate(plain).pixels)


def test_inpainting_is_replayed(engine, tmp_path):
    init_path, mask_path = tmp_path / "photo.png", tmp_path / "mask.png"
    _init_image(64, 64, 4).save(init_path)
    _mask().save(mask_path)
    result = engine.generate(_request(init_image=str(init_path), mask_image=str(mask_path), mask_feather=3))
    (saved,) = result.save(tmp_path / "out")
    assert np.array_equal(engine.replay(saved).pixels, result.pixels)


def test_a_mask_of_another_size_is_refused(engine):
    with pytest.raises(InvalidImageError, match="mask is 32x32 but the init image is 64x64"):
        engine.generate(_request(init_image=_init_image(64, 64, 0), mask_image=_mask(32, 32)))


def test_a_mask_needs_an_init_image():
    with pytest.raises(ValidationError, match="mask_image needs an init_image"):
        GenerationRequest(prompt="x", mask_image="mask.png")


def test_quality_mode_with_a_mask_keeps_the_image_size(engine):
    result = engine.generate(_request(steps=2, mode="quality", init_image=_init_image(64, 64, 0), mask_image=_mask()))
    assert result.images[0].size == (64, 64)


def test_without_a_size_inpainting_keeps_the_init_images_size(engine):
    init = _init_image(96, 72, 5)
    mask = Image.fromarray(np.pad(np.full((24, 32), 255, np.uint8), ((24, 24), (32, 32))), mode="L")
    request = GenerationRequest(prompt=PROMPT, steps=2, seed=1, init_image=init, mask_image=mask)
    result = engine.generate(request)
    assert result.images[0].size == (96, 72)
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result.images[0])[outside], np.asarray(init)[outside])
