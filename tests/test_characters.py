"""Character profiles (adapters/characters.py, engine/cli/character.py): a named identity made once
from anchor photos and kept on disk as JSON + safetensors + PNGs, read back equal, listed, shown,
deleted; names that could escape the store are refused; failures write nothing and leave an
existing profile intact; the CLI wraps it all with one-line errors.

Faces come from the tiny deterministic insightface pack of tests/tiny_faces.py (the astronaut's face
where skimage's photo has it; a black picture has none). Offline, CPU.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image, ImageOps
from typer.testing import CliRunner

import tiny_faces as tf
from adapters.characters import (
    Character,
    CharacterError,
    CharacterExistsError,
    CharacterStore,
    UnknownCharacterError,
    score,
)
from adapters.faces import FaceAnalyzer, MultipleFacesError, NoFaceError, identity_score
from engine.cli.character import character_app
from engine.errors import RefgenError
from conftest import COMMITTED_MANIFEST

pytestmark = pytest.mark.usefixtures("private_home")  # no weights, caches or downloads from this machine

ANCHOR = "Eileen, 40s, short brown hair, NASA flight suit"


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory) -> Path:
    """A weights folder holding the tiny antelopev2 pack that finds the astronaut's face."""
    folder = tmp_path_factory.mktemp("character_pack")
    tf.write_pack(folder, [tf.ASTRONAUT_FACE], manifest_path=COMMITTED_MANIFEST)
    return folder


@pytest.fixture
def analyzer(pack_dir, monkeypatch) -> FaceAnalyzer:
    monkeypatch.setenv("REFGEN_WEIGHTS", str(pack_dir))
    return FaceAnalyzer.load("antelopev2", device="cpu")


@pytest.fixture
def mirrored(astronaut) -> Image.Image:
    return ImageOps.mirror(astronaut)  # same face box for the tiny detector, another embedding


@pytest.fixture
def blank() -> Image.Image:
    return Image.new("RGB", (512, 512))  # the tiny detector finds no face in black


@pytest.fixture
def store(tmp_path) -> CharacterStore:
    return CharacterStore(tmp_path / "store" / "characters")


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------ create / get


def test_create_stores_json_safetensors_and_pngs_and_reloads_equal(store, analyzer, astronaut, mirrored, tmp_path):
    made = store.create("Eileen Collins", [astronaut, mirrored], analyzer, anchor=ANCHOR)
    folder = store.root / "eileen-collins"
    assert made.path == folder.resolve()
    assert tree(folder) == [
        "anchors",
        "anchors/anchor_1.png",
        "anchors/anchor_2.png",
        "character.json",
        "embeddings.safetensors",
        "face.png",
    ]
    assert [p.name for p in store.root.iterdir()] == ["eileen-collins"]  # no staging folder left behind

    profile = json.loads((folder / "character.json").read_text())
    assert profile["name"] == "Eileen Collins" and profile["anchor"] == ANCHOR
    assert profile["analyzer"] == analyzer.describe() and profile["analyzer"]["pack"] == "antelopev2"
    assert profile["created"].endswith("+00:00")
    assert [a["file"] for a in profile["anchors"]] == ["anchors/anchor_1.png", "anchors/anchor_2.png"]
    np.testing.assert_allclose(profile["anchors"][0]["bbox"], tf.ASTRONAUT_FACE.bbox, atol=1e-2)

    from safetensors.numpy import load_file

    tensors = load_file(folder / "embeddings.safetensors")
    expected = np.stack([analyzer.analyze(astronaut).embedding, analyzer.analyze(mirrored).embedding])
    np.testing.assert_allclose(tensors["embeddings"], expected, atol=1e-6)
    mean = expected.mean(axis=0)
    np.testing.assert_allclose(tensors["mean_embedding"], mean / np.linalg.norm(mean), atol=1e-6)
    assert not (folder / "embeddings.safetensors").read_bytes().startswith(b"\x80")  # not a pickle

    # The anchors are stored pixel for pixel.
    with Image.open(folder / "anchors" / "anchor_2.png") as stored:
        assert stored.format == "PNG" and np.array_equal(np.asarray(stored), np.asarray(mirrored))

    loaded = store.get("Eileen Collins")
    assert isinstance(loaded, Character)
    assert loaded.name == "Eileen Collins" and loaded.anchor == ANCHOR and loaded.created == made.created
    assert loaded.embeddings.shape == (2, 512) and loaded.embeddings.dtype == np.float32
    np.testing.assert_array_equal(loaded.embeddings, made.embeddings)
    np.testing.assert_array_equal(loaded.mean_embedding, made.mean_embedding)
    assert np.linalg.norm(loaded.mean_embedding) == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(loaded.embeddings[0], loaded.embeddings[1])  # two anchors, two identities
    assert loaded.face_crop.size == (224, 224) and loaded.face_crop.mode == "RGB"
    assert np.array_equal(np.asarray(loaded.face_crop), np.asarray(made.face_crop))
    assert loaded.anchor_paths == [folder.resolve() / "anchors/anchor_1.png", folder.resolve() / "anchors/anchor_2.png"]
    assert all(p.is_file() for p in loaded.anchor_paths)
    assert loaded.analyzer == analyzer.describe()
    # case and spacing do not make another character
    assert store.get("eileen   collins").name == "Eileen Collins"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_character_gets_the_modes_a_plain_mkdir_and_write_get(store, analyzer, astronaut, tmp_path, umask):
    """The profile is staged in a temp folder and renamed into place: mkdtemp's 0700 must not survive."""
    previous = os.umask(umask)
    try:
        (tmp_path / "plain_dir").mkdir()
        (tmp_path / "plain_file").write_bytes(b"")
        folder = store.create("Eileen", [astronaut], analyzer, anchor=ANCHOR).path
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert {mode(folder), mode(folder / "anchors")} == {mode(tmp_path / "plain_dir")}
    assert {mode(path) for path in folder.rglob("*") if path.is_file()} == {mode(tmp_path / "plain_file")}


def test_face_analysis_on_a_gpu_this_machine_lacks_is_a_device_error_not_a_silent_cpu_run(pack_dir, monkeypatch):
    from engine.errors import DeviceError

    monkeypatch.setenv("REFGEN_WEIGHTS", str(pack_dir))
    with pytest.raises(DeviceError, match="cuda:99"):
        FaceAnalyzer.load("antelopev2", device="cuda:99")


def test_the_default_store_lives_in_refgen_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFGEN_HOME", str(tmp_path / "somewhere"))
    assert CharacterStore().root == tmp_path / "somewhere" / "characters"


def test_paths_are_accepted_and_a_single_anchor_scores_itself_at_one(store, analyzer, astronaut, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    astronaut.save(photo, quality=95)
    character = store.create("solo", [photo], analyzer)
    assert character.image_count == 1 and character.anchor == ""
    assert score(character, photo, analyzer) == pytest.approx(1.0, abs=1e-5)


def test_score_is_the_similarity_to_the_mean_and_none_without_a_face(store, analyzer, astronaut, mirrored, blank):
    character = store.create("pair", [astronaut, mirrored], analyzer)
    own = score(character, astronaut, analyzer)
    assert own == pytest.approx(identity_score(analyzer.analyze(astronaut).embedding, character.mean_embedding))
    assert own < 0.9999  # the mean of two different embeddings is neither of them
    assert score(character, blank, analyzer) is None


# ------------------------------------------------------------------------------------ list / delete


def test_list_and_delete(store, analyzer, astronaut, mirrored):
    assert store.list() == []
    store.create("Bravo", [astronaut], analyzer, anchor="b")
    store.create("alpha_one", [mirrored, astronaut], analyzer, anchor="a")
    assert [(c.name, c.image_count, c.anchor) for c in store.list()] == [("alpha_one", 2, "a"), ("Bravo", 1, "b")]
    store.delete("bravo")
    assert [c.name for c in store.list()] == ["alpha_one"]
    assert sorted(p.name for p in store.root.iterdir()) == ["alpha-one"]
    with pytest.raises(UnknownCharacterError):
        store.delete("Bravo")


def test_an_unknown_name_lists_the_known_ones(store, analyzer, astronaut):
    with pytest.raises(UnknownCharacterError, match="unknown character 'nobody'; known: none yet"):
        store.get("nobody")
    store.create("Ada", [astronaut], analyzer)
    store.create("Grace", [astronaut], analyzer)
    with pytest.raises(UnknownCharacterError, match=r"unknown character 'nobody'; known: Ada, Grace$") as caught:
        store.get("nobody")
    assert isinstance(caught.value, CharacterError) and isinstance(caught.value, RefgenError)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "name", ["../evil", "..", "a/b", "a\\b", "/abs", ".hidden", "", " ", "x" * 65, "dot.name", "nul\x00", "é"]
)
def test_names_that_could_escape_the_store_are_refused_and_nothing_is_written(name, tmp_path, analyzer, astronaut):
    store = CharacterStore(tmp_path / "characters")
    before = tree(tmp_path)
    with pytest.raises(CharacterError, match="invalid character name"):
        store.create(name, [astronaut], analyzer)
    with pytest.raises(CharacterError, match="invalid character name"):
        store.get(name)
    with pytest.raises(CharacterError, match="invalid character name"):
        store.delete(name)
    assert tree(tmp_path) == before  # not even the store's root was made
    assert not (tmp_path / "evil").exists()


def test_the_longest_valid_name_is_accepted(store, analyzer, astronaut):
    name = "a" * 64
    assert store.create(name, [astronaut], analyzer).name == name


def test_an_anchor_without_a_face_is_named_and_nothing_is_written(store, analyzer, astronaut, blank):
    with pytest.raises(NoFaceError, match="no face found in anchor image 2"):
        store.create("Eileen", [astronaut, blank, astronaut], analyzer)
    with pytest.raises(NoFaceError, match="no face found in anchor image 1"):
        store.create("Eileen", [blank], analyzer)
    assert tree(store.root) == []
    with pytest.raises(UnknownCharacterError):
        store.get("Eileen")


def test_the_number_of_anchor_images_is_checked(store, analyzer, astronaut, tmp_path):
    with pytest.raises(CharacterError, match="at least one anchor image"):
        store.create("none", [], analyzer)
    with pytest.raises(CharacterError, match="6 anchor images given; a character takes at most 5"):
        store.create("six", [astronaut] * 6, analyzer)
    with pytest.raises(RefgenError, match="anchor image 2 not found"):
        store.create("missing", [astronaut, tmp_path / "nope.png"], analyzer)
    assert tree(store.root) == []


def test_a_duplicate_is_an_error_and_leaves_the_existing_profile_intact(store, analyzer, astronaut, mirrored):
    first = store.create("Eileen", [astronaut], analyzer, anchor="first")
    files = {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    for clash in ("Eileen", "eileen", " Eileen "):
        with pytest.raises(CharacterExistsError, match="already exists.*overwrite"):
            store.create(clash, [mirrored], analyzer, anchor="second")
    assert {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()} == files
    assert store.get("Eileen").anchor == "first"

    replaced = store.create("Eileen", [mirrored, astronaut], analyzer, anchor="second", overwrite=True)
    assert replaced.anchor == "second" and replaced.image_count == 2
    again = store.get("Eileen")
    assert again.anchor == "second" and again.image_count == 2
    np.testing.assert_array_equal(again.embeddings[0], analyzer.analyze(mirrored).embedding)
    assert [p.name for p in store.root.iterdir()] == ["eileen"]  # the old folder is gone, no leftovers


def test_a_failed_overwrite_keeps_the_old_profile(store, analyzer, astronaut, blank):
    store.create("Eileen", [astronaut], analyzer, anchor="kept")
    with pytest.raises(NoFaceError, match="anchor image 1"):
        store.create("Eileen", [blank], analyzer, anchor="lost", overwrite=True)
    assert store.get("Eileen").anchor == "kept"


def test_a_damaged_profile_is_a_typed_error_and_skipped_by_list(store, analyzer, astronaut):
    store.create("good", [astronaut], analyzer)
    broken = store.create("broken", [astronaut], analyzer)
    (broken.path / "embeddings.safetensors").write_bytes(b"garbage")
    with pytest.raises(CharacterError, match="embeddings.safetensors"):
        store.get("broken")
    assert [c.name for c in store.list()] == ["good"]


def test_select_single_refuses_a_photo_with_several_faces_and_writes_nothing(store, tmp_path, monkeypatch, astronaut):
    """The studio's create: which of two people is the character is the user's call, not the largest box's."""
    two_faces = tmp_path / "two_faces"
    tf.write_pack(two_faces, [tf.ASTRONAUT_FACE, tf.SECOND_FACE], manifest_path=COMMITTED_MANIFEST)
    monkeypatch.setenv("REFGEN_WEIGHTS", str(two_faces))
    analyzer = FaceAnalyzer.load("antelopev2", device="cpu")
    with pytest.raises(MultipleFacesError, match="anchor image 1 shows 2 faces"):
        store.create("Eileen", [astronaut], analyzer, select="single")
    assert tree(store.root) == []
    assert store.create("Eileen", [astronaut], analyzer).image_count == 1  # the library's default: the largest


def test_add_anchor_keeps_the_anchor_text_lora_and_mask_and_the_first_anchor(store, analyzer, astronaut, mirrored):
    store.create("Eileen", [astronaut], analyzer, anchor=ANCHOR)
    store.set_lora("Eileen", "eileen-v1")
    mask = Image.new("L", astronaut.size, 0)
    mask.paste(255, (100, 40, 350, 300))
    store.set_appearance("Eileen", "face+hair", mask)

    grown = store.add_anchor("Eileen", mirrored, analyzer)

    assert grown.image_count == 2 and (grown.anchor, grown.lora, grown.keep) == (ANCHOR, "eileen-v1", "face+hair")
    np.testing.assert_array_equal(np.asarray(Image.open(grown.anchor_paths[0])), np.asarray(astronaut.convert("RGB")))
    np.testing.assert_array_equal(grown.embeddings[1], analyzer.analyze(mirrored).embedding)
    np.testing.assert_array_equal(np.asarray(Image.open(grown.mask_path)), np.asarray(mask))


def test_add_anchor_stops_at_five_and_on_a_photo_without_a_face_leaving_the_profile(store, analyzer, astronaut, blank):
    store.create("Eileen", [astronaut] * 4, analyzer, anchor="kept")
    with pytest.raises(NoFaceError, match="anchor image 5"):
        store.add_anchor("Eileen", blank, analyzer)
    assert store.get("Eileen").image_count == 4
    store.add_anchor("Eileen", astronaut, analyzer)
    with pytest.raises(CharacterError, match="already has 5 anchor images"):
        store.add_anchor("Eileen", astronaut, analyzer)
    assert store.get("Eileen").image_count == 5 and store.get("Eileen").anchor == "kept"


def test_scoring_with_another_pack_is_refused(store, analyzer, astronaut):
    character = store.create("Eileen", [astronaut], analyzer)
    foreign = Character(**{**character.__dict__, "analyzer": {**character.analyzer, "pack": "buffalo_l"}})
    with pytest.raises(CharacterError, match="buffalo_l pack"):
        score(foreign, astronaut, analyzer)


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli(tmp_path, pack_dir, monkeypatch):
    """A local Typer app mounting character_app, with REFGEN_HOME/REFGEN_WEIGHTS in temp folders."""
    monkeypatch.setenv("REFGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REFGEN_WEIGHTS", str(pack_dir))
    monkeypatch.setenv("COLUMNS", "240")  # rich tables on one line per row
    app = typer.Typer()
    app.add_typer(character_app, name="character")

    @app.callback()
    def main() -> None:  # a group, so "character" is a subcommand as in the real CLI
        pass

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, ["character", *args], input=input)

    return invoke


@pytest.fixture
def photos(tmp_path, astronaut, mirrored, blank) -> dict[str, Path]:
    files = {"front": astronaut, "mirror": mirrored, "blank": blank}
    for stem, image in files.items():
        image.save(tmp_path / f"{stem}.png")
    return {stem: tmp_path / f"{stem}.png" for stem in files}


def test_cli_create_list_show_delete(cli, photos, tmp_path):
    result = cli("create", "Eileen Collins", str(photos["front"]), str(photos["mirror"]), "--anchor", ANCHOR)
    assert result.exit_code == 0, result.output
    assert "created: Eileen Collins (2 anchor images)" in result.output
    folder = tmp_path / "home" / "characters" / "eileen-collins"
    assert (folder / "character.json").is_file()

    result = cli("list")
    assert result.exit_code == 0, result.output
    assert "Eileen Collins" in result.output and "NASA flight suit" in result.output and " 2 " in result.output

    result = cli("show", "eileen collins")
    assert result.exit_code == 0, result.output
    assert "Eileen Collins" in result.output and ANCHOR in result.output and "antelopev2" in result.output
    assert "anchor_1.png" in result.output and "anchor_2.png" in result.output

    result = cli("delete", "Eileen Collins", input="n\n")
    assert result.exit_code == 1 and folder.exists()  # declined: nothing deleted
    result = cli("delete", "Eileen Collins", input="y\n")
    assert result.exit_code == 0, result.output
    assert not folder.exists()
    result = cli("create", "Eileen", str(photos["front"]), "--anchor", "x")
    assert result.exit_code == 0, result.output
    result = cli("delete", "Eileen", "--yes")
    assert result.exit_code == 0 and "deleted: Eileen" in result.output
    assert "no characters" in cli("list").output


def test_cli_errors_are_one_line(cli, photos):
    result = cli("show", "nobody")
    assert result.exit_code == 1 and "unknown character 'nobody'" in result.output
    assert "Traceback" not in result.output

    result = cli("create", "Eileen", str(photos["front"]), str(photos["blank"]), "--anchor", "x")
    assert result.exit_code == 1 and "no face found in anchor image 2" in result.output

    result = cli("create", "../evil", str(photos["front"]), "--anchor", "x")
    assert result.exit_code == 1 and "invalid character name" in result.output

    assert cli("create", "Eileen", str(photos["front"]), "--anchor", "one").exit_code == 0
    result = cli("create", "Eileen", str(photos["mirror"]), "--anchor", "two")
    assert result.exit_code == 1 and "already exists" in result.output
    result = cli("create", "Eileen", str(photos["mirror"]), "--anchor", "two", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "two" in cli("show", "Eileen").output

    result = cli("create", "Big", *[str(photos["front"])] * 6, "--anchor", "x")
    assert result.exit_code == 1 and "at most 5" in result.output
    result = cli("delete", "nobody", "--yes")
    assert result.exit_code == 1 and "known: Eileen" in result.output


def test_cli_without_the_pack_names_the_fetch_command(cli, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("REFGEN_WEIGHTS", str(tmp_path / "no-weights"))
    result = cli("create", "Eileen", str(photos["front"]), "--anchor", "x")
    assert result.exit_code == 1 and "refgen weights fetch insightface-antelopev2" in result.output
