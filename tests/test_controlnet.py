"""ControlNet units: parity with diffusers' SDXL ControlNet pipelines, and the unit semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.controlnet import ControlError, ControlNetLibrary, ControlNets, fit_image

from engine.request_types import ControlUnit
from conftest import generators
from engine import Engine, GenerationRequest, WeightsMissingError
from engine.compose import default_adapters
from test_parity import TOLERANCE, _diffusers_scheduler, _init_image, _max_diff


@pytest.fixture(scope="module")
def loaded_controlnets(controlnet_dirs):
    from diffusers import ControlNetModel

    return {kind: ControlNetModel.from_pretrained(str(folder)) for kind, folder in controlnet_dirs.items()}


def _control_map(width: int, height: int, seed: int) -> Image.Image:
    """A canny-like map: thin white strokes on black."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            canvas[rng.integers(0, height), :, :] = 255
        else:
            canvas[:, rng.integers(0, width), :] = 255
    return Image.fromarray(canvas)


def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a robot in a field", width=64, height=64, steps=5, guidance_scale=5.0, scheduler="euler", seed=3)
    return GenerationRequest(**{**base, **fields})


def _unit(kind: str, image, **fields) -> ControlUnit:
    return ControlUnit(type=kind, image=image, preprocess=False, **fields)


@pytest.mark.parametrize("scheduler, batch, start, end, weight", [("euler", 2, 0.0, 1.0, 1.0), ("dpmpp_2m_karras", 1, 0.2, 0.8, 0.7)])
def test_one_unit_matches_the_diffusers_controlnet_pipeline(control_engine, reference_pipe, loaded_controlnets, tiny_model_dir,
                                                            scheduler, batch, start, end, weight):
    from diffusers import StableDiffusionXLControlNetPipeline

    control = _control_map(64, 64, 0)
    ours = control_engine.generate(_request(scheduler=scheduler, num_images=batch,
                                            controlnets=[_unit("canny", control, weight=weight, start=start, end=end)])).pixels
    pipe = StableDiffusionXLControlNetPipeline(**reference_pipe.components, controlnet=loaded_controlnets["canny"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler(scheduler, tiny_model_dir)
    theirs = pipe(prompt="a robot in a field", image=control, width=64, height=64, num_inference_steps=5, guidance_scale=5.0,
                  controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
                  num_images_per_prompt=batch, generator=generators(3, batch), output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_several_units_match_diffusers_multi_controlnet(control_engine, reference_pipe, loaded_controlnets, tiny_model_dir):
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets import MultiControlNetModel

    edges, depth = _control_map(64, 64, 1), _control_map(64, 64, 2).convert("L").convert("RGB")
    units = [_unit("canny", edges, weight=0.8, start=0.0, end=0.6), _unit("depth", depth, weight=1.3, start=0.3, end=1.0)]
    ours = control_engine.generate(_request(num_images=2, controlnets=units)).pixels

    multi = MultiControlNetModel([loaded_controlnets["canny"], loaded_controlnets["depth"]])
    pipe = StableDiffusionXLControlNetPipeline(**reference_pipe.components, controlnet=multi)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    theirs = pipe(prompt="a robot in a field", image=[edges, depth], width=64, height=64, num_inference_steps=5,
                  guidance_scale=5.0, controlnet_conditioning_scale=[0.8, 1.3], control_guidance_start=[0.0, 0.3],
                  control_guidance_end=[0.6, 1.0], num_images_per_prompt=2, generator=generators(3, 2), output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_a_unit_with_img2img_matches_the_diffusers_controlnet_img2img_pipeline(control_engine, reference_pipe, loaded_controlnets,
                                                                               tiny_model_dir):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    init, control = _init_image(64, 64, 4), _control_map(64, 64, 4)
    ours = control_engine.generate(_request(num_images=2, init_image=init, init_strength=0.4,
                                            controlnets=[_unit("canny", control, weight=0.9)])).pixels
    pipe = StableDiffusionXLControlNetImg2ImgPipeline(**reference_pipe.components, controlnet=loaded_controlnets["canny"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    theirs = pipe(prompt="a robot in a field", image=init, control_image=control, strength=0.6, num_inference_steps=5,
                  guidance_scale=5.0, controlnet_conditioning_scale=0.9, num_images_per_prompt=2,
                  generator=generators(3, 2), output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_a_unit_changes_the_image_and_weight_zero_is_no_unit(control_engine):
    control = _control_map(64, 64, 5)
    plain = control_engine.generate(_request()).pixels
    live = control_engine.generate(_request(controlnets=[_unit("canny", control)])).pixels
    zero = control_engine.generate(_request(controlnets=[_unit("canny", control, weight=0.0)])).pixels
    assert np.abs(live - plain).max() > 1e-2
    assert np.array_equal(zero, plain)


def test_a_window_outside_the_steps_is_no_unit(control_engine):
    control = _control_map(64, 64, 6)
    plain = control_engine.generate(_request(steps=4)).pixels
    # With 4 steps, step i is active only if i/4 >= start and (i+1)/4 <= end: [0.05, 0.2] holds no step.
    outside = control_engine.generate(_request(steps=4, controlnets=[_unit("canny", control, start=0.05, end=0.2)])).pixels
    assert np.array_equal(outside, plain)


def test_control_units_are_replayed(control_engine, tmp_path):
    path = tmp_path / "edges.png"
    _control_map(64, 64, 7).save(path)
    result = control_engine.generate(_request(num_images=2, controlnets=[_unit("canny", str(path), weight=1.2)]))
    saved = result.save(tmp_path / "out")
    meta = result.metadata[1]["resolved"]["controlnets"][0]
    assert meta["type"] == "canny" and meta["weight"] == 1.2 and len(meta["image"]["sha256"]) == 64
    assert np.array_equal(control_engine.replay(saved[1]).pixels[0], result.pixels[1])


@pytest.mark.parametrize("mode, expected_black_rows", [("crop", 0), ("fit", 16), ("stretch", 0)])
def test_control_images_are_fitted_to_the_output_size(mode, expected_black_rows):
    wide = Image.new("RGB", (128, 64), (255, 255, 255))
    fitted = np.asarray(fit_image(wide, 64, 64, mode))
    assert fitted.shape == (64, 64, 3)
    assert int((fitted.max(axis=(1, 2)) == 0).sum()) == expected_black_rows * 2


def test_grayscale_alpha_and_cmyk_control_images_work(control_engine):
    base = _control_map(64, 64, 8)
    variants = [base.convert("L"), base.convert("RGBA"), base.convert("CMYK")]
    for variant in variants:
        assert control_engine.generate(_request(steps=2, controlnets=[_unit("canny", variant)])).images[0].size == (64, 64)


def _engine_with(tiny_model_dir, library: ControlNetLibrary) -> Engine:
    """An engine whose ControlNets come from `library` alone."""
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32",
                       adapters=lambda setup: default_adapters(setup, controlnets=library))


def test_a_type_no_loaded_model_serves_lists_what_is_available(tiny_model_dir, controlnet_dirs):
    engine = _engine_with(tiny_model_dir, ControlNetLibrary(torch.device("cpu"), torch.float32, dict(controlnet_dirs), use_manifest=False))
    with pytest.raises(ControlError, match="'lineart'.*served: canny, depth"):
        engine.generate(_request(controlnets=[_unit("lineart", _control_map(64, 64, 0))]))


def test_by_default_every_type_is_served_from_the_manifest(engine):
    library = engine.adapter(ControlNets).library
    assert library.served_types() == ["canny", "depth", "lineart", "normal", "pose", "scribble", "softedge"]
    assert library.identity("canny") == "single:controlnet-canny-sdxl"
    assert library.identity("lineart") == "union:controlnet-union-sdxl"


def test_missing_union_weights_name_the_fetch_command(engine, refgen_home):
    with pytest.raises(WeightsMissingError, match="refgen weights fetch controlnet-union-sdxl"):
        engine.generate(_request(controlnets=[_unit("softedge", _control_map(64, 64, 0))]))


@pytest.fixture(scope="module")
def union_dir(tiny_model_dir, tmp_path_factory):
    """The tiny union model saved as xinsir publishes promax: config_promax.json + *_promax.safetensors."""
    import json

    from safetensors.torch import save_file

    from engine.tiny import tiny_unet_config
    from tiny_controlnet import build_tiny_union

    union = build_tiny_union(tiny_unet_config(), seed=12)
    folder = tmp_path_factory.mktemp("union") / "controlnet-union-sdxl"
    folder.mkdir()
    (folder / "config_promax.json").write_text(json.dumps(dict(union.config)))
    save_file({k: v.contiguous() for k, v in union.state_dict().items()}, folder / "diffusion_pytorch_model_promax.safetensors")
    return folder


@pytest.mark.parametrize("kind, mode", [("lineart", 3), ("depth", 1)])
def test_a_union_unit_matches_the_diffusers_union_pipeline(tiny_model_dir, reference_pipe, union_dir, kind, mode):
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

    library = ControlNetLibrary(torch.device("cpu"), torch.float32, use_manifest=False)
    library.register_union(union_dir)
    engine = _engine_with(tiny_model_dir, library)
    control = _control_map(64, 64, 9)
    ours = engine.generate(_request(num_images=2, controlnets=[_unit(kind, control, weight=0.8, end=0.8)])).pixels

    union = ControlNetUnionModel.from_config(ControlNetUnionModel.load_config(str(union_dir / "config_promax.json")))
    from safetensors.torch import load_file

    union.load_state_dict(load_file(str(union_dir / "diffusion_pytorch_model_promax.safetensors")))
    pipe = StableDiffusionXLControlNetUnionPipeline(**reference_pipe.components, controlnet=union)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    theirs = pipe(prompt="a robot in a field", control_image=[control], control_mode=[mode], width=64, height=64,
                  num_inference_steps=5, guidance_scale=5.0, controlnet_conditioning_scale=0.8, control_guidance_end=0.8,
                  num_images_per_prompt=2, generator=generators(3, 2), output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_missing_controlnet_weights_name_the_fetch_command(engine, refgen_home):
    with pytest.raises(WeightsMissingError, match="refgen weights fetch controlnet-openpose-sdxl"):
        engine.generate(_request(controlnets=[_unit("pose", _control_map(64, 64, 0))]))


@pytest.mark.parametrize("fields, words", [({"type": "laser"}, "unknown control type"), ({"weight": 2.5}, "weight"),
                                           ({"start": 0.7, "end": 0.3}, "start")])
def test_invalid_units_are_rejected_by_name(fields, words):
    with pytest.raises(ValueError, match=words):
        ControlUnit(**{"type": "canny", "image": "x.png", **fields})


def _photo(size: int = 64) -> Image.Image:
    from skimage.data import astronaut

    return Image.fromarray(astronaut()).resize((size, size), Image.LANCZOS)


def test_a_photo_is_preprocessed_automatically_and_a_control_map_is_not(control_engine):
    photo = _photo()
    auto = control_engine.generate(_request(controlnets=[ControlUnit(type="canny", image=photo, weight=2.0)])).pixels
    edges = control_engine.adapter(ControlNets).preprocessors.run("canny", photo)
    from_edges = control_engine.generate(_request(controlnets=[ControlUnit(type="canny", image=edges, weight=2.0)])).pixels
    raw_photo = control_engine.generate(_request(controlnets=[_unit("canny", photo, weight=2.0)])).pixels
    assert np.array_equal(auto, from_edges)  # the photo became its canny map; the map was used as is
    assert np.abs(auto - raw_photo).max() > 1e-4


def test_remix_is_img2img_plus_a_control_unit_from_the_same_image(control_engine, tmp_path):
    from engine.remix import REMIX_INIT_STRENGTH, remix_request

    path = tmp_path / "photo.png"
    _photo().save(path)
    request = remix_request(str(path), "a bronze statue", control="canny", width=64, height=64, steps=4, seed=1)
    assert request.init_strength == REMIX_INIT_STRENGTH and request.controlnets[0].image == str(path)
    result = control_engine.generate(request)
    meta = result.metadata[0]["resolved"]
    assert meta["init_strength"] == REMIX_INIT_STRENGTH and meta["controlnets"][0]["type"] == "canny"
    without_control = control_engine.generate(request.model_copy(update={"controlnets": []})).pixels
    assert np.abs(result.pixels - without_control).max() > 1e-3
    assert np.array_equal(control_engine.replay(result.save(tmp_path / "out")[0]).pixels, result.pixels)
