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

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.conditioning import Guidance
from engine.errors import RefgenError

# Types with a model to serve them, and the spellings users and Leonardo use for them.
CONTROL_TYPES = ("canny", "depth", "pose", "lineart", "scribble", "softedge", "normal")
CONTROL_ALIASES = {"edge": "canny", "edges": "canny", "openpose": "pose", "sketch": "scribble", "hed": "softedge",
            "line_art": "lineart", "normal_map": "normal"}

# Single-type SDXL ControlNets in weights/manifest.toml, by control type.
DEFAULT_MODELS = {"canny": "controlnet-canny-sdxl", "depth": "controlnet-depth-sdxl", "pose": "controlnet-openpose-sdxl"}

# ControlNet-Union (xinsir promax) serves the other types: its control modes by type.
UNION_MODEL = "controlnet-union-sdxl"
UNION_MODES = {"pose": 0, "depth": 1, "softedge": 2, "scribble": 2, "canny": 3, "lineart": 3, "normal": 4}

FitMode = Literal["crop", "fit", "stretch"]


class ControlError(RefgenError):
    """A control unit that cannot be served: unknown type, no model for it, unusable image."""


def normalise_type(name: str) -> str:
    """`Edge`, `openpose`, `line-art` ... -> the type's own name (not checked against CONTROL_TYPES)."""
    key = str(name).strip().lower().replace("-", "_")
    return CONTROL_ALIASES.get(key, key)


def canonical_type(name: str) -> str:
    key = normalise_type(name)
    if key not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {name!r}; known types: {', '.join(CONTROL_TYPES)}")
    return key


class ControlUnit(BaseModel):
    """One ControlNet unit of a request."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    type: str
    image: Union[str, Path, Image.Image]
    weight: float = Field(default=1.0, ge=0.0, le=2.0)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    preprocess: Union[bool, Literal["auto"]] = "auto"  # auto: a photo is preprocessed, a control map is used as is
    fit: FitMode = "crop"
    options: dict[str, Union[float, int, bool, str]] = Field(default_factory=dict)  # preprocessor options

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return canonical_type(value)

    @model_validator(mode="after")
    def _window(self) -> "ControlUnit":
        if self.start >= self.end:
            raise ValueError(f"control unit window: start ({self.start}) must be before end ({self.end})")
        return self


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

    def __call__(self, sample, timestep, *, controlnet_cond, **kwargs):
        control_type = torch.zeros(sample.shape[0], self.model.config.num_control_type, device=sample.device, dtype=sample.dtype)
        control_type[:, self.mode] = 1
        return self.model(sample, timestep, controlnet_cond=[controlnet_cond], control_type=control_type,
                          control_type_idx=[self.mode], **kwargs)


class ControlNetLibrary:
    """The ControlNet models an engine can use by control type, loaded on first use and kept.

    By default canny, depth and pose use their single-type SDXL ControlNets and every other type
    the ControlNet-Union model, all from the manifest (fetched with `refgen weights fetch`).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, references: Optional[dict[str, str]] = None,
                 use_manifest: bool = True):
        self._device, self._dtype = device, dtype
        self._references: dict[str, object] = {}
        self._loaded: dict[object, torch.nn.Module] = {}  # by reference: a union model loads once for all its types
        if use_manifest:
            self.register_union(UNION_MODEL, [t for t in UNION_MODES if t not in DEFAULT_MODELS])
            for control_type, reference in DEFAULT_MODELS.items():
                self.register(control_type, reference)
        for control_type, reference in (references or {}).items():
            self.register(control_type, reference)

    def register(self, control_type: str, reference: Union[str, Path, torch.nn.Module]) -> None:
        """Serve `control_type` with a manifest name, a diffusers ControlNet folder, or a loaded model."""
        key = canonical_type(control_type)
        if isinstance(reference, torch.nn.Module):
            self._loaded[id(reference)] = reference.to(self._device, self._dtype).eval()
            reference = id(reference)
        self._references[key] = ("single", str(reference) if isinstance(reference, Path) else reference)

    def register_union(self, reference: Union[str, Path], control_types: Optional[list[str]] = None) -> None:
        """Serve `control_types` (default: all it knows) with a ControlNet-Union model."""
        for control_type in control_types or list(UNION_MODES):
            key = canonical_type(control_type)
            if key not in UNION_MODES:
                raise ControlError(f"ControlNet-Union has no mode for {key!r}; it serves {', '.join(UNION_MODES)}")
            self._references[key] = ("union", str(reference))

    def served_types(self) -> list[str]:
        return sorted(self._references)

    def model(self, control_type: str):
        key = canonical_type(control_type)
        if key not in self._references:
            raise ControlError(
                f"no ControlNet serves control type {key!r}; served: {', '.join(self.served_types())}. "
                "Register one with engine.controlnets.register(type, folder_or_manifest_name)"
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

        folder = Path(reference).expanduser()
        if not folder.is_dir():
            folder = weights.require(reference)  # WeightsMissingError names `refgen weights fetch ...`
        model = _load_union(folder, self._dtype) if kind == "union" else _load_single(folder, self._dtype)
        return model.to(self._device).eval()


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

    def active_at(self, step: int, total: int) -> bool:
        """Step i of n runs unless the weight is 0, i/n < start or (i+1)/n > end (diffusers' window rule)."""
        return self.weight != 0 and not (step / total < self.start or (step + 1) / total > self.end)


class ControlGuidance(Guidance):
    """The summed residuals of a request's ControlNets (engine Contribution)."""

    def __init__(self, controls: list[ReadyControl]):
        self._controls = controls

    def unet_kwargs(self, latent_input, timestep, step: int, total: int, cond) -> dict:
        down, mid = None, None
        for ready in self._controls:
            if not ready.active_at(step, total):
                continue  # exactly "no unit": skipping adds nothing, where running at scale 0 adds zeros
            context = cond.prompt_embeds if ready.context is None else ready.context
            unit_down, unit_mid = ready.model(
                latent_input, timestep, encoder_hidden_states=context, controlnet_cond=ready.image,
                conditioning_scale=ready.weight, return_dict=False,
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
