"""The public request types besides GenerationRequest, and their strength tables: a ControlNet unit,
a T2I-Adapter unit, a Style/Content Reference, a Character Reference. Plain validated data (pydantic), no models: the
request, the CLI and the Leonardo translation use them without loading any adapter, and each adapter
in adapters/ reads them.

Strength tables (Leonardo's strengthType buckets onto a weight 0-2):
- Style/Content Reference: Low 0.2, Mid 0.6, High 1.0 (default), Ultra 1.4, Max 1.8 -> the IP-Adapter scale.
- Character Reference: Low 0.33, Mid 0.99 (default), High 1.66 -> (adapter scale, IdentityNet scale),
  linear between (0, 0) at 0, Low (0.4, 0.3), Mid (0.8, 0.8), High (1.0, 1.0) and (1.2, 1.2) at 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- ControlNet units ---------------------------------------------------------------------------

# Types with a model to serve them, and the spellings users and Leonardo use for them.
CONTROL_TYPES = ("canny", "depth", "pose", "lineart", "scribble", "softedge", "normal")
CONTROL_ALIASES = {"edge": "canny", "edges": "canny", "openpose": "pose", "sketch": "scribble", "hed": "softedge",
            "line_art": "lineart", "normal_map": "normal"}

FitMode = Literal["crop", "fit", "stretch"]


def normalise_type(name: str) -> str:
    """`Edge`, `openpose`, `line-art` ... -> the type's own name (not checked against CONTROL_TYPES)."""
    key = str(name).strip().lower().replace("-", "_")
    return CONTROL_ALIASES.get(key, key)


def canonical_type(name: str) -> str:
    key = normalise_type(name)
    if key not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {name!r}; known types: {', '.join(CONTROL_TYPES)}")
    return key


class ImageUnit(BaseModel):
    """What every unit guiding with a picture has: ControlNet units and T2I-Adapter units."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    type: str
    image: Union[str, Path, Image.Image]
    weight: float = Field(default=1.0, ge=0.0, le=2.0)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    preprocess: Union[bool, Literal["auto"]] = "auto"  # auto: a photo is preprocessed, a control map is used as is
    fit: FitMode = "crop"
    options: dict[str, Union[float, int, bool, str]] = Field(default_factory=dict)  # preprocessor options

    @model_validator(mode="after")
    def _window(self) -> "ImageUnit":
        if self.start >= self.end:
            raise ValueError(f"{self.kind} window: start ({self.start}) must be before end ({self.end})")
        return self

    kind: ClassVar[str] = "unit"  # how messages name it


def active_at(weight: float, start: float, end: float, step: int, total: int) -> bool:
    """Whether a unit runs at step i of n: not when its weight is 0, i/n < start or (i+1)/n > end (diffusers'
    ControlNet window rule; with start 0 it is the T2I-Adapter pipeline's `i < int(n * adapter_conditioning_factor)`)."""
    return weight != 0 and not (step / total < start or (step + 1) / total > end)


class ControlUnit(ImageUnit):
    """One ControlNet unit of a request."""

    kind: ClassVar[str] = "control unit"

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return canonical_type(value)


# -- T2I-Adapter units ---------------------------------------------------------------------------

# The published SDXL T2I-Adapters (TencentARC), by the control type whose preprocessor feeds them:
# sketch is `scribble` (alias `sketch`), depth-midas is `depth`, openpose is `pose`.
T2I_ADAPTER_TYPES = ("canny", "lineart", "scribble", "depth", "pose")


class T2IAdapterUnit(ImageUnit):
    """One T2I-Adapter unit of a request: like a ControlNet unit, but its features are computed once per
    generation. `weight` is diffusers' adapter_conditioning_scale, `end` its adapter_conditioning_factor."""

    kind: ClassVar[str] = "T2I-Adapter unit"

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return t2i_adapter_type(value)


def t2i_adapter_type(name: str) -> str:
    key = normalise_type(name)
    if key not in T2I_ADAPTER_TYPES:
        raise ValueError(f"no T2I-Adapter for type {name!r}; types: {', '.join(T2I_ADAPTER_TYPES)} (sketch = scribble)")
    return key


# -- Style / Content Reference -------------------------------------------------------------------

StrengthType = Literal["Low", "Mid", "High", "Ultra", "Max"]
STRENGTH_WEIGHTS: dict[str, float] = {"Low": 0.2, "Mid": 0.6, "High": 1.0, "Ultra": 1.4, "Max": 1.8}
DEFAULT_WEIGHT = STRENGTH_WEIGHTS["High"]


class Reference(BaseModel):
    """One Style or Content Reference image of a request."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    kind: Literal["style", "content"]
    image: Union[str, Path, Image.Image]
    weight: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    strength_type: Optional[StrengthType] = None
    influence: float = Field(default=1.0, gt=0.0, le=100.0)  # style only: relative to the other style images

    @model_validator(mode="after")
    def _one_strength(self) -> "Reference":
        check_one_strength(self.weight, self.strength_type)
        return self

    @property
    def scale(self) -> float:
        return bucket_weight(self.weight, self.strength_type, STRENGTH_WEIGHTS, DEFAULT_WEIGHT)


def check_one_strength(weight: Optional[float], strength_type: Optional[str]) -> None:
    if weight is not None and strength_type is not None:
        raise ValueError("give weight or strength_type, not both")


def bucket_weight(weight: Optional[float], strength_type: Optional[str], buckets: dict[str, float], default: float) -> float:
    """The weight 0-2 a reference runs at: its own weight, else its strengthType bucket, else the default."""
    if weight is not None:
        return weight
    return buckets[strength_type] if strength_type else default


# -- Character Reference ---------------------------------------------------------------------------

IdentityAdapterName = Literal["instantid", "faceid"]
CharacterStrength = Literal["Low", "Mid", "High"]
# What of the reference photo the character carries besides the face (Ideogram's character mask): the face goes
# through the identity adapter; hair, outfit and accessories through an appearance reference (adapters/appearance.py).
CharacterParts = Literal["face", "face+hair", "face+hair+outfit", "all"]

CHARACTER_WEIGHTS: dict[str, float] = {"Low": 0.33, "Mid": 0.99, "High": 1.66}
DEFAULT_CHARACTER_WEIGHT = CHARACTER_WEIGHTS["Mid"]
# weight -> (adapter scale, IdentityNet scale): the table above, interpolated linearly.
_TABLE_WEIGHTS = (0.0, 0.33, 0.99, 1.66, 2.0)
_TABLE_ADAPTER = (0.0, 0.40, 0.80, 1.00, 1.20)
_TABLE_IDENTITYNET = (0.0, 0.30, 0.80, 1.00, 1.20)


def character_scales(weight: float) -> tuple[float, float]:
    """(adapter scale, IdentityNet scale) for a Character Reference weight 0-2."""
    return (float(np.interp(weight, _TABLE_WEIGHTS, _TABLE_ADAPTER)),
            float(np.interp(weight, _TABLE_WEIGHTS, _TABLE_IDENTITYNET)))


class CharacterReference(BaseModel):
    """The Character Reference of a request: a saved character by name, or 1-5 photos of one person."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    name: Optional[str] = Field(default=None, min_length=1, max_length=64)
    images: list[Union[str, Path, Image.Image]] = Field(default_factory=list, max_length=5)
    weight: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    strength_type: Optional[CharacterStrength] = None
    adapter: IdentityAdapterName = "instantid"
    face_index: Optional[int] = Field(default=None, ge=0, le=63)  # which face of each photo; None: the largest
    pose_image: Optional[Union[str, Path, Image.Image]] = None  # InstantID: face position/orientation from here
    keep: Optional[CharacterParts] = None  # None: the saved character's default, else "face" (today's behaviour)
    mask: Optional[Union[str, Path, Image.Image]] = None  # greyscale over the first photo, white = carried
    mask_mode: Literal["replace", "add", "subtract"] = "replace"  # the mask replaces keep's parts, or adjusts them

    @model_validator(mode="after")
    def _consistent(self) -> "CharacterReference":
        check_one_strength(self.weight, self.strength_type)
        if (self.name is None) == (not self.images):
            raise ValueError("a character reference needs a saved character `name` or `images` (one or the other)")
        if self.face_index is not None and self.name is not None:
            raise ValueError("face_index picks a face in `images`; a saved character's anchors are used as stored")
        if self.pose_image is not None and self.adapter != "instantid":
            raise ValueError("pose_image steers InstantID's keypoints; the faceid adapter has none")
        if self.mask is not None and self.keep == "face":
            raise ValueError("a character mask selects what is carried besides the face: it needs keep other than 'face'")
        if self.mask_mode != "replace" and (self.mask is None or self.keep in (None, "face")):
            raise ValueError(f"mask_mode={self.mask_mode!r} adjusts keep's parts with a mask: it needs both a mask and "
                             "keep face+hair, face+hair+outfit or all")
        return self

    @property
    def scale(self) -> float:
        """The weight 0-2 this reference runs at."""
        return bucket_weight(self.weight, self.strength_type, CHARACTER_WEIGHTS, DEFAULT_CHARACTER_WEIGHT)
