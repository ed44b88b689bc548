"""`refgen sheet IMAGE... --out sheet.png [--columns 4] [--thumb 256] [--character NAME] [--pack antelopev2]`

A plain typer command function; the main CLI mounts it with `app.command()(sheet)`. Seeds come from
refgen's PNG metadata; with --character, every image is scored against that character's identity and
the sheet is ranked best first ("no face" last). Errors refgen raises on purpose become one red line
and exit code 1 (`refgen_errors`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Optional

import typer

from .error_lines import fail, refgen_errors
from ..errors import InvalidImageError
from ..images import write_atomic


def sheet(
    images: Annotated[list[Path], typer.Argument(help="Images to lay out (refgen PNGs show their seed).", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The contact sheet to write (.png).", dir_okay=False)],
    columns: Annotated[int, typer.Option("--columns", "-c", help="Thumbnails per row.")] = 4,
    thumb: Annotated[int, typer.Option("--thumb", help="Thumbnail box size in px (aspect ratio kept).")] = 256,
    character: Annotated[Optional[str], typer.Option("--character", help="Score every image against this character and rank best first.")] = None,
    pack: Annotated[str, typer.Option("--pack", help="insightface pack for --character: antelopev2 or buffalo_l.")] = "antelopev2",
) -> None:
    """Lay images out on one contact sheet: thumbnail, seed, identity score and file name per tile.

    \b
    Examples:
      refgen sheet out/*.png --out sheet.png
      refgen sheet out/*.png --out ranked.png --character mira
      refgen sheet a.png b.png c.png --out small.png --columns 3 --thumb 128
    """
    from adapters.sheet import check_layout, contact_sheet, items_from_pngs

    if out.suffix.lower() != ".png":
        fail(f"--out must name a .png file, got {out}")
    if any(out.resolve() == image.resolve() for image in images):
        fail(f"refusing to overwrite the input image {out}; pass another --out")
    with refgen_errors():
        check_layout(columns, thumb)
        for image in images:  # every file checked before any face model loads
            if not image.is_file():
                raise InvalidImageError(f"image not found: {image}")
        scored, analyzer, title = None, None, ""
        if character is not None:
            from adapters.characters import CharacterStore
            from adapters.faces import FaceAnalyzer

            scored = CharacterStore().get(character)
            analyzer = FaceAnalyzer.load(pack)
            title = f"ranked by likeness to {scored.name}"
        items = items_from_pngs(images, character=scored, analyzer=analyzer)
        picture = contact_sheet(items, columns=columns, thumb=thumb, title=title)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        write_atomic(out, buffer.getvalue())
    typer.echo(str(out))
