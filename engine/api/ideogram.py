"""Ideogram 3.0's character endpoints (multipart forms) -> refgen's GenerationRequest, and refgen's images ->
Ideogram's answer. The routes are engine/api/ideogram_routes.py, mounted on the Leonardo API's app under
`/v1/ideogram-v3` (Ideogram's own paths: a client changes only its base URL).

Reference followed: Ideogram's public API reference, developer.ideogram.ai/api-reference, pages "Generate with
Ideogram 3.0" (POST /v1/ideogram-v3/generate), "Edit with Ideogram 3.0" (POST /v1/ideogram-v3/edit) and "Remix
with Ideogram 3.0" (POST /v1/ideogram-v3/remix), as published when read on 2026-11-28 (its OpenAPI 3.1 document,
"API Reference" version 1.0.0; the form field names were checked against the generated client of that document,
tryAGI/Ideogram at 796aa9f, 2026-06-17). All three are synchronous in that reference: it documents no async/poll
form for the 3.0 endpoints (only Ideogram 4's /v1/ideogram-v4/async/...), so these answer synchronously. A request
still running when the server's wait ends is answered 504 with its refgen job id; the job itself runs once, and
GET /api/rest/v1/generations/{id} (the Leonardo API) shows it.

    body, files, warnings = parse_form("generate", fields, files, max_pixels)  # IdeogramRequestError naming a field
    request = generation_request(body, resolve)          # GenerationRequest (resolve: upload id -> path)
    answer = ideogram_answer(job, url_for)               # {"created", "data": [...]}

Authentication: Ideogram's `Api-Key: <key>` header (the server's API key); `Authorization: Bearer <key>` as on the
Leonardo routes is accepted too.

Fields (every endpoint: prompt (required), seed, num_images, rendering_speed, magic_prompt, style_type,
style_reference_images, character_reference_images, character_reference_images_mask):

| Ideogram                          | refgen                                                                   |
|-----------------------------------|--------------------------------------------------------------------------|
| prompt, negative_prompt, seed     | same names; seed 0-2147483647 (Ideogram's range); edit has no negative   |
| num_images                        | 1-8, same name                                                           |
| aspect_ratio ("16x9", ...)        | aspect_ratio "16:9": the SDXL size bucket of that shape at the model's   |
|                                   | native size. Ideogram's 15 values; default 1x1. Not with resolution      |
| resolution ("1024x1024", ...)     | width x height exactly. Ideogram's ResolutionV3 values; any other WxH    |
|                                   | with sides multiples of 8, 64-4096, is accepted too (a refgen extension) |
| rendering_speed                   | refgen mode "fast" at a step count: FLASH 8, TURBO 12, DEFAULT 20 (fast  |
|                                   | mode's own), QUALITY 40 (quality mode's count). Not mode "quality":      |
|                                   | its refine pass renders 1.5x larger, and Ideogram's resolution is the    |
|                                   | size of the answer. BALANCED (in Ideogram's enum) = DEFAULT. FLASH with  |
|                                   | a character reference is refused, as by Ideogram                         |
| style_type                        | preset: AUTO, GENERAL -> none; REALISTIC -> "photography"; FICTION ->    |
|                                   | "illustration"; DESIGN -> none (no refgen preset fits graphic design),   |
|                                   | accepted and answered as given. Other values are refused                 |
| magic_prompt AUTO/ON/OFF          | accepted, not applied: refgen never rewrites prompts. ON logs a warning  |
|                                   | and answers it under "refgen.warnings"                                   |
| style_reference_images (files)    | Reference(kind="style") each, at most 8                                  |
| character_reference_images (file) | CharacterReference(images=[photo]); one image, as on Ideogram. Without a |
|                                   | mask: keep=None (the identity adapter's face only)                       |
| character_reference_images_mask   | CharacterReference(mask=..., keep="all"): one per character image, the   |
|                                   | photo's size. Ideogram's reference says only "a grayscale image"; refgen |
|                                   | takes it as refgen's own mask: white = what of the photo is carried.     |
|                                   | Passed through unchanged                                                 |
| edit: image + mask (files)        | inpainting: init_image + mask_image. Ideogram's mask: "Black regions in  |
|                                   | the mask should match up with the regions of the image that you would    |
|                                   | like to edit"; refgen's mask_image is white = repaint, so the mask is    |
|                                   | inverted (255 - grey). Same size as the image, else refused. The answer  |
|                                   | has the image's size (floored to multiples of 8)                         |
| remix: image + image_weight 1-100 | img2img: init_image, init_strength = image_weight / 100 (both: higher =  |
|                                   | closer to the image), held to refgen's 0.1-0.9; default 50 -> 0.5        |

Refused, naming the field (400): color_palette, style_codes, style_preset, custom_model_uri (refgen cannot draw
what they ask), any field the endpoint does not define, a value outside Ideogram's range. Files must be JPEG, PNG
or WebP (checked from their bytes), at most the server's upload limit each, and decodable within its pixel limit
(a pixel bomb is refused from its header, before decoding): the Leonardo API's checks (engine/images.load_rgb).

Answer (Ideogram's ImageGenerationResponseV3): {"created": ISO time, "data": [{"url", "prompt" (the prompt that
ran, refgen's preset styling included), "resolution" "WxH" of the PNG, "is_image_safe": true (refgen runs no
safety classifier), "seed", "style_type"}]}, plus "refgen": {"generation_id", "warnings"} (extra keys are
allowed by Ideogram's clients). style_type answers AUTO as GENERAL (what ran), others as given.

Errors: {"error": message, "field": the Ideogram field or null} with Ideogram's statuses: 400 invalid input, 401 a
missing or wrong key, 413 an upload over the limit, 429 a full queue, 500 a job that failed, 504 the wait ended.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence

from PIL import Image, ImageOps
from pydantic import ValidationError

from ..errors import InvalidImageError, RefgenError
from ..images import load_rgb
from ..request import GenerationRequest
from ..request_types import CharacterReference, Reference

log = logging.getLogger("refgen.ideogram")

REFERENCE_VERSION = "developer.ideogram.ai/api-reference (Ideogram 3.0 generate/edit/remix), read 2026-11-28"
PREFIX = "/v1/ideogram-v3"
ENDPOINTS = ("generate", "edit", "remix")
MAX_SEED = 2147483647
MAX_STYLE_IMAGES = 8

ASPECT_RATIOS = ("1x3", "3x1", "1x2", "2x1", "9x16", "16x9", "10x16", "16x10", "2x3", "3x2", "3x4", "4x3", "4x5", "5x4",
                 "1x1")
RENDERING_STEPS = {"FLASH": 8, "TURBO": 12, "DEFAULT": 20, "BALANCED": 20, "QUALITY": 40}
STYLE_PRESETS: dict[str, Optional[str]] = {"AUTO": None, "GENERAL": None, "REALISTIC": "photography",
                                           "DESIGN": None, "FICTION": "illustration"}
MAGIC_PROMPT = ("AUTO", "ON", "OFF")
REFUSED = {
    "color_palette": "refgen has no colour-palette conditioning",
    "style_codes": "refgen has no Ideogram style codes; send style_reference_images",
    "style_preset": "refgen has no Ideogram style presets; use style_type or style_reference_images",
    "custom_model_uri": "refgen runs the server's model",
}

_COMMON_TEXT = ("prompt", "seed", "num_images", "rendering_speed", "magic_prompt", "style_type")
_COMMON_FILES = ("style_reference_images", "character_reference_images", "character_reference_images_mask")
TEXT_FIELDS = {
    "generate": _COMMON_TEXT + ("negative_prompt", "aspect_ratio", "resolution"),
    "edit": _COMMON_TEXT,
    "remix": _COMMON_TEXT + ("negative_prompt", "aspect_ratio", "resolution", "image_weight"),
}
FILE_FIELDS = {
    "generate": _COMMON_FILES,
    "edit": _COMMON_FILES + ("image", "mask"),
    "remix": _COMMON_FILES + ("image",),
}
REQUIRED_FILES = {"generate": (), "edit": ("image", "mask"), "remix": ("image",)}
_RESOLUTION = re.compile(r"^(\d{2,4})x(\d{2,4})$")


class IdeogramRequestError(RefgenError):
    """An Ideogram request refgen cannot run; `field` is the Ideogram field, `status` the HTTP status."""

    def __init__(self, field: Optional[str], message: str, status: int = 400):
        self.field, self.status = field, status
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class UploadedFile:
    """One checked file of the form: the field it came in, its bytes, its extension and size."""

    field: str
    data: bytes
    extension: str
    size: tuple[int, int]


# ------------------------------------------------------------------------------------------ forms

def parse_form(endpoint: str, fields: Mapping[str, Sequence[str]], files: Mapping[str, Sequence[bytes]],
               max_pixels: int = 40_000_000) -> tuple[dict, list[UploadedFile], list[str]]:
    """Check an Ideogram form: (the job body without its file ids, the checked files, warnings).

    `fields`: text field -> its values; `files`: file field -> the bytes of each part."""
    if endpoint not in ENDPOINTS:
        raise IdeogramRequestError(None, f"unknown endpoint {endpoint!r}", 404)
    for name in list(fields) + list(files):
        if name in REFUSED:
            raise IdeogramRequestError(name, f"not supported: {REFUSED[name]}")
        if name not in TEXT_FIELDS[endpoint] and name not in FILE_FIELDS[endpoint]:
            raise IdeogramRequestError(name, f"not a field of Ideogram's {endpoint} endpoint")
        if name in TEXT_FIELDS[endpoint] and name in files:
            raise IdeogramRequestError(name, "must be a text field, not a file")
        if name in FILE_FIELDS[endpoint] and name in fields:
            raise IdeogramRequestError(name, "must be a file (JPEG, PNG or WebP)")
    text = {name: _single(name, values) for name, values in fields.items()}
    warnings: list[str] = []
    body: dict[str, Any] = {"endpoint": endpoint, "prompt": _prompt(text.get("prompt"))}
    if endpoint != "edit" and text.get("negative_prompt"):
        body["negative_prompt"] = text["negative_prompt"]
    if "seed" in text:
        body["seed"] = _integer("seed", text["seed"], 0, MAX_SEED)
    body["num_images"] = _integer("num_images", text["num_images"], 1, 8) if "num_images" in text else 1
    speed = text.get("rendering_speed", "DEFAULT").upper()
    if speed not in RENDERING_STEPS:
        raise IdeogramRequestError("rendering_speed", f"must be one of TURBO, DEFAULT, QUALITY (or FLASH), got {speed!r}")
    body["rendering_speed"] = speed
    style = text.get("style_type", "AUTO" if endpoint != "remix" else "GENERAL").upper()
    if style not in STYLE_PRESETS:
        raise IdeogramRequestError("style_type", f"must be one of {', '.join(STYLE_PRESETS)}, got {style!r}")
    body["style_type"] = style
    magic = text.get("magic_prompt", "AUTO").upper()
    if magic not in MAGIC_PROMPT:
        raise IdeogramRequestError("magic_prompt", f"must be one of AUTO, ON, OFF, got {magic!r}")
    body["magic_prompt"] = magic
    if magic == "ON":
        warnings.append("magic_prompt: ON is accepted but not applied: refgen does not rewrite prompts; "
                        "the prompt ran as given")
    if "aspect_ratio" in text and "resolution" in text:
        raise IdeogramRequestError("aspect_ratio", "cannot be used together with resolution")
    if "resolution" in text:
        body["width"], body["height"] = _resolution(text["resolution"])
    elif endpoint != "edit":
        ratio = text.get("aspect_ratio", "1x1")
        if ratio not in ASPECT_RATIOS:
            raise IdeogramRequestError("aspect_ratio", f"must be one of {', '.join(ASPECT_RATIOS)}, got {ratio!r}")
        body["aspect_ratio"] = ratio
    if endpoint == "remix":
        body["image_weight"] = _integer("image_weight", text["image_weight"], 1, 100) if "image_weight" in text else 50

    checked = _files(endpoint, files, max_pixels)
    names = {item.field for item in checked}
    characters = [item for item in checked if item.field == "character_reference_images"]
    masks = [item for item in checked if item.field == "character_reference_images_mask"]
    if len(characters) > 1:
        raise IdeogramRequestError("character_reference_images", "only 1 character reference image is supported")
    if masks and len(masks) != len(characters):
        raise IdeogramRequestError("character_reference_images_mask",
                                   "must match the number of character_reference_images (one mask per image)")
    for character, mask in zip(characters, masks):
        if mask.size != character.size:
            raise IdeogramRequestError("character_reference_images_mask",
                                       f"is {mask.size[0]}x{mask.size[1]}; it must be the size of its character "
                                       f"reference image, {character.size[0]}x{character.size[1]}")
    if characters and speed == "FLASH":
        raise IdeogramRequestError("rendering_speed", "FLASH cannot be used with character_reference_images")
    if sum(item.field == "style_reference_images" for item in checked) > MAX_STYLE_IMAGES:
        raise IdeogramRequestError("style_reference_images", f"at most {MAX_STYLE_IMAGES} images")
    for name in REQUIRED_FILES[endpoint]:
        if name not in names:
            raise IdeogramRequestError(name, "is required (a JPEG, PNG or WebP file)")
        if sum(item.field == name for item in checked) > 1:
            raise IdeogramRequestError(name, "give one file")
    if endpoint == "edit":
        image, mask = (next(item for item in checked if item.field == name) for name in ("image", "mask"))
        if image.size != mask.size:
            raise IdeogramRequestError("mask", f"is {mask.size[0]}x{mask.size[1]}; it must be the size of the image, "
                                       f"{image.size[0]}x{image.size[1]}")
    return body, checked, warnings


def _single(name: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise IdeogramRequestError(name, "give it once")
    return values[0].strip()


def _prompt(value: Optional[str]) -> str:
    if not value:
        raise IdeogramRequestError("prompt", "is required")
    if len(value) > 10_000:
        raise IdeogramRequestError("prompt", "is longer than 10000 characters")
    return value


def _integer(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise IdeogramRequestError(name, f"must be a whole number, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise IdeogramRequestError(name, f"must be between {low} and {high}, got {value}")
    return value


def _resolution(text: str) -> tuple[int, int]:
    match = _RESOLUTION.match(text)
    width, height = (int(match[1]), int(match[2])) if match else (0, 0)
    if not match or width % 8 or height % 8 or not (64 <= width <= 4096 and 64 <= height <= 4096):
        raise IdeogramRequestError("resolution", f"must be WIDTHxHEIGHT like 1024x1024 (Ideogram's resolutions; "
                                   f"sides multiples of 8, 64-4096), got {text[:40]!r}")
    return width, height


def _files(endpoint: str, files: Mapping[str, Sequence[bytes]], max_pixels: int) -> list[UploadedFile]:
    checked = []
    for name, parts in files.items():
        for data in parts:
            extension = image_extension(data)
            if extension is None:
                raise IdeogramRequestError(name, "only JPEG, WebP and PNG images are supported")
            try:
                size = load_rgb(data, name, max_pixels=max_pixels).size
            except InvalidImageError as exc:
                raise IdeogramRequestError(name, str(exc).removeprefix(f"{name} ")) from None
            checked.append(UploadedFile(name, data, extension, size))
    return checked


def image_extension(data: bytes) -> Optional[str]:
    """The file's format from its first bytes (JPEG, PNG, WebP: Ideogram's formats), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# ------------------------------------------------------------------------------------- requests

Resolver = Callable[[str, str], Any]  # (upload id, "UPLOADED") -> a path or None (AssetStore.resolve_image)


def generation_request(body: Mapping[str, Any], resolve: Resolver) -> GenerationRequest:
    """The job body (parse_form's, with "files": {field: [upload ids]}) -> the GenerationRequest it runs."""
    files = body.get("files") or {}

    def paths(name: str) -> list:
        found = []
        for upload_id in files.get(name, []):
            path = resolve(upload_id, "UPLOADED")
            if path is None:
                raise IdeogramRequestError(name, f"the uploaded file {upload_id} is gone")
            found.append(path)
        return found

    speed = body["rendering_speed"]
    fields: dict[str, Any] = {
        "prompt": body["prompt"], "negative_prompt": body.get("negative_prompt"), "seed": body.get("seed"),
        "num_images": body["num_images"], "mode": "fast", "steps": RENDERING_STEPS[speed],
        "preset": STYLE_PRESETS[body["style_type"]],
    }
    if "width" in body:
        fields["width"], fields["height"] = body["width"], body["height"]
    elif "aspect_ratio" in body:
        fields["aspect_ratio"] = body["aspect_ratio"].replace("x", ":")
    if body["endpoint"] in ("edit", "remix"):
        (fields["init_image"],) = paths("image")
    if body["endpoint"] == "edit":
        (mask,) = paths("mask")
        fields["mask_image"] = refgen_mask(mask)
    if body["endpoint"] == "remix":
        fields["init_strength"] = min(0.9, max(0.1, body["image_weight"] / 100))
    fields["references"] = [Reference(kind="style", image=path) for path in paths("style_reference_images")]
    characters = paths("character_reference_images")
    if characters:
        masks = paths("character_reference_images_mask")
        fields["character"] = (CharacterReference(images=characters, mask=masks[0], keep="all") if masks
                               else CharacterReference(images=characters))
    try:
        return GenerationRequest(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise IdeogramRequestError(_ideogram_field(error.get("loc") or ()), error.get("msg", "invalid")) from None


def refgen_mask(path) -> Image.Image:
    """Ideogram's edit mask (black = edit) -> refgen's mask_image (white = repaint): the grey levels inverted."""
    return ImageOps.invert(load_rgb(path, "mask").convert("L"))


_REFGEN_TO_IDEOGRAM = {"init_image": "image", "mask_image": "mask", "init_strength": "image_weight",
                       "references": "style_reference_images", "character": "character_reference_images",
                       "width": "resolution", "height": "resolution", "steps": "rendering_speed", "mode": "rendering_speed",
                       "preset": "style_type"}


def _ideogram_field(loc: Sequence) -> Optional[str]:
    name = str(loc[0]) if loc else None
    return _REFGEN_TO_IDEOGRAM.get(name, name) if name else None


# -------------------------------------------------------------------------------------- answers

def ideogram_answer(images: Sequence[Any], body: Mapping[str, Any], created: str, url_for: Callable[[str], str],
                    warnings: Sequence[str] = (), generation_id: Optional[str] = None) -> dict:
    """Ideogram's ImageGenerationResponseV3 for a finished job's images (store GeneratedImage records)."""
    style = body.get("style_type", "AUTO")
    data = []
    for image in images:
        meta = image.metadata if isinstance(image.metadata, dict) else {}
        recorded = meta.get("image") if isinstance(meta.get("image"), dict) else {}
        width, height = recorded.get("width"), recorded.get("height")
        if width is None or height is None:
            with Image.open(image.path) as picture:
                width, height = picture.size
        resolved = meta.get("resolved") if isinstance(meta.get("resolved"), dict) else {}
        data.append({"url": url_for(image.id), "prompt": resolved.get("prompt") or body.get("prompt"),
                     "resolution": f"{width}x{height}", "is_image_safe": True, "seed": int(image.seed),
                     "style_type": "GENERAL" if style == "AUTO" else style})
    return {"created": _created(created), "data": data,
            "refgen": {"generation_id": generation_id, "warnings": list(warnings)}}


def _created(created: str) -> str:
    try:
        return datetime.fromisoformat(created).astimezone(timezone.utc).isoformat()
    except (TypeError, ValueError):
        return datetime.now(timezone.utc).isoformat()
