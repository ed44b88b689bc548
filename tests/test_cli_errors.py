"""CLI rough edges: every failure is one `error: ...` line and exit 1, options named as typed, input
files checked before the model loads, complete --help, and no third-party progress output."""

from __future__ import annotations

import socket
import struct
import zlib
from pathlib import Path

import diffusers.utils.logging as diffusers_logging
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.provenance import read_metadata

runner = CliRunner()
TINY = ["--model", "tiny", "--steps", "1", "--width", "64", "--height", "64"]


def _one_error_line(result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert f"error: {expected}" in " ".join(result.output.split())  # rich may wrap a long line
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option, expected", [
    (["--device", "cuda:99"], "device 'cuda:99' asked for"),  # no such GPU here, with or without CUDA
    (["--device", "foo"], "unknown device 'foo'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--device", "cpu", "--dtype", "fp16"], "fp16 needs a GPU"),
])
def test_device_and_dtype_mistakes_are_one_error_line(refgen_home, tmp_path, option, expected):
    result = runner.invoke(app, ["generate", "x", *TINY, *option, "--out", str(tmp_path)])
    _one_error_line(result, expected)


@pytest.mark.parametrize("option", [["--device", "foo"], ["--device", "cpu", "--dtype", "fp16"]])
def test_serve_refuses_a_device_it_cannot_use_before_listening(refgen_home, option):
    with socket.socket() as taken:  # were the device checked only at the first job, serve would fail to bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--model", "tiny", "--port", str(port), *option])
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert "Traceback" not in result.output


def test_the_library_raises_the_same_typed_device_error(refgen_home):
    from engine import Engine
    from engine.errors import DeviceError

    with pytest.raises(DeviceError, match="unknown device 'foo'"):
        Engine.load("tiny", device="foo")


def _png_claiming(side: int) -> bytes:
    """A few hundred bytes whose header says side x side RGB pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [100_000, 10_000])  # past PIL's error limit; past its warning limit
def test_replay_of_a_decompression_bomb_is_one_error_line(refgen_home, tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(side))
    result = runner.invoke(app, ["replay", str(tmp_path / "bomb.png"), "--out", str(tmp_path / "out")])
    _one_error_line(result, f"cannot read {tmp_path / 'bomb.png'}: too large to open safely")


def test_upscale_out_naming_an_existing_folder_is_one_error_line(refgen_home, tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "small.png")
    (tmp_path / "big.png").mkdir()
    result = runner.invoke(app, ["upscale", str(tmp_path / "small.png"), "--model", "tiny", "--out", str(tmp_path / "big.png")])
    _one_error_line(result, f"--out {tmp_path / 'big.png'} is an existing folder")
    assert not any((tmp_path / "big.png").iterdir())


def test_dash_n_is_the_image_count_and_the_negative_prompt_is_long_form_only(refgen_home, tmp_path):
    result = runner.invoke(app, ["generate", "a fox", *TINY, "-n", "2", "--seed", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = sorted(tmp_path.glob("*.png"))
    assert [read_metadata(path)["request"]["negative_prompt"] for path in written] == [None, None]
    assert [read_metadata(path)["image"]["seed"] for path in written] == [5, 6]


@pytest.fixture
def photo(tmp_path):
    Image.new("RGB", (64, 64), (90, 120, 200)).save(tmp_path / "photo.png")
    return str(tmp_path / "photo.png")


@pytest.mark.parametrize("inputs, expected", [
    ([], "model '{tmp}/no-such-model' is not a manifest name"),  # the control: good inputs reach the model load
    (["--init", "{tmp}/missing.png"], "init image (--init) not found"),
    (["--init", "{photo}", "--mask", "{tmp}/missing.png"], "mask (--mask) not found"),
    (["--control", "canny:{tmp}/missing.png:0.8"], "control image 1 (--control) not found"),
    (["--adapter", "sketch:{tmp}/missing.png:0.8"], "adapter image 1 (--adapter) not found"),
    (["--style", "{tmp}/missing.png:High"], "style reference image (--style) not found"),
    (["--content", "{tmp}/missing.png"], "content reference image (--content) not found"),
    (["--character", "{tmp}/missing.jpg"], "character image 1 (--character) not found"),
    (["--character", "{photo}", "--pose", "{tmp}/missing.png"], "pose image (--pose) not found"),
    (["--character", "Nobody"], "unknown character 'Nobody'"),
    (["--lora", "{tmp}/missing.safetensors:0.8"], "(--lora) LoRA not found"),
    (["--lora", "{tmp}/trusted.ckpt"], "trusted.ckpt is a pickle-based checkpoint"),
])
def test_input_files_are_checked_before_the_model_loads(refgen_home, tmp_path, photo, inputs, expected):
    """The model folder does not exist: had the model been loaded first, the error would name it."""
    (tmp_path / "trusted.ckpt").write_bytes(b"not really a pickle")
    args = [arg.format(tmp=tmp_path, photo=photo) for arg in inputs]
    result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "no-such-model"), *args, "--out", str(tmp_path / "out")])
    _one_error_line(result, expected.format(tmp=tmp_path))
    assert ("no-such-model" in result.output) == (not inputs)


@pytest.mark.parametrize("command, flag, unwanted", [
    (["generate", "x", *TINY, "--n", "9"], "--n: Input should be less than or equal to 8", "num_images"),
    (["generate", "x", *TINY, "--aspect", "0:1"], "--aspect: aspect ratio '0:1'", "aspect_ratio"),
    (["generate", "x", *TINY, "--init-strength", "0.5"], "--init-strength needs an --init", "init_strength"),
    (["generate", "x", *TINY, "--character", "Mira", "--character-strength", "9"], "--character-strength: Input", "character.weight"),
    (["remix", "{photo}", "x", "--model", "tiny", "--control-weight", "5"], "--control-weight: Input", "-- weight:"),
    (["generate", "x", *TINY, "--adapter", "normal:{photo}"], "--adapter #1 (type): no T2I-Adapter for type 'normal'",
     "t2i_adapters"),
])
def test_validation_errors_name_the_flag_the_user_typed(refgen_home, tmp_path, photo, command, flag, unwanted):
    args = [arg.format(photo=photo) for arg in command]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)])
    _one_error_line(result, f"invalid options -- {flag}")
    assert unwanted not in result.output


def test_missing_face_weights_do_not_offer_a_model_option_character_create_lacks(refgen_home, tmp_path, photo):
    result = runner.invoke(app, ["character", "create", "Mira", photo, "--anchor", "mira"],
                           env={"REFGEN_WEIGHTS": str(tmp_path / "empty")})
    _one_error_line(result, "weights 'insightface-antelopev2' are not on disk")
    assert "refgen weights fetch insightface-antelopev2" in result.output and "--model tiny" not in result.output


def _commands(command, path=()):
    """(path, click command) of every leaf command under `command`."""
    children = getattr(command, "commands", None)
    if not children:
        yield path, command
        return
    for name, child in children.items():
        yield from _commands(child, (*path, name))


def test_every_command_documents_every_option_shows_defaults_and_has_examples(refgen_home):
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) >= 16  # the walk reaches the sub-apps (weights, presets, character)
    for path, command in commands:
        undocumented = [param.name for param in command.params if not (getattr(param, "help", None) or "").strip()]
        assert not undocumented, f"refgen {' '.join(path)}: no help for {undocumented}"
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "2000"})
        assert shown.exit_code == 0, shown.output
        text = " ".join(shown.output.split())
        examples = text.partition("Examples:")[2]
        assert examples.count("refgen ") >= 2, f"refgen {' '.join(path)} --help has no Examples section"
        for param in command.params:
            if getattr(param, "opts", None) and param.default not in (None, False, True, ()):
                assert f"[default: {param.default}]" in text, f"refgen {' '.join(path)}: {param.opts[0]} hides its default"


def test_a_tiny_generate_prints_no_third_party_progress_or_logs(refgen_home, tmp_path):
    bars_before = diffusers_logging.is_progress_bar_enabled()
    result = runner.invoke(app, ["generate", "a fox", *TINY, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    everything = result.stdout + result.stderr
    assert "Loading pipeline components" not in everything and "Loading weights" not in everything
    assert "it/s]" not in everything  # no tqdm bar of any library
    assert str(next(tmp_path.glob("*.png"))) in result.stdout
    assert diffusers_logging.is_progress_bar_enabled() == bars_before  # silenced for the run only


@pytest.mark.parametrize("command, option, expected", [
    ("generate", ["--speed", "fast"], "--speed"),
    ("serve", ["--speed", "fast"], "--speed"),
    ("serve", ["--warm-up", "1024"], "--warm-up"),
    ("serve", ["--train-max-steps", "0"], "--train-max-steps"),
    ("serve", ["--train-max-resolution", "32"], "--train-max-resolution"),
])
def test_speed_options_are_checked_before_anything_loads_or_listens(refgen_home, tmp_path, command, option, expected):
    arguments = ["generate", "x", *TINY, "--out", str(tmp_path)] if command == "generate" else ["serve", "--model", "tiny"]
    result = runner.invoke(app, [*arguments, *option])
    assert result.exit_code != 0 and expected in result.output and "Traceback" not in result.output


def test_a_fresh_process_prints_no_third_party_import_warnings(refgen_home, tmp_path):
    """Import-time notices (torch's pytree registry about torchao's enums) happen once per process, so only a
    new process shows them: none reach a user's terminal."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "a fox", *TINY, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "_pytree" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr[-2000:]
