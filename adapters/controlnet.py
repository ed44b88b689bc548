"""ControlNet image guidance: any number of units, each with its own model, weight and step window.

A unit is `{type, image, weight 0-2, start, end, preprocess, fit}`. All active units are evaluated
on the same latent input at every step and their residuals are summed into the one UNet call
(engine/sampling.py merges them), each scaled by its weight and active only inside its window.

Control image fitting to the output size (`fit`):
- `crop` (default): scale to cover the output, centre-crop the overflow (no distortion, edges lost)
- `fit`: scale to fit inside, pad with black (nothing lost; black = "no edge" / "far" for depth)
- `stretch`: resize to the output size exactly (distorts when aspect ratios differ)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from engine.adapter import Context, Frame, Prepared
from engine.conditioning import Guidance
from engine.errors import RefgenError
from engine.images import load_rgb
from engine.provenance import input_record, replay_image
from engine.request import GenerationRequest, ResolvedRequest
from engine.request_types import ControlUnit, FitMode, ImageUnit, active_at, canonical_type
from engine.speed import Speed, prepare_module

from .preprocess import Preprocessors, is_preprocessed

# Single-type SDXL ControlNets in weights/manifest.toml, by control type.
DEFAULT_MODELS = {"canny": "controlnet-canny-sdxl", "depth": "controlnet-depth-sdxl", "pose": "controlnet-openpose-sdxl"}

# ControlNet-Union (xinsir promax) serves the other types: its control modes by type.
UNION_MODEL = "controlnet-union-sdxl"
UNION_MODES = {"pose": 0, "depth": 1, "softedge": 2, "scribble": 2, "canny": 3, "lineart": 3, "normal": 4}

class ControlError(RefgenError):
    """A control unit that cannot be served: unknown type, no model for it, unusable image."""


def fit_image(image: Image.Image, width: int, height: int, mode: FitMode) -> Image.Image:
    if image.size == (width, height):
        return image
    if mode == "stretch":
        return image.resize((width, height), Image.LANCZOS)
    if mode == "fit":
        return ImageOps.pad(image, (width, height), Image.LANCZOS, color=(0, 0, 0))
    return ImageOps.fit(image, (width, height), Image.LANCZOS)


class UnionControl:
    """ControlNet-Union serving one control type, called like a single-type ControlNet.

    Each unit runs the union model with its own condition and mode, so every unit keeps its own
    weight and window; diffusers' union pipeline instead fuses all conditions in one call.
    """

    def __init__(self, model: torch.nn.Module, mode: int):
        self.model, self.mode = model, mode

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def __call__(self, sample, timestep, *, controlnet_cond, conditioning_scale, **kwargs):
        control_type = torch.zeros(sample.shape[0], self.model.config.num_control_type, device=sample.device, dtype=sample.dtype)
        control_type[:, self.mode] = 1
        return self.model(sample, timestep, controlnet_cond=[controlnet_cond], control_type=control_type,
                          control_type_idx=[self.mode], conditioning_scale=[conditioning_scale], **kwargs)


class ControlNetFolderError(ControlError):
    """A ControlNet to register that is not there: no such folder, no ControlNet config in it."""


# diffusers' `_class_name` of each kind of ControlNet config (xinsir's own code calls its class ControlNetModel_Union).
SINGLE_CLASSES = ("ControlNetModel",)
UNION_CLASSES = ("ControlNetUnionModel", "ControlNetModel_Union")


# Parameters every ControlNet has (its condition encoder), and those only ControlNet-Union has (its task
# embedding and the transformer that mixes the conditions).
CONTROLNET_KEYS = ("controlnet_cond_embedding.",)
UNION_KEYS = ("task_embedding", "transformer_layes.", "control_add_embedding.")


def controlnet_kind(folder: Union[str, Path]) -> str:
    """'single' or 'union' for a diffusers ControlNet folder (or xinsir's promax files); ControlNetFolderError,
    naming the folder and what is wrong, for anything else. Registration calls this at once, so a wrong path
    fails when it is given, not at the first request that needs it. The weights' keys decide, as a loader
    must read them anyway; the config's class name only where no safetensors file is there yet."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ControlNetFolderError(f"ControlNet folder {folder} {'is a file' if folder.exists() else 'does not exist'}"
                                    " (give the folder holding its config.json)")
    weights_file = next(iter(sorted(folder.glob("diffusion_pytorch_model*.safetensors"))), None)
    if weights_file is not None and _config_file(folder) is not None:
        return _kind_from_keys(weights_file)
    if (folder / "config_promax.json").is_file():
        return "union"  # xinsir's promax files (loaded by name, whatever their config's class says)
    config = folder / "config.json"
    try:
        class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except FileNotFoundError:
        raise ControlNetFolderError(f"{folder} has no config.json: not a diffusers ControlNet folder") from None
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise ControlNetFolderError(f"{config} is not a readable model config ({exc})") from None
    if class_name in SINGLE_CLASSES or class_name in UNION_CLASSES:
        return "union" if class_name in UNION_CLASSES else "single"
    raise ControlNetFolderError(f"{folder} holds a {class_name or 'model without _class_name'} config, not a ControlNet "
                                f"({' or '.join(SINGLE_CLASSES + UNION_CLASSES)})")


def _config_file(folder: Path) -> Optional[Path]:
    return next((folder / name for name in ("config.json", "config_promax.json") if (folder / name).is_file()), None)


def _kind_from_keys(weights_file: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as file:
            keys = list(file.keys())
    except (OSError, ValueError) as exc:
        raise ControlNetFolderError(f"{weights_file} is not a readable safetensors file ({exc})") from None
    if not any(key.startswith(CONTROLNET_KEYS) for key in keys):
        raise ControlNetFolderError(f"{weights_file} holds no ControlNet (no condition encoder among its weights)")
    return "union" if any(key.startswith(UNION_KEYS) for key in keys) else "single"


class ControlNetLibrary:
    """The ControlNet models an engine can use by control type, loaded on first use and kept.

    By default canny, depth and pose use their single-type SDXL ControlNets and every other type
    the ControlNet-Union model, all from the manifest (fetched with `refgen weights fetch`), or from
    `manifest` / `weights_dir` when given (the tiny model's stand-ins).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, references: Optional[dict[str, str]] = None,
                 use_manifest: bool = True, *, manifest=None, weights_dir: Optional[Path] = None, speed: Optional[Speed] = None):
        self._device, self._dtype, self._speed = device, dtype, speed or Speed()  # speed: compiled ControlNets with a compiled UNet
        self._manifest, self._weights_dir = manifest, weights_dir
        self._references: dict[str, object] = {}
        self._loaded: dict[object, torch.nn.Module] = {}  # by reference: a union model loads once for all its types
        if use_manifest:  # names only: whether they are fetched is checked when a request needs them
            for control_type in UNION_MODES:
                self._references[control_type] = ("union", UNION_MODEL)
            for control_type, reference in DEFAULT_MODELS.items():
                self._references[control_type] = ("single", reference)
        for control_type, reference in (references or {}).items():
            self.register(control_type, reference)

    def register(self, control_type: str, reference: Union[str, Path, torch.nn.Module]) -> None:
        """Serve `control_type` with a diffusers ControlNet folder (single-type or ControlNet-Union: its config
        says which), a manifest name, or a loaded model. A folder is checked now (ControlNetFolderError)."""
        key = canonical_type(control_type)
        if isinstance(reference, torch.nn.Module):
            self._loaded[id(reference)] = prepare_module(reference.to(self._device, self._dtype).eval(), self._speed)
            self._references[key] = ("single", id(reference))
            return
        if self._is_manifest_name(reference):
            kind = "union" if str(reference) == UNION_MODEL else "single"
        else:
            kind = controlnet_kind(reference)
        if kind == "union":
            self.register_union(reference, [key])
        else:
            self._references[key] = ("single", str(reference))

    def register_union(self, reference: Union[str, Path], control_types: Optional[list[str]] = None) -> None:
        """Serve `control_types` (default: all it knows) with a ControlNet-Union model (folder or manifest name)."""
        if not self._is_manifest_name(reference) and controlnet_kind(reference) != "union":
            raise ControlNetFolderError(f"{reference} holds a single-type ControlNet, not ControlNet-Union; use register()")
        for control_type in control_types or list(UNION_MODES):
            key = canonical_type(control_type)
            if key not in UNION_MODES:
                raise ControlError(f"ControlNet-Union has no mode for {key!r}; it serves {', '.join(UNION_MODES)}")
            self._references[key] = ("union", str(reference))

    def _is_manifest_name(self, reference: Union[str, Path]) -> bool:
        """A bare name of the manifest (not an existing path): fetched or built when first needed."""
        from engine import weights

        if isinstance(reference, Path) or Path(str(reference)).expanduser().exists():
            return False
        return str(reference) in (self._manifest or weights.Manifest.load()).names()

    def served_types(self) -> list[str]:
        return sorted(self._references)

    def model(self, control_type: str):
        key = canonical_type(control_type)
        if key not in self._references:
            raise ControlError(
                f"no ControlNet serves control type {key!r}; served: {', '.join(self.served_types())}. "
                "Register one with Engine.load(controlnets={type: folder}) (CLI: --controlnet-model TYPE=FOLDER)"
            )
        kind, reference = self._references[key]
        if reference not in self._loaded:
            self._loaded[reference] = self._load(kind, reference)
        model = self._loaded[reference]
        return UnionControl(model, UNION_MODES[key]) if kind == "union" else model

    def identity(self, control_type: str) -> str:
        kind, reference = self._references[canonical_type(control_type)]
        return f"{kind}:{reference}" if isinstance(reference, str) else f"{kind}:in-memory"

    def _load(self, kind: str, reference: str) -> torch.nn.Module:
        from engine import weights

        folder = weights.locate(reference, self._weights_dir, self._manifest)
        model = _load_union(folder, self._dtype) if kind == "union" else _load_single(folder, self._dtype)
        return prepare_module(model.to(self._device).eval(), self._speed)


def _load_single(folder: Path, dtype) -> torch.nn.Module:
    from diffusers import ControlNetModel

    variant = "fp16" if any(folder.glob("*.fp16.safetensors")) else None
    return ControlNetModel.from_pretrained(str(folder), dtype=dtype, variant=variant, use_safetensors=True, local_files_only=True)


def _load_union(folder: Path, dtype) -> torch.nn.Module:
    """ControlNet-Union from a diffusers folder, or xinsir's promax files (config_promax.json + *_promax.safetensors)."""
    from diffusers import ControlNetUnionModel
    from safetensors.torch import load_file

    promax = folder / "config_promax.json"
    if not promax.exists():
        return ControlNetUnionModel.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, local_files_only=True)
    model = ControlNetUnionModel.from_config(ControlNetUnionModel.load_config(str(promax)))
    model.load_state_dict(load_file(str(folder / "diffusion_pytorch_model_promax.safetensors")), strict=True)
    return model.to(dtype)


@dataclass(frozen=True)
class ReadyControl:
    """A ControlNet ready to run: its model, its CFG-batched image, its weight and step window."""

    model: torch.nn.Module
    image: torch.Tensor  # (2B or B, 3, H, W) in [0, 1], CFG-batched like the latents
    weight: float
    start: float = 0.0
    end: float = 1.0
    context: Optional[torch.Tensor] = None  # what it attends to; None: the prompt (InstantID's IdentityNet: face tokens)


class ControlGuidance(Guidance):
    """The summed residuals of a request's ControlNets (engine Contribution)."""

    def __init__(self, controls: list[ReadyControl]):
        self._controls = controls
        # Each weight as a device tensor: a compiled ControlNet then takes any weight without recompiling (a Python
        # float would be baked into the graph); the product is the same.
        self._scales = [torch.tensor(ready.weight, dtype=torch.float32, device=ready.image.device) for ready in controls]

    def unet_kwargs(self, latent_input, timestep, step: int, total: int, cond) -> dict:
        down, mid = None, None
        for ready, scale in zip(self._controls, self._scales):
            if not active_at(ready.weight, ready.start, ready.end, step, total):
                continue  # exactly "no unit": skipping adds nothing, where running at scale 0 adds zeros
            context = cond.prompt_embeds if ready.context is None else ready.context
            unit_down, unit_mid = ready.model(
                latent_input, timestep, encoder_hidden_states=context, controlnet_cond=ready.image,
                conditioning_scale=scale, return_dict=False,
                added_cond_kwargs={"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids},
            )
            down = list(unit_down) if down is None else [a + b for a, b in zip(down, unit_down)]
            mid = unit_mid if mid is None else mid + unit_mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def control_tensor(image: Image.Image, width: int, height: int, fit: FitMode, rows: int, model) -> torch.Tensor:
    """A control picture fitted to the output size, as the (rows, 3, H, W) [0, 1] batch a ControlNet takes."""
    fitted = fit_image(image, width, height, fit)
    tensor = torch.from_numpy(np.asarray(fitted.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return tensor.repeat(rows, 1, 1, 1).to(device=model.device, dtype=model.dtype)


def build_guidance(
    library: ControlNetLibrary,
    units: list[ControlUnit],
    width: int,
    height: int,
    batch: int,
    guided: bool,
) -> Optional[ControlGuidance]:
    """Units whose `image` is the prepared (preprocessed, RGB) control image: fitted, batched, paired with models."""
    if not units:
        return None
    ready = []
    for unit in units:
        model = library.model(unit.type)
        image = control_tensor(unit.image, width, height, unit.fit, batch * (2 if guided else 1), model)
        ready.append(ReadyControl(model, image, unit.weight, unit.start, unit.end))
    return ControlGuidance(ready)


class ImageUnits:
    """Units that guide with a picture (ControlNets, T2I-Adapters), an Adapter (engine/adapter.py): photos go
    through their type's preprocessor (cached); each image is recorded by hash and read back for replay; the
    units guide every whole-picture pass (not the tiles of a tiled refine). A subclass names its request field
    and unit type, and turns its ready units into per-step guidance."""

    field = "controlnets"  # the GenerationRequest's and the ResolvedRequest's field
    unit: type[ImageUnit] = ControlUnit
    what = "control image"  # how messages name one image

    def __init__(self, library, preprocessors: Preprocessors):
        self.library, self.preprocessors = library, preprocessors

    def guidance(self, units: list, frame: Frame) -> Guidance:
        """Units whose `image` is the prepared control picture -> their guidance for a pass of this frame."""
        raise NotImplementedError

    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional["PreparedUnits"]:
        units = getattr(request, self.field)
        if not units:
            return None
        sources = [load_rgb(unit.image, f"{self.what} {i + 1} ({unit.type})") for i, unit in enumerate(units)]
        records = [input_record(unit, image) for unit, image in zip(units, sources)]
        return PreparedUnits(self, self._ready(units, sources), records)

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional["PreparedUnits"]:
        records = getattr(resolved, self.field)
        if not records:
            return None
        sources = [replay_image(record["image"], f"{self.what} {i + 1}") for i, record in enumerate(records)]
        units = [self.unit(**{**record, "image": image}) for record, image in zip(records, sources)]
        return PreparedUnits(self, self._ready(units, sources), list(records))

    def _ready(self, units, sources: list[Image.Image]) -> list:
        """Each unit with its control image."""
        return [unit.model_copy(update={"image": self._control_image(unit, image)}) for unit, image in zip(units, sources)]

    def _control_image(self, unit: ImageUnit, image: Image.Image) -> Image.Image:
        if unit.preprocess is False or (unit.preprocess == "auto" and is_preprocessed(image, unit.type)):
            return image
        return self.preprocessors.run(unit.type, image, **unit.options)


class PreparedUnits(Prepared):
    def __init__(self, owner: ImageUnits, units: list, records: list[dict]):
        self._owner, self._units, self._records = owner, units, records

    def record(self) -> dict:
        return {self._owner.field: self._records}

    def guidance(self, frame: Frame) -> tuple[Guidance, ...]:
        return (self._owner.guidance(self._units, frame),) if frame.whole else ()


class ControlNets(ImageUnits):
    """ControlNet units: their residuals are summed into every step's UNet call."""

    library: ControlNetLibrary

    def guidance(self, units: list[ControlUnit], frame: Frame) -> Guidance:
        return build_guidance(self.library, units, frame.width, frame.height, frame.batch, frame.guided)
