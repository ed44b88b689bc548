"""Loading models from every kind of reference, offline, with the pickle policy enforced."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, UnsafeWeightsError, WeightsMissingError
from engine.errors import UnknownModelError
from engine.sdxl_configs import SDXL_UNET_PARAMETERS, build_sdxl_unet_on_meta
from sdxl_original_layout import save_original_sdxl_checkpoint

REQUEST = dict(prompt="a harbour at night", width=64, height=64, steps=3, guidance_scale=4.0, seed=12, scheduler="euler")


def test_the_real_sdxl_base_unet_config_has_the_published_parameter_count():
    unet = build_sdxl_unet_on_meta()
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMETERS == 2_567_463_684
    assert unet.config.cross_attention_dim == 2048 and unet.config.projection_class_embeddings_input_dim == 2816


def test_a_single_file_checkpoint_in_the_original_layout_matches_the_folder_model(tiny_model_dir, engine, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    checkpoint = save_original_sdxl_checkpoint(pipe, tmp_path / "community_model.safetensors")
    config = tmp_path / "config-only"
    shutil.copytree(tiny_model_dir, config, ignore=shutil.ignore_patterns("*.safetensors"))

    single = Engine.load(str(checkpoint), device="cpu", dtype="fp32", single_file_config=config)
    assert single.model.kind == "single-file"
    assert list(single.model.hashes) == ["community_model.safetensors"]
    ours = single.generate(GenerationRequest(**REQUEST)).pixels
    assert np.abs(ours - engine.generate(GenerationRequest(**REQUEST)).pixels).max() <= 1e-5


def test_a_single_file_without_the_sdxl_configs_names_the_weights_to_fetch(tmp_path, refgen_home):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(WeightsMissingError, match="refgen weights fetch sdxl-base-config"):
        Engine.load(str(checkpoint), device="cpu")


def test_missing_manifest_weights_name_the_entry_and_the_fetch_command(refgen_home):
    with pytest.raises(WeightsMissingError) as caught:
        Engine.load("sdxl-base", device="cpu")
    message = str(caught.value)
    assert "'sdxl-base'" in message and "refgen weights fetch sdxl-base" in message and "--model tiny" in message
    assert caught.value.entry == "sdxl-base" and "unet/diffusion_pytorch_model.fp16.safetensors" in caught.value.missing


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoints_are_refused_without_opt_in(tmp_path, suffix):
    checkpoint = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        Engine.load(str(checkpoint), device="cpu")


def test_a_diffusers_folder_holding_only_pickles_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.with_suffix(".bin").write_bytes(b"pickle")
        weights.unlink()
    with pytest.raises(UnsafeWeightsError, match="only pickle weights"):
        Engine.load(str(folder), device="cpu")


def test_a_repo_id_already_in_the_local_hugging_face_cache_loads_offline(tiny_model_dir, tmp_path, monkeypatch, engine):
    cache = tmp_path / "hf-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--refgen-test--tiny-sdxl" / "snapshots" / revision
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--refgen-test--tiny-sdxl" / "refs").mkdir()
    (cache / "models--refgen-test--tiny-sdxl" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    cached = Engine.load("refgen-test/tiny-sdxl", device="cpu", dtype="fp32")
    assert cached.model.kind == "hf-cache"
    assert np.array_equal(cached.generate(GenerationRequest(**REQUEST)).pixels, engine.generate(GenerationRequest(**REQUEST)).pixels)


def test_an_unknown_reference_says_what_is_accepted(refgen_home):
    with pytest.raises(UnknownModelError, match="manifest name .*sdxl-base.*--model tiny"):
        Engine.load("nobody/no-such-model", device="cpu")


def test_fp16_on_cpu_is_refused_with_advice():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Engine.load("tiny", device="cpu", dtype="fp16")
