"""Reading untrusted images safely and writing files atomically."""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError

# 64 MP: far above any input SDXL can use, far below a decompression bomb.
MAX_INPUT_PIXELS = 64 * 1024 * 1024

ImageSource = Union[str, Path, bytes, Image.Image]
# write_atomic's temp file beside its target, `.<target name>.<8 random>.partial`: what a kill can leave.
STAGING_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-z_]{8}\.partial")


def load_rgb(source: ImageSource, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An RGB copy of `source`, upright per EXIF. Raises InvalidImageError for anything unsafe or unreadable.

    Transparency is composited on white (what a viewer shows); CMYK, palette, 16-bit and grey
    are converted. The pixel limit is checked from the header, before any decoding. Any size down to
    1x1 is accepted, as by `refgen upscale`: each use resizes its input to the size it works at.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, what)
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImageError(f"{what} is {width}x{height}: more than the {max_pixels // 2**20} MP limit")
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


def png_data(image: Image.Image) -> bytes:
    """The image as PNG file bytes (in its own mode), for write_atomic."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels and size: the identity of a picture held in memory (cache keys of
    reference encodings, face analyses and preprocessor outputs; provenance of in-memory inputs)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, handle = _create_staging(path)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


def make_staging_folder(path: Path, suffix: str = ".partial") -> Path:
    """A new, empty folder beside `path` to fill and then rename into place. Mode 0o777 lets the umask
    apply, as a plain mkdir does (mkdtemp's 0700 would survive the rename)."""
    return _create_beside(path, suffix, lambda staging: staging.mkdir(0o777))[0]


def staging_path(path: Path, suffix: str = ".partial") -> Path:
    """A fresh temp name beside `path`, `.<name>.<8 random><suffix>` (write_atomic's match STAGING_NAME)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def _create_staging(path: Path) -> tuple[Path, int]:
    """A new, exclusive temp file beside `path`. Mode 0o666 lets the kernel apply the umask, as a plain
    open() does (mkstemp's 0600 would survive the rename); reading the umask would mean setting it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return _create_beside(path, ".partial", lambda staging: os.open(staging, flags, 0o666))


def _create_beside(path: Path, suffix: str, create):
    """(name, create(name)) for a fresh staging name beside `path`."""
    for _ in range(100):  # 32 random bits: a clash is a leftover of the same name, never 100 in a row
        staging = staging_path(path, suffix)
        try:
            return staging, create(staging)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {path}")
