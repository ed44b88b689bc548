"""Contact sheets (adapters/sheet.py, engine/cli/sheet.py): the grid's geometry, captions read from
refgen's PNG metadata (real PNGs from the built-in tiny engine), tiles for plain PNGs, ranking by
identity score against a character made with the tiny face pack of tests/tiny_faces.py ("no face" for
a black picture), and the CLI command's output file and one-line errors. Offline, CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image, ImageOps
from typer.testing import CliRunner

from adapters.characters import CharacterStore, score
from adapters.sheet import (
    BACKGROUND,
    PADDING,
    THUMB_BACKGROUND,
    SheetError,
    SheetItem,
    contact_sheet,
    items_from_pngs,
    sheet_size,
    tile_box,
)
from engine.cli.sheet import sheet
from engine.errors import InvalidImageError
from engine.provenance import read_metadata, save_png
from test_characters import analyzer, blank, mirrored, pack_dir, photos  # noqa: F401  (fixtures, reused)

pytestmark = pytest.mark.usefixtures("private_home")  # no weights, caches or downloads from this machine

SEED = 4242


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> tuple[list[Path], list[int]]:
    """Three real refgen PNGs (64x64, one step) from Engine.load("tiny") under a private REFGEN_HOME."""
    from engine import Engine, GenerationRequest

    home = tmp_path_factory.mktemp("sheet_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFGEN_HOME", str(home))
        engine = Engine.load("tiny", device="cpu")
        result = engine.generate(
            GenerationRequest(prompt="contact sheet", width=64, height=64, steps=1, num_images=3, seed=SEED)
        )
        paths = result.save(home / "renders", stem="render")
    return paths, list(result.seeds)


def solid(colour, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def pixel(image: Image.Image, xy) -> tuple[int, int, int]:
    return tuple(image.getpixel(xy))


# ------------------------------------------------------------------------------------ layout


def test_five_images_in_two_columns_make_a_three_row_grid():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    sizes = [(128, 64), (64, 128), (64, 64), (200, 50), (64, 64)]  # wide, tall, square ...
    items = [SheetItem(solid(c, s), name=f"img{i}.png", seed=i) for i, (c, s) in enumerate(zip(colours, sizes))]
    picture = contact_sheet(items, columns=2, thumb=64)

    assert picture.mode == "RGB"
    assert picture.size == sheet_size(5, columns=2, thumb=64, lines=2)
    width, height = picture.size
    assert width == PADDING + 2 * (64 + PADDING) == 152
    # three rows of equal tiles: the fifth tile starts the third row, in the first column
    first, second, fifth = (tile_box(i, 5, columns=2, thumb=64, lines=2) for i in (0, 1, 4))
    assert first[:2] == (PADDING, PADDING)
    assert second[0] == PADDING + 64 + PADDING and second[1] == first[1]
    assert fifth[0] == first[0]
    tile_pitch = (fifth[1] - first[1]) // 2
    assert tile_pitch > 64 + PADDING  # room for the captions
    assert height == PADDING + 3 * tile_pitch

    # each thumbnail sits in its box, aspect kept on neutral grey
    x1, y1, x2, y2 = first  # 128x64 red -> 64x32, centred vertically
    assert pixel(picture, (x1 + 32, y1 + 32)) == (255, 0, 0)
    assert pixel(picture, (x1 + 32, y1 + 4)) == THUMB_BACKGROUND
    assert pixel(picture, (x1 + 32, y2 - 4)) == THUMB_BACKGROUND
    x1, y1, x2, y2 = second  # 64x128 green -> 32x64, centred horizontally
    assert pixel(picture, (x1 + 32, y1 + 32)) == (0, 255, 0)
    assert pixel(picture, (x1 + 4, y1 + 32)) == THUMB_BACKGROUND
    assert pixel(picture, (x2 - 4, y1 + 32)) == THUMB_BACKGROUND
    x1, y1, _, _ = fifth
    assert pixel(picture, (x1 + 32, y1 + 32)) == (0, 255, 255)
    # the sixth slot is empty sheet
    x1, y1, x2, y2 = tile_box(5, 6, columns=2, thumb=64, lines=2)
    assert {pixel(picture, (x, y)) for x in range(x1, x2, 8) for y in range(y1, y2, 8)} == {BACKGROUND}
    # the captions are drawn under each thumbnail
    x1, _, x2, y2 = first
    caption = np.asarray(picture.crop((x1, y2, x2, y2 + tile_pitch - 64 - PADDING)))
    assert (caption != np.array(BACKGROUND)).any(axis=-1).sum() > 20


def test_fewer_items_than_columns_make_a_narrower_sheet_and_a_title_adds_a_band():
    items = [SheetItem(solid((10, 20, 30)), name="one.png")]
    plain = contact_sheet(items, columns=4, thumb=64)
    assert plain.size[0] == PADDING + 64 + PADDING
    titled = contact_sheet(items, columns=4, thumb=64, title="ranked")
    assert titled.size[0] == plain.size[0] and titled.size[1] > plain.size[1]
    with pytest.raises(SheetError, match="at least one image"):
        contact_sheet([], columns=2)
    with pytest.raises(SheetError, match="columns"):
        contact_sheet(items, columns=0)
    with pytest.raises(SheetError, match="thumbnail size"):
        contact_sheet(items, thumb=4)


def test_caption_lines():
    image = solid((0, 0, 0))
    assert SheetItem(image, "a.png").caption == ["a.png"]
    assert SheetItem(image, "a.png", seed=7).caption == ["seed 7", "a.png"]
    assert SheetItem(image, "a.png", seed=7, score=0.8349, scored=True).caption == ["seed 7", "score 0.83", "a.png"]
    assert SheetItem(image, "a.png", seed=7, score=None, scored=True).caption == ["seed 7", "no face", "a.png"]


# ------------------------------------------------------------------------------------ from PNGs


def test_captions_show_the_seeds_of_refgen_pngs_in_the_callers_order(renders):
    paths, seeds = renders
    assert seeds == [SEED, SEED + 1, SEED + 2]
    items = items_from_pngs(list(reversed(paths)))
    assert [item.seed for item in items] == list(reversed(seeds))
    assert [item.caption for item in items] == [[f"seed {s}", f"render-seed{s}.png"] for s in reversed(seeds)]
    assert all(item.meta["resolved"]["prompt"] == "contact sheet" for item in items)
    assert all(item.image.size == (64, 64) and item.image.mode == "RGB" for item in items)
    picture = contact_sheet(items, columns=2, thumb=64)
    assert picture.size == sheet_size(3, columns=2, thumb=64, lines=2)


def test_a_plain_png_without_metadata_still_gets_a_tile(renders, tmp_path):
    paths, seeds = renders
    plain = tmp_path / "plain photo.png"
    solid((200, 30, 90), (96, 48)).save(plain)
    items = items_from_pngs([paths[0], plain])
    assert [(item.seed, item.name, item.meta is None) for item in items] == [
        (seeds[0], paths[0].name, False),
        (None, "plain photo.png", True),
    ]
    assert items[1].caption == ["plain photo.png"]
    picture = contact_sheet(items, columns=2, thumb=64)
    x1, y1, _, _ = tile_box(1, 2, columns=2, thumb=64, lines=2)
    assert pixel(picture, (x1 + 32, y1 + 32)) == (200, 30, 90)


def test_an_identity_score_recorded_in_the_metadata_is_shown(renders, tmp_path):
    paths, seeds = renders
    meta = read_metadata(paths[0])
    with Image.open(paths[0]) as image:
        save_png(image.convert("RGB"), {**meta, "identity_score": 0.8765}, tmp_path / "scored.png")
        save_png(image.convert("RGB"), {**meta, "identity_score": None}, tmp_path / "faceless.png")
    scored, faceless = items_from_pngs([tmp_path / "scored.png", tmp_path / "faceless.png"])
    assert scored.caption == [f"seed {seeds[0]}", "score 0.88", "scored.png"]
    assert faceless.caption == [f"seed {seeds[0]}", "no face", "faceless.png"]


def test_a_missing_or_unreadable_file_is_a_typed_error(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        items_from_pngs([tmp_path / "nope.png"])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InvalidImageError):
        items_from_pngs([tmp_path / "junk.png"])


# ------------------------------------------------------------------------------------ ranking


def test_items_are_ranked_by_identity_score_and_a_faceless_image_says_no_face(
    tmp_path, analyzer, astronaut, photos
):
    character = CharacterStore(tmp_path / "characters").create("Eileen", [astronaut], analyzer)
    given = [photos["blank"], photos["mirror"], photos["front"]]
    items = items_from_pngs(given, character=character, analyzer=analyzer)

    assert [item.name for item in items] == ["front.png", "mirror.png", "blank.png"]
    front, mirror, faceless = items
    assert front.score == pytest.approx(1.0, abs=1e-4)
    assert mirror.score == pytest.approx(score(character, photos["mirror"], analyzer))
    assert mirror.score < front.score
    assert faceless.score is None
    assert front.caption == ["score 1.00", "front.png"]
    assert mirror.caption == [f"score {mirror.score:.2f}", "mirror.png"]
    assert faceless.caption == ["no face", "blank.png"]
    assert contact_sheet(items, columns=3, thumb=64, title="Eileen").size[0] == PADDING + 3 * (64 + PADDING)

    # unscored, the caller's order stands
    assert [item.name for item in items_from_pngs(given)] == ["blank.png", "mirror.png", "front.png"]
    with pytest.raises(SheetError, match="both a character and a face analyzer"):
        items_from_pngs(given, character=character)


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")
    app = typer.Typer()
    app.command()(sheet)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_writes_the_sheet_and_prints_its_path(cli, renders, tmp_path):
    paths, _ = renders
    plain = tmp_path / "plain.png"
    solid((1, 2, 3)).save(plain)
    out = tmp_path / "out" / "sheet.png"
    result = cli(*paths, plain, "--out", out, "--columns", "2", "--thumb", "64")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    with Image.open(out) as written:
        assert written.format == "PNG"
        assert written.size == sheet_size(4, columns=2, thumb=64, lines=2)
    assert [p.name for p in out.parent.iterdir()] == ["sheet.png"]  # no staging file left behind


def test_cli_errors_are_one_line_and_write_nothing(cli, renders, tmp_path):
    paths, _ = renders
    out = tmp_path / "sheet.png"
    result = cli(paths[0], tmp_path / "missing.png", "--out", out)
    assert result.exit_code == 1
    assert "image not found" in result.output and "missing.png" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()

    result = cli(paths[0], "--out", out, "--columns", "0")
    assert result.exit_code == 1 and "columns must be" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = cli(paths[0], "--out", tmp_path / "sheet.jpg")
    assert result.exit_code == 1 and ".png" in result.output
    result = cli(paths[0], "--out", out, "--character", "nobody")
    assert result.exit_code == 1 and "unknown character 'nobody'" in result.output
    assert not out.exists()


def test_cli_ranks_by_a_stored_character(cli, pack_dir, monkeypatch, astronaut, photos, tmp_path):
    monkeypatch.setenv("REFGEN_WEIGHTS", str(pack_dir))
    from adapters.faces import FaceAnalyzer

    CharacterStore().create("Eileen", [astronaut], FaceAnalyzer.load("antelopev2", device="cpu"))
    out = tmp_path / "ranked.png"
    result = cli(*photos.values(), "--out", out, "--character", "Eileen", "--thumb", "64")
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        picture = written.convert("RGB")
    # ranked best first: the astronaut's tile comes first, the black picture's last
    assert picture.size[1] > sheet_size(3, columns=4, thumb=64, lines=2)[1]  # the title band
    first = tile_box(0, 3, columns=4, thumb=64, title="x", lines=2)
    last = tile_box(2, 3, columns=4, thumb=64, title="x", lines=2)
    expected_first = np.asarray(ImageOps.contain(astronaut, (64, 64), Image.Resampling.LANCZOS), np.int16)
    assert np.abs(np.asarray(picture.crop(first), np.int16) - expected_first).mean() < 3
    assert np.asarray(picture.crop(last)).max() < 5  # black
