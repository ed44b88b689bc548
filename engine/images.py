"""Reading untrusted images safely and writing files atomically."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError

# 64 MP: far above any input SDXL can use, far below a decompression bomb.
MAX_INPUT_PIXELS = 64 * 1024 * 1024

ImageSource = Union[str, Path, bytes, Image.Image]


def load_rgb(source: ImageSource, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An RGB copy of `source`, upright per EXIF. Raises InvalidImageError for anything unsafe or unreadable.

    Transparency is composited on white (what a viewer shows); CMYK, palette, 16-bit and grey
    are converted. The pixel limit is checked from the header, before any decoding.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, what)
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImageError(f"{what} is {width}x{height}: more than the {max_pixels // 2**20} MP limit")
    if width < 8 or height < 8:
        raise InvalidImageError(f"{what} is {width}x{height}: too small to use")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{what} cannot be decoded ({exc}); is the file complete?") from exc


def _open(source, what: str) -> Image.Image:
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source))
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"{what} not found: {path}")
        return Image.open(path)
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{what} is not an image file PIL can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{what} is too large to open safely: {exc}") from exc
    except OSError as exc:
        raise InvalidImageError(f"{what} cannot be opened: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
