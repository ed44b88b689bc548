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
from typing import Callable, Literal, Optional, Union

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

    def active_at(self, step: int, total: int) -> bool:
        """Active for step i of n unless i/n < start or (i+1)/n > end (diffusers' rule)."""
        return not (step / total < self.start or (step + 1) / total > self.end)


def fit_image(image: Image.Image, width: int, height: int, mode: FitMode) -> Image.Image:
    if image.size == (width, height):
        return image
    if mode == "stretch":
        return image.resize((width, height), Image.LANCZOS)
    if mode == "fit":
        return ImageOps.pad(image, (width, height), Image.LANCZOS, color=(0, 0, 0))
    return ImageOps.fit(image, (width, height), Image.LANCZOS)


class ControlNetLibrary:
    """The ControlNet models an engine can use by control type, loaded on first use and kept."""

    def __init__(self, device: torch.device, dtype: torch.dtype, references: Optional[dict[str, str]] = None):
        self._device, self._dtype = device, dtype
        self._references = dict(DEFAULT_MODELS)
        self._loaded: dict[str, torch.nn.Module] = {}
        for control_type, reference in (references or {}).items():
            self.register(control_type, reference)

    def register(self, control_type: str, reference: Union[str, Path, torch.nn.Module]) -> None:
        """Serve `control_type` with a manifest name, a diffusers ControlNet folder, or a loaded model."""
        key = canonical_type(control_type)
        self._loaded.pop(key, None)
        if isinstance(reference, torch.nn.Module):
            self._loaded[key] = reference.to(self._device, self._dtype).eval()
        self._references[key] = reference if isinstance(reference, torch.nn.Module) else str(reference)

    def served_types(self) -> list[str]:
        return sorted(self._references)

    def model(self, control_type: str) -> torch.nn.Module:
        key = canonical_type(control_type)
        if key not in self._references:
            raise ControlError(
                f"no ControlNet serves control type {key!r}; served: {', '.join(self.served_types())}. "
                "Register one with engine.controlnets.register(type, folder_or_manifest_name)"
            )
        if key not in self._loaded:
            self._loaded[key] = self._load(self._references[key])
        return self._loaded[key]

    def identity(self, control_type: str) -> str:
        reference = self._references.get(canonical_type(control_type))
        return reference if isinstance(reference, str) else type(reference).__name__

    def _load(self, reference: str) -> torch.nn.Module:
        from diffusers import ControlNetModel

        from engine import weights

        folder = Path(reference).expanduser()
        if not folder.is_dir():
            folder = weights.require(reference)  # WeightsMissingError names `refgen weights fetch ...`
        variant = "fp16" if any(folder.glob("*.fp16.safetensors")) else None
        model = ControlNetModel.from_pretrained(
            str(folder), dtype=self._dtype, variant=variant, use_safetensors=True, local_files_only=True
        )
        return model.to(self._device).eval()


@dataclass(frozen=True)
class _ReadyUnit:
    unit: ControlUnit
    model: torch.nn.Module
    image: torch.Tensor  # (2B or B, 3, H, W) in [0, 1], CFG-batched like the latents


class ControlGuidance(Guidance):
    """The conditioning contribution of all ControlNet units of a request (engine Contribution)."""

    def __init__(self, units: list[_ReadyUnit]):
        self._units = units

    def unet_kwargs(self, latent_input, timestep, step: int, total: int, cond) -> dict:
        down, mid = None, None
        for ready in self._units:
            if ready.unit.weight == 0 or not ready.unit.active_at(step, total):
                continue  # exactly "no unit": skipping adds nothing, where running at scale 0 adds zeros
            unit_down, unit_mid = ready.model(
                latent_input, timestep, encoder_hidden_states=cond.prompt_embeds, controlnet_cond=ready.image,
                conditioning_scale=ready.unit.weight, return_dict=False,
                added_cond_kwargs={"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids},
            )
            down = list(unit_down) if down is None else [a + b for a, b in zip(down, unit_down)]
            mid = unit_mid if mid is None else mid + unit_mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


Preprocess = Callable[[Image.Image, str, dict], Image.Image]


def build_guidance(
    library: ControlNetLibrary,
    units: list[ControlUnit],
    images: list[Image.Image],
    width: int,
    height: int,
    batch: int,
    guided: bool,
) -> Optional[ControlGuidance]:
    """Control images (already loaded and preprocessed, one per unit) fitted, batched and paired with models."""
    if not units:
        return None
    ready = []
    for unit, image in zip(units, images):
        fitted = fit_image(image, width, height, unit.fit)
        tensor = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        tensor = tensor.repeat(batch * (2 if guided else 1), 1, 1, 1)
        model = library.model(unit.type)
        ready.append(_ReadyUnit(unit, model, tensor.to(device=model.device, dtype=model.dtype)))
    return ControlGuidance(ready)
