"""Batch manifests: a file of requests -> one BatchLine per line (its number, request, model and stable id) or
the line's error. A bad line never stops the others: it is kept with its error and reported by its number.

Formats (from the file's extension, or `format=`):
- jsonl (`.jsonl`, `.ndjson`): one JSON object per line, a refgen GenerationRequest (the fields of
  engine/request.py) plus an optional "model". A line with a Leonardo-only key (num_inference_steps, presetStyle,
  modelId, init_image_id, alchemy, ...), controlnets entries with a preprocessorId, or "format": "leonardo" is a
  Leonardo generation body, read by engine.api.leonardo.parse_generation; format="leonardo" reads every line so.
  Blank lines and lines starting with `#` are skipped (the others keep their line numbers).
- csv (`.csv`): a header row, then one request per row; an empty cell is unset. Columns: the request's scalar
  fields (prompt, negative_prompt, seed, aspect_ratio, width, height, num_images, steps, guidance_scale, scheduler,
  preset, mode, init_image, init_strength, mask_image, best_of, upscale, guidance_cutoff, deep_cache), model,
  loras (`file[:weight]`, `;`-separated), style (`image[:weight 0-2 or Low..Max]`, `;`-separated), content
  (`image[:weight]`), character (a saved character's name, or photos `;`-separated), character_strength (Low, Mid,
  High or 0-2), character_adapter. The line number is the row's line in the file (the header is line 1).
- template (`.json`, `.toml`): {"template": {request}, "vary": {"prompt": [...], "seed": [...], "character": [...]}}
  expands to the cross product of the `vary` lists in the order their keys are written, the last key varying
  fastest; "line" N is the N-th combination. A `vary` value replaces the template's field.

Paths: image paths (init_image, mask_image, controlnets[].image, t2i_adapters[].image, references[].image, a
character's images / pose_image / mask) are relative to the manifest's folder. In a Leonardo body the image ids
(init_image_id, controlnets[].initImageId, ...) are file paths relative to the manifest's folder, for UPLOADED and
GENERATED alike. A character given as a string is a saved character's name unless it looks like a path (it
contains `.`, `/` or `\\`): then it is a photo.

Models: "model" (a refgen line, the CSV column, the template) or a Leonardo modelId (through the Leonardo model
table; Leonardo's platform ids run on the default model) names the model; otherwise the `model` given here
(`refgen batch --model`).

Ids: a line's id is the first 16 hex digits of sha256 over its identity and its seed. The identity is the validated
request (every field with its default, names canonical: what changes the pixels), each image input replaced by its
pixel digest (engine.images.pixel_digest: renaming a file or re-saving it losslessly keeps the id), a saved character
by what `characters(name)` returns (the CLI: a digest of its profile), and the model reference (its name or path,
not a hash of its weights: planning loads no model). A line without a seed gets seed = int(sha256(identity)[:8], 16)
(below 2^32), so the same line gets the same seed in every run and resume; two identical lines without a seed are
therefore the same pictures (give seeds or num_images for variants).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from pydantic import ValidationError

from ..errors import RefgenError
from ..images import load_rgb, pixel_digest
from ..request import GenerationRequest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FORMATS = ("jsonl", "leonardo", "csv", "template")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "template", ".toml": "template"}
REQUEST_FIELDS = frozenset(GenerationRequest.model_fields)
CSV_SCALARS = frozenset({
    "prompt", "negative_prompt", "seed", "aspect_ratio", "width", "height", "num_images", "steps", "guidance_scale",
    "scheduler", "preset", "mode", "init_image", "init_strength", "mask_image", "best_of", "upscale", "guidance_cutoff",
    "deep_cache",
})
CSV_NUMBERS = frozenset({"seed", "width", "height", "num_images", "steps", "guidance_scale", "init_strength", "best_of",
                         "upscale", "guidance_cutoff", "deep_cache"})
CSV_COLUMNS = CSV_SCALARS | {"model", "loras", "style", "content", "character", "character_strength", "character_adapter"}
STRENGTH_NAMES = frozenset({"Low", "Mid", "High", "Ultra", "Max"})

CharacterIdentity = Callable[[str], str]  # a saved character's name -> a digest of it; RefgenError when unknown


class ManifestError(RefgenError):
    """The file cannot be read as a manifest at all (missing, unknown format, bad CSV header, bad template)."""


class LineError(RefgenError):
    """One line cannot run; the message leaves out the line number, which BatchLine carries."""


@dataclass(frozen=True)
class BatchLine:
    """One line of a manifest: a request ready to run (seed filled), or the error that keeps it from running."""

    number: int
    request: Optional[GenerationRequest] = None
    model: Optional[str] = None
    id: Optional[str] = None
    variant_key: Optional[str] = None  # the identity without seed and num_images: lines that differ only there
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def image_count(self) -> int:
        return self.request.best_of or self.request.num_images

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + index for index in range(self.image_count)]

    def output_names(self) -> list[str]:
        """`<id>-<n>.png` for n = 0 .. images - 1."""
        return [f"{self.id}-{index}.png" for index in range(self.image_count)]


@dataclass(frozen=True)
class Manifest:
    path: Path
    format: str
    lines: tuple[BatchLine, ...]

    @property
    def valid(self) -> list[BatchLine]:
        return [line for line in self.lines if line.ok]

    @property
    def images_total(self) -> int:
        return sum(line.image_count for line in self.valid)


def read_manifest(path: Union[str, Path], model: str = "sdxl-base", format: Optional[str] = None,
                  characters: Optional[CharacterIdentity] = None) -> Manifest:
    """Every line of the manifest at `path`, parsed and identified (see the module docstring).
    `characters`: a saved character's name -> its digest (raises RefgenError for an unknown one); None: a saved
    character counts by its name, and an unknown one fails when its line runs."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    chosen = format or EXTENSIONS.get(path.suffix.lower())
    if chosen not in FORMATS:
        raise ManifestError(f"cannot tell the manifest format of {path.name}: name it .jsonl, .csv, .json or .toml, "
                            f"or give the format ({', '.join(FORMATS)})")
    reader = _Reader(path.resolve().parent, model, characters)
    entries = {"jsonl": _jsonl_entries, "leonardo": _jsonl_entries, "csv": _csv_entries, "template": _template_entries}
    lines = tuple(reader.line(number, kind, data) for number, kind, data in entries[chosen](path, chosen))
    return Manifest(path, chosen, lines)


# ------------------------------------------------------------------------------------------- formats
# Each yields (line number, kind, data): kind "refgen" or "leonardo" with a dict, or "error" with a message.

def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc


def _jsonl_entries(path: Path, format: str) -> Iterator[tuple[int, str, Any]]:
    for number, text in enumerate(_text(path).splitlines(), 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, "error", f"invalid JSON: {exc.msg} (column {exc.colno})"
            continue
        if not isinstance(data, dict):
            yield number, "error", f"must be a JSON object, got {type(data).__name__}"
            continue
        yield number, "leonardo" if format == "leonardo" or _is_leonardo(data) else "refgen", data


def _is_leonardo(data: dict) -> bool:
    from ..api.leonardo import IGNORED, MAPPED, REFUSED

    if data.get("format") is not None:
        return data["format"] == "leonardo"
    units = data.get("controlnets")
    if isinstance(units, list) and any(isinstance(unit, dict) and "preprocessorId" in unit for unit in units):
        return True  # both formats have controlnets; Leonardo's entries name a preprocessorId
    return any(key in MAPPED or key in IGNORED or key in REFUSED for key in set(data) - REQUEST_FIELDS - {"model"})


def _csv_entries(path: Path, format: str) -> Iterator[tuple[int, str, Any]]:
    rows = csv.DictReader(io.StringIO(_text(path), newline=""))  # quoted cells may hold newlines
    header = [name.strip() for name in rows.fieldnames or []]
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if "prompt" not in header or unknown:
        problem = f"unknown column(s) {', '.join(unknown)}" if unknown else "no prompt column"
        raise ManifestError(f"{path.name} line 1: {problem}; columns: {', '.join(sorted(CSV_COLUMNS))}")
    rows.fieldnames = header
    for row in rows:
        if None in row:  # more cells than the header has
            yield rows.line_num, "error", f"{len(header) + len(row[None])} cells, the header has {len(header)}"
            continue
        cells = {name: value.strip() for name, value in row.items() if value and value.strip()}
        if cells:
            yield rows.line_num, "refgen", _csv_request(cells)


def _csv_request(cells: dict[str, str]) -> dict:
    fields: dict[str, Any] = {name: _number(value) if name in CSV_NUMBERS else value
                              for name, value in cells.items() if name in CSV_SCALARS or name == "model"}
    if "loras" in cells:
        fields["loras"] = _split(cells["loras"])
    references = [_reference("style", text) for text in _split(cells.get("style", ""))]
    references += [_reference("content", cells["content"])] if "content" in cells else []
    if references:
        fields["references"] = references
    if "character" in cells:
        fields["character"] = _character(_split(cells["character"]), cells.get("character_strength"),
                                         cells.get("character_adapter"))
    elif "character_strength" in cells or "character_adapter" in cells:
        fields["character"] = {"strength_type": cells.get("character_strength")}  # fails validation: no character
    return fields


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(";") if part.strip()]


def _number(text: str) -> Union[int, float, str]:
    """A cell as a number when it is one; anything else stays text, for the request's validation to name."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _reference(kind: str, text: str) -> dict:
    """'ink.png', 'ink.png:0.8' or 'ink.png:High' -> Reference fields."""
    image, _, strength = text.rpartition(":")
    if image and strength in STRENGTH_NAMES:
        return {"kind": kind, "image": image, "strength_type": strength}
    if image and isinstance(_number(strength), (int, float)):
        return {"kind": kind, "image": image, "weight": float(strength)}
    return {"kind": kind, "image": text}


def _character(values: list[str], strength: Optional[str] = None, adapter: Optional[str] = None) -> dict:
    """A saved character's name or photos -> CharacterReference fields."""
    fields: dict[str, Any] = {"adapter": adapter} if adapter else {}
    if strength is not None:
        number = _number(strength)
        fields.update({"weight": number} if isinstance(number, (int, float)) else {"strength_type": strength})
    if len(values) == 1 and not any(mark in values[0] for mark in "./\\"):
        return {"name": values[0], **fields}
    return {"images": values, **fields}


def _template_entries(path: Path, format: str) -> Iterator[tuple[int, str, Any]]:
    data = _template_data(path)
    template, vary = data["template"], data.get("vary", {})
    if not isinstance(template, dict) or not isinstance(vary, dict):
        raise ManifestError(f"{path.name}: `template` must be a request (an object) and `vary` an object of lists")
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise ManifestError(f"{path.name}: vary.{key} must be a non-empty list")
    for number, combination in enumerate(itertools.product(*vary.values()), 1):
        yield number, "refgen", {**copy.deepcopy(template), **dict(zip(vary, copy.deepcopy(combination)))}


def _template_data(path: Path) -> dict:
    text = _text(path)
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path.name} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict) or "template" not in data or set(data) - {"template", "vary"}:
        raise ManifestError(f"{path.name}: a template manifest is {{\"template\": {{request}}, \"vary\": {{field: [values]}}}}")
    return data


# ------------------------------------------------------------------------------------------- one line

@dataclass
class _Reader:
    """What reading one manifest needs: its folder, the default model, image digests read so far (by path)."""

    folder: Path
    model: str
    characters: Optional[CharacterIdentity]
    digests: dict[str, str] = field(default_factory=dict)
    leonardo_models: Any = None  # engine.api.leonardo.ModelTable, read on the first Leonardo line

    def line(self, number: int, kind: str, data: Any) -> BatchLine:
        if kind == "error":
            return BatchLine(number, error=data)
        try:
            request, model = self._leonardo(data) if kind == "leonardo" else self._refgen(data)
            return self._identified(BatchLine(number, request, model))
        except ValidationError as exc:
            return BatchLine(number, error=_validation_text(exc))
        except (RefgenError, ValueError, TypeError) as exc:
            return BatchLine(number, error=str(exc))

    def _refgen(self, data: dict) -> tuple[GenerationRequest, str]:
        if data.get("format") not in (None, "refgen", "leonardo"):
            raise LineError(f"format: {data['format']!r} is not a line format; use \"refgen\" or \"leonardo\"")
        fields = {key: value for key, value in data.items() if key not in ("model", "format")}
        model = data.get("model") or self.model
        if not isinstance(model, str):
            raise LineError(f"model: must be a model name or path, got {model!r}")
        if isinstance(fields.get("character"), str):
            fields["character"] = _character([fields["character"]])
        return GenerationRequest(**_absolute_images(fields, self.folder)), model

    def _leonardo(self, data: dict) -> tuple[GenerationRequest, str]:
        from ..api.leonardo import ModelTable, local_model, parse_generation

        body = {key: value for key, value in data.items() if key != "format"}
        if self.leonardo_models is None:  # the user's table, read once per manifest; its default is ours
            self.leonardo_models = replace(ModelTable.load(), default=self.model)
        table = self.leonardo_models
        model = local_model(body, table)
        return parse_generation(body, images=lambda image_id, kind: self.folder / image_id, models=table), model

    def _identified(self, line: BatchLine) -> BatchLine:
        """The line with its seed filled, its id and its variant key (see the module docstring)."""
        identity = {"model": line.model, "request": self._request_identity(line.request)}
        digest = _digest(identity)
        seed = line.request.seed if line.request.seed is not None else int(digest[:8], 16)
        variant = {**identity, "request": {k: v for k, v in identity["request"].items() if k != "num_images"}}
        return replace(line, request=line.request.model_copy(update={"seed": seed}),
                       id=_digest({"identity": digest, "seed": seed})[:16], variant_key=_digest(variant))

    def _request_identity(self, request: GenerationRequest) -> dict:
        data = request.model_dump(mode="json", exclude={"seed"})
        for holder, key, label in _image_slots(data):
            holder[key] = {"pixels": self._pixels(holder[key], label)}
        character = data.get("character")
        if character and character.get("name") and self.characters is not None:
            character["profile"] = self.characters(character["name"])
        return data

    def _pixels(self, path: str, label: str) -> str:
        if path not in self.digests:
            self.digests[path] = pixel_digest(load_rgb(path, label))
        return self.digests[path]


def _absolute_images(fields: dict, folder: Path) -> dict:
    """The request's fields with every relative image path made relative to the manifest's folder."""
    fields = copy.deepcopy(fields)
    for holder, key, _ in _image_slots(fields):
        if isinstance(holder[key], str):
            holder[key] = str(folder / Path(holder[key]).expanduser())  # an absolute path stays as it is
    return fields


def _image_slots(fields: dict) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, label) of every image input a request's fields (or its json dump) hold."""
    for key, label in (("init_image", "init image"), ("mask_image", "mask")):
        if fields.get(key) is not None:
            yield fields, key, label
    for key in ("controlnets", "t2i_adapters", "references"):
        for index, unit in enumerate(fields.get(key) or []):
            if isinstance(unit, dict) and unit.get("image") is not None:
                yield unit, "image", f"{key}[{index}].image"
    character = fields.get("character")
    if isinstance(character, dict):
        images = character.get("images")
        for index in range(len(images) if isinstance(images, list) else 0):
            yield images, index, f"character image {index + 1}"
        for key, label in (("pose_image", "character pose image"), ("mask", "character mask")):
            if character.get(key) is not None:
                yield character, key, label


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _validation_text(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid request -- " + "; ".join(parts)
