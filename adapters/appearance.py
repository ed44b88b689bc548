"""Character appearance: what the reference photo carries besides the face (Ideogram Character's "character
mask" for hair, clothing and accessories).

The face goes through the identity adapter (adapters/identity.py), as before. When the Character Reference
asks for more (`keep="face+hair"`, `"face+hair+outfit"`, `"all"`, or a `mask` of its own), the first reference
photo is masked to those parts (from the face-parsing model, adapters/face_parsing.py, or the user's mask:
white = carried, which replaces the parts, or with mask_mode "add" / "subtract" adjusts them), cropped to them
and padded square on neutral grey, and fed to IP-Adapter plus (the 16-token
resampler over CLIP's penultimate states: it keeps detail such as a hairstyle or a pattern) on every attention
layer, at the character's own strength (Low/Mid/High, weight 0-2: the same scale as the identity adapter).
`keep="face"` (the default) adds nothing: the output is exactly what it was without this adapter. A saved
character's profile may hold a default (`refgen character mask NAME --keep face+hair` or `--mask PNG`), used when
the reference names it and sets neither keep nor mask.

Recorded in provenance as `character_appearance` (parts, mask identity, the parser that made the mask, the
carried picture's digest, scale) and rebuilt on replay from the recorded photo and mask.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from engine.adapter import Context, Frame, Prepared
from engine.errors import RefgenError
from engine.images import load_rgb, pixel_digest
from engine.provenance import image_record, replay_image
from engine.request import GenerationRequest, ResolvedRequest
from engine.request_types import CharacterReference

from .characters import CharacterStore
from .ip_adapter import IPAdapters

GREY = (127, 127, 127)  # what is not carried: neutral, so CLIP sees the parts, not a background colour
MARGIN = 0.08  # of the carried region's size, kept around it when cropping


class CharacterMaskError(RefgenError):
    """A character mask refgen cannot use: another size than the photo, not greyscale, or empty."""


def carries_appearance(ref: Optional[CharacterReference]) -> bool:
    return ref is not None and (ref.mask is not None or ref.keep not in (None, "face")) and ref.scale > 0


def checked_mask(source, size: tuple[int, int]) -> Image.Image:
    """The user's mask as an "L" image the size of the photo (white = carried). Typed errors for another size,
    colour (R, G, B differ: a mask is greyscale) and a mask that carries nothing."""
    rgb = np.asarray(load_rgb(source, "character mask"))
    if rgb.shape[1::-1] != size:
        raise CharacterMaskError(f"the character mask is {rgb.shape[1]}x{rgb.shape[0]}; it must be the size of the "
                                 f"reference photo, {size[0]}x{size[1]}")
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        raise CharacterMaskError("the character mask must be greyscale (white = carried, black = not): it has colours")
    if rgb[..., 0].max() < 128:
        raise CharacterMaskError("the character mask is empty: nothing is white (carried)")
    return Image.fromarray(rgb[..., 0], "L")


def appearance_picture(photo: Image.Image, mask: Image.Image) -> Image.Image:
    """The photo's carried region on grey, cropped around it (with a margin) and padded square."""
    keep = np.asarray(mask) >= 128
    pixels = np.where(keep[..., None], np.asarray(photo), np.array(GREY, np.uint8))
    rows, cols = np.nonzero(keep)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad = int(MARGIN * max(bottom - top, right - left))
    top, left = max(0, top - pad), max(0, left - pad)
    bottom, right = min(keep.shape[0], bottom + pad), min(keep.shape[1], right + pad)
    crop = Image.fromarray(pixels[top:bottom, left:right].astype(np.uint8), "RGB")
    side = max(crop.size)
    square = Image.new("RGB", (side, side), GREY)
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


class CharacterAppearance:
    """An Adapter (engine/adapter.py): the character's hair, outfit and accessories through IP-Adapter plus."""

    def __init__(self, ip_adapters: IPAdapters, device, *, store: Optional[CharacterStore] = None,
                 manifest=None, weights_dir=None, parser=None):
        self.ip_adapters = ip_adapters
        self._device, self._store = device, store
        self._manifest, self._weights_dir = manifest, weights_dir  # where the face-parsing entry is looked up
        self._parser = parser  # a FaceParser (tests), else loaded on first need

    @property
    def store(self) -> CharacterStore:
        return self._store or CharacterStore()

    def set_parser(self, parser=None) -> None:
        """Use this FaceParser; None: load the installed one again on next need (after `refgen weights fetch`)."""
        self._parser = parser

    def parser(self):
        """The face-parsing model, loaded on first need (WeightsMissingError names the fetch command)."""
        if self._parser is None:
            from .face_parsing import FaceParser

            self._parser = FaceParser.load(device=str(self._device), weights_dir=self._weights_dir, manifest=self._manifest)
        return self._parser

    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional["PreparedAppearance"]:
        ref = request.character
        if ref is not None and ref.name is not None and ref.keep is None and ref.mask is None:
            character = self.store.get(ref.name)  # a saved character's own default (refgen character mask)
            ref = ref.model_copy(update={"keep": character.keep, "mask": character.mask_path})
        if not carries_appearance(ref):
            return None
        return self._prepared(ref, self._photo(ref), ref.mask)

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional["PreparedAppearance"]:
        record = resolved.character_appearance
        if record is None:
            return None
        photo = replay_image(record["photo"], "character photo")
        mask = None if record["mask"] is None else replay_image(record["mask"], "character mask")
        ref = CharacterReference(images=[photo], keep=record["keep"], weight=record["scale"],
                                 mask_mode=record.get("mask_mode", "replace"), mask=mask)
        prepared = self._prepared(ref, photo, mask)
        if prepared.record()["character_appearance"]["picture_sha256"] != record["picture_sha256"]:
            raise RefgenError("the character's carried appearance differs from the one recorded (another parsing model?)")
        return prepared

    def _photo(self, ref: CharacterReference):
        if ref.name is not None:
            character = self.store.get(ref.name)
            return character.anchor_paths[0], load_rgb(character.anchor_paths[0], f"anchor image 1 of {character.name!r}")
        return ref.images[0], load_rgb(ref.images[0], "character image 1")

    def _prepared(self, ref: CharacterReference, photo, mask_source) -> "PreparedAppearance":
        source, picture = photo if isinstance(photo, tuple) else (photo, photo)
        user = None if mask_source is None else checked_mask(mask_source, picture.size)
        parts, parser_record = None, None
        if user is None or ref.mask_mode != "replace":
            from .face_parsing import parts_mask

            parser = self.parser()
            parts, parser_record = parts_mask(parser.labels(picture), ref.keep), parser.describe()
        carried_mask = combined_mask(parts, None if user is None else np.asarray(user) >= 128, ref.mask_mode)
        if not carried_mask.any():
            raise CharacterMaskError(f"keep={ref.keep!r} found none of those parts in the reference photo "
                                     "(give a mask of your own, or keep='face')" if user is None else
                                     f"mask_mode={ref.mask_mode!r} leaves nothing of keep={ref.keep!r} to carry")
        carried = appearance_picture(picture, Image.fromarray(carried_mask.astype(np.uint8) * 255, "L"))
        record = {"keep": ref.keep, "mask_mode": ref.mask_mode, "scale": ref.scale, "photo": image_record(source, picture),
                  "mask": None if user is None else image_record(mask_source, user),
                  "parser": parser_record, "picture_sha256": pixel_digest(carried)}
        return PreparedAppearance(self.ip_adapters, carried, ref.scale, record)


def combined_mask(parts: Optional[np.ndarray], user: Optional[np.ndarray], mode: str) -> np.ndarray:
    """What is carried: the parsed parts, the user's mask, or the parts adjusted by it (add: either; subtract:
    the parts the mask leaves black)."""
    if user is None:
        return parts
    if mode == "replace":
        return user
    return parts | user if mode == "add" else parts & ~user


class PreparedAppearance(Prepared):
    def __init__(self, ip_adapters: IPAdapters, picture: Image.Image, scale: float, record: dict):
        self._ip, self._picture, self._scale, self._record = ip_adapters, picture, scale, record

    def record(self) -> dict:
        return {"character_appearance": self._record}

    def patches(self, frame: Frame) -> list:
        return [(self._ip, self._ip.image_use(self._picture, self._scale, frame.batch, frame.guided))]
