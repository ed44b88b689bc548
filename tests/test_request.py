"""GenerationRequest: validation names the field; presets, modes and sizes resolve as documented."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine import GenerationRequest, LoraSpec
from engine.presets import MODES, Preset, all_presets, get_preset, save_user_preset
from engine.request import resolve
from engine.schedulers import SCHEDULERS, build_scheduler, canonical_name
from engine.sizes import SDXL_BUCKETS, size_for_ratio


@pytest.mark.parametrize(
    "fields, field_named",
    [
        ({"prompt": ""}, "prompt"),
        ({"num_images": 9}, "num_images"),
        ({"num_images": 0}, "num_images"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 21}, "guidance_scale"),
        ({"steps": 0}, "steps"),
        ({"width": 100, "height": 64}, "width"),
        ({"width": 64, "height": 8192}, "height"),
        ({"seed": -1}, "seed"),
        ({"init_image": "x.png", "init_strength": 0.95}, "init_strength"),
        ({"scheduler": "warp_drive"}, "scheduler"),
        ({"mode": "turbo"}, "mode"),
        ({"preset": "no-such-style"}, "preset"),
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"aspect_ratio": "10:1"}, "aspect_ratio"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_out_of_range_or_unknown_fields_are_rejected_by_name(fields, field_named):
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(**{"prompt": "a cat", **fields})
    assert field_named in str(caught.value)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"width": 512}, "width and height"),
        ({"width": 512, "height": 512, "aspect_ratio": "1:1"}, "aspect_ratio conflicts with width/height"),
        ({"init_strength": 0.5}, "init_strength needs an init_image"),
    ],
)
def test_conflicting_fields_are_rejected_with_the_fields_named(fields, words):
    with pytest.raises(ValidationError, match=words):
        GenerationRequest(prompt="a cat", **fields)


def test_leonardo_init_strength_is_closeness_to_the_init_image():
    resolved = resolve(GenerationRequest(prompt="x", init_image="any.png", init_strength=0.8))
    assert resolved.denoise == pytest.approx(0.2)
    assert resolve(GenerationRequest(prompt="x", init_image="any.png")).init_strength == 0.5
    assert resolve(GenerationRequest(prompt="x")).denoise == 1.0


def test_seeds_are_consecutive_from_the_request_seed():
    assert resolve(GenerationRequest(prompt="x", seed=100, num_images=4)).seeds == [100, 101, 102, 103]
    drawn = resolve(GenerationRequest(prompt="x", num_images=2)).seeds
    assert drawn[1] == drawn[0] + 1


@pytest.mark.parametrize(
    "ratio, size",
    [("1:1", (1024, 1024)), ("4:3", (1152, 896)), ("3:4", (896, 1152)), ("3:2", (1216, 832)), ("2:3", (832, 1216)),
     ("16:9", (1344, 768)), ("9:16", (768, 1344)), ("21:9", (1536, 640))],
)
def test_aspect_ratios_map_to_sdxl_training_resolutions(ratio, size):
    assert size_for_ratio(ratio) == size
    assert size in SDXL_BUCKETS and size[0] % 64 == 0 and size[1] % 64 == 0


@pytest.mark.parametrize(
    "init_size, size",
    [((1, 1), (1024, 1024)), ((800, 100), (2048, 512)), ((100, 800), (512, 2048)), ((1600, 900), (1344, 768))],
)
def test_img2img_without_a_size_takes_the_bucket_nearest_the_init_images_shape_whatever_its_shape(init_size, size):
    """A panorama or a 1x1 init image is fitted to SDXL's nearest bucket; only a typed aspect_ratio is bounded."""
    resolved = resolve(GenerationRequest(prompt="x", init_image="any.png"), init_size=init_size)
    assert (resolved.width, resolved.height) == size


def test_every_bucket_is_about_one_megapixel():
    assert all(0.9e6 <= w * h <= 1.1e6 for w, h in SDXL_BUCKETS)


def test_modes_fast_and_quality():
    fast = resolve(GenerationRequest(prompt="x", mode="fast"))
    quality = resolve(GenerationRequest(prompt="x", mode="quality", width=1024, height=1024))
    assert fast.steps < quality.steps and fast.refine_scale == 1.0
    assert quality.refine_scale > 1.0 and 0 < quality.refine_denoise < 0.5
    assert quality.output_size == (1536, 1536)
    assert MODES["quality"].steps == quality.steps


def test_request_fields_beat_preset_fields_which_beat_mode_defaults():
    preset = get_preset("cinematic")
    from_preset = resolve(GenerationRequest(prompt="a ship", preset="cinematic"))
    assert from_preset.guidance_scale == preset.guidance_scale
    assert from_preset.prompt == preset.compose_prompt("a ship")
    assert "cartoon" in from_preset.negative_prompt
    explicit = resolve(GenerationRequest(prompt="a ship", preset="cinematic", guidance_scale=11, negative_prompt="fog"))
    assert explicit.guidance_scale == 11
    assert explicit.negative_prompt.startswith("fog, ")


def test_presets_cover_leonardo_styles_and_accept_leonardo_names():
    names = set(all_presets())
    assert {"cinematic", "photography", "anime", "illustration", "render_3d", "portrait", "dynamic", "none"} <= names
    assert get_preset("RENDER_3D").name == "render_3d"
    assert get_preset("3D Render").name == "render_3d"
    assert get_preset("LEONARDO").name == "dynamic"
    assert GenerationRequest(prompt="x", preset="CINEMATIC").preset == "cinematic"


def test_a_template_carries_identity_anchor_style_camera_and_negatives():
    preset = Preset(
        name="mira", prompt_template="portrait of {prompt}", identity_anchor="Mira, 28, freckles, scar_L_cheek",
        style_tokens="photoreal", camera_tokens="85mm f/1.8", negative_prompt="extra fingers, watermark",
    )
    assert preset.compose_prompt("in the rain") == "Mira, 28, freckles, scar_L_cheek, portrait of in the rain, photoreal, 85mm f/1.8"
    assert preset.compose_negative("text") == "text, extra fingers, watermark"
    assert preset.compose_negative(None) == "extra fingers, watermark"


def test_user_presets_are_files_that_override_builtins(refgen_home):
    from engine import paths

    saved = save_user_preset(Preset(name="noir", prompt_template="film noir still of {prompt}", steps=33, guidance_scale=4.5))
    assert saved.parent == paths.presets_dir() and saved.read_text().startswith("[noir]")
    assert get_preset("noir").steps == 33
    assert resolve(GenerationRequest(prompt="a detective", preset="noir")).prompt == "film noir still of a detective"
    with pytest.raises(ValueError, match="{prompt}"):
        Preset(name="bad", prompt_template="no placeholder")
    saved.unlink()


@pytest.mark.parametrize(
    "name, ours",
    [("KLMS", "lms"), ("EULER_DISCRETE", "euler"), ("EULER_ANCESTRAL_DISCRETE", "euler_a"), ("DDIM", "ddim"),
     ("DPM_SOLVER", "dpm_solver"), ("PNDM", "pndm"), ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("euler-a", "euler_a")],
)
def test_leonardo_scheduler_names_are_accepted(name, ours):
    assert canonical_name(name) == ours


def test_every_scheduler_builds_from_the_sdxl_config():
    from engine.sdxl_configs import SDXL_SCHEDULER_CONFIG

    for name, spec in SCHEDULERS.items():
        scheduler = build_scheduler(name, SDXL_SCHEDULER_CONFIG)
        assert type(scheduler).__name__ == spec.class_name
        assert scheduler.config.beta_schedule == "scaled_linear"
    assert build_scheduler("dpmpp_2m_karras", SDXL_SCHEDULER_CONFIG).config.use_karras_sigmas is True


def test_lora_specs_parse_path_and_weight():
    assert LoraSpec.parse("styles/ink.safetensors:0.7") == LoraSpec(path="styles/ink.safetensors", weight=0.7)
    assert LoraSpec.parse("C:/loras/ink.safetensors") == LoraSpec(path="C:/loras/ink.safetensors", weight=1.0)
    assert GenerationRequest(prompt="x", loras=["a.safetensors:0.5"]).loras[0].weight == 0.5
