"""The ESRGAN upscaler (adapters/upscale.py) and `refgen upscale`, offline on tiny random ESRGANs.

Checkpoints are built in code in the published key layouts (see esrgan_layouts.py for where each
comes from: xinntao/Real-ESRGAN's BasicSR RRDBNet, and the original xinntao/ESRGAN `model.N`
layout), saved to disk as .safetensors and .pth, and loaded back through `Upscaler.load`, the
code users run on RealESRGAN_x4plus / x2plus.
"""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pytest

from engine.tiling import balanced_tile
import torch
import typer
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from adapters.upscale import (
    MIN_TILE,
    UpscaleError,
    Upscaler,
    load_image,
    tile_starts,
)
from engine.cli.upscale import METADATA_KEY, upscale
from engine.errors import InvalidImageError, UnknownModelError, UnsafeWeightsError, WeightsMissingError
from esrgan_layouts import (
    compact_state_dict,
    original_esrgan_x2_state_dict,
    realesrgan_state_dict,
    reference_forward,
    sdxl_unet_like_state_dict,
    to_original_esrgan_layout,
)


LAYOUTS = {
    # name: (builder, scale)
    "realesrgan-x4": (lambda: realesrgan_state_dict(scale=4), 4),
    "realesrgan-x2-unshuffle": (lambda: realesrgan_state_dict(scale=2, seed=1), 2),
    "original-esrgan-x4": (lambda: to_original_esrgan_layout(realesrgan_state_dict(scale=4)), 4),
    "original-esrgan-x2": (lambda: original_esrgan_x2_state_dict(), 2),
}


def save(state: dict, path, nest_params_ema: bool = False):
    """Write a checkpoint the way it is published: .pth nests under `params_ema` (Real-ESRGAN's
    release files); safetensors cannot nest, so there the same keys carry a `params_ema.` prefix."""
    if path.suffix == ".safetensors":
        flat = {f"params_ema.{k}" if nest_params_ema else k: v.contiguous() for k, v in state.items()}
        save_file(flat, str(path))
    else:
        torch.save({"params_ema": state} if nest_params_ema else state, str(path))
    return path


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


@pytest.fixture
def x4_file(tmp_path):
    return save(realesrgan_state_dict(scale=4), tmp_path / "tiny-x4.safetensors")


@pytest.fixture
def x4(refgen_home, x4_file):
    return Upscaler.load(str(x4_file), device="cpu")


# --------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "params_ema"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_both_published_layouts_load_from_both_containers(refgen_home, tmp_path, layout, nested, suffix):
    builder, scale = LAYOUTS[layout]
    path = save(builder(), tmp_path / f"{layout}{suffix}", nest_params_ema=nested)
    if suffix == ".pth":
        with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
            Upscaler.load(str(path), device="cpu")
    up = Upscaler.load(str(path), device="cpu", allow_pickle=suffix == ".pth")
    assert (up.scale, up.architecture) == (scale, "ESRGAN")
    assert up.info.path == str(path) and up.info.manifest_entry is None
    assert up.info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert up.identity()["scale"] == scale and up.identity()["dtype"] == "float32"  # fp32 on CPU
    out = up.upscale_pixels(np.full((1, 12, 16, 3), 0.5, np.float32), tile=0)
    assert out.shape == (1, 12 * scale, 16 * scale, 3)


def test_x2plus_layout_is_pixel_unshuffled():
    state = realesrgan_state_dict(scale=2)
    assert state["conv_first.weight"].shape[1] == 12  # 3 channels x 2x2 unshuffle, as in RealESRGAN_x2plus
    assert "conv_up2.weight" in state  # two x2 upsamplings after the /2 unshuffle: net x2
    assert Upscaler.from_state_dict(state, device="cpu").scale == 2


@pytest.mark.parametrize("scale", [4, 2])
def test_output_matches_basicsr_rrdbnet_forward(scale):
    """Our path (spandrel + padding + clamp) computes exactly BasicSR's RRDBNet on the same weights."""
    state = realesrgan_state_dict(scale=scale, seed=1)
    up = Upscaler.from_state_dict(state, device="cpu")
    pixels = np.random.default_rng(3).random((2, 24, 32, 3), dtype=np.float32)  # multiples of 4: no padding
    expected = reference_forward(state, torch.from_numpy(pixels).permute(0, 3, 1, 2)).clamp(0, 1)
    got = up.upscale_pixels(pixels, tile=0)
    assert got.shape == (2, 24 * scale, 32 * scale, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert got.std() > 0.05  # an image, not a flat clamp: the comparison means something


def test_the_same_weights_in_both_layouts_give_the_same_pixels(refgen_home, tmp_path):
    state = realesrgan_state_dict(scale=4, seed=2)
    new = Upscaler.load(str(save(state, tmp_path / "new.safetensors", nest_params_ema=True)), device="cpu")
    old = Upscaler.load(str(save(to_original_esrgan_layout(state), tmp_path / "old.pth")), device="cpu",
                        allow_pickle=True)
    image = random_image(20, 28)
    assert np.array_equal(np.asarray(new.upscale(image, progress=False)), np.asarray(old.upscale(image, progress=False)))
    assert new.info.sha256 != old.info.sha256  # different files, same network


def test_tiny_is_an_offline_nearest_neighbour_stand_in():
    up = Upscaler.load("tiny-x2", device="cpu")
    assert (up.scale, up.architecture, up.info.sha256) == (2, "Compact", None) and "smoke" in up.notice
    image = random_image(10, 14)
    assert np.array_equal(np.asarray(up.upscale(image, progress=False)), np.asarray(image.resize((28, 20), Image.NEAREST)))
    assert Upscaler.load("tiny-x4").scale == 4


def test_real_esrgan_compact_is_accepted():
    up = Upscaler.from_state_dict(compact_state_dict(scale=4), device="cpu")
    assert (up.architecture, up.scale) == ("Compact", 4)
    assert up.upscale(random_image(10, 14), progress=False).size == (56, 40)


# ------------------------------------------------------------------------------ bad weights


def test_a_unet_state_dict_is_not_an_upscaler(refgen_home, tmp_path):
    path = save(sdxl_unet_like_state_dict(), tmp_path / "unet.safetensors")
    with pytest.raises(UpscaleError, match="not an ESRGAN-family upscaler") as caught:
        Upscaler.load(str(path), device="cpu")
    assert "unet.safetensors" in str(caught.value) and "conv_in" in str(caught.value)  # names what it found


def test_random_tensors_are_not_an_upscaler():
    noise = {f"layer{i}.weight": torch.randn(4, 4) for i in range(3)}
    with pytest.raises(UpscaleError, match="not an ESRGAN-family upscaler"):
        Upscaler.from_state_dict(noise)


def test_another_spandrel_architecture_is_named_and_refused():
    from spandrel.architectures.DnCNN import DnCNN

    state = DnCNN(in_nc=3, out_nc=3, nc=8, nb=8, act_mode="R").state_dict()
    with pytest.raises(UpscaleError, match="DnCNN model .*not ESRGAN-family"):
        Upscaler.from_state_dict(state)


def test_esrgan_keys_with_wrong_grow_channels_are_refused():
    with pytest.raises(UpscaleError, match="32 grow channels"):
        Upscaler.from_state_dict(realesrgan_state_dict(scale=4, gc=16))


def test_a_truncated_checkpoint_says_so(refgen_home, x4_file):
    x4_file.write_bytes(x4_file.read_bytes()[: x4_file.stat().st_size // 2])
    with pytest.raises(UpscaleError, match="is the file complete"):
        Upscaler.load(str(x4_file), device="cpu")


def test_a_pickled_module_is_refused_even_with_allow_pickle(refgen_home, tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Conv2d(3, 3, 3), str(path))  # a whole pickled object, not a state dict
    with pytest.raises(UpscaleError, match="weights_only"):
        Upscaler.load(str(path), device="cpu", allow_pickle=True)


def write_manifest(tmp_path, monkeypatch):
    """The committed manifest, over an empty weights folder: returns the Real-ESRGAN entries' folder."""
    monkeypatch.setenv("REFGEN_WEIGHTS", str(tmp_path / "weights"))
    return tmp_path / "weights" / "realesrgan"


def test_a_missing_manifest_model_names_the_fetch_command(refgen_home, tmp_path, monkeypatch):
    write_manifest(tmp_path, monkeypatch)
    with pytest.raises(WeightsMissingError, match="refgen weights fetch realesrgan-x4plus") as caught:
        Upscaler.load("realesrgan-x4plus", device="cpu")
    assert caught.value.missing == ["RealESRGAN_x4plus.safetensors"]


def test_a_fetched_manifest_model_loads_by_name(refgen_home, tmp_path, monkeypatch):
    folder = write_manifest(tmp_path, monkeypatch)
    folder.mkdir(parents=True)
    save(realesrgan_state_dict(scale=2), folder / "RealESRGAN_x2plus.safetensors", nest_params_ema=True)
    up = Upscaler.load("realesrgan-x2plus", device="cpu")
    assert (up.scale, up.info.manifest_entry) == (2, "realesrgan-x2plus")


def test_an_unknown_reference_lists_the_manifest_upscalers(refgen_home, tmp_path, monkeypatch):
    write_manifest(tmp_path, monkeypatch)
    with pytest.raises(UnknownModelError, match="realesrgan-x4plus, realesrgan-x2plus"):
        Upscaler.load("no-such-upscaler", device="cpu")


# ---------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("length,tile,overlap,align", [
    (75, 48, 24, 1), (91, 48, 24, 1), (76, 48, 24, 4), (1000, 512, 32, 1), (1024, 512, 32, 4),
    (513, 512, 32, 1), (40, 48, 24, 1), (300, 64, 16, 4),
])
def test_tiles_cover_the_image_exactly_with_at_least_the_overlap(length, tile, overlap, align):
    starts = tile_starts(length, min(tile, length), overlap, align)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(s % align == 0 for s in starts)
    assert all(b > a and a + size - b >= overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("scale", [4, 2])
def test_tiled_equals_untiled(scale):
    up = Upscaler.from_state_dict(realesrgan_state_dict(scale=scale, seed=1), device="cpu")
    image = random_image(57, 71, seed=5)  # neither side a multiple of the tile, nor of x2plus's 4
    pixels = as_float(image)[None]
    whole = up.upscale_pixels(pixels, tile=0)
    assert whole.shape == (1, 57 * scale, 71 * scale, 3) and whole.std() > 0.05  # not a flat clamp
    calls = []
    tiled = up.upscale(image, tile=40, overlap=20, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert total >= 6 and calls[-1] == (total, total)  # several tiles, every one reported
    assert tiled.size == (71 * scale, 57 * scale)
    assert np.abs(as_float(tiled) - np.round(whole[0] * 255) / 255).max() <= 2 / 255
    float_tiled = up.upscale_pixels(pixels, tile=40, overlap=20)
    assert np.abs(float_tiled - whole).max() <= 1e-3  # much tighter than the 8-bit bound


def test_blending_hides_a_tile_that_disagrees_at_its_edges():
    """A model whose output is wrong in a 3-px band along every tile edge: with the edge quarter of
    each shared region weighted 0, no wrong pixel reaches the image (except at the image border)."""
    up = Upscaler.from_state_dict(realesrgan_state_dict(scale=4), device="cpu")
    truth = up._call_model

    def edgy(tile):
        out = truth(tile).clone()
        out[..., :12, :] = out[..., -12:, :] = out[..., :, :12] = out[..., :, -12:] = 1.0
        return out

    pixels = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
    up._call_model = edgy
    whole_edgy = up.upscale_pixels(pixels, tile=0)
    tiled = up.upscale_pixels(pixels, tile=32, overlap=16)
    inner = (slice(None), slice(12, -12), slice(12, -12))
    np.testing.assert_allclose(tiled[inner], whole_edgy[inner], atol=2e-3)


def test_out_of_memory_halves_the_tile_and_retries():
    up = Upscaler.from_state_dict(realesrgan_state_dict(scale=4), device="cpu")
    real, seen = up._call_model, []

    def small_gpu(tile):
        seen.append(max(tile.shape[-2:]))
        if max(tile.shape[-2:]) > 80:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(tile)

    image = random_image(150, 130)
    expected = up.upscale(image, tile=64, overlap=16, progress=False)
    up._call_model = small_gpu
    got = up.upscale(image, tile=128, overlap=16, progress=False)
    # Tiles are balanced to the count a size needs (engine.tiling.balanced_tile): the first tile from
    # tile=128 fails, then every tile is at most 64 px.
    first = max(balanced_tile(130, 128, 16, up.align), balanced_tile(150, 128, 16, up.align))
    assert first > 80 and seen[0] == first and max(seen[1:]) <= 64
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_out_of_memory_below_the_minimum_tile_is_a_clear_error():
    up = Upscaler.from_state_dict(realesrgan_state_dict(scale=4), device="cpu")

    def no_gpu(tile):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    up._call_model = no_gpu
    with pytest.raises(UpscaleError, match=f"out of GPU memory even with {MIN_TILE}-pixel tiles.*--device cpu"):
        up.upscale(random_image(256, 256), tile=512, progress=False)  # 256 (whole) -> 128 -> 64 -> give up


def test_bad_tile_settings_are_refused(x4):
    with pytest.raises(UpscaleError, match="at least"):
        x4.upscale(random_image(40, 40), tile=8)
    with pytest.raises(UpscaleError, match="half the tile"):
        x4.upscale(random_image(100, 100), tile=32, overlap=20)


def test_progress_false_is_silent_and_true_draws_a_bar(x4, capsys):
    x4.upscale(random_image(24, 24), tile=16, overlap=4, progress=False)
    assert capsys.readouterr().err == ""
    x4.upscale(random_image(24, 24), tile=16, overlap=4, progress=True)
    assert "tile" in capsys.readouterr().err


# ------------------------------------------------------------------------------ alpha, modes


def test_transparent_regions_stay_transparent(x4):
    image = random_image(24, 32, "RGBA")
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[:, :16] = 0  # left half fully transparent
    image.putalpha(Image.fromarray(alpha))
    out = x4.upscale(image, tile=16, overlap=4, progress=False)
    assert out.mode == "RGBA" and out.size == (128, 96)
    result_alpha = np.asarray(out.getchannel("A"))
    # Exactly 0 / 255 one source pixel away from the edge (no Lanczos ringing), a smooth edge between.
    assert (result_alpha[:, : 15 * 4] == 0).all() and (result_alpha[:, 17 * 4 :] == 255).all()
    assert len(np.unique(result_alpha[0, 15 * 4 : 17 * 4])) > 2


@pytest.mark.parametrize("make,mode", [
    (lambda: random_image(20, 24, "LA"), "LA"),
    (lambda: random_image(20, 24, "L"), "L"),
    (lambda: random_image(20, 24).convert("P", palette=Image.Palette.ADAPTIVE), "RGB"),
    (lambda: _palette_with_transparency(), "RGBA"),
    (lambda: Image.fromarray(np.arange(480, dtype=np.uint16).reshape(20, 24) * 100), "L"),
    (lambda: random_image(20, 24).convert("CMYK"), "RGB"),
])
def test_every_input_mode_comes_back_at_scale(x4, make, mode):
    out = x4.upscale(make(), progress=False)
    assert out.size == (96, 80) and out.mode == mode


def _palette_with_transparency() -> Image.Image:
    image = random_image(20, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return image


def test_exif_orientation_is_applied(x4, tmp_path):
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    random_image(20, 32).save(path, exif=exif)
    assert x4.upscale(path, progress=False).size == (80, 128)


# -------------------------------------------------------------------------------- bad images


def test_a_truncated_image_is_an_invalid_image_error(x4, tmp_path):
    path = tmp_path / "cut.png"
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(InvalidImageError, match="is the file complete"):
        x4.upscale(path)


def test_not_an_image_and_too_large_are_invalid_image_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(InvalidImageError, match="not an image"):
        load_image(text)
    with pytest.raises(InvalidImageError, match="MP limit"):
        load_image(random_image(2048, 1024), max_pixels=1024 * 1024)


def test_an_output_above_the_limit_is_refused_before_any_work(x4, monkeypatch):
    import adapters.upscale

    monkeypatch.setattr(adapters.upscale, "MAX_OUTPUT_PIXELS", 100 * 100)
    with pytest.raises(UpscaleError, match="100x120, above the"):
        x4.upscale(random_image(30, 25))


def test_upscale_pixels_checks_its_input(x4):
    with pytest.raises(UpscaleError, match=r"\(N, H, W, 3\)"):
        x4.upscale_pixels(np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(UpscaleError, match="floats"):
        x4.upscale_pixels(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(UpscaleError, match="NaN"):
        x4.upscale_pixels(np.full((1, 8, 8, 3), np.nan, np.float32))
    assert x4.upscale_pixels(np.zeros((8, 10, 3), np.float32)).shape == (32, 40, 3)


# ---------------------------------------------------------------------------------------- CLI


def cli_app() -> typer.Typer:
    """Mounted the way the main CLI does it: `app.command()(upscale)`."""
    app = typer.Typer()
    app.command()(upscale)

    @app.command()
    def version() -> None:  # a second command, so `upscale` is a subcommand as in `refgen upscale`
        print("test")

    return app


runner = CliRunner()


def test_cli_writes_a_png_at_scale_with_provenance(refgen_home, tmp_path, x4_file):
    source = tmp_path / "in.png"
    random_image(30, 40, "RGBA").save(source)
    result = runner.invoke(cli_app(), ["upscale", str(source), "--model", str(x4_file), "--tile", "16",
                                       "--overlap", "4", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "out" / "in_x4.png"
    with Image.open(written) as image:
        assert image.size == (160, 120) and image.mode == "RGBA"
        meta = json.loads(image.text[METADATA_KEY])
    assert meta["model"]["sha256"] == hashlib.sha256(x4_file.read_bytes()).hexdigest()
    assert meta["model"]["architecture"] == "ESRGAN" and meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert not list((tmp_path / "out").glob("*.partial"))
    again = runner.invoke(cli_app(), ["upscale", str(source), "--model", str(x4_file), "--no-progress",
                                      "--out", str(tmp_path / "out")])
    assert again.exit_code == 0 and (tmp_path / "out" / "in_x4-1.png").exists()  # never overwrites


def test_cli_bad_image_is_one_line_and_exit_1(refgen_home, tmp_path, x4_file):
    broken = tmp_path / "broken.png"
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="PNG")
    broken.write_bytes(buffer.getvalue()[:200])
    result = runner.invoke(cli_app(), ["upscale", str(broken), "--model", str(x4_file), "--out", str(tmp_path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    assert not list(tmp_path.glob("broken_x4*.png"))


def test_cli_non_esrgan_weights_exit_1(refgen_home, tmp_path):
    source = tmp_path / "in.png"
    random_image(16, 16).save(source)
    unet = save(sdxl_unet_like_state_dict(), tmp_path / "unet.safetensors")
    result = runner.invoke(cli_app(), ["upscale", str(source), "--model", str(unet)])
    assert result.exit_code == 1 and "not an ESRGAN-family upscaler" in result.output


def test_cli_default_model_follows_scale_and_says_how_to_fetch(refgen_home, tmp_path, monkeypatch):
    write_manifest(tmp_path, monkeypatch)
    source = tmp_path / "in.png"
    random_image(16, 16).save(source)
    result = runner.invoke(cli_app(), ["upscale", str(source), "--scale", "2"])
    assert result.exit_code == 1 and "refgen weights fetch realesrgan-x2plus" in result.output
    assert runner.invoke(cli_app(), ["upscale", str(source), "--scale", "3"]).exit_code == 1


def test_cli_tiny_runs_offline_and_says_what_it_is(refgen_home, tmp_path):
    source = tmp_path / "in.png"
    random_image(16, 20).save(source)
    result = runner.invoke(cli_app(), ["upscale", str(source), "--model", "tiny", "--scale", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "stand-in" in result.output
    with Image.open(tmp_path / "in_x2.png") as image:
        assert image.size == (40, 32)


def test_cli_scale_must_match_an_explicit_model(refgen_home, tmp_path, x4_file):
    source = tmp_path / "in.png"
    random_image(16, 16).save(source)
    result = runner.invoke(cli_app(), ["upscale", str(source), "--model", str(x4_file), "--scale", "2"])
    assert result.exit_code == 1 and "upscales x4, not x2" in result.output


def test_tile_count_grows_as_tiles_shrink():
    """Sanity of the plan the progress bar counts: ceil-ish coverage, never fewer tiles than needed."""
    for tile in (16, 24, 48):
        count = len(tile_starts(91, tile, 8))
        assert count >= math.ceil(91 / tile)
