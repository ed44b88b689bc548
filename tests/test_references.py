"""Style and Content Reference (IP-Adapter, InstantStyle layers): parity with diffusers and semantics."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from adapters.ip_adapter import IPAdapters, StyleContentReferences, block_scales

from engine.request_types import Reference
from conftest import generators
from engine import Engine, GenerationRequest, WeightsMissingError
from engine.compose import default_adapters
from test_parity import TOLERANCE, _diffusers_scheduler, _max_diff
from tiny_ip_adapter import save_tiny_ip_adapter


@pytest.fixture(scope="module")
def ip_root(tiny_model_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    return save_tiny_ip_adapter(unet, tmp_path_factory.mktemp("ip") / "IP-Adapter")


def ip_engine(tiny_model_dir, ip_root, **options) -> Engine:
    """An engine whose IP-Adapter comes from the tiny folder `ip_root`."""
    def adapters(setup):
        return default_adapters(setup, ip_adapters=IPAdapters(setup.pipe, setup.device, setup.dtype, reference=ip_root, **options))
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", adapters=adapters)


def encoder_runs(engine: Engine) -> int:
    return engine.adapter(StyleContentReferences).ip_adapters.encoder_runs


@pytest.fixture(scope="module")
def ref_engine(tiny_model_dir, ip_root):
    return ip_engine(tiny_model_dir, ip_root)


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), np.uint8))


def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a lighthouse", width=64, height=64, steps=4, guidance_scale=5.0, scheduler="euler", seed=6)
    return GenerationRequest(**{**base, **fields})


def _diffusers_with_ip(tiny_model_dir, ip_root, kinds_scales, images, batch):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ip_root), subfolder="sdxl_models", weight_name=["ip-adapter_sdxl_vit-h.safetensors"] * len(images),
                         image_encoder_folder="models/image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale([block_scales(pipe.unet, kind, scale) for kind, scale in kinds_scales])
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    return pipe(prompt="a lighthouse", width=64, height=64, num_inference_steps=4, guidance_scale=5.0, ip_adapter_image=images,
                num_images_per_prompt=batch, generator=generators(6, batch), output_type="np").images


def test_instantstyle_layers_are_the_style_and_layout_attentions(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from engine.sdxl_configs import build_sdxl_unet_on_meta

    sdxl = build_sdxl_unet_on_meta()
    assert block_scales(sdxl, "style", 1.0) == {"up": {"block_0": [0.0, 1.0, 0.0]}}  # up_blocks.0.attentions.1
    assert block_scales(sdxl, "content", 0.5) == {"down": {"block_2": [0.0, 0.5]}}  # down_blocks.2.attentions.1
    tiny = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    assert block_scales(tiny, "content", 1.0) == {"down": {"block_1": [0.0, 1.0]}}


@pytest.mark.parametrize("kind, batch", [("style", 2), ("content", 1)])
def test_one_reference_matches_diffusers_ip_adapter_pipeline(ref_engine, tiny_model_dir, ip_root, kind, batch):
    picture = _picture(1)
    ours = ref_engine.generate(_request(num_images=batch, references=[Reference(kind=kind, image=picture, weight=1.3)])).pixels
    theirs = _diffusers_with_ip(tiny_model_dir, ip_root, [(kind, 1.3)], [picture], batch)
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_style_and_content_together_match_two_diffusers_adapters(ref_engine, tiny_model_dir, ip_root):
    style, content = _picture(2), _picture(3)
    refs = [Reference(kind="style", image=style, strength_type="Ultra"), Reference(kind="content", image=content, weight=0.7)]
    ours = ref_engine.generate(_request(references=refs)).pixels
    theirs = _diffusers_with_ip(tiny_model_dir, ip_root, [("style", 1.4), ("content", 0.7)], [style, content], 1)
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_a_reference_changes_the_image_and_scale_zero_is_no_adapter(ref_engine, engine):
    plain = engine.generate(_request()).pixels
    live = ref_engine.generate(_request(references=[Reference(kind="style", image=_picture(4), weight=2.0)])).pixels
    zero = ref_engine.generate(_request(references=[Reference(kind="style", image=_picture(4), weight=0.0)])).pixels
    assert np.abs(live - plain).max() > 1e-3
    assert np.abs(zero - plain).max() <= 1e-5
    # and without references the adapter is unloaded: exactly the plain model again
    assert np.array_equal(ref_engine.generate(_request()).pixels, plain)


def test_only_the_ratio_of_style_influences_matters(ref_engine):
    a, b = _picture(5), _picture(6)
    def styled(influence_a, influence_b):
        refs = [Reference(kind="style", image=a, influence=influence_a), Reference(kind="style", image=b, influence=influence_b)]
        return ref_engine.generate(_request(references=refs)).pixels
    assert np.abs(styled(1, 1) - styled(0.5, 0.5)).max() <= 1e-6
    assert np.abs(styled(1, 3) - styled(0.25, 0.75)).max() <= 1e-6
    assert np.abs(styled(1, 1) - styled(1, 3)).max() > 1e-4


def test_a_repeated_reference_skips_its_encoder_even_in_a_new_engine(ref_engine, tiny_model_dir, ip_root):
    picture = _picture(7)
    before = encoder_runs(ref_engine)
    first = [ref_engine.generate(_request(references=[Reference(kind="style", image=picture)])).pixels for _ in range(2)]
    assert encoder_runs(ref_engine) == before + 1
    fresh = ip_engine(tiny_model_dir, ip_root)
    again = fresh.generate(_request(references=[Reference(kind="style", image=picture)])).pixels
    assert encoder_runs(fresh) == 0  # read from the disk cache
    assert np.array_equal(again, first[0])


def test_references_are_recorded_and_replayed(ref_engine, tmp_path):
    path = tmp_path / "style.png"
    _picture(8).save(path)
    result = ref_engine.generate(_request(num_images=2, references=[Reference(kind="style", image=str(path), strength_type="Mid")]))
    record = result.metadata[0]["resolved"]["references"][0]
    assert record["kind"] == "style" and record["strength_type"] == "Mid" and len(record["image"]["sha256"]) == 64
    saved = result.save(tmp_path / "out")
    assert np.array_equal(ref_engine.replay(saved[1]).pixels, result.pixels[1:])


# Leonardo's strengthType buckets as the README documents them (Low 0-0.4 ... Max 1.6-2: each bucket's middle).
@pytest.mark.parametrize("strength_type, scale", [("Low", 0.2), ("Mid", 0.6), ("High", 1.0), ("Ultra", 1.4), ("Max", 1.8)])
def test_strength_buckets_run_at_the_documented_weights(strength_type, scale):
    assert Reference(kind="style", image="x.png", strength_type=strength_type).scale == scale


def test_a_reference_runs_at_high_unless_told_and_takes_a_weight_or_a_bucket():
    assert Reference(kind="style", image="x.png").scale == 1.0
    assert Reference(kind="content", image="x.png", weight=0.35).scale == 0.35
    with pytest.raises(ValidationError, match="not both"):
        Reference(kind="style", image="x.png", weight=1.0, strength_type="Low")
    with pytest.raises(ValidationError, match="weight"):
        Reference(kind="style", image="x.png", weight=2.5)


def test_missing_ip_adapter_weights_name_the_fetch_command(engine):
    with pytest.raises(WeightsMissingError, match="refgen weights fetch ip-adapter-sdxl"):
        engine.generate(_request(references=[Reference(kind="style", image=_picture(0))]))


def test_which_clip_output_an_adapter_feeds_on_is_read_from_its_keys(tiny_model_dir, tmp_path):
    """Plus files carry a Resampler's learnt latents and feed on hidden states; the base file does not.
    The same holds for the published .bin layout (nested image_proj / ip_adapter dicts)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from adapters.ip_adapter import WEIGHT_FILES, resamples_hidden_states
    from tiny_ip_adapter import save_tiny_ip_adapter_plus

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    root = save_tiny_ip_adapter_plus(unet, save_tiny_ip_adapter(unet, tmp_path / "IP-Adapter"))
    plus, base = root / WEIGHT_FILES["plus"], root / WEIGHT_FILES["vit-h"]
    assert resamples_hidden_states(plus) and not resamples_hidden_states(base)
    nested: dict = {}
    for key, tensor in load_file(str(plus)).items():
        outer, inner = key.split(".", 1)
        nested.setdefault(outer, {})[inner] = tensor
    torch.save(nested, tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")
    assert resamples_hidden_states(tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")


@pytest.mark.parametrize("kind", ["style", "content"])
def test_the_plus_layout_matches_diffusers(tiny_model_dir, ip_root, kind):
    """ip-adapter-plus_sdxl_vit-h: a Resampler over the encoder's hidden states (tiny, published key layout)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from tiny_ip_adapter import save_tiny_ip_adapter_plus

    save_tiny_ip_adapter_plus(UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet"), ip_root)
    engine = ip_engine(tiny_model_dir, ip_root, variant="plus")
    picture = _picture(9)
    ours = engine.generate(_request(num_images=2, references=[Reference(kind=kind, image=picture, weight=1.5)])).pixels

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ip_root), subfolder="sdxl_models", weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
                         image_encoder_folder="models/image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale(block_scales(pipe.unet, kind, 1.5))
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    theirs = pipe(prompt="a lighthouse", width=64, height=64, num_inference_steps=4, guidance_scale=5.0, ip_adapter_image=picture,
                  num_images_per_prompt=2, generator=generators(6, 2), output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE
    plain = engine.generate(_request(num_images=2)).pixels
    assert np.abs(ours - plain).max() > 1e-3
