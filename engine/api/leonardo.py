"""Leonardo.ai's generation JSON (body of `POST /api/rest/v1/generations`) -> refgen's GenerationRequest,
and refgen's values -> Leonardo's vocabulary for the API's answers.

    from engine.api.leonardo import parse_generation, local_model
    request = parse_generation(body, images=asset_store.resolve)   # GenerationRequest
    engine = Engine.load(local_model(body))                        # the model modelId stands for
    leonardo_scheduler("dpmpp_2m_karras")                          # "LEONARDO": what answers report

Images travel as ids; `images(image_id, kind)` (kind "UPLOADED" or "GENERATED") returns a path or
a PIL image, and returns None or raises LookupError for an id it does not know. Every problem is a
`LeonardoRequestError` whose `field` is the Leonardo path, e.g. `controlnets[1].initImageId`.

Field by field:

| Leonardo                                   | refgen                                                       |
|--------------------------------------------|--------------------------------------------------------------|
| prompt, negative_prompt, seed              | same names                                                   |
| guidance_scale, scheduler                  | same names (Leonardo's scheduler names are refgen aliases;   |
|                                            | answers name the scheduler in Leonardo's enum, see below)    |
| num_inference_steps                        | steps                                                        |
| width, height                              | same; both or neither; a side that is not a multiple of 8 is |
|                                            | floored to one with a warning (Leonardo's own Image Guidance |
|                                            | sample sends height 644), or refused with strict_sizes=True  |
| num_images                                 | 1-8, at most 4 when a side exceeds 768 (Leonardo's rule;     |
|                                            | without a size refgen picks 1024 px, so 4 then too)          |
| modelId                                    | not in GenerationRequest (an Engine is one model): see       |
|                                            | `ModelTable`. Leonardo's SDXL platform ids (the SDKs' default|
|                                            | is Lightning XL) run on the server's model (`refgen serve    |
|                                            | --model`, else the table's default); an id the table does not|
|                                            | know is refused here, before any work, naming modelId        |
| presetStyle                                | preset: every Leonardo style has a built-in preset, by name  |
|                                            | or by presets' aliases (LEONARDO->dynamic, BOKEH->           |
|                                            | cinematic_closeup, ...); other names are refused             |
| alchemy                                    | true -> mode "quality", false -> "fast"                      |
| ultra                                      | true -> mode "ultra" (wins over alchemy)                     |
| photoReal (+ photoRealVersion v1|v2)       | preset "photoreal" (the photographic built-in: RAW-photo     |
|                                            | prompt, DSLR tokens, quality mode) unless presetStyle names  |
|                                            | one: the explicit style wins, as on Leonardo where PhotoReal |
|                                            | takes a style                                                |
| init_image_id (UPLOADED) or                | init_image (one of the two)                                  |
| init_generation_image_id (GENERATED)       |                                                              |
| init_strength                              | init_strength (same meaning: closeness to the init image)    |
| controlNet + controlNetType (+ weighting)  | legacy: one ControlUnit (CANNY/POSE/DEPTH) on the init image,|
|                                            | which also stays the img2img init image, as on Leonardo      |
| controlnets[]                              | controlnets / references / character, by preprocessorId:     |

preprocessorId (seed 003's table; refgen runs SDXL only, so SD1.5/SD2.1 ids get the SDXL unit of the
same kind):

| id (SDXL / SD1.5 / SD2.1) | Leonardo              | refgen                                                  |
|---------------------------|-----------------------|---------------------------------------------------------|
| 67                        | Style Reference       | Reference(kind="style"); `influence` allowed here only  |
| 100                       | Content Reference     | Reference(kind="content")                               |
| 133                       | Character Reference   | CharacterReference(images=[...]); several entries merge |
|                           |                       | into one (max 5 images) and must share one strength     |
|                           |                       | (refgen runs one character per request)                 |
| 19 / 1 / 12               | Edge to Image         | ControlUnit canny                                       |
| 20 / 3 / 13               | Depth to Image        | ControlUnit depth                                       |
| 21 / 7 / 16               | Pose to Image         | ControlUnit pose                                        |
| 22 / 11 / 18              | Text Image Input      | ControlUnit canny: the glyphs' outlines are what shapes |
|                           |                       | the picture; canny has its own SDXL ControlNet          |
| - / 10 / 17               | Sketch to Image       | ControlUnit scribble                                    |
| - / 6 / 15                | Normal Map            | ControlUnit normal (give a ready normal map)            |
| - / 5 / -                 | Line Art              | ControlUnit lineart                                     |
| - / 8, 9 / -              | Pattern, QR Code      | refused: refgen has no model for them                   |

preprocessorId is a number in Leonardo's schema (the Python SDK sends 19.0): any whole number is accepted.

T2I-Adapters (refgen's `t2i_adapters`) are not reachable from this API, on purpose: Leonardo has no such
feature and no preprocessorId for one, its SDKs build request bodies from their own schemas (a refgen-only key
would not survive them), and this API's promise is Leonardo's JSON, so an unknown key stays a 422. A
preprocessorId keeps meaning a ControlNet unit, whose result Leonardo users expect; T2I-Adapters are for the
library and the CLI (`--adapter`).

Strength: `weight` (0-2, a number or a numeric string: Leonardo's Edge sample sends "0.5") or
`strengthType`, never both. References and Character Reference keep strengthType as such (their
adapters own the bucket tables); a ControlUnit has only a weight, so strengthType becomes the middle
of its bucket (Low 0.2, Mid 0.6, High 1.0, Ultra 1.4, Max 1.8). Character Reference knows Low/Mid/High.

Leonardo fields refgen does not honour. Absent, null or at their neutral value they are accepted
silently. Otherwise:
- accepted, ignored, logged as a warning (they do not change what is drawn, or only refine it in ways
  the request's own fields already cover): public, webhookCallbackUrl, sd_version (modelId decides),
  promptMagic, promptMagicStrength, promptMagicVersion, highContrast, contrastRatio, contrast,
  expandedDomain, highResolution, photoRealStrength, enhancePrompt, enhancePromptInstruction,
  imagePromptWeight, unzoomAmount, and controlNetType/weighting without controlNet.
- refused (the output would differ in a way refgen cannot produce): tiling (true), transparency (other
  than "disabled"), unzoom (true), fantasyAvatar (true), canvasRequest (true), canvasRequestType,
  canvasInitId, canvasMaskId, imagePrompts, elements, styleUUID, upscaleRatio (other than 1).

Trained LoRAs (engine/api/trainings.py trains them from POST /elements and POST /models): with a `trained`
resolver, `userElements: [{userLoraId, weight}]` adds each element's LoRA file at its weight (default 1; a
LoraSpec's -4..4), and a `modelId` that is a trained custom model runs on the model it was trained on with its
LoRA at weight 1. An unknown or unfinished element is refused naming `userElements[i].userLoraId`. Without a
resolver (the library alone) a non-empty userElements is refused naming `userElements`.
A key Leonardo does not define is refused by name.

refgen's extension (engine/studio and scripts): one top-level object `"refgen": {...}` for what Leonardo's fields
cannot say. Leonardo's SDKs never send it (their schemas have no such key), so a Leonardo request means what it
meant before. Errors name the path, e.g. `refgen.character.keep`.

| key                     | refgen                          | notes                                                 |
|-------------------------|---------------------------------|-------------------------------------------------------|
| preset                  | preset (built-in or the user's) | instead of presetStyle, not both                      |
| aspectRatio             | aspect_ratio ("16:9")           | instead of width/height, not both: the model's size   |
|                         |                                 | of that shape (GET /refgen/catalog lists them)        |
| bestOf                  | best_of (2-8)                   | N images ranked by identity score; needs a character  |
| character.name          | CharacterReference(name=...)    | a saved character; not with Character Reference photos|
| character.strengthType  | Low, Mid, High (or .weight 0-2) | a saved character's strength (photos: their entries') |
| character.keep          | face, face+hair, face+hair+     | what it carries besides the face; a saved character's |
|                         | outfit, all                     | default when absent                                   |
| character.maskImageId   | mask (an UPLOADED image id)     | white = carried, over the first photo / anchor        |
| character.maskMode      | replace, add, subtract          |                                                       |

keep, maskImageId and maskMode apply to a saved character and to Character Reference photos alike.

Answers (engine/api/server.py) speak Leonardo's enums, which both official SDKs validate. Schedulers, refgen ->
Leonardo (`LEONARDO_SCHEDULERS`); the exact refgen name stays in the answer's "refgen" part:

| refgen              | Leonardo                 | why                                                          |
|---------------------|--------------------------|--------------------------------------------------------------|
| euler               | EULER_DISCRETE           | the same sampler (each of these five is its Leonardo name's  |
| euler_a             | EULER_ANCESTRAL_DISCRETE | alias, so an answer sent back as a request runs the same     |
| lms                 | KLMS                     | sampler)                                                     |
| ddim                | DDIM                     |                                                              |
| pndm                | PNDM                     |                                                              |
| dpm_solver          | DPM_SOLVER               | the same sampler (DPM-Solver++ 2M)                           |
| dpmpp_2m_karras     | LEONARDO                 | refgen runs LEONARDO (unpublished) as DPM++ 2M Karras, its   |
|                     |                          | default, so the answer replays                               |
| dpmpp_2m_sde_karras | DPM_SOLVER               | no Leonardo equivalent: the same multistep DPM-Solver++      |
|                     |                          | family, stochastic variant                                   |
| unipc               | DPM_SOLVER               | no Leonardo equivalent: UniPC is a multistep solver built on |
|                     |                          | DPM-Solver++                                                 |
| heun                | EULER_DISCRETE           | no Leonardo equivalent: Heun is Euler's step plus a second-  |
|                     |                          | order correction on the same sigmas                          |

presetStyle is answered in Leonardo's upper case (requests may use any case).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Protocol, Union

from PIL import Image
from pydantic import ValidationError

from ..request_types import ControlUnit
from ..request_types import CharacterReference
from ..request_types import STRENGTH_WEIGHTS, Reference

from .. import paths
from ..errors import InvalidImageError, RefgenError
from ..images import load_rgb
from ..presets import get_preset, normalise_name
from ..request import GenerationRequest, LoraSpec
from ..schedulers import canonical_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger("refgen.leonardo")

ImageKind = Literal["UPLOADED", "GENERATED"]
ImageSource = Union[str, Path, Image.Image]


class ImageResolver(Protocol):
    """The caller's asset store: an image id -> a path or PIL image; None or LookupError if unknown."""

    def __call__(self, image_id: str, kind: ImageKind) -> Optional[ImageSource]: ...


class TrainedLoras(Protocol):
    """The caller's trained LoRAs (the API store's elements and custom models)."""

    def element(self, lora_id: int) -> Optional[Path]:
        """The element's LoRA file; None if the id is unknown; a RefgenError if it cannot be used (not trained yet)."""

    def model(self, model_id: str) -> Optional[tuple[str, Path]]:
        """(the local base model, the LoRA file) of a trained custom model; None if the id is not one."""


class LeonardoRequestError(RefgenError):
    """A Leonardo request refgen cannot run. `field` is the Leonardo path of the offending value."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownImageError(LeonardoRequestError):
    """An image id the resolver does not know."""


class LeonardoConfigError(RefgenError):
    """A malformed user model table."""


# ------------------------------------------------------------------------------------------ models

DEFAULT_LOCAL_MODEL = "sdxl-base"
MODEL_TABLE_FILE = "leonardo_models.toml"  # in paths.data_dir(); extends/overrides the built-in table

# Leonardo's published SDXL platform models (ids from seed 003's samples; names from Leonardo's model
# table, docs.leonardo.ai/docs/legacy-generation). None: the id runs on the table's default model, the
# one `refgen serve --model` names (sdxl-base otherwise), until a user maps it to a closer local
# checkpoint. Leonardo's SDKs send Lightning XL when the caller gives no modelId, so that must run on
# whatever model the server was started with. Non-SDXL models (Phoenix, Flux, Lucid, SD1.5) are absent
# on purpose: refusing them beats silently drawing with another architecture.
BUILTIN_MODELS: dict[str, Optional[str]] = {
    "aa77f04e-3eec-4034-9c07-d0f619684628": None,  # Leonardo Kino XL (seed 003)
    "b24e16ff-06e3-43eb-8d33-4416c2d75876": None,  # Leonardo Lightning XL (seed 003; the SDKs' default)
    "1e60896f-3c26-4296-8ecc-53e2afecc132": None,  # Leonardo Diffusion XL (seed 003)
    "5c232a9e-9061-4777-980a-ddc8e65647c6": None,  # Leonardo Vision XL
    "e71a1c2f-4f80-4800-934f-2c68979d8cc8": None,  # Leonardo Anime XL
    "2067ae52-33fd-4a82-bb92-c2c55e7d2786": None,  # AlbedoBase XL
    "16e7060a-803e-4df3-97ee-edcfa5dc9cc8": None,  # SDXL 1.0
    "b63f7119-31dc-4540-969b-2a9df997e173": None,  # SDXL 0.9
}


@dataclass(frozen=True)
class ModelTable:
    """Leonardo modelId -> local model reference (manifest name, folder or file; None: `default`), and
    `default`, the model for requests without a modelId and for Leonardo's platform ids.

    User file (`<REFGEN_HOME>/leonardo_models.toml`), merged over the built-in table:

        default = "sdxl-base"                                   # optional
        [models]
        "aa77f04e-3eec-4034-9c07-d0f619684628" = "/models/my-cinematic-xl.safetensors"
    """

    models: Mapping[str, Optional[str]] = field(default_factory=lambda: dict(BUILTIN_MODELS))
    default: str = DEFAULT_LOCAL_MODEL
    source: str = "built-in table"  # named in errors, so users know which file to extend

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "ModelTable":
        """The built-in table, extended by `path` (default: the user file, when it exists)."""
        path = path or paths.data_dir() / MODEL_TABLE_FILE
        if not path.is_file():
            return cls()
        models, default = _read_table(path)
        return cls(models={**BUILTIN_MODELS, **models}, default=default or DEFAULT_LOCAL_MODEL,
                   source=f"built-in table + {path}")

    def local_name(self, model_id: Optional[str]) -> str:
        if model_id is None:
            return self.default
        if not isinstance(model_id, str) or model_id not in self.models:
            raise LeonardoRequestError("modelId", self._unknown(model_id))
        return self.models[model_id] or self.default

    def _unknown(self, model_id: Any) -> str:
        on_default = sorted(key for key, local in self.models.items() if local is None)
        mapped = sorted(f"{key} -> {local}" for key, local in self.models.items() if local is not None)
        known = [f"{', '.join(on_default)} (run on this server's model, {self.default})"] if on_default else []
        return (f"unknown model id {model_id!r}: refgen does not guess which local model it stands for. Known ids "
                f"({self.source}): {'; '.join(known + mapped) or 'none'}. Leave modelId out to use {self.default}, "
                f"or map the id to a local model in {paths.data_dir() / MODEL_TABLE_FILE}")


def _read_table(path: Path) -> tuple[dict[str, str], Optional[str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LeonardoConfigError(f"cannot read Leonardo model table {path}: {exc}") from exc
    unknown = set(data) - {"models", "default"}
    models, default = data.get("models", {}), data.get("default")
    if unknown or not isinstance(models, dict) or not all(isinstance(v, str) and v for v in models.values()):
        raise LeonardoConfigError(
            f"{path}: expected `default = \"local-model\"` and a [models] table of \"leonardo-id\" = \"local-model\""
            + (f"; unknown keys: {', '.join(sorted(unknown))}" if unknown else ""))
    if default is not None and not (isinstance(default, str) and default):
        raise LeonardoConfigError(f"{path}: `default` must be a local model name")
    return models, default


def local_model(body: Mapping[str, Any], models: Optional[ModelTable] = None, trained: Optional[TrainedLoras] = None) -> str:
    """The local model reference a Leonardo request's `modelId` stands for (a trained custom model: its base)."""
    custom = _custom_model(body.get("modelId"), trained)
    if custom is not None:
        return custom[0]
    return (models or ModelTable.load()).local_name(body.get("modelId"))


def _custom_model(model_id: Any, trained: Optional[TrainedLoras]) -> Optional[tuple[str, Path]]:
    if trained is None or not isinstance(model_id, str):
        return None
    try:
        return trained.model(model_id)
    except LookupError:
        return None
    except RefgenError as exc:
        raise LeonardoRequestError("modelId", str(exc)) from exc


# --------------------------------------------------------------------------------- static tables

# Leonardo's presetStyle values -> refgen's built-in presets (most share the name; presets'
# aliases cover LEONARDO, GENERAL, NEUTRAL, UNPROCESSED, CREATIVE, BOKEH, LONG_EXPOSURE, FOOD, RETRO).
PRESET_STYLES: dict[str, str] = {style: normalise_name(style) for style in (
    "ANIME", "BOKEH", "CINEMATIC", "CINEMATIC_CLOSEUP", "CREATIVE", "DYNAMIC", "ENVIRONMENT", "FASHION",
    "FILM", "FOOD", "GENERAL", "HDR", "ILLUSTRATION", "LEONARDO", "LONG_EXPOSURE", "MACRO", "MINIMALISTIC",
    "MONOCHROME", "MOODY", "NONE", "NEUTRAL", "PHOTOGRAPHY", "PORTRAIT", "RAYTRACED", "RENDER_3D", "RETRO",
    "SKETCH_BW", "SKETCH_COLOR", "STOCK_PHOTO", "VIBRANT", "UNPROCESSED",
)}
PHOTOREAL_PRESET = "photoreal"
PHOTOREAL_VERSIONS = ("v1", "v2")

LEGACY_CONTROL_TYPES = {"CANNY": "canny", "POSE": "pose", "DEPTH": "depth"}

# refgen scheduler -> Leonardo's scheduler enum, for answers (the table and its reasons: module docstring).
LEONARDO_SCHEDULERS: dict[str, str] = {
    "euler": "EULER_DISCRETE", "euler_a": "EULER_ANCESTRAL_DISCRETE", "lms": "KLMS", "ddim": "DDIM", "pndm": "PNDM",
    "dpm_solver": "DPM_SOLVER", "dpmpp_2m_karras": "LEONARDO", "dpmpp_2m_sde_karras": "DPM_SOLVER",
    "unipc": "DPM_SOLVER", "heun": "EULER_DISCRETE",
}


def leonardo_scheduler(name: Any) -> Optional[str]:
    """Leonardo's name for a refgen scheduler name or alias; None for a name refgen does not know."""
    try:
        return LEONARDO_SCHEDULERS.get(canonical_name(name)) if isinstance(name, str) else None
    except ValueError:
        return None


def leonardo_style(style: Any) -> Optional[str]:
    """presetStyle as Leonardo's enum spells it (requests may use any case); None if it is not one."""
    key = style.strip().upper() if isinstance(style, str) else None
    return key if key in PRESET_STYLES else None


@dataclass(frozen=True)
class Preprocessor:
    name: str  # Leonardo's
    base: str  # the Leonardo model family the id belongs to
    role: Literal["style", "content", "character", "control"]
    control_type: Optional[str] = None


PREPROCESSORS: dict[int, Preprocessor] = {
    67: Preprocessor("Style Reference", "SDXL", "style"),
    100: Preprocessor("Content Reference", "SDXL", "content"),
    133: Preprocessor("Character Reference", "SDXL", "character"),
    19: Preprocessor("Edge to Image", "SDXL", "control", "canny"),
    20: Preprocessor("Depth to Image", "SDXL", "control", "depth"),
    21: Preprocessor("Pose to Image", "SDXL", "control", "pose"),
    22: Preprocessor("Text Image Input", "SDXL", "control", "canny"),
    1: Preprocessor("Edge to Image", "SD1.5", "control", "canny"),
    3: Preprocessor("Depth to Image", "SD1.5", "control", "depth"),
    7: Preprocessor("Pose to Image", "SD1.5", "control", "pose"),
    11: Preprocessor("Text Image Input", "SD1.5", "control", "canny"),
    10: Preprocessor("Sketch to Image", "SD1.5", "control", "scribble"),
    6: Preprocessor("Normal Map", "SD1.5", "control", "normal"),
    5: Preprocessor("Line Art", "SD1.5", "control", "lineart"),
    12: Preprocessor("Edge to Image", "SD2.1", "control", "canny"),
    13: Preprocessor("Depth to Image", "SD2.1", "control", "depth"),
    16: Preprocessor("Pose to Image", "SD2.1", "control", "pose"),
    18: Preprocessor("Text Image Input", "SD2.1", "control", "canny"),
    17: Preprocessor("Sketch to Image", "SD2.1", "control", "scribble"),
    15: Preprocessor("Normal Map", "SD2.1", "control", "normal"),
}
UNSERVED_PREPROCESSORS = {8: "Pattern to Image (SD1.5)", 9: "QR Code to Image (SD1.5)"}

CONTROLNET_KEYS = ("initImageId", "initImageType", "preprocessorId", "weight", "strengthType", "influence")
MAX_CHARACTER_IMAGES = 5

# Fields refgen maps (handled below) and Leonardo fields it does not honour (see the docstring).
MAPPED = {
    "prompt", "negative_prompt", "modelId", "width", "height", "num_images", "seed", "guidance_scale",
    "num_inference_steps", "scheduler", "presetStyle", "alchemy", "ultra", "photoReal", "photoRealVersion",
    "init_image_id", "init_generation_image_id", "init_strength", "controlNet", "controlNetType", "weighting",
    "controlnets", "userElements", "refgen",
}
IGNORED = {  # field -> neutral value (no warning when sent at it)
    "public": False, "webhookCallbackUrl": None, "sd_version": None, "promptMagic": False,
    "promptMagicStrength": None, "promptMagicVersion": None, "highContrast": False, "contrastRatio": None,
    "contrast": None, "expandedDomain": False, "highResolution": False, "photoRealStrength": None,
    "enhancePrompt": False, "enhancePromptInstruction": None, "imagePromptWeight": None, "unzoomAmount": None,
}
REFUSED = {  # field -> (neutral value, why refgen cannot honour anything else)
    "tiling": (False, "seamless tiling is not implemented"),
    "transparency": ("disabled", "transparent (alpha) output is not implemented"),
    "unzoom": (False, "unzoom (outpainting around the image) is not implemented"),
    "fantasyAvatar": (False, "Fantasy Avatar is a Leonardo-only pipeline"),
    "canvasRequest": (False, "canvas (inpaint/outpaint) requests are not mapped; use refgen's mask_image"),
    "canvasRequestType": (None, "canvas requests are not mapped"),
    "canvasInitId": (None, "canvas requests are not mapped"),
    "canvasMaskId": (None, "canvas requests are not mapped"),
    "imagePrompts": ([], "image prompts are not mapped; use controlnets with preprocessorId 100 (Content Reference)"),
    "elements": ([], "Elements are Leonardo-hosted LoRAs; give refgen LoRA files instead"),
    "styleUUID": (None, "style UUIDs name Leonardo-hosted styles; use presetStyle"),
    "upscaleRatio": (1, "upscaling inside the generation is not mapped; use POST /variations/upscale afterwards"),
}

# GenerationRequest field -> the Leonardo field its value came from, for converted ValidationErrors.
DEFAULT_ORIGIN = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "num_images": "num_images", "seed": "seed", "steps": "num_inference_steps", "guidance_scale": "guidance_scale",
    "scheduler": "scheduler", "mode": "alchemy", "preset": "presetStyle", "init_image": "init_image_id",
    "init_strength": "init_strength", "controlnets": "controlnets", "references": "controlnets", "character": "controlnets",
    "loras": "userElements",
}
# Sub-model field -> controlnets[] key.
ENTRY_ORIGIN = {"image": "initImageId", "weight": "weight", "strength_type": "strengthType",
                "influence": "influence", "type": "preprocessorId", "images": "initImageId"}


# ------------------------------------------------------------------------------------------ parse

def parse_generation(body: Mapping[str, Any], images: ImageResolver, models: Optional[ModelTable] = None,
                     *, strict_sizes: bool = False, trained: Optional[TrainedLoras] = None) -> GenerationRequest:
    """A Leonardo `POST /generations` body -> GenerationRequest. Raises LeonardoRequestError naming the field.
    `trained`: the trained elements and custom models userElements and modelId may name."""
    if not isinstance(body, Mapping):
        raise LeonardoRequestError("body", f"must be a JSON object, got {type(body).__name__}")
    _check_keys(body)
    local_model(body, models, trained)  # an unknown modelId fails here, before any image is fetched
    fields = _Fields()
    _text(body, fields)
    _size(body, fields, strict_sizes)
    _sampling(body, fields)
    _style(body, fields)
    _init_image(body, images, fields)
    _legacy_controlnet(body, fields)
    _controlnets(body, images, fields)
    _loras(body, trained, fields)
    _extension(body, images, fields)
    return fields.build()


class _Fields:
    """GenerationRequest keyword arguments, each remembering the Leonardo field it came from."""

    def __init__(self):
        self.values: dict[str, Any] = {}
        self.origin: dict[str, str] = dict(DEFAULT_ORIGIN)

    def put(self, name: str, value: Any, source: str) -> None:
        self.values[name] = value
        self.origin[name] = source

    def build(self) -> GenerationRequest:
        try:
            return GenerationRequest(**self.values)
        except ValidationError as exc:
            raise _converted(exc, lambda loc: self.origin.get(str(loc[0]), "body") if loc else "body") from None


def _converted(exc: ValidationError, path_of) -> LeonardoRequestError:
    """A pydantic error as one LeonardoRequestError; `path_of(loc)` gives each error's Leonardo path."""
    parts = [(path_of(error["loc"]), error["msg"].removeprefix("Value error, ")) for error in exc.errors()]
    first = parts[0][0]
    message = "; ".join(msg if path == first else f"{path}: {msg}" for path, msg in parts)
    return LeonardoRequestError(first, message)


def _check_keys(body: Mapping[str, Any]) -> None:
    for key, value in body.items():
        if key in MAPPED:
            continue
        if key in IGNORED:
            if value is not None and value != IGNORED[key]:
                log.warning("Leonardo field %s=%r is accepted but has no effect in refgen", key, value)
        elif key in REFUSED:
            neutral, why = REFUSED[key]
            if value is not None and value != neutral:
                raise LeonardoRequestError(key, f"{value!r} is not supported: {why}")
        else:
            raise LeonardoRequestError(key, "unknown field (not part of Leonardo's generation request)")


# ---------------------------------------------------------------------------------- value readers

def _string(body: Mapping, key: str, path: Optional[str] = None) -> Optional[str]:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise LeonardoRequestError(path or key, f"must be a string, got {value!r}")
    return value


def _flag(body: Mapping, key: str) -> Optional[bool]:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise LeonardoRequestError(key, f"must be true or false, got {value!r}")
    return value


def _number(body: Mapping, key: str, path: Optional[str] = None) -> Optional[float]:
    """A JSON number, or a numeric string (Leonardo's own samples send "weight": "0.5")."""
    value = body.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, bool):  # bool is an int in Python, never a number in JSON
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise LeonardoRequestError(path or key, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise LeonardoRequestError(path or key, f"must be a finite number, got {value!r}")
    return number


def _integer(body: Mapping, key: str, path: Optional[str] = None) -> Optional[int]:
    value = body.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact: float() would round seeds above 2**53
    number = _number(body, key, path)
    if number is not None and not number.is_integer():
        raise LeonardoRequestError(path or key, f"must be a whole number, got {body[key]!r}")
    return None if number is None else int(number)


# ------------------------------------------------------------------------------------ the fields

def _text(body: Mapping, fields: _Fields) -> None:
    prompt = _string(body, "prompt")
    if prompt is None:
        raise LeonardoRequestError("prompt", "is required")
    fields.put("prompt", prompt, "prompt")
    if _string(body, "negative_prompt"):
        fields.put("negative_prompt", body["negative_prompt"], "negative_prompt")


def _size(body: Mapping, fields: _Fields, strict: bool) -> None:
    width, height = _integer(body, "width"), _integer(body, "height")
    if (width is None) != (height is None):
        missing = "height" if height is None else "width"
        raise LeonardoRequestError(missing, "give both width and height, or neither (refgen then picks the model's size)")
    if width is not None:
        fields.put("width", _multiple_of_8(width, "width", strict), "width")
        fields.put("height", _multiple_of_8(height, "height", strict), "height")
    _num_images(body, fields, width, height)


def _multiple_of_8(side: int, key: str, strict: bool) -> int:
    """Leonardo documents multiples of 8 yet its own sample sends 644: floor with a warning, or refuse."""
    if side % 8 == 0:
        return side
    if strict or side < 8:
        raise LeonardoRequestError(key, f"must be a multiple of 8, got {side}")
    log.warning("Leonardo %s=%d is not a multiple of 8; using %d", key, side, side // 8 * 8)
    return side // 8 * 8


def _num_images(body: Mapping, fields: _Fields, width: Optional[int], height: Optional[int]) -> None:
    count = _integer(body, "num_images")
    if count is None:
        return
    large = width is None or max(width, height) > 768  # no size: refgen picks the model's 1024 px
    if large and count > 4:
        size = "the default 1024 px size" if width is None else f"{width}x{height}"
        raise LeonardoRequestError("num_images", f"at most 4 when a side exceeds 768 px ({size}), got {count}")
    fields.put("num_images", count, "num_images")


def _sampling(body: Mapping, fields: _Fields) -> None:
    for key, name in (("seed", "seed"), ("num_inference_steps", "steps")):
        if (value := _integer(body, key)) is not None:
            fields.put(name, value, key)
    if (scale := _number(body, "guidance_scale")) is not None:
        fields.put("guidance_scale", scale, "guidance_scale")
    if _string(body, "scheduler") is not None:
        fields.put("scheduler", body["scheduler"], "scheduler")


def _style(body: Mapping, fields: _Fields) -> None:
    _mode(body, fields)
    photoreal = _flag(body, "photoReal")
    version = _string(body, "photoRealVersion")
    if version is not None and version not in PHOTOREAL_VERSIONS:
        raise LeonardoRequestError("photoRealVersion", f"must be one of {', '.join(PHOTOREAL_VERSIONS)}, got {version!r}")
    if version is not None and not photoreal:
        log.warning("Leonardo photoRealVersion=%r is ignored without photoReal=true", version)
    style = _string(body, "presetStyle")
    if style is not None:
        fields.put("preset", _preset_for(style), "presetStyle")
    elif photoreal:
        fields.put("preset", PHOTOREAL_PRESET, "photoReal")


def _mode(body: Mapping, fields: _Fields) -> None:
    alchemy, ultra = _flag(body, "alchemy"), _flag(body, "ultra")
    if ultra:
        fields.put("mode", "ultra", "ultra")
    elif alchemy is not None:
        # alchemy=false is explicit: it also overrides a preset's own mode (photoreal's is quality).
        fields.put("mode", "quality" if alchemy else "fast", "alchemy")


def _preset_for(style: str) -> str:
    key = style.strip().upper()
    if key not in PRESET_STYLES:
        raise LeonardoRequestError("presetStyle", f"unknown preset style {style!r}; Leonardo's styles: {', '.join(PRESET_STYLES)}")
    return PRESET_STYLES[key]


# ---------------------------------------------------------------------------------------- images

def _resolve(images: ImageResolver, image_id: Any, kind: Any, path: str) -> ImageSource:
    """The resolver's image for an id; every failure names the field that carried the id."""
    if kind not in ("UPLOADED", "GENERATED"):
        raise LeonardoRequestError(path, f"image type must be UPLOADED or GENERATED, got {kind!r}")
    if not isinstance(image_id, str) or not image_id.strip():
        raise LeonardoRequestError(path, f"must be an image id (a non-empty string), got {image_id!r}")
    try:
        image = images(image_id, kind)
    except LookupError:
        image = None
    except RefgenError as exc:  # e.g. the store found the id but the file is unreadable
        raise LeonardoRequestError(path, f"{kind} image {image_id!r}: {exc}") from exc
    if image is None:
        raise UnknownImageError(path, f"unknown {kind} image id {image_id!r}")
    if not isinstance(image, (str, Path, Image.Image)):
        raise LeonardoRequestError(path, f"the image resolver returned {type(image).__name__} for {image_id!r}, not a path or image")
    return image


def _init_image(body: Mapping, images: ImageResolver, fields: _Fields) -> None:
    uploaded, generated = body.get("init_image_id"), body.get("init_generation_image_id")
    if uploaded is not None and generated is not None:
        raise LeonardoRequestError("init_generation_image_id", "give init_image_id or init_generation_image_id, not both")
    if uploaded is not None:
        fields.put("init_image", _resolve(images, uploaded, "UPLOADED", "init_image_id"), "init_image_id")
    elif generated is not None:
        fields.put("init_image", _resolve(images, generated, "GENERATED", "init_generation_image_id"), "init_generation_image_id")
    strength = _number(body, "init_strength")
    if strength is not None:
        if "init_image" not in fields.values:
            raise LeonardoRequestError("init_strength", "needs init_image_id or init_generation_image_id")
        fields.put("init_strength", strength, "init_strength")


def _legacy_controlnet(body: Mapping, fields: _Fields) -> None:
    """`controlNet: true` + `controlNetType`: a ControlUnit on the init image (Leonardo's legacy form)."""
    if not _flag(body, "controlNet"):
        for key in ("controlNetType", "weighting"):
            if body.get(key) is not None:
                log.warning("Leonardo %s is ignored without controlNet=true", key)
        return
    kind = _string(body, "controlNetType")
    if kind not in LEGACY_CONTROL_TYPES:
        raise LeonardoRequestError("controlNetType", f"must be one of {', '.join(LEGACY_CONTROL_TYPES)} with controlNet=true, got {kind!r}")
    if "init_image" not in fields.values:
        raise LeonardoRequestError("controlNet", "needs init_image_id or init_generation_image_id (its control image)")
    weight = _number(body, "weighting")
    unit = _model(ControlUnit, "weighting", type=LEGACY_CONTROL_TYPES[kind], image=fields.values["init_image"],
                  **({} if weight is None else {"weight": weight}))
    fields.put("controlnets", [unit], "controlNet")


def _model(cls, path: str, /, **values):
    """Build one adapter model; its ValidationError becomes a LeonardoRequestError at `path`."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise _converted(exc, lambda loc: _entry_path(path, loc)) from None


def _entry_path(path: str, loc: tuple) -> str:
    if not loc or "[" not in path:  # a model-level rule, or a path that is already a field
        return path
    return f"{path}.{ENTRY_ORIGIN.get(str(loc[0]), loc[0])}"


# ---------------------------------------------------------------------------------- controlnets[]

@dataclass
class _CharacterImages:
    images: list = field(default_factory=list)
    strength: Optional[tuple] = None  # (weight, strengthType) shared by every entry
    first_path: str = ""


def _controlnets(body: Mapping, images: ImageResolver, fields: _Fields) -> None:
    entries = body.get("controlnets")
    if entries is None:
        return
    if not isinstance(entries, list):
        raise LeonardoRequestError("controlnets", f"must be a list, got {type(entries).__name__}")
    units, references, character = list(fields.values.get("controlnets", [])), [], _CharacterImages()
    for index, entry in enumerate(entries):
        path = f"controlnets[{index}]"
        preprocessor, image, weight, strength = _entry(entry, images, path)
        if preprocessor.role == "character":
            _add_character(character, image, (weight, strength), path)
        elif preprocessor.role == "control":
            units.append(_control_unit(preprocessor, image, weight, strength, path))
        else:
            references.append(_reference(preprocessor.role, image, weight, strength, entry, path))
    _put_all(fields, units, references, character)


def _entry(entry: Any, images: ImageResolver, path: str):
    """One controlnets[] entry checked: (preprocessor, image, weight, strengthType)."""
    if not isinstance(entry, Mapping):
        raise LeonardoRequestError(path, f"must be an object, got {type(entry).__name__}")
    for key in entry:
        if key not in CONTROLNET_KEYS:
            raise LeonardoRequestError(f"{path}.{key}", f"unknown field; a controlnets entry has {', '.join(CONTROLNET_KEYS)}")
    preprocessor = _preprocessor(entry.get("preprocessorId"), f"{path}.preprocessorId")
    weight, strength = _number(entry, "weight", f"{path}.weight"), _string(entry, "strengthType", f"{path}.strengthType")
    if weight is not None and strength is not None:
        raise LeonardoRequestError(path, "give weight or strengthType, not both")
    if entry.get("influence") is not None and preprocessor.role != "style":
        raise LeonardoRequestError(f"{path}.influence", f"only Style Reference (67) takes influence, not {preprocessor.name}")
    if entry.get("initImageType") is None:
        raise LeonardoRequestError(f"{path}.initImageType", "is required (UPLOADED or GENERATED)")
    image = _resolve(images, entry.get("initImageId"), entry.get("initImageType"), f"{path}.initImageId")
    return preprocessor, image, weight, strength


def _preprocessor(value: Any, path: str) -> Preprocessor:
    supported = ", ".join(f"{key} ({p.name}, {p.base})" for key, p in sorted(PREPROCESSORS.items()))
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a number in Leonardo's schema: the Python SDK sends 19.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise LeonardoRequestError(path, f"must be a whole-number id, got {value!r}; supported: {supported}")
    if value in UNSERVED_PREPROCESSORS:
        raise LeonardoRequestError(path, f"{value} ({UNSERVED_PREPROCESSORS[value]}) has no refgen model; supported: {supported}")
    if value not in PREPROCESSORS:
        raise LeonardoRequestError(path, f"unknown preprocessorId {value}; supported: {supported}")
    return PREPROCESSORS[value]


def _control_unit(preprocessor: Preprocessor, image, weight, strength, path: str) -> ControlUnit:
    if strength is not None:
        if strength not in STRENGTH_WEIGHTS:
            raise LeonardoRequestError(f"{path}.strengthType", f"must be one of {', '.join(STRENGTH_WEIGHTS)}, got {strength!r}")
        weight = STRENGTH_WEIGHTS[strength]  # a ControlUnit has only a weight: the bucket's middle
    return _model(ControlUnit, path, type=preprocessor.control_type, image=image, **({} if weight is None else {"weight": weight}))


def _reference(kind: str, image, weight, strength, entry: Mapping, path: str) -> Reference:
    influence = _number(entry, "influence", f"{path}.influence")
    optional = {"weight": weight, "strength_type": strength, "influence": influence}
    return _model(Reference, path, kind=kind, image=image, **{k: v for k, v in optional.items() if v is not None})


def _add_character(character: _CharacterImages, image, strength: tuple, path: str) -> None:
    """Several Character Reference entries are several photos of one person: refgen runs one character."""
    if character.images and strength != character.strength:
        raise LeonardoRequestError(path, f"Character Reference entries must share one weight/strengthType "
                                         f"(refgen runs one character); {character.first_path} differs")
    if len(character.images) == MAX_CHARACTER_IMAGES:
        raise LeonardoRequestError(path, f"at most {MAX_CHARACTER_IMAGES} Character Reference images per request")
    if not character.images:
        character.strength, character.first_path = strength, path
    character.images.append(image)


def _put_all(fields: _Fields, units: list, references: list, character: _CharacterImages) -> None:
    if units:
        fields.put("controlnets", units, "controlnets")
    if references:
        fields.put("references", references, "controlnets")
    if character.images:
        weight, strength = character.strength
        optional = {"weight": weight, "strength_type": strength}
        reference = _model(CharacterReference, character.first_path, images=character.images,
                           **{k: v for k, v in optional.items() if v is not None})
        fields.put("character", reference, "controlnets")


# ---------------------------------------------------------------------------------- trained LoRAs

USER_ELEMENT_KEYS = ("userLoraId", "weight")


def _loras(body: Mapping, trained: Optional[TrainedLoras], fields: _Fields) -> None:
    """userElements[] and a trained custom model's modelId -> GenerationRequest.loras (LoRA files)."""
    loras = []
    custom = _custom_model(body.get("modelId"), trained)
    if custom is not None:
        loras.append(_model(LoraSpec, "modelId", path=str(custom[1]), weight=1.0))
    entries = body.get("userElements")
    if entries is not None and not isinstance(entries, list):
        raise LeonardoRequestError("userElements", f"must be a list, got {type(entries).__name__}")
    if entries and trained is None:
        raise LeonardoRequestError("userElements", "user Elements are LoRAs trained by this server (POST /elements); "
                                                   "none can be resolved here")
    for index, entry in enumerate(entries or []):
        loras.append(_user_element(entry, trained, f"userElements[{index}]"))
    if loras:
        fields.put("loras", loras, "userElements" if entries else "modelId")


def _user_element(entry: Any, trained: TrainedLoras, path: str) -> LoraSpec:
    if not isinstance(entry, Mapping):
        raise LeonardoRequestError(path, f"must be an object, got {type(entry).__name__}")
    for key in entry:
        if key not in USER_ELEMENT_KEYS:
            raise LeonardoRequestError(f"{path}.{key}", f"unknown field; a userElements entry has {', '.join(USER_ELEMENT_KEYS)}")
    lora_id = _integer(entry, "userLoraId", f"{path}.userLoraId")
    if lora_id is None:
        raise LeonardoRequestError(f"{path}.userLoraId", "is required (the id POST /elements answered)")
    try:
        lora = trained.element(lora_id)
    except LookupError:
        lora = None
    except RefgenError as exc:
        raise LeonardoRequestError(f"{path}.userLoraId", str(exc)) from exc
    if lora is None:
        raise LeonardoRequestError(f"{path}.userLoraId", f"unknown element {lora_id} (GET /elements/user/<userId> lists "
                                                         "this server's trained elements)")
    weight = _number(entry, "weight", f"{path}.weight")
    return _model(LoraSpec, path, path=str(lora), weight=1.0 if weight is None else weight)


# ------------------------------------------------------------------------- refgen's extension object

EXTENSION_KEYS = ("preset", "aspectRatio", "bestOf", "character")
CHARACTER_KEYS = ("name", "strengthType", "weight", "keep", "maskImageId", "maskMode")
CHARACTER_ORIGIN = {"name": "name", "strength_type": "strengthType", "weight": "weight", "keep": "keep",
                    "mask": "maskImageId", "mask_mode": "maskMode"}  # CharacterReference field -> extension key


def _extension(body: Mapping, images: ImageResolver, fields: _Fields) -> None:
    """The `refgen` object (module docstring): preset, aspectRatio, bestOf, character."""
    extension = body.get("refgen")
    if extension is None:
        return
    if not isinstance(extension, Mapping):
        raise LeonardoRequestError("refgen", f"must be an object of refgen's extension fields, got {type(extension).__name__}")
    _only_keys(extension, EXTENSION_KEYS, "refgen")
    if (preset := _string(extension, "preset", "refgen.preset")) is not None:
        if body.get("presetStyle") is not None:
            raise LeonardoRequestError("refgen.preset", "give presetStyle (Leonardo's styles) or refgen.preset, not both")
        fields.put("preset", _known_preset(preset), "refgen.preset")
    if (ratio := _string(extension, "aspectRatio", "refgen.aspectRatio")) is not None:
        if "width" in fields.values:
            raise LeonardoRequestError("refgen.aspectRatio", "give width/height or refgen.aspectRatio, not both")
        fields.put("aspect_ratio", ratio, "refgen.aspectRatio")
    if extension.get("character") is not None:
        fields.put("character", _extended_character(extension["character"], images, fields.values.get("character")),
                   "refgen.character")
    if (best_of := _integer(extension, "bestOf", "refgen.bestOf")) is not None:
        if "character" not in fields.values:
            raise LeonardoRequestError("refgen.bestOf", "ranks images by their likeness to a character: give "
                                                        "refgen.character or Character Reference photos")
        fields.put("best_of", best_of, "refgen.bestOf")


def _only_keys(mapping: Mapping, allowed: tuple[str, ...], path: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise LeonardoRequestError(f"{path}.{key}", f"unknown field; {path} has {', '.join(allowed)}")


def _known_preset(name: str) -> str:
    try:
        return get_preset(name).name
    except RefgenError as exc:
        raise LeonardoRequestError("refgen.preset", str(exc)) from None


def _saved_character(name: Any, path: str):
    """A saved character's name is checked here, so an unknown one is a 422 rather than a failed job."""
    from adapters.characters import CharacterError, CharacterStore

    if not isinstance(name, str):
        raise LeonardoRequestError(path, f"must be a saved character's name, got {name!r}")
    try:
        return CharacterStore().get(name)
    except CharacterError as exc:
        raise LeonardoRequestError(path, str(exc)) from None


def _check_mask(mask: ImageSource, size: tuple[int, int], path: str) -> None:
    """The character mask against the size of the picture it covers: that size, grey, and not empty."""
    from adapters.appearance import CharacterMaskError, checked_mask

    try:
        checked_mask(mask, size)
    except (CharacterMaskError, InvalidImageError) as exc:
        raise LeonardoRequestError(path, str(exc)) from None


def _extended_character(entry: Any, images: ImageResolver, photos: Optional[CharacterReference]) -> CharacterReference:
    """refgen.character: a saved character, or keep/mask for the Character Reference photos."""
    path = "refgen.character"
    if not isinstance(entry, Mapping):
        raise LeonardoRequestError(path, f"must be an object, got {type(entry).__name__}")
    _only_keys(entry, CHARACTER_KEYS, path)
    values = {field: entry[key] for field, key in CHARACTER_ORIGIN.items() if key in entry and entry[key] is not None}
    if "weight" in values:
        values["weight"] = _number(entry, "weight", f"{path}.weight")
    if "mask" in values:
        values["mask"] = _resolve(images, values["mask"], "UPLOADED", f"{path}.maskImageId")
    if photos is not None:
        if "name" in values:
            raise LeonardoRequestError(f"{path}.name", "give a saved character or Character Reference photos "
                                                       "(preprocessorId 133), not both")
        if "weight" in values or "strength_type" in values:
            raise LeonardoRequestError(path, "the photos' strength is their controlnets entries' weight or strengthType")
        values = {**dict(photos), **values}
    elif "name" not in values:
        raise LeonardoRequestError(f"{path}.name", "is required: a saved character (GET /refgen/characters), or give "
                                                   "Character Reference photos (controlnets preprocessorId 133)")
    else:
        saved = _saved_character(values["name"], f"{path}.name")
    if values.get("mask") is not None:  # checked against the picture it covers now, rather than failing the job
        covered = load_rgb(photos.images[0], "character image 1").size if photos is not None else tuple(saved.anchors[0]["size"])
        _check_mask(values["mask"], covered, f"{path}.maskImageId")
    try:
        return CharacterReference(**values)
    except ValidationError as exc:
        raise _converted(exc, lambda loc: f"{path}.{CHARACTER_ORIGIN.get(str(loc[0]), loc[0])}" if loc else path) from None
