"""Aspect ratio -> the model's training resolution.

SDXL was trained on ~1 MP buckets whose sides are multiples of 64 (SDXL report, appendix I).
A ratio picks the bucket nearest in log-ratio; models with another native size (the tiny one)
get the bucket scaled to their size, still in multiples of 64.
"""

from __future__ import annotations

import math

# (width, height) of SDXL's training buckets, landscape half; portrait is the transpose.
_LANDSCAPE_BUCKETS = [
    (1024, 1024), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576),
    (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
]
SDXL_BUCKETS = sorted(set(_LANDSCAPE_BUCKETS + [(h, w) for w, h in _LANDSCAPE_BUCKETS]))

# Named ratios offered in the CLI and docs; any "W:H" string works.
COMMON_RATIOS = ["1:1", "5:4", "4:5", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"]


def parse_ratio(text: str) -> float:
    """'16:9' -> 1.777...; raises ValueError with the accepted form."""
    try:
        width, height = (float(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"aspect ratio must look like '16:9', got {text!r}") from None
    if width <= 0 or height <= 0 or not (1 / 4 <= width / height <= 4):
        raise ValueError(f"aspect ratio {text!r} must be positive and between 1:4 and 4:1")
    return width / height


def size_for_ratio(text: str, native: int = 1024) -> tuple[int, int]:
    """(width, height) for an aspect ratio on a model whose native square side is `native`."""
    return size_for_shape(parse_ratio(text), 1.0, native)


def size_for_shape(width: float, height: float, native: int = 1024) -> tuple[int, int]:
    """The bucket nearest to a picture's shape, whatever its shape (a 1x1 or 8:1 init image included:
    the picture is then fitted to the bucket)."""
    target = math.log(width / height)
    width, height = min(SDXL_BUCKETS, key=lambda wh: abs(math.log(wh[0] / wh[1]) - target))
    if native == 1024:
        return width, height
    scale = native / 1024
    return _multiple_of_64(width * scale), _multiple_of_64(height * scale)


def _multiple_of_64(value: float) -> int:
    return max(64, int(round(value / 64)) * 64)
