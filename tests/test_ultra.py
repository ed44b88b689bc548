"""`upscale=` on a request and Ultra mode (ESRGAN, then a low-denoise refine; tiled above native size)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import GenerationRequest
from engine.presets import MODES


def _request(**fields) -> GenerationRequest:
    # "tiny-x2"/"tiny-x4": refgen's offline stand-in upscalers (nearest-neighbour ESRGAN-family nets).
    base = dict(prompt="a harbour town", width=64, height=64, steps=4, guidance_scale=5.0, scheduler="euler", seed=2)
    return GenerationRequest(**{**base, **fields})


def test_upscale_multiplies_the_size_with_the_esrgan_model(engine):
    plain = engine.generate(_request(num_images=2))
    upscaled = engine.generate(_request(num_images=2, upscale=4, upscaler="tiny-x4"))
    assert upscaled.pixels.shape == (2, 256, 256, 3)
    # The stand-in is nearest-neighbour: every 4x4 block repeats one generated pixel.
    assert np.abs(upscaled.pixels[:, ::4, ::4] - plain.pixels).max() <= 1e-5
    assert set(upscaled.metadata[0]["model"]["upscalers"]) == {"tiny-x4"}


def test_upscale_with_a_model_of_another_factor_is_resized_to_the_factor_asked(engine):
    assert engine.generate(_request(upscale=2, upscaler="tiny-x4")).pixels.shape == (1, 128, 128, 3)


def test_ultra_mode_upscales_then_adds_detail(engine):
    assert MODES["ultra"].refine_upsampler == "esrgan" and MODES["ultra"].refine_scale == 2.0
    ultra = engine.generate(_request(mode="ultra", upscaler="tiny-x2"))
    assert ultra.pixels.shape == (1, 128, 128, 3)
    fast = engine.generate(_request(mode="fast"))
    just_enlarged = np.repeat(np.repeat(fast.pixels, 2, axis=1), 2, axis=2)
    assert np.abs(ultra.pixels - just_enlarged).mean() > 1e-3  # refined, not only interpolated
    assert ultra.metadata[0]["resolved"]["refine_denoise"] == MODES["ultra"].refine_denoise


def test_ultra_refines_in_native_size_tiles_beyond_the_native_size(engine):
    phases = []
    result = engine.generate(_request(mode="ultra", upscaler="tiny-x2", width=256, height=256, steps=4),
                             on_step=lambda info: phases.append((info.phase, info.step)))
    assert result.pixels.shape == (1, 512, 512, 3)
    tiles = sum(1 for phase, step in phases if phase == "refine" and step == 0)
    assert tiles == 9  # 512 px in 256 px tiles overlapping by 64 px: 3 x 3
    assert np.isfinite(result.pixels).all()


def test_ultra_is_replayed_exactly(engine, tmp_path):
    result = engine.generate(_request(mode="ultra", upscaler="tiny-x2", num_images=2))
    saved = result.save(tmp_path)
    assert np.array_equal(engine.replay(saved[1]).pixels, result.pixels[1:])


def test_a_missing_upscaler_names_the_fetch_command(engine, refgen_home):
    from engine import WeightsMissingError

    with pytest.raises(WeightsMissingError, match="refgen weights fetch realesrgan-x4plus"):
        engine.generate(_request(upscale=4))
