"""The `refgen` command line, driven the way a user types it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.provenance import read_metadata

runner = CliRunner()


def test_generate_with_the_tiny_model_writes_pngs_with_provenance(refgen_home, tmp_path):
    result = runner.invoke(app, ["generate", "a red fox", "--model", "tiny", "--n", "2", "--seed", "3", "--steps", "2",
                                 "--width", "64", "--height", "64", "--preset", "anime", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = sorted(tmp_path.glob("*.png"))
    assert [read_metadata(p)["image"]["seed"] for p in written] == [3, 4]
    assert read_metadata(written[0])["resolved"]["scheduler"] == "euler_a"  # from the anime preset


def test_replay_reports_identical_pixels(refgen_home, tmp_path):
    runner.invoke(app, ["generate", "a boat", "--model", "tiny", "--seed", "9", "--steps", "2", "--width", "64",
                        "--height", "64", "--out", str(tmp_path / "a")])
    (original,) = (tmp_path / "a").glob("*.png")
    result = runner.invoke(app, ["replay", str(original), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "pixels identical to the original" in result.output
    (copy,) = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(copy)))


def test_an_invalid_request_names_the_flag_and_exits_1(refgen_home, tmp_path):
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--guidance", "42", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--guidance: Input should be less than or equal to 20" in result.output
    assert "guidance_scale" not in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))


def test_missing_default_weights_say_how_to_fetch_them(refgen_home, tmp_path):
    result = runner.invoke(app, ["generate", "a cat", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "refgen weights fetch sdxl-base" in result.output and "--model tiny" in result.output


def test_presets_list_and_show(refgen_home):
    listed = runner.invoke(app, ["presets", "list"])
    assert listed.exit_code == 0 and "cinematic" in listed.output and "render_3d" in listed.output
    shown = runner.invoke(app, ["presets", "show", "PORTRAIT"])
    assert shown.exit_code == 0 and "example: portrait of a red fox" in shown.output
    assert runner.invoke(app, ["presets", "show", "nope"]).exit_code == 1


def test_control_units_parse_type_image_weight_and_window():
    from engine.request_types import ControlUnit

    from engine.cli.main import _control_unit

    unit = ControlUnit(**_control_unit("edge:photos/c:at.png:0.8:0.1:0.9"))
    assert (unit.type, unit.image, unit.weight, unit.start, unit.end) == ("canny", "photos/c:at.png", 0.8, 0.1, 0.9)
    assert ControlUnit(**_control_unit("depth:room.jpg")).weight == 1.0


def test_inpainting_from_the_command_line_keeps_the_outside(refgen_home, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = runner.invoke(app, ["generate", "a window", "--model", "tiny", "--steps", "2", "--init", str(tmp_path / "photo.png"),
                                 "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "out").glob("*.png")
    outside = mask == 0
    assert np.array_equal(np.asarray(Image.open(written))[outside], np.asarray(Image.open(tmp_path / "photo.png"))[outside])


def test_remix_without_controlnet_weights_says_what_to_fetch(refgen_home, tiny_model_dir, tmp_path):
    # A model folder (not `tiny`, whose stand-ins need no fetch) without the canny ControlNet on disk.
    Image.new("RGB", (64, 64), (90, 120, 200)).save(tmp_path / "photo.png")
    result = runner.invoke(app, ["remix", str(tmp_path / "photo.png"), "a bronze statue", "--model", str(tiny_model_dir),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 1 and "refgen weights fetch controlnet-canny-sdxl" in result.output


def test_upscale_command_is_registered(refgen_home, tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "small.png")
    result = runner.invoke(app, ["upscale", str(tmp_path / "small.png"), "--model", "tiny-x2", "--out", str(tmp_path / "big.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "big.png").size == (64, 64)


def test_style_and_content_references_parse_weight_strength_and_influence():
    from engine.request_types import Reference

    from engine.cli.main import _reference

    assert Reference(**_reference("style", "ink.png")).model_dump(exclude={"image"}) == {
        "kind": "style", "weight": None, "strength_type": None, "influence": 1.0}
    high = Reference(**_reference("style", "art/c:ink.png:High:2"))
    assert (high.image, high.strength_type, high.influence) == ("art/c:ink.png", "High", 2.0)
    assert Reference(**_reference("content", "layout.png:0.7")).weight == 0.7


def test_character_options_name_a_profile_or_list_photos(tmp_path):
    from engine.request_types import CharacterReference

    from engine.cli.main import _character

    photo = tmp_path / "me.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    by_name = CharacterReference(**_character(["mira"], "High", "instantid", None, None))
    assert (by_name.name, by_name.strength_type, by_name.images) == ("mira", "High", [])
    by_photos = CharacterReference(**_character([str(photo), str(photo)], "0.7", "faceid", None, 1))
    assert (by_photos.name, by_photos.weight, by_photos.adapter, by_photos.face_index) == (None, 0.7, "faceid", 1)
    assert len(by_photos.images) == 2
    assert _character(["typo.jpg"], None, "instantid", None, None)["images"] == [Path("typo.jpg")]  # a photo, not a name
    assert _character(None, None, "instantid", None, None) is None


def test_character_options_without_a_character_are_a_usage_error(refgen_home, tmp_path):
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--best-of", "3", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--best-of ranks images" in result.output and "character" in result.output
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--pose", __file__, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--character" in result.output
