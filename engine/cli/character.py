"""`refgen character create NAME IMAGE... --anchor TEXT | list | show NAME | mask NAME --keep/--mask | delete NAME`.

Mounted by the main CLI with `app.add_typer(character_app, name="character")`. Profiles live in
$REFGEN_HOME/characters (see adapters/characters.py). Errors refgen raises on purpose become one red
line and exit code 1 (`refgen_errors`), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import RefgenError
from .error_lines import refgen_errors

character_app = typer.Typer(
    help="Character profiles: a named face identity (3-5 anchor photos + an identity anchor string).",
    no_args_is_help=True,
)

NameArgument = Annotated[str, typer.Argument(help="Character name: letters, digits, spaces, '-' or '_' (max 64).")]


def _store():
    from adapters.characters import CharacterStore

    return CharacterStore()


@character_app.command("create")
def create_character(
    name: NameArgument,
    images: Annotated[list[Path], typer.Argument(help="1-5 anchor photos of one person (3-5 recommended).")],
    anchor: Annotated[str, typer.Option("--anchor", help="The identity anchor string, used verbatim in prompts.")],
    pack: Annotated[str, typer.Option("--pack", help="insightface pack: antelopev2 or buffalo_l.")] = "antelopev2",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing character of this name.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cpu (default: cuda if available).")] = None,
) -> None:
    """Analyse the anchor photos and save the character's embeddings, face crop and anchor string.

    \b
    Examples:
      refgen character create Mira mira1.jpg mira2.jpg mira3.jpg --anchor "mira, short red hair, green eyes"
      refgen character create Mira new1.jpg new2.jpg --anchor "mira, red bob" --overwrite
      refgen character create Tom tom.png --anchor "tom, grey beard" --pack buffalo_l
    """
    with refgen_errors():
        from adapters.characters import MAX_ANCHORS, CharacterError
        from adapters.faces import FaceAnalyzer

        if len(images) > MAX_ANCHORS:  # checked before the face models load
            raise CharacterError(f"{len(images)} anchor images given; a character takes at most {MAX_ANCHORS}")
        store = _store()
        store.folder(name)  # validate the name before the face models load
        analyzer = FaceAnalyzer.load(pack, device=device)
        character = store.create(name, list(images), analyzer, anchor=anchor, overwrite=overwrite)
    Console().print(
        f"[green]created:[/green] {escape(character.name)} ({character.image_count} anchor image"
        f"{'s' if character.image_count != 1 else ''}) in {escape(str(character.path))}",
        soft_wrap=True,
    )


@character_app.command("list")
def list_characters() -> None:
    """Show every stored character.

    \b
    Examples:
      refgen character list
      refgen generate "portrait in the rain" --character Mira
    """
    with refgen_errors():
        store = _store()
        characters = store.list()
    console = Console()
    if not characters:
        console.print(f"no characters in {escape(str(store.root))}; create one with: refgen character create NAME IMAGE...")
        return
    table = Table(title=f"characters in {store.root}")
    table.add_column("name", no_wrap=True)
    table.add_column("images", justify="right")
    table.add_column("anchor", overflow="fold")
    table.add_column("created", no_wrap=True)
    for character in characters:
        table.add_row(escape(character.name), str(character.image_count), escape(character.anchor), character.created)
    console.print(table)


@character_app.command("show")
def show_character(name: NameArgument) -> None:
    """Show one character's fields and where its files are.

    \b
    Examples:
      refgen character show Mira
      refgen character show "mira"                  # names match in any case
    """
    with refgen_errors():
        character = _store().get(name)
    analyzer = character.analyzer
    rows = [
        ("name", character.name),
        ("anchor", character.anchor),
        ("images", str(character.image_count)),
        ("created", character.created),
        ("pack", str(analyzer.get("pack", "?"))),
        ("analyzer", str(analyzer.get("identity", "?"))),
        ("folder", str(character.path)),
        ("face crop", str(character.face_path)),
        ("lora", _lora_line(character.lora)),
        ("carries", _carries_line(character)),
    ]
    console = Console()
    for label, value in rows:
        console.print(f"[bold]{label:>9}:[/bold] {escape(value)}", soft_wrap=True)
    for number, path in enumerate(character.anchor_paths, start=1):
        console.print(f"[bold]{'anchor ' + str(number):>9}:[/bold] {escape(str(path))}", soft_wrap=True)
    if character.keep != "face" or character.mask_path is not None:
        with refgen_errors():
            preview = _write_preview(character)
        console.print(f"[bold]{'preview':>9}:[/bold] {escape(str(preview))} (tinted: what is carried besides the face)",
                      soft_wrap=True)


def _carries_line(character) -> str:
    if character.mask_path is not None:
        return f"the face, and what its own mask shows ({character.mask_path})"
    return {"face": "the face only (refgen character mask NAME --keep face+hair to carry more)"}.get(
        character.keep, f"the face, and by the face-parsing model: {character.keep}")


def _write_preview(character) -> Path:
    """<character folder>/mask_preview.png: the mask tinted over anchor 1 (the parser runs for a parts mask)."""
    import numpy as np

    from adapters.appearance import checked_mask
    from adapters.face_parsing import FaceParser, mask_preview
    from ..images import load_rgb, png_data, write_atomic

    photo = load_rgb(character.anchor_paths[0], "anchor image 1")
    if character.mask_path is not None:
        mask = np.asarray(checked_mask(character.mask_path, photo.size)) >= 128
    else:
        mask = FaceParser.load().mask(photo, character.keep)
    return write_atomic(character.path / "mask_preview.png", png_data(mask_preview(photo, mask)))


@character_app.command("mask")
def set_character_mask(
    name: NameArgument,
    keep: Annotated[Optional[str], typer.Option("--keep", help="face, face+hair, face+hair+outfit or all: the parts carried besides the face.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Your own greyscale mask over anchor 1 (white = carried), instead of parts.", dir_okay=False)] = None,
) -> None:
    """Set what a Character Reference to this character carries besides the face (Ideogram's character mask).

    \b
    Examples:
      refgen character mask Mira --keep face+hair          # hair (and hat) from anchor 1, by the face-parsing model
      refgen character mask Mira --mask mira_outfit.png    # exactly the white part of your mask
      refgen character mask Mira --keep face               # back to the face only
      refgen character show Mira                           # writes mask_preview.png to check it
    """
    with refgen_errors():
        from typing import get_args

        from adapters.appearance import checked_mask
        from ..images import load_rgb
        from ..request_types import CharacterParts

        store = _store()
        character = store.get(name)
        if keep is not None and keep not in get_args(CharacterParts):
            raise CharacterMaskValueError(f"--keep must be one of {', '.join(get_args(CharacterParts))}, got {keep!r}")
        if mask is not None:
            photo = load_rgb(character.anchor_paths[0], "anchor image 1")
            if keep == "face":
                raise CharacterMaskValueError("--mask selects what is carried besides the face: it needs --keep other than face")
            character = store.set_appearance(name, keep or "all", checked_mask(mask, photo.size))
        else:
            character = store.set_appearance(name, keep or "face")
    Console().print(f"[green]{escape(character.name)} carries:[/green] {escape(_carries_line(character))}", soft_wrap=True)


class CharacterMaskValueError(RefgenError):
    """A bad `refgen character mask` option."""


def _lora_line(lora: str) -> str:
    if not lora:
        return "none (train one: refgen train NAME IMAGES... --character NAME)"
    from ..lora_library import LoraLibrary

    state = "" if LoraLibrary().exists(lora) else " (missing from the LoRA library)"
    return f"{lora}{state}; use it with --lora {lora}"


@character_app.command("delete")
def delete_character(
    name: NameArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a character's profile and its stored anchor images.

    \b
    Examples:
      refgen character delete Mira
      refgen character delete Mira --yes           # no question asked
    """
    with refgen_errors():
        store = _store()
        character = store.get(name)  # unknown names fail before any question
        if not yes:
            typer.confirm(
                f"delete character {character.name!r} and its {character.image_count} stored anchor images?",
                abort=True,
            )
        store.delete(name)
    Console().print(f"[green]deleted:[/green] {escape(character.name)}")
