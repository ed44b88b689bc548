"""T2I-Adapter units: parity with diffusers' StableDiffusionXLAdapterPipeline, and the unit semantics.

The tiny adapters are diffusers' T2IAdapter in the published SDXL config family (TencentARC/t2i-adapter-*-sdxl-1.0:
`adapter_type: full_adapter_xl`, downscale_factor 16; channels shrunk to the tiny UNet's [32, 64], one res block),
written by save_pretrained as the published folders are (config.json + diffusion_pytorch_model.safetensors) and
loaded back through the engine's loader (T2IAdapter.from_pretrained, local files, safetensors only).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.controlnet import ControlNetLibrary
from adapters.t2i_adapter import RESIDUALS, T2IAdapterError, T2IAdapterLibrary, load_t2i_adapter
from conftest import generators
from engine import Engine, GenerationRequest, T2IAdapterUnit, WeightsMissingError
from engine.compose import default_adapters
from engine.tiny.adapters import save_tiny_t2i_adapter
from test_controlnet import _control_map, _request, _unit
from test_parity import TOLERANCE, _diffusers_scheduler, _max_diff

CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def t2i_dirs(tiny_model_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    root = tmp_path_factory.mktemp("t2i-adapters")
    return {kind: save_tiny_t2i_adapter(unet, root / kind, seed) for kind, seed in (("canny", 40), ("depth", 41))}


@pytest.fixture(scope="module")
def t2i_engine(tiny_model_dir, t2i_dirs, controlnet_dirs):
    """The tiny model with those T2I-Adapters and the tiny ControlNets."""
    adapters = partial(default_adapters, controlnets=ControlNetLibrary(CPU, FP32, controlnet_dirs),
                       t2i_adapters=T2IAdapterLibrary(CPU, FP32, t2i_dirs))
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", adapters=adapters)


def _adapter(kind: str, image, **fields) -> T2IAdapterUnit:
    return T2IAdapterUnit(type=kind, image=image, preprocess=False, **fields)


def _diffusers_pipe(reference_pipe, adapter, scheduler: str, model_dir):
    from diffusers import StableDiffusionXLAdapterPipeline

    pipe = StableDiffusionXLAdapterPipeline(**reference_pipe.components, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler(scheduler, model_dir)
    return pipe


@pytest.mark.parametrize("scheduler, batch, weight, end", [("euler", 2, 1.0, 1.0), ("dpmpp_2m_karras", 1, 0.7, 0.6)])
def test_one_unit_matches_the_diffusers_adapter_pipeline(t2i_engine, reference_pipe, t2i_dirs, tiny_model_dir,
                                                         scheduler, batch, weight, end):
    control = _control_map(64, 64, 0)
    ours = t2i_engine.generate(_request(scheduler=scheduler, num_images=batch,
                                        t2i_adapters=[_adapter("canny", control, weight=weight, end=end)])).pixels
    pipe = _diffusers_pipe(reference_pipe, load_t2i_adapter(t2i_dirs["canny"], FP32), scheduler, tiny_model_dir)
    theirs = pipe(prompt="a robot in a field", image=control, width=64, height=64, num_inference_steps=5, guidance_scale=5.0,
                  adapter_conditioning_scale=weight, adapter_conditioning_factor=end, num_images_per_prompt=batch,
                  generator=generators(3, batch), output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_a_unit_visibly_changes_the_image_and_weight_zero_is_no_unit(t2i_engine):
    plain = t2i_engine.generate(_request()).pixels
    by_weight = {weight: t2i_engine.generate(_request(t2i_adapters=[_adapter("canny", _control_map(64, 64, 5), weight=weight)]))
                 for weight in (0.0, 1.0)}
    assert np.array_equal(by_weight[0.0].pixels, plain)  # bit-identical: the unit is skipped, not run at scale 0
    assert np.abs(by_weight[1.0].pixels - plain).max() > 0.1


def test_the_unet_consumes_every_feature_the_adapter_gives(t2i_dirs, tiny_model_dir):
    """Each feature map lands where UNet2DConditionModel adds `down_intrablock_additional_residuals`: after the
    DownBlock2D, at the CrossAttnDownBlock2D's last layer (it pops the list; a wrong shape raises, a feature left over
    was not used), and it changes the UNet's output."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").eval()
    adapter = load_t2i_adapter(t2i_dirs["canny"], FP32)
    with torch.inference_mode():
        features = adapter(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        assert [tuple(f.shape[1:]) for f in features] == [(32, 4, 4), (64, 4, 4)]
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        kwargs = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim),
                  "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}}
        residuals = list(features)
        guided = unet(latents, 10, **kwargs, **{RESIDUALS: residuals}).sample
        plain = unet(latents, 10, **kwargs).sample
    assert residuals == []
    assert (guided - plain).abs().max() > 1e-2


def test_an_adapter_and_a_controlnet_unit_combine_in_one_request(t2i_engine):
    edges, depth = _control_map(64, 64, 1), _control_map(64, 64, 2)
    control = [_unit("canny", edges)]
    only_control = t2i_engine.generate(_request(controlnets=control)).pixels
    only_adapter = t2i_engine.generate(_request(t2i_adapters=[_adapter("depth", depth)])).pixels
    both = t2i_engine.generate(_request(controlnets=control, t2i_adapters=[_adapter("depth", depth)])).pixels
    silent = t2i_engine.generate(_request(controlnets=control, t2i_adapters=[_adapter("depth", depth, weight=0.0)])).pixels
    assert np.abs(both - only_control).max() > 1e-2 and np.abs(both - only_adapter).max() > 1e-2
    assert np.array_equal(silent, only_control)


def test_two_adapter_units_sum_like_one_adapter_of_their_summed_weight(t2i_engine):
    """Features are linear in the weight and units add up: canny at 0.4 + canny at 0.6 == canny at 1.0."""
    edges = _control_map(64, 64, 3)
    split = t2i_engine.generate(_request(t2i_adapters=[_adapter("canny", edges, weight=0.4), _adapter("canny", edges, weight=0.6)]))
    whole = t2i_engine.generate(_request(t2i_adapters=[_adapter("canny", edges, weight=1.0)]))
    assert _max_diff(split.pixels, whole.pixels) <= TOLERANCE


def test_adapter_units_are_recorded_and_replayed(t2i_engine, tmp_path):
    path = tmp_path / "edges.png"
    _control_map(64, 64, 7).save(path)
    result = t2i_engine.generate(_request(num_images=2, t2i_adapters=[_adapter("edge", str(path), weight=1.2, end=0.8)]))
    saved = result.save(tmp_path / "out")
    meta = result.metadata[1]
    record = meta["resolved"]["t2i_adapters"][0]
    assert (record["type"], record["weight"], record["end"], len(record["image"]["sha256"])) == ("canny", 1.2, 0.8, 64)
    assert meta["request"]["t2i_adapters"][0]["image"] == str(path)
    assert np.array_equal(t2i_engine.replay(saved[1]).pixels[0], result.pixels[1])


def test_missing_adapter_weights_name_the_fetch_command(engine, refgen_home):
    with pytest.raises(WeightsMissingError, match="refgen weights fetch t2i-adapter-openpose-sdxl"):
        engine.generate(_request(t2i_adapters=[_adapter("openpose", _control_map(64, 64, 0))]))


def test_a_size_the_adapter_cannot_take_is_refused_by_name(t2i_engine):
    with pytest.raises(T2IAdapterError, match="multiples of 32"):
        t2i_engine.generate(_request(width=72, height=64, t2i_adapters=[_adapter("canny", _control_map(72, 64, 0))]))


def test_a_folder_without_a_t2i_adapter_is_refused_when_registered(controlnet_dirs, tmp_path):
    library = T2IAdapterLibrary(CPU, FP32)
    with pytest.raises(T2IAdapterError, match="not a T2IAdapter"):
        library.register("canny", controlnet_dirs["canny"])
    with pytest.raises(T2IAdapterError, match="no readable config.json"):
        library.register("canny", tmp_path)


@pytest.mark.parametrize("fields, words", [({"type": "normal"}, "no T2I-Adapter for type 'normal'"), ({"weight": 2.5}, "weight"),
                                           ({"start": 0.7, "end": 0.3}, "T2I-Adapter unit window")])
def test_invalid_units_are_rejected_by_name(fields, words):
    with pytest.raises(ValueError, match=words):
        GenerationRequest(prompt="x", t2i_adapters=[{"type": "canny", "image": "x.png", **fields}])


def test_published_type_names_map_onto_the_preprocessor_types():
    names = ["canny", "lineart", "sketch", "depth", "openpose", "edge"]
    assert [T2IAdapterUnit(type=name, image="x.png").type for name in names] == ["canny", "lineart", "scribble", "depth",
                                                                                 "pose", "canny"]


def test_the_cli_runs_an_adapter_offline_on_the_tiny_model(refgen_home, tmp_path):
    """`--model tiny` serves --adapter with its stand-in (built on first use, never downloaded), and it is live."""
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.provenance import read_metadata

    _control_map(64, 64, 9).save(tmp_path / "sketch.png")
    base = ["generate", "a knight", "--model", "tiny", "--steps", "2", "--seed", "5", "--width", "64", "--height", "64"]
    pixels = {}
    for name, extra in (("plain", []), ("adapter", ["--adapter", f"sketch:{tmp_path / 'sketch.png'}:0.5"])):
        result = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        (written,) = (tmp_path / name).glob("*.png")
        pixels[name] = np.asarray(Image.open(written).convert("RGB"), dtype=np.int16)
    record = read_metadata(written)["resolved"]["t2i_adapters"]
    assert [(unit["type"], unit["weight"]) for unit in record] == [("scribble", 0.5)]
    assert np.abs(pixels["adapter"] - pixels["plain"]).max() > 5


@pytest.mark.parametrize("key", ["t2i_adapters", "t2iAdapters"])
def test_the_leonardo_api_refuses_a_t2i_adapter_field_by_name(key):
    """Leonardo has no T2I-Adapter: the API keeps to Leonardo's JSON (engine/api/leonardo.py says why)."""
    from engine.api.leonardo import LeonardoRequestError, parse_generation

    body = {"prompt": "a fox", key: [{"type": "canny", "image": "x.png"}]}
    with pytest.raises(LeonardoRequestError, match="unknown field") as caught:
        parse_generation(body, images=lambda image_id, kind: None)
    assert caught.value.field == key
