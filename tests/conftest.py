"""Shared fixtures: a tiny random-weight SDXL saved in diffusers layout and loaded back through
the same loader users run on real weights. Nothing here touches a network or a GPU."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

COMMITTED_MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.toml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: a test that tries the hub fails
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def refgen_home(tmp_path_factory):
    """A private data folder for the whole session (presets, caches, the built-in tiny model)."""
    home = tmp_path_factory.mktemp("refgen_home")
    previous = {key: os.environ.get(key) for key in ("REFGEN_HOME", "REFGEN_WEIGHTS")}
    os.environ["REFGEN_HOME"] = str(home)
    os.environ["REFGEN_WEIGHTS"] = str(home / "weights")
    yield home
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def private_home(tmp_path, monkeypatch):
    """A REFGEN_HOME of this test only (caches, presets, the Leonardo model table), the committed manifest,
    an empty weights folder, and insightface unable to download: nothing from the machine leaks in.
    Returns the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("REFGEN_HOME", str(home))
    monkeypatch.setenv("REFGEN_MANIFEST", str(COMMITTED_MANIFEST))
    monkeypatch.setenv("REFGEN_WEIGHTS", str(tmp_path / "empty-weights"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"insightface tried to download: {args}")

    import insightface.utils.storage as storage

    monkeypatch.setattr(storage, "download_file", no_download)  # a guard on a third-party download, not on refgen
    return home


@pytest.fixture(scope="session")
def astronaut():
    """skimage's astronaut photo: 512 x 512, one frontal face, a helmet bottom right."""
    from PIL import Image
    from skimage.data import astronaut as load

    return Image.fromarray(load())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, refgen_home):
    from engine.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """Our Engine over the tiny model, loaded from its folder like any real diffusers model."""
    from engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def reference_pipe(tiny_model_dir):
    """diffusers' own SDXL pipeline over the same files: the reference our loop must match."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + index) for index in range(count)]


@pytest.fixture(scope="session")
def controlnet_dirs(tiny_model_dir, tmp_path_factory):
    """Tiny canny and depth ControlNets in diffusers' folder layout, copied from the tiny UNet with their
    zero-initialised parts randomised (a fresh ControlNet changes nothing and would prove nothing)."""
    from diffusers import UNet2DConditionModel

    from tiny_controlnet import save_tiny_controlnet

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    root = tmp_path_factory.mktemp("controlnets")
    return {kind: save_tiny_controlnet(unet, root / kind, seed) for kind, seed in (("canny", 10), ("depth", 11))}


@pytest.fixture(scope="session")
def control_engine(tiny_model_dir, controlnet_dirs):
    """An Engine over the tiny model with those ControlNets registered at load."""
    from engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", controlnets=controlnet_dirs)

