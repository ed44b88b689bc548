"""Contact sheets: a grid of thumbnails with a short caption under each, for picking the best render.

    from adapters.sheet import contact_sheet, items_from_pngs
    items = items_from_pngs(paths)                                  # caller's order, seeds from metadata
    items = items_from_pngs(paths, character=mira, analyzer=faces)  # scored, best first, "no face" last
    contact_sheet(items, columns=4, thumb=256, title="Mira").save("sheet.png")

Each tile is a `thumb` x `thumb` box of neutral grey holding the image scaled to fit (aspect ratio kept,
centred), with up to three caption lines under it: `seed N` (from refgen's PNG metadata), the identity
score to two decimals (`score 0.83`) or `no face`, and the file name. Lines too wide for the tile are
cut with "...". Captions use PIL's built-in default font (no font files). The grid has `columns`
columns (fewer when there are fewer items) and `PADDING` pixels around and between tiles.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageFont

from engine.errors import ProvenanceError, RefgenError
from engine.images import load_rgb
from engine.provenance import read_metadata

if TYPE_CHECKING:  # the face stack (insightface, onnxruntime) is only needed when scoring
    from .characters import Character
    from .faces import FaceAnalyzer

log = logging.getLogger("refgen")

PADDING = 8  # px around the grid and between tiles
LINE_SPACING = 3  # px between caption lines
MIN_THUMB = 32
MAX_THUMB = 2048
MAX_COLUMNS = 64
BACKGROUND = (32, 32, 32)  # the sheet
THUMB_BACKGROUND = (128, 128, 128)  # neutral grey behind each thumbnail (letterbox bars)
TEXT_COLOUR = (236, 236, 236)
TITLE_COLOUR = (255, 255, 255)
NO_FACE = "no face"
ELLIPSIS = "..."


class SheetError(RefgenError):
    """A contact sheet that cannot be made: no images, bad columns/thumbnail size, half a scorer."""


@dataclass
class SheetItem:
    """One tile: the picture and what its caption says.

    `scored` marks an item whose identity was measured (or recorded in its metadata); such an item
    with `score=None` is captioned "no face". Unscored items have no score line at all.
    """

    image: Image.Image
    name: str
    seed: Optional[int] = None
    score: Optional[float] = None
    scored: bool = False
    path: Optional[Path] = None
    meta: Optional[dict] = field(default=None, repr=False)  # the refgen metadata, when the PNG had it

    @property
    def caption(self) -> list[str]:
        """The caption lines, top to bottom: seed, identity score or "no face", file name."""
        lines = []
        if self.seed is not None:
            lines.append(f"seed {self.seed}")
        if self.score is not None:
            lines.append(f"score {self.score:.2f}")
        elif self.scored:
            lines.append(NO_FACE)
        lines.append(self.name)
        return lines


# ------------------------------------------------------------------------------------- layout


def sheet_size(count: int, columns: int = 4, thumb: int = 256, title: str = "", lines: int = 3) -> tuple[int, int]:
    """The (width, height) of a sheet of `count` tiles whose captions have `lines` lines."""
    cols, rows = _grid(count, columns)
    line = _line_height(_font())
    tile_height = thumb + _caption_height(lines, line)
    width = PADDING + cols * (thumb + PADDING)
    height = _title_height(title, line) + PADDING + rows * (tile_height + PADDING)
    return width, height


def tile_box(index: int, count: int, columns: int = 4, thumb: int = 256, title: str = "", lines: int = 3) -> tuple[int, int, int, int]:
    """The thumbnail square (x1, y1, x2, y2) of tile `index` on such a sheet (row-major order)."""
    cols, _ = _grid(count, columns)
    line = _line_height(_font())
    tile_height = thumb + _caption_height(lines, line)
    row, column = divmod(index, cols)
    x = PADDING + column * (thumb + PADDING)
    y = _title_height(title, line) + PADDING + row * (tile_height + PADDING)
    return x, y, x + thumb, y + thumb


def contact_sheet(items: Sequence[SheetItem], columns: int = 4, thumb: int = 256, title: str = "") -> Image.Image:
    """An RGB contact sheet of `items`, in the order given (row by row)."""
    items = list(items)
    if not items:
        raise SheetError("a contact sheet needs at least one image")
    check_layout(columns, thumb)
    font = _font()
    line = _line_height(font)
    lines = max(len(item.caption) for item in items)
    size = sheet_size(len(items), columns, thumb, title, lines)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PADDING, PADDING), _fit(draw, title, font, size[0] - 2 * PADDING), fill=TITLE_COLOUR, font=font)
    for index, item in enumerate(items):
        x1, y1, x2, y2 = tile_box(index, len(items), columns, thumb, title, lines)
        sheet.paste(_thumbnail(item.image, thumb), (x1, y1))
        y = y2 + PADDING // 2
        for text in item.caption:
            draw.text((x1, y), _fit(draw, text, font, thumb), fill=TEXT_COLOUR, font=font)
            y += line
    return sheet


# ------------------------------------------------------------------------------------- reading


def items_from_pngs(
    paths: Sequence[Union[str, Path]],
    character: Optional["Character"] = None,
    analyzer: Optional["FaceAnalyzer"] = None,
) -> list[SheetItem]:
    """One item per file, in the order given; with a character and an analyzer, scored and sorted
    best first (images with no face last, in the order given).

    Seeds come from refgen's PNG metadata; a file without it (or with unreadable metadata) still gets a
    tile with its name. An `identity_score` number in the metadata is shown unless a score is computed
    here. Unreadable or missing images raise InvalidImageError (a RefgenError).
    """
    if (character is None) != (analyzer is None):
        raise SheetError("scoring needs both a character and a face analyzer")
    items = []
    for raw in paths:
        path = Path(raw)
        image = load_rgb(path, what=f"image {path}")
        meta = _metadata(path)
        item = SheetItem(image=image, name=path.name, path=path, meta=meta, seed=_seed(meta))
        recorded = (meta or {}).get("identity_score", _MISSING)
        if recorded is None or _is_number(recorded):  # a later refgen may record it (None: no face)
            item.score = None if recorded is None else float(recorded)
            item.scored = True
        items.append(item)
    if character is not None:
        from .characters import score

        for item in items:
            item.score = score(character, item.image, analyzer)
            item.scored = True
        items = rank(items)
    return items


def rank(items: Sequence[SheetItem]) -> list[SheetItem]:
    """Best score first; items without a score (no face, or never scored) last, order otherwise kept."""
    from .faces import ranking  # the one ranking of identity scores (best_of uses it too); OpenCV on first use only

    return [items[index] for index in ranking([item.score for item in items])]


# ------------------------------------------------------------------------------------- helpers

_MISSING = object()


def _metadata(path: Path) -> Optional[dict]:
    try:
        return read_metadata(path)
    except ProvenanceError as exc:
        log.debug("no refgen metadata in %s: %s", path, exc)
        return None


def _seed(meta: Optional[dict]) -> Optional[int]:
    image = (meta or {}).get("image")
    seed = image.get("seed") if isinstance(image, dict) else None
    return int(seed) if _is_number(seed) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_layout(columns: Any, thumb: Any) -> None:
    if not isinstance(columns, int) or isinstance(columns, bool) or not 1 <= columns <= MAX_COLUMNS:
        raise SheetError(f"columns must be a whole number from 1 to {MAX_COLUMNS}, got {columns!r}")
    if not isinstance(thumb, int) or isinstance(thumb, bool) or not MIN_THUMB <= thumb <= MAX_THUMB:
        raise SheetError(f"thumbnail size must be {MIN_THUMB}-{MAX_THUMB} px, got {thumb!r}")


def _grid(count: int, columns: int) -> tuple[int, int]:
    if count < 1:
        raise SheetError("a contact sheet needs at least one image")
    check_layout(columns, MIN_THUMB)
    cols = min(columns, count)
    return cols, math.ceil(count / cols)


def _font():
    return ImageFont.load_default()


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag|")[1::2]
    return max(bottom, bottom - top) + LINE_SPACING


def _caption_height(lines: int, line: int) -> int:
    return PADDING // 2 + lines * line


def _title_height(title: str, line: int) -> int:
    return PADDING + line if title else 0


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut at the end with "..." so that it is at most `width` px wide."""
    text = " ".join(str(text).split())  # no newlines or tabs inside one caption line
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + ELLIPSIS, font=font) > width:
        text = text[:-1]
    return text + ELLIPSIS


def _thumbnail(image: Image.Image, thumb: int) -> Image.Image:
    """The image scaled to fit a thumb x thumb square (aspect kept), centred on neutral grey;
    transparency is composited on the same grey."""
    width, height = image.size
    if width < 1 or height < 1:
        raise SheetError("an image of the sheet is empty")
    scale = min(thumb / width, thumb / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = image.convert("RGBA").resize(size, Image.Resampling.LANCZOS)
    box = Image.new("RGBA", (thumb, thumb), THUMB_BACKGROUND + (255,))
    box.alpha_composite(picture, ((thumb - size[0]) // 2, (thumb - size[1]) // 2))
    return box.convert("RGB")
