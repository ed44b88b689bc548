"""The `refgen` command line, driven the way a user types it."""

from __future__ import annotations

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


def test_an_invalid_request_names_the_field_and_exits_1(refgen_home, tmp_path):
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--guidance", "42", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "guidance_scale" in result.output and "Traceback" not in result.output
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
