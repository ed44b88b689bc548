"""The tiny model's stand-in components, ControlNet registration, the public imports, and an offline fetch.

The stand-ins are built by `engine.weights.require` from the recipes in `engine.tiny.components.components_manifest()`
and read back through the loaders real weights go through (spandrel for ESRGAN, diffusers for ControlNets
and IP-Adapters, insightface for the face packs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from engine import paths, tiny, weights
from engine.tiny.components import components_dir, components_manifest

CPU, FP32 = torch.device("cpu"), torch.float32
HEAVY = {"annotators-openpose"}  # controlnet-aux's fixed-size networks: 255 MB, built only when pose needs them


@pytest.fixture(scope="module")
def kit(refgen_home):
    """(manifest, folder) of the stand-ins, where `Engine.load("tiny")` looks for them."""
    return components_manifest(), components_dir(paths.cache_dir())


@pytest.fixture(scope="module")
def tiny_engine(refgen_home):
    from engine import Engine

    return Engine.load("tiny", device="cpu", dtype="fp32")


def test_stand_ins_cover_the_components_a_request_can_name(kit):
    real = weights.Manifest.load()
    stand_ins = kit[0]
    pipelines = {e.name for e in real.entries if e.kind in ("sdxl-pipeline", "config", "vae")}  # the tiny model itself
    assert set(stand_ins.names()) == set(real.names()) - pipelines
    for entry in stand_ins.entries:  # the same folders as fetched weights, so the same layouts
        assert entry.local_dir == real.get(entry.name).local_dir


def test_each_stand_in_is_built_once_with_its_hashes_recorded(kit):
    manifest, folder = kit
    for entry in manifest.entries:
        if entry.name in HEAVY:
            continue
        built = weights.require(entry.name, folder, manifest)
        lock_before = weights.lock_path(built).read_text()
        assert [check.status for check in weights.verify(entry, folder)] == ["ok"] * len(entry.files), entry.name
        assert weights.require(entry.name, folder, manifest) == built
        assert weights.lock_path(built).read_text() == lock_before  # not built twice
        assert not [p for p in built.iterdir() if p.name.endswith(".building")]


@pytest.mark.parametrize("name, scale", [("realesrgan-x2plus", 2), ("realesrgan-x4plus", 4), ("tiny", 4)])
def test_the_tiny_real_esrgan_loads_through_spandrel_in_the_published_layout(name, scale, kit):
    from adapters.upscale import Upscaler

    manifest, folder = kit
    up = Upscaler.load(name, device="cpu", manifest=manifest, weights_dir=folder)
    assert (up.architecture, up.scale) == ("ESRGAN", scale)  # RRDBNet recognised from the Real-ESRGAN key names
    entry = manifest.get(f"realesrgan-x{scale}plus")
    assert up.info.sha256 == weights.read_lock(entry.folder(folder))[entry.files[0].path]["sha256"]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 10, 3), np.uint8))
    assert up.upscale(image, progress=False).size == (10 * scale, 12 * scale)


def _request(**fields):
    from engine import GenerationRequest

    return GenerationRequest(**{"prompt": "a portrait", "width": 64, "height": 64, "steps": 2, "seed": 3, **fields})


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (128, 128, 3), np.uint8)).save(path)
    return path


def test_the_stand_ins_steer_the_picture(tiny_engine, picture):
    """Live weights: a ControlNet, a style reference and a character each change the pixels; at weight 0
    each is exactly absent (zero-initialised parts left at zero would pass the second check, not the first)."""
    from engine import CharacterReference, ControlUnit, Reference

    plain = tiny_engine.generate(_request()).pixels
    for field, live, off in [
        ("controlnets", [ControlUnit(type="canny", image=picture)], [ControlUnit(type="canny", image=picture, weight=0)]),
        ("references", [Reference(kind="style", image=picture)], [Reference(kind="style", image=picture, weight=0)]),
        ("character", CharacterReference(images=[picture], weight=2), CharacterReference(images=[picture], weight=0)),
    ]:
        assert np.abs(tiny_engine.generate(_request(**{field: live})).pixels - plain).max() > 1e-3, field
        assert np.abs(tiny_engine.generate(_request(**{field: off})).pixels - plain).max() <= 1e-5, field


def test_the_request_types_are_importable_from_engine():
    import engine
    from engine.request_types import ControlUnit
    from engine.request_types import CharacterReference
    from engine.request_types import Reference

    assert (engine.ControlUnit, engine.Reference, engine.CharacterReference) == (ControlUnit, Reference, CharacterReference)
    assert {"ControlUnit", "Reference", "CharacterReference"} <= set(engine.__all__)


def test_register_checks_the_folder_at_once(tmp_path):
    from adapters.controlnet import ControlNetFolderError, ControlNetLibrary
    from engine import RefgenError

    library = ControlNetLibrary(CPU, FP32, use_manifest=False)
    with pytest.raises(ControlNetFolderError, match="does not exist"):
        library.register("canny", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ControlNetFolderError, match="no config.json"):
        library.register("canny", tmp_path / "empty")
    tiny.build_tiny_unet(0).save_config(tmp_path / "unet")
    with pytest.raises(ControlNetFolderError, match="UNet2DConditionModel config, not a ControlNet"):
        library.register("depth", tmp_path / "unet")
    assert issubclass(ControlNetFolderError, RefgenError) and library.served_types() == []


def test_register_tells_single_type_from_union_folders(tmp_path):
    from adapters.controlnet import ControlNetLibrary

    single = tiny.save_tiny_controlnet(tiny.build_tiny_unet(0), tmp_path / "canny", seed=1)
    union = tiny.save_tiny_union_promax(tmp_path / "union")
    library = ControlNetLibrary(CPU, FP32, use_manifest=False)
    library.register("edge", single)
    library.register("depth", union)
    assert (library.identity("canny"), library.identity("depth")) == (f"single:{single}", f"union:{union}")
    assert type(library.model("depth")).__name__ == "UnionControl"  # loaded the promax files, serves its depth mode


def test_the_weights_keys_decide_single_or_union_whatever_the_config_says(tmp_path):
    """As spandrel tells architectures apart: by the parameters present. A union model re-saved with a plain
    ControlNet class name is still served as a union, and a UNet's folder is no ControlNet at all."""
    import json

    from adapters.controlnet import ControlNetFolderError, controlnet_kind

    union = tiny.build_tiny_union(tiny.tiny_unet_config(), seed=2)
    union.save_pretrained(tmp_path / "union")
    config = tmp_path / "union" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "ControlNetModel"}))
    assert controlnet_kind(tmp_path / "union") == "union"
    assert controlnet_kind(tiny.save_tiny_controlnet(tiny.build_tiny_unet(0), tmp_path / "canny", seed=1)) == "single"
    tiny.build_tiny_unet(0).save_pretrained(tmp_path / "unet")
    with pytest.raises(ControlNetFolderError, match="holds no ControlNet"):
        controlnet_kind(tmp_path / "unet")


def test_engine_load_registers_controlnets_and_refuses_a_bad_folder_first(refgen_home, tmp_path):
    from adapters.controlnet import ControlNetFolderError, ControlNets
    from engine import Engine

    mine = tiny.save_tiny_controlnet(tiny.build_tiny_unet(0), tmp_path / "mine", seed=7)
    engine = Engine.load("tiny", device="cpu", dtype="fp32", controlnets={"canny": mine})
    library = engine.adapter(ControlNets).library
    assert library.identity("canny") == f"single:{mine}"
    assert library.identity("depth") == "single:controlnet-depth-sdxl"  # the others keep their default
    with pytest.raises(ControlNetFolderError, match="missing"):
        Engine.load("tiny", device="cpu", dtype="fp32", controlnets={"pose": tmp_path / "missing"})


def test_fetch_offline_says_what_is_missing_and_leaves_nothing_behind(refgen_home, tmp_path):
    from engine.cli import app

    result = CliRunner().invoke(app, ["weights", "fetch", "realesrgan-x4plus", "sdxl-vae-fp16-fix", "--weights-dir",
                                      str(tmp_path), "--no-progress"])  # the tests run with HF_HUB_OFFLINE=1
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()  # the error; the license notices went to stdout
    assert "HF_HUB_OFFLINE" in lines[0]
    assert any("realesrgan-x4plus: RealESRGAN_x4plus.safetensors" in line for line in lines)
    assert any("sdxl-vae-fp16-fix: config.json" in line for line in lines)  # the one not attempted too
    assert "--model tiny" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # no staging folder, no empty component folder


def test_fetch_with_no_network_fails_fast_without_retrying(tmp_path):
    """A hub that refuses connections: huggingface_hub alone retries for ~25 s; refgen asks once."""
    script = ("import sys, time; from typer.testing import CliRunner; from engine.cli import app; start = time.monotonic(); "
              "result = CliRunner().invoke(app, sys.argv[1:]); "
              "print(json.dumps({'code': result.exit_code, 'seconds': time.monotonic() - start, 'output': result.output}))")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "REFGEN_HOME": str(tmp_path / "home")}
    completed = subprocess.run(
        [sys.executable, "-c", "import json; " + script, "weights", "fetch", "realesrgan-x4plus", "--weights-dir",
         str(tmp_path / "weights"), "--no-progress"], capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["code"] == 1 and answer["seconds"] < 10, answer
    assert "cannot reach the Hugging Face hub" in answer["output"] and "RealESRGAN_x4plus.safetensors" in answer["output"]
    assert "Retrying" not in completed.stderr + answer["output"]
    assert not (tmp_path / "weights").exists() or list((tmp_path / "weights").rglob("*")) == []
