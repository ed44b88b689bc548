"""`--model tiny` runs every command and option offline: each writes a real PNG of the expected size.

Before the tiny model had stand-ins for the other components, ultra, --upscale, remix, --control,
--style/--content and --character stopped on missing weights and suggested `--model tiny`, the option
already given. All runs share the session's REFGEN_HOME, so the stand-ins are built once.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.tiny import save_tiny_controlnet, tiny_unet_config

runner = CliRunner()
NATIVE = tiny_unet_config()["sample_size"] * 8  # the tiny model's native square side
SMALL = ["--width", "64", "--height", "64"]
FAST = ["--model", "tiny", "--steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A textured 128 px picture: canny finds edges in it, and the tiny face packs see a 77 px face."""
    folder = tmp_path_factory.mktemp("inputs")
    pixels = np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "dot.png")
    Image.new("L", (1, 1), 255).save(folder / "dot_mask.png")
    return folder


def _run(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--model tiny" not in result.output  # no message suggests the option already given
    return result


def _only_png(folder) -> Image.Image:
    (written,) = folder.glob("*.png")
    with Image.open(written) as image:
        image.load()
        return image


SMOKE = {  # option -> (command line with {photo} / {mask} / {folder} placeholders, expected size)
    "--mode ultra": (["generate", "a harbour", "--mode", "ultra", *SMALL], (128, 128)),
    "--upscale": (["generate", "a harbour", "--upscale", "2", *SMALL], (128, 128)),
    "remix": (["remix", "{photo}", "a bronze statue"], (NATIVE, NATIVE)),
    "remix --control depth": (["remix", "{photo}", "a bronze statue", "--control", "depth"], (NATIVE, NATIVE)),
    "--control": (["generate", "a dancer", "--control", "canny:{photo}", "--control", "depth:{photo}:0.5", *SMALL], (64, 64)),
    "--adapter": (["generate", "a dancer", "--adapter", "sketch:{photo}", "--adapter", "depth:{photo}:0.5:0:0.6",
                   "--control", "canny:{photo}", *SMALL], (64, 64)),
    "--style/--content": (["generate", "a cat", "--style", "{photo}:High", "--content", "{photo}:0.5", *SMALL], (64, 64)),
    "--character": (["generate", "a portrait", "--character", "{photo}", *SMALL], (64, 64)),
    "--character faceid": (["generate", "a portrait", "--character", "{photo}", "--character-adapter", "faceid", *SMALL],
                           (64, 64)),
    "--character-keep": (["generate", "a portrait", "--character", "{photo}", "--character-keep", "all", *SMALL], (64, 64)),
    "--character-mask": (["generate", "a portrait", "--character", "{photo}", "--character-mask", "{mask}", *SMALL], (64, 64)),
    "--inpaint-unet": (["generate", "a door", "--init", "{photo}", "--mask", "{mask}", "--inpaint-unet", "sdxl-inpainting"],
                       (128, 128)),
}


@pytest.mark.parametrize("option", list(SMOKE))
def test_every_option_runs_offline_on_the_tiny_model(option, photo, refgen_home, tmp_path):
    args, size = SMOKE[option]
    filled = [arg.format(photo=photo / "photo.png", mask=photo / "mask.png") for arg in args]
    _run([*filled, *FAST, "--out", str(tmp_path)])
    assert _only_png(tmp_path).size == size


def test_upscale_command_uses_the_tiny_real_esrgan(photo, refgen_home, tmp_path):
    result = _run(["upscale", str(photo / "photo.png"), "--model", "tiny", "--scale", "2", "--out", str(tmp_path / "big.png"),
                   "--no-progress"])
    assert "tiny-realesrgan-x2plus" in result.output
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == (256, 256)


TINY_INPUTS = {  # a 1x1 picture wherever a command takes an init image or a mask: resized, never refused
    "generate --init": (["generate", "x", "--init", "{dot}", *SMALL, *FAST], (64, 64)),
    "generate --init --mask": (["generate", "x", "--init", "{dot}", "--mask", "{dot_mask}", *FAST], (64, 64)),
    "remix": (["remix", "{dot}", "x", *FAST], (NATIVE, NATIVE)),
    "upscale": (["upscale", "{dot}", "--model", "tiny", "--scale", "2", "--no-progress"], (2, 2)),
}


@pytest.mark.parametrize("command", list(TINY_INPUTS))
def test_a_one_pixel_input_is_accepted_by_every_command(command, photo, refgen_home, tmp_path):
    args, size = TINY_INPUTS[command]
    filled = [arg.format(dot=photo / "dot.png", dot_mask=photo / "dot_mask.png") for arg in args]
    _run([*filled, "--out", str(tmp_path)])
    assert _only_png(tmp_path).size == size


def test_controlnet_model_serves_a_type_with_your_own_folder(photo, refgen_home, tmp_path):
    from engine.tiny import build_tiny_unet

    mine = save_tiny_controlnet(build_tiny_unet(0), tmp_path / "my-canny", seed=99)  # not the stand-in's seed
    base = ["generate", "a dancer", "--control", f"canny:{photo / 'photo.png'}", *SMALL, *FAST]
    _run([*base, "--out", str(tmp_path / "stand-in")])
    _run([*base, "--controlnet-model", f"edge={mine}", "--out", str(tmp_path / "mine")])
    stand_in, own = (np.asarray(_only_png(tmp_path / name), np.int16) for name in ("stand-in", "mine"))
    assert own.shape == (64, 64, 3) and np.abs(own - stand_in).max() > 0  # the same seed, another ControlNet


@pytest.mark.parametrize("command", [["generate", "x", *SMALL], ["remix", "{photo}", "x"]])
def test_controlnet_model_checks_the_folder_before_loading(command, photo, refgen_home, tmp_path):
    args = [arg.format(photo=photo / "photo.png") for arg in command]
    missing = runner.invoke(app, [*args, *FAST, "--controlnet-model", f"canny={tmp_path / 'nope'}", "--out", str(tmp_path)])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "nope" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, [*args, *FAST, "--controlnet-model", f"depth={tmp_path / 'empty'}", "--out", str(tmp_path)])
    assert empty.exit_code == 1 and "no config.json" in empty.output
    malformed = runner.invoke(app, [*args, *FAST, "--controlnet-model", "canny", "--out", str(tmp_path)])
    assert malformed.exit_code == 2 and "TYPE=FOLDER" in malformed.output
    assert not list(tmp_path.glob("*.png"))
