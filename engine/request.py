"""What a user asks for (GenerationRequest) and what the engine will actually run (ResolvedRequest)."""

from __future__ import annotations

import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .request_types import CharacterReference, ControlUnit, Reference, T2IAdapterUnit

from . import presets as preset_lib
from . import schedulers
from .presets import MODES, Mode, ModeSettings
from .sizes import parse_ratio, size_for_ratio, size_for_shape

MAX_SEED = 2**53 - 1  # survives JSON round trips in every language
MAX_SIDE = 4096


class LoraSpec(BaseModel):
    """One LoRA file (diffusers or kohya layout) and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    weight: float = Field(default=1.0, ge=-4.0, le=4.0)

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """'path/to/file.safetensors:0.8' (weight optional) -> LoraSpec."""
        path, sep, weight = text.rpartition(":")
        if sep and path and is_number(weight):
            return cls(path=path, weight=float(weight))
        return cls(path=text)


def default_upscaler(scale: int) -> str:
    """The ESRGAN model for a scale when none is named (upscale=, ultra mode, the CLI, the API):
    Real-ESRGAN x2plus / x4plus from weights/manifest.toml."""
    return f"realesrgan-x{scale}plus"


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class GenerationRequest(BaseModel):
    """One generation request. Unset fields come from the preset, then the mode, then defaults."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: Optional[str] = Field(default=None, max_length=10_000)
    width: Optional[int] = Field(default=None, ge=64, le=MAX_SIDE)
    height: Optional[int] = Field(default=None, ge=64, le=MAX_SIDE)
    aspect_ratio: Optional[str] = None
    num_images: int = Field(default=1, ge=1, le=8)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED - 8)
    steps: Optional[int] = Field(default=None, ge=1, le=150)
    guidance_scale: Optional[float] = Field(default=None, ge=1.0, le=20.0)
    # Less work, opt-in: guidance stops after step int(steps x cutoff) (0-based) of each pass, as diffusers'
    # SDXLCFGCutoffCallback; the later steps run the UNet on the conditional half only (0.4 of 30 steps: 13
    # guided, 17 at half the UNet rows). Changes the image; recorded, replayed.
    guidance_cutoff: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    # Less work, opt-in: DeepCache-style feature reuse (adapters/deep_cache.py): the UNet runs whole on every
    # `deep_cache`-th call and only its outer blocks in between, reusing the deep features. Changes the image.
    deep_cache: Optional[int] = Field(default=None, ge=2, le=10)
    scheduler: Optional[str] = None
    mode: Optional[Mode] = None
    preset: Optional[str] = None
    init_image: Optional[Union[str, Path, Image.Image]] = None
    init_strength: Optional[float] = Field(default=None, ge=0.1, le=0.9)
    mask_image: Optional[Union[str, Path, Image.Image]] = None  # inpainting: white = repaint
    mask_feather: int = Field(default=4, ge=0, le=64)  # px of soft seam, inside the mask only
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16)
    controlnets: list[ControlUnit] = Field(default_factory=list, max_length=8)
    t2i_adapters: list[T2IAdapterUnit] = Field(default_factory=list, max_length=8)  # features computed once, not per step
    references: list[Reference] = Field(default_factory=list, max_length=8)  # Style / Content Reference
    character: Optional[CharacterReference] = None  # Character Reference: a saved character or photos
    best_of: Optional[int] = Field(default=None, ge=2, le=8)  # character requests: make N, rank by identity score
    upscale: Optional[Literal[2, 4]] = None  # ESRGAN after generation (ultra mode refines instead)
    upscaler: Optional[str] = None  # ESRGAN model for upscale/ultra (default: realesrgan-x{2,4}plus)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _valid_ratio(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parse_ratio(value)
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else schedulers.canonical_name(value)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        try:
            return preset_lib.get_preset(value).name
        except preset_lib.PresetError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_strings(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [LoraSpec.parse(item) if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationRequest":
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height: give both or neither")
        if self.width is not None and self.aspect_ratio is not None:
            raise ValueError("aspect_ratio conflicts with width/height: give one or the other")
        if self.init_strength is not None and self.init_image is None:
            raise ValueError("init_strength needs an init_image")
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("mask_image needs an init_image (the picture to inpaint)")
        if self.best_of is not None and self.character is None:
            raise ValueError("best_of ranks images by their likeness to a character: give a character reference")
        if self.best_of is not None and self.num_images != 1:
            raise ValueError("best_of=N makes N images and returns them ranked; leave num_images at 1")
        return self


class ResolvedRequest(BaseModel):
    """Every value the engine runs with, after presets, mode and defaults. Recorded in provenance."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: Optional[str]
    width: int
    height: int
    seeds: list[int]
    steps: int
    guidance_scale: float
    scheduler: str
    mode: Mode
    guidance_cutoff: Optional[float] = None
    deep_cache: Optional[int] = None  # filled by the DeepCache adapter's record()
    preset: Optional[str]
    init_strength: Optional[float]
    refine_scale: float
    refine_denoise: float
    refine_upsampler: str = "bicubic"
    upscale: Optional[int] = None
    upscaler: Optional[str] = None
    mask_feather: int = 0
    loras: list[LoraSpec]
    controlnets: list[dict] = Field(default_factory=list)  # units with image identities, see Engine
    t2i_adapters: list[dict] = Field(default_factory=list)  # T2I-Adapter units with image identities
    mask_image: Optional[dict] = None  # the inpainting mask's identity (path, sha256)
    references: list[dict] = Field(default_factory=list)  # style/content references with image identities
    character: Optional[dict] = None  # the Character Reference with its images' identities, see Engine
    character_appearance: Optional[dict] = None  # what it carries besides the face (adapters/appearance.py)
    ranked: bool = False  # best_of: images are returned ranked by identity score

    @property
    def denoise(self) -> float:
        """Leonardo's init_strength is closeness to the init image; the sampler wants its opposite,
        taken in decimal: in binary 1 - 0.9 is 0.09999999999999998, which runs 1 step of 20, not 2."""
        if self.init_strength is None:
            return 1.0
        return float(Decimal(1) - Decimal(repr(self.init_strength)))

    @property
    def refined_size(self) -> tuple[int, int]:
        """Size after the refine pass (quality/ultra), before any plain `upscale`."""
        if self.refine_scale == 1.0:
            return self.width, self.height
        return _refined_side(self.width, self.refine_scale), _refined_side(self.height, self.refine_scale)

    @property
    def output_size(self) -> tuple[int, int]:
        width, height = self.refined_size
        return width * (self.upscale or 1), height * (self.upscale or 1)


def _refined_side(side: int, scale: float) -> int:
    return int(round(side * scale / 8)) * 8


def resolve(request: GenerationRequest, native_size: int = 1024, init_size: Optional[tuple[int, int]] = None,
            prepared: Sequence = ()) -> ResolvedRequest:
    """Fill every unset field: request > preset > mode > engine defaults.

    `native_size` is the model's native square side (1024 for SDXL); `init_size` the init
    image's size, used when the request gives no size so img2img keeps the image's shape.
    `prepared`: the request's prepared adapters (engine/adapter.py), which record their inputs and may lead
    the prompt (a character's identity text).
    """
    preset = preset_lib.get_preset(request.preset) if request.preset else preset_lib.Preset(name="none")
    prompt = preset.compose_prompt(request.prompt)
    for part in prepared:
        prompt = part.prompt(prompt)
    inputs = {key: value for part in prepared for key, value in part.record().items()}
    mode = request.mode or preset.mode or "fast"
    settings: ModeSettings = MODES[mode]
    refines = settings.refine_scale != 1.0 and request.mask_image is None  # inpainting keeps the image's size
    width, height = _resolve_size(request, preset, native_size, init_size)
    base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    return ResolvedRequest(
        prompt=prompt,
        negative_prompt=preset.compose_negative(request.negative_prompt),
        width=width,
        height=height,
        seeds=[base_seed + index for index in range(request.best_of or request.num_images)],
        steps=request.steps or preset.steps or settings.steps,
        guidance_scale=request.guidance_scale or preset.guidance_scale or preset_lib.DEFAULT_GUIDANCE,
        guidance_cutoff=request.guidance_cutoff,
        scheduler=schedulers.canonical_name(request.scheduler or preset.scheduler or schedulers.DEFAULT_SCHEDULER),
        mode=mode,
        preset=request.preset,
        init_strength=_init_strength(request),
        refine_scale=settings.refine_scale if refines else 1.0,
        refine_denoise=settings.refine_denoise if refines else 0.0,
        refine_upsampler=settings.refine_upsampler if refines else "bicubic",
        upscale=request.upscale,
        upscaler=request.upscaler,
        mask_feather=request.mask_feather if request.mask_image is not None else 0,
        loras=list(request.loras),
        ranked=request.best_of is not None,
        **inputs,
    )


def _init_strength(request: GenerationRequest) -> Optional[float]:
    """img2img defaults to 0.5; inpainting repaints the masked region from scratch unless told otherwise."""
    if request.init_image is None or (request.mask_image is not None and request.init_strength is None):
        return None
    return request.init_strength or 0.5


def _resolve_size(request, preset, native_size, init_size) -> tuple[int, int]:
    if request.width is not None:
        return request.width, request.height
    if request.mask_image is not None and init_size is not None:
        # Inpainting edits the picture in place: keep its size (the VAE needs multiples of 8).
        return max(64, init_size[0] // 8 * 8), max(64, init_size[1] // 8 * 8)
    ratio = request.aspect_ratio or preset.aspect_ratio
    if ratio is None and init_size is not None:
        return size_for_shape(*init_size, native_size)  # img2img keeps the init image's shape, as near as SDXL can
    return size_for_ratio(ratio or "1:1", native_size)
