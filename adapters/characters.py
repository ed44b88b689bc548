"""Character profiles: a named identity built once from a few anchor photos, reused for every render.

    from adapters.characters import CharacterStore, score
    from adapters.faces import FaceAnalyzer
    faces = FaceAnalyzer.load("antelopev2")
    store = CharacterStore()                                   # $REFGEN_HOME/characters
    mira = store.create("Mira", ["front.jpg", "three-quarter.jpg", "profile.jpg"], faces,
                        anchor="Mira, 30, olive skin, short black bob, scar on left cheek")
    mira = store.get("Mira")                                   # later, in another process
    similarity = score(mira, "render.png", faces)              # ArcFace cosine vs the mean, None: no face

On disk, one folder per character under the store's root, named by the name's slug ("Mira Rossi" ->
"mira-rossi"; names are 1-64 letters, digits, spaces, "-" or "_", so no name can reach outside the root):

    character.json            name, identity anchor string, created, analyzer identity, per-anchor facts,
                              "lora": the name of its trained LoRA in the LoRA library, once there is one;
                              "keep" and "mask": its default character mask (adapters/appearance.py)
    mask.png                  its own character mask over anchor 1, when it has one
    embeddings.safetensors    "embeddings" (n, 512) float32, one per anchor; "mean_embedding" (512,) unit length
    face.png                  the aligned face crop of the first anchor (224 x 224)
    anchors/anchor_1.png ...  RGB copies of the anchor images (upright per EXIF)

A folder is built complete in a hidden temporary sibling and renamed into place, so a crash leaves either
the old profile or the new one; hidden folders (".name...") are never listed. No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from engine import paths
from engine.errors import RefgenError
from engine.images import load_rgb, make_staging_folder, png_data, write_atomic

from .faces import EMBEDDING_DIM, FaceAnalyzer, ImageInput, mean_identity

log = logging.getLogger("refgen")

FORMAT_VERSION = 1
MAX_ANCHORS = 5
MAX_NAME_LENGTH = 64
FACE_CROP_SIZE = 224
PROFILE_FILE = "character.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
FACE_FILE = "face.png"
ANCHORS_FOLDER = "anchors"
MASK_FILE = "mask.png"

_NAME_PATTERN = re.compile(r"[A-Za-z0-9 _-]{1,%d}" % MAX_NAME_LENGTH)


# ------------------------------------------------------------------------------------- errors


class CharacterError(RefgenError):
    """Base of the character store's errors: a bad name, bad anchors, a damaged profile."""


class UnknownCharacterError(CharacterError, KeyError):
    """No character of that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CharacterExistsError(CharacterError):
    """create() of a name that already has a profile, without overwrite=True."""


# ------------------------------------------------------------------------------------- profile


@dataclass(frozen=True, eq=False)
class Character:
    """One stored character. Arrays are float32 and read-only."""

    name: str
    anchor: str  # the identity anchor string, prepended to prompts verbatim
    embeddings: np.ndarray  # (n, 512): one per anchor image, each unit length
    mean_embedding: np.ndarray  # (512,): normalised mean of `embeddings`
    face_crop: Image.Image  # aligned RGB crop of the first anchor's face
    anchor_paths: list[Path]  # the stored copies of the anchor images, in the order given
    analyzer: dict[str, Any]  # FaceAnalyzer.describe() of the analyzer that made the embeddings
    created: str  # ISO 8601, UTC
    path: Path = field(default=Path())  # the character's folder
    anchors: list[dict[str, Any]] = field(default_factory=list)  # per anchor: file, size, bbox, det_score
    lora: str = ""  # the character's trained LoRA in the LoRA library ("" when none)
    keep: str = "face"  # what a Character Reference to it carries besides the face, by default (appearance.py)
    mask_path: Optional[Path] = None  # its own mask over anchor 1 (white = carried), replacing keep's parts

    @property
    def slug(self) -> str:
        return self.path.name

    @property
    def image_count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def face_path(self) -> Path:
        return self.path / FACE_FILE


def validate_name(name: Any) -> str:
    """The name, checked: 1-64 characters, letters/digits/space/-/_, at least one letter or digit."""
    if not isinstance(name, str):
        raise CharacterError(f"a character name must be text, got {type(name).__name__}")
    if not _NAME_PATTERN.fullmatch(name) or not any(ch.isalnum() for ch in name):
        shown = name if len(name) <= MAX_NAME_LENGTH + 10 else name[: MAX_NAME_LENGTH + 10] + "..."
        raise CharacterError(
            f"invalid character name {shown!r}: use 1-{MAX_NAME_LENGTH} letters, digits, spaces, '-' or '_' "
            "(no dots, slashes or other punctuation)"
        )
    return name


def slugify(name: str) -> str:
    """The folder name of a character: lower case, runs of spaces/-/_ become one '-', ends trimmed."""
    validate_name(name)
    slug = re.sub(r"[ _-]+", "-", name.strip().lower()).strip("-")
    if not slug or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug):  # only ASCII letters/digits survive
        raise CharacterError(f"invalid character name {name!r}: use ASCII letters and digits")
    return slug


# ------------------------------------------------------------------------------------- store


class CharacterStore:
    """Character profiles in one folder (default: $REFGEN_HOME/characters)."""

    def __init__(self, root: Optional[Path | str] = None):
        self.root = Path(root) if root is not None else paths.data_dir() / "characters"

    # ---------------------------------------------------------------------------- paths

    def folder(self, name: str) -> Path:
        """The folder a character of this name lives in (it may not exist); never outside the root."""
        slug = slugify(name)
        root = self.root.resolve()
        folder = (root / slug).resolve()
        if folder.parent != root:  # belt and braces: slugify already allows no separators or dots
            raise CharacterError(f"invalid character name {name!r}: it would leave the character folder")
        return folder

    def exists(self, name: str) -> bool:
        return (self.folder(name) / PROFILE_FILE).is_file()

    # ---------------------------------------------------------------------------- create

    def create(
        self,
        name: str,
        images: Sequence[ImageInput],
        analyzer: FaceAnalyzer,
        anchor: str = "",
        overwrite: bool = False,
        select: Literal["largest", "single"] = "largest",
    ) -> Character:
        """Build a character from 1-5 anchor images (3-5 recommended: frontal, three-quarter, other
        lighting) of one person; the largest face of each is used, or with select="single" a photo showing
        several faces is refused (MultipleFacesError naming it: which one is the character is then the user's call).

        Raises CharacterError for a bad name or image count, CharacterExistsError when the name has a
        profile and overwrite is False (the existing one is left untouched), and the face layer's typed
        errors naming the image ("no face found in anchor image 2"). Nothing is written on any error.
        """
        folder = self.folder(name)
        if isinstance(images, (str, Path, bytes, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise CharacterError("a character needs at least one anchor image (3-5 recommended)")
        if len(images) > MAX_ANCHORS:
            raise CharacterError(
                f"{len(images)} anchor images given; a character takes at most {MAX_ANCHORS} (3-5 recommended)"
            )
        if not isinstance(anchor, str):
            raise CharacterError(f"the identity anchor must be text, got {type(anchor).__name__}")
        if not overwrite and self.exists(name):
            raise CharacterExistsError(_exists_message(name, folder))

        # Everything that can fail on the inputs happens before anything is written.
        rgbs, faces = [], []
        for number, image in enumerate(images, start=1):
            what = f"anchor image {number}"
            rgb = _to_rgb(image, what)
            face = analyzer.analyze(rgb, select=select, what=what, crop_size=FACE_CROP_SIZE)
            rgbs.append(rgb)
            faces.append(face)
        embeddings = np.stack([np.asarray(f.embedding, np.float32) for f in faces])
        mean = mean_identity(embeddings, "the anchor images")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        anchor_files = [f"{ANCHORS_FOLDER}/anchor_{n}.png" for n in range(1, len(rgbs) + 1)]
        profile = {
            "format": FORMAT_VERSION,
            "name": name,
            "slug": folder.name,
            "anchor": anchor,
            "created": created,
            "analyzer": analyzer.describe(),
            "face_crop": FACE_FILE,
            "anchors": [
                {
                    "file": file,
                    "size": list(rgb.size),
                    "bbox": [round(float(v), 3) for v in face.bbox],
                    "det_score": round(float(face.det_score), 6),
                }
                for file, rgb, face in zip(anchor_files, rgbs, faces)
            ],
        }

        self.root.mkdir(parents=True, exist_ok=True)
        staging = make_staging_folder(folder)
        try:
            for file, rgb in zip(anchor_files, rgbs):
                write_atomic(staging / file, png_data(rgb))
            write_atomic(staging / FACE_FILE, png_data(faces[0].crop))
            write_atomic(staging / EMBEDDINGS_FILE, _safetensors_bytes(embeddings, mean))
            write_atomic(staging / PROFILE_FILE, (json.dumps(profile, indent=2) + "\n").encode())
            _move_into_place(staging, folder, name, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("character %r saved in %s (%d anchor images)", name, folder, len(rgbs))
        return self._load(folder)

    # ---------------------------------------------------------------------------- read

    def get(self, name: str) -> Character:
        """The character of this name (names differing only in case or spacing are the same one)."""
        folder = self.folder(name)
        if not (folder / PROFILE_FILE).is_file():
            known = [c.name for c in self.list()]
            listed = ", ".join(known) if known else "none yet; create one with: refgen character create NAME IMAGE..."
            raise UnknownCharacterError(f"unknown character {name!r}; known: {listed}")
        return self._load(folder)

    def list(self) -> list[Character]:
        """Every readable character, sorted by slug; damaged profiles are logged and skipped."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir() or not (folder / PROFILE_FILE).is_file():
                continue
            try:
                found.append(self._load(folder))
            except CharacterError as exc:
                log.warning("skipping character folder %s: %s", folder, exc)
        return found

    def delete(self, name: str) -> None:
        """Remove a character's folder (UnknownCharacterError when there is none)."""
        character = self.get(name)
        trash = character.path.with_name(f".{character.path.name}.deleting-{os.getpid()}")
        os.rename(character.path, trash)  # atomic: the profile disappears at once, then the files go
        shutil.rmtree(trash, ignore_errors=True)
        log.info("character %r deleted", character.name)

    def add_anchor(self, name: str, image: ImageInput, analyzer: FaceAnalyzer,
                   select: Literal["largest", "single"] = "largest") -> Character:
        """One more anchor image (at most MAX_ANCHORS): the profile is rebuilt from its anchors plus `image`, keeping
        its identity anchor text, LoRA and character mask (anchor 1, which the mask covers, stays first). The same
        errors as create(); the old profile stays untouched on any of them."""
        character = self.get(name)
        if character.image_count >= MAX_ANCHORS:
            raise CharacterError(f"character {character.name!r} already has {MAX_ANCHORS} anchor images, the most it "
                                 "takes; delete it and create it again from the photos you want")
        mask = None
        if character.mask_path is not None:
            with Image.open(character.mask_path) as stored:
                mask = stored.convert("L")
        rebuilt = self.create(character.name, [*character.anchor_paths, image], analyzer, anchor=character.anchor,
                              overwrite=True, select=select)
        if character.lora:
            rebuilt = self.set_lora(character.name, character.lora)
        if character.keep != "face" or mask is not None:
            rebuilt = self.set_appearance(character.name, character.keep, mask)
        return rebuilt

    def set_lora(self, name: str, lora: str) -> Character:
        """Point the character at its LoRA in the LoRA library (`refgen train NAME --character ...` does this);
        "" removes the pointer. character.json is rewritten atomically; nothing else changes."""
        folder = self.get(name).path
        profile = json.loads((folder / PROFILE_FILE).read_text(encoding="utf-8"))
        if lora:
            profile["lora"] = lora
        else:
            profile.pop("lora", None)
        write_atomic(folder / PROFILE_FILE, (json.dumps(profile, indent=2) + "\n").encode())
        return self._load(folder)

    def set_appearance(self, name: str, keep: str = "face", mask: Optional[Image.Image] = None) -> Character:
        """The character's default character mask: parts to carry besides the face (`keep`), or its own mask
        over anchor 1 (an "L" image the anchor's size, saved as mask.png). keep="face" and no mask: the face only."""
        character = self.get(name)
        folder = character.path
        profile = json.loads((folder / PROFILE_FILE).read_text(encoding="utf-8"))
        profile["keep"] = keep
        if mask is not None:
            write_atomic(folder / MASK_FILE, png_data(mask))
            profile["mask"] = MASK_FILE
        else:
            profile.pop("mask", None)
        write_atomic(folder / PROFILE_FILE, (json.dumps(profile, indent=2) + "\n").encode())
        if mask is None:
            (folder / MASK_FILE).unlink(missing_ok=True)
        return self._load(folder)

    def _load(self, folder: Path) -> Character:
        try:
            profile = json.loads((folder / PROFILE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CharacterError(f"character profile {folder / PROFILE_FILE} cannot be read: {exc}") from exc
        if not isinstance(profile, dict) or profile.get("format") != FORMAT_VERSION:
            raise CharacterError(f"{folder / PROFILE_FILE} is not a version-{FORMAT_VERSION} character profile")
        try:
            name = str(profile["name"])
            anchors = list(profile["anchors"])
            anchor_paths = [folder / _inside(str(a["file"]), folder) for a in anchors]
            embeddings, mean = _read_safetensors(folder / EMBEDDINGS_FILE)
            with Image.open(folder / _inside(str(profile.get("face_crop", FACE_FILE)), folder)) as crop:
                face_crop = crop.convert("RGB")
        except CharacterError:
            raise
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise CharacterError(f"character profile in {folder} is damaged ({exc}); delete and recreate it") from exc
        if embeddings.shape[0] != len(anchor_paths):
            raise CharacterError(
                f"character profile in {folder} is damaged: {embeddings.shape[0]} embeddings for "
                f"{len(anchor_paths)} anchor images; delete and recreate it"
            )
        return Character(
            name=name,
            anchor=str(profile.get("anchor", "")),
            embeddings=embeddings,
            mean_embedding=mean,
            face_crop=face_crop,
            anchor_paths=anchor_paths,
            analyzer=dict(profile.get("analyzer") or {}),
            created=str(profile.get("created", "")),
            path=folder,
            anchors=anchors,
            lora=str(profile.get("lora") or ""),
            keep=str(profile.get("keep") or "face"),
            mask_path=folder / _inside(str(profile["mask"]), folder) if profile.get("mask") else None,
        )


# ------------------------------------------------------------------------------------- scoring


def score(character: Character, image: ImageInput, analyzer: FaceAnalyzer) -> Optional[float]:
    """ArcFace cosine similarity of the image's largest face to the character's mean embedding, or
    None when the image shows no face. The analyzer must use the pack the character was made with
    (embeddings of different recognisers are not comparable): another pack is a CharacterError."""
    made_with = character.analyzer.get("pack")
    if made_with and made_with != analyzer.pack:
        raise CharacterError(
            f"character {character.name!r} was embedded with the {made_with} pack, not {analyzer.pack}; "
            f"score it with FaceAnalyzer.load({made_with!r})"
        )
    if character.analyzer.get("identity") not in (None, analyzer.identity):
        log.warning("character %r was embedded with other %s model files; scores may drift", character.name, made_with)
    return analyzer.score_image(image, character.mean_embedding)


# ------------------------------------------------------------------------------------- helpers


def _exists_message(name: str, folder: Path) -> str:
    return f"character {name!r} already exists ({folder}); pass overwrite (--overwrite) to replace it"


def _to_rgb(image: ImageInput, what: str) -> Image.Image:
    if isinstance(image, np.ndarray):
        from .faces import _load_image

        return _load_image(image, what)
    return load_rgb(image, what=what)


def _safetensors_bytes(embeddings: np.ndarray, mean: np.ndarray) -> bytes:
    from safetensors.numpy import save

    return save(
        {
            "embeddings": np.ascontiguousarray(embeddings, np.float32),
            "mean_embedding": np.ascontiguousarray(mean, np.float32),
        },
        metadata={"format": f"refgen-character-{FORMAT_VERSION}"},
    )


def _read_safetensors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(path.read_bytes())
    except (OSError, SafetensorError, ValueError) as exc:
        raise CharacterError(f"{path} cannot be read ({exc}); delete and recreate the character") from exc
    embeddings = tensors.get("embeddings")
    mean = tensors.get("mean_embedding")
    if (
        embeddings is None
        or mean is None
        or embeddings.ndim != 2
        or embeddings.shape[1] != EMBEDDING_DIM
        or not 1 <= embeddings.shape[0] <= MAX_ANCHORS
        or mean.shape != (EMBEDDING_DIM,)
    ):
        raise CharacterError(f"{path} does not hold (n, {EMBEDDING_DIM}) embeddings and their mean")
    embeddings = embeddings.astype(np.float32)
    mean = mean.astype(np.float32)
    embeddings.setflags(write=False)
    mean.setflags(write=False)
    return embeddings, mean


def _inside(relative: str, folder: Path) -> str:
    """A file name from a profile, refused if it points outside the character's folder."""
    resolved = (folder / relative).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise CharacterError(f"character profile in {folder} names a file outside its folder: {relative!r}")
    return relative


def _move_into_place(staging: Path, folder: Path, name: str, overwrite: bool) -> None:
    """Rename the finished staging folder to `folder`; with overwrite, swap out the old one."""
    if not folder.exists():
        try:
            os.rename(staging, folder)
            return
        except OSError:
            if not folder.exists():
                raise
            if not overwrite:  # another process created it meanwhile
                raise CharacterExistsError(_exists_message(name, folder)) from None
    elif not overwrite:  # a profile, or a folder of that name someone else put there
        raise CharacterExistsError(_exists_message(name, folder))
    old = make_staging_folder(folder, suffix=".old")
    old.rmdir()  # only its free name is wanted
    os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(old, folder)  # put the previous profile back
        raise
    shutil.rmtree(old, ignore_errors=True)
