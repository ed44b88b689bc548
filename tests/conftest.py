"""Shared fixtures: a tiny random-weight SDXL saved in diffusers layout and loaded back through
the same loader users run on real weights. Nothing here touches a network or a GPU."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

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
