"""Untrusted input images: clear typed errors, never a crash; files written atomically."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest, InvalidImageError
from engine.images import load_rgb, write_atomic


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_truncated_file_is_an_invalid_image(tmp_path):
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="cannot be decoded"):
        load_rgb(path)


def test_a_file_that_is_not_an_image_is_an_invalid_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(InvalidImageError, match="not an image"):
        load_rgb(path)


def test_a_missing_file_is_an_invalid_image(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_rgb(tmp_path / "nowhere.png", "init image")


@pytest.mark.parametrize("side", [9_000, 40_000])
def test_decompression_bombs_are_refused_before_decoding(side):
    with pytest.raises(InvalidImageError, match="limit|too large"):
        load_rgb(_png_header_claiming(side, side))


@pytest.mark.parametrize(
    "mode, make",
    [
        ("RGBA", lambda: Image.new("RGBA", (32, 32), (255, 0, 0, 0))),
        ("LA", lambda: Image.new("LA", (32, 32), (10, 255))),
        ("CMYK", lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0))),
        ("P", lambda: Image.new("RGB", (32, 32), (0, 0, 255)).convert("P")),
        ("L", lambda: Image.new("L", (32, 32), 77)),
        ("I;16", lambda: Image.fromarray(np.full((32, 32), 65535, np.uint16))),
    ],
)
def test_every_common_mode_becomes_rgb(mode, make):
    image = make()
    assert image.mode == mode
    rgb = load_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)


def test_transparency_is_composited_on_white_and_exif_rotation_applied(tmp_path):
    assert load_rgb(Image.new("RGBA", (16, 16), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    tall = Image.new("RGB", (16, 32), (0, 128, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    tall.save(path, exif=exif)
    assert load_rgb(path).size == (32, 16)


def test_a_broken_init_image_fails_the_request_cleanly(engine, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    with pytest.raises(InvalidImageError, match="init image"):
        engine.generate(GenerationRequest(prompt="x", init_image=str(path), width=64, height=64, steps=1))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = write_atomic(tmp_path / "out.png", b"old")

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
