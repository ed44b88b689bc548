"""Behaviour of Engine.generate: seeds, batches, provenance, replay, callbacks, numerical safety."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, GenerationCancelled, GenerationRequest, NonFiniteOutputError
from engine.provenance import read_metadata


def _request(**overrides) -> GenerationRequest:
    fields = dict(prompt="a red fox in snow", width=64, height=64, steps=4, guidance_scale=5.0, scheduler="euler_a")
    return GenerationRequest(**{**fields, **overrides})


def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(engine):
    batch = engine.generate(_request(num_images=3, seed=40))
    assert batch.seeds == [40, 41, 42]
    for index, seed in enumerate(batch.seeds):
        alone = engine.generate(_request(seed=seed))
        assert np.abs(batch.pixels[index] - alone.pixels[0]).max() <= 1e-4


def test_same_seed_same_pixels_and_different_seed_different_pixels(engine):
    first, again, other = (engine.generate(_request(seed=s)) for s in (7, 7, 8))
    assert np.array_equal(first.pixels, again.pixels)
    assert np.abs(first.pixels - other.pixels).max() > 1e-2


def test_a_missing_seed_is_drawn_and_recorded(engine):
    result = engine.generate(_request(seed=None))
    assert result.metadata[0]["image"]["seed"] == result.seeds[0]
    replayed = engine.generate(_request(seed=result.seeds[0]))
    assert np.array_equal(result.pixels, replayed.pixels)


def test_every_png_carries_replayable_provenance(engine, tmp_path):
    result = engine.generate(_request(num_images=2, seed=5, negative_prompt="blurry", preset="cinematic"))
    paths = result.save(tmp_path)
    assert [p.name.endswith(f"seed{s}.png") for p, s in zip(paths, result.seeds)] == [True, True]
    meta = read_metadata(paths[1])
    assert meta["image"] == {"index": 1, "seed": 6, "width": 64, "height": 64}
    assert meta["request"]["preset"] == "cinematic" and meta["request"]["prompt"] == "a red fox in snow"
    assert meta["resolved"]["prompt"].startswith("cinematic film still of a red fox in snow")
    assert meta["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
    assert meta["device"] == {"type": "cpu", "name": "cpu", "dtype": "float32", "speed": "eager", "quantize": None}
    assert all(len(digest) == 64 for digest in meta["model"]["hashes"].values())
    assert {"torch", "diffusers", "transformers", "refgen"} <= set(meta["versions"])
    parameters = Image.open(paths[1]).text["parameters"]
    assert "Steps: 4, Sampler: Euler a, CFG scale: 5.0, Seed: 6, Size: 64x64" in parameters
    assert "\nNegative prompt: blurry" in parameters


def test_replay_reproduces_the_pixels_exactly(engine, tmp_path):
    result = engine.generate(_request(num_images=3, seed=90, scheduler="dpmpp_2m_sde_karras"))
    paths = result.save(tmp_path)
    replayed = engine.replay(paths[2])
    assert np.array_equal(np.asarray(Image.open(paths[2])), np.asarray(replayed.images[0]))
    assert replayed.seeds == [92]
    original, again = read_metadata(paths[2]), replayed.metadata[0]
    original.pop("created"), again.pop("created")
    assert json.loads(json.dumps(again)) == original


def test_img2img_replay_checks_the_init_image(engine, tmp_path):
    init_path = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(init_path)
    result = engine.generate(_request(seed=1, init_image=str(init_path), init_strength=0.6))
    (path,) = result.save(tmp_path / "out")
    assert np.array_equal(engine.replay(path).pixels, result.pixels)
    Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(init_path)
    from engine.errors import ProvenanceError

    with pytest.raises(ProvenanceError, match="has changed"):
        engine.replay(path)


def test_higher_init_strength_stays_closer_to_the_init_image(engine):
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    target = np.asarray(init, dtype=np.float32) / 255
    distance = {
        strength: np.abs(engine.generate(_request(seed=3, init_image=init, init_strength=strength)).pixels[0] - target).mean()
        for strength in (0.2, 0.8)
    }
    assert distance[0.8] < distance[0.2]


def test_init_image_of_another_shape_is_cropped_to_the_requested_size(engine):
    init = Image.fromarray(np.zeros((50, 120, 3), np.uint8) + 128)
    result = engine.generate(_request(seed=2, init_image=init, init_strength=0.5, width=64, height=128))
    assert result.images[0].size == (64, 128)


def test_aspect_ratio_picks_the_models_own_resolution(engine):
    assert engine.native_size == 256  # tiny model: 32 latent * 8
    result = engine.generate(GenerationRequest(prompt="x", aspect_ratio="16:9", steps=1, seed=0))
    assert result.images[0].size == (320, 192)


def test_quality_mode_refines_at_a_larger_size(engine):
    calls = []
    result = engine.generate(_request(seed=4, mode="quality", steps=4), on_step=lambda info: calls.append((info.phase, info.step, info.total)))
    assert result.images[0].size == (96, 96)
    assert [c for c in calls if c[0] == "base"] == [("base", i, 4) for i in range(4)]
    assert calls[-1][0] == "refine" and result.metadata[0]["resolved"]["refine_denoise"] == 0.35


def test_step_callback_sees_every_step_and_can_cancel(engine):
    seen = []
    engine.generate(_request(seed=0, steps=5), on_step=lambda info: seen.append(info.step))
    assert seen == [0, 1, 2, 3, 4]
    with pytest.raises(GenerationCancelled, match="after step 2 of 5"):
        engine.generate(_request(seed=0, steps=5), on_step=lambda info: info.step < 1)


def test_nan_from_the_unet_is_reported_not_returned(tiny_model_dir):
    broken = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        broken.pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        broken.generate(_request(seed=0))


def test_an_all_black_decode_is_reported_not_returned(tiny_model_dir):
    broken = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        broken.pipe.vae.decoder.conv_out.weight.zero_()
        broken.pipe.vae.decoder.conv_out.bias.fill_(-10.0)
    with pytest.raises(NonFiniteOutputError, match="all black"):
        broken.generate(_request(seed=0))


def test_builtin_tiny_model_needs_no_download(refgen_home):
    engine = Engine.load("tiny", device="cpu")
    assert engine.model.kind == "tiny" and "noise" in engine.model.notice
    assert (refgen_home / "cache" / "tiny-sdxl" / "model_index.json").exists()
    assert engine.generate(GenerationRequest(prompt="smoke", steps=1, width=64, height=64, seed=0)).images[0].size == (64, 64)
