"""Presets (named bundles of prompt styling and sampling defaults) and the fast/quality modes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import paths
from .errors import PresetError
from .images import write_atomic

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Mode = Literal["fast", "quality", "ultra"]


class ModeSettings(BaseModel):
    """What the modes mean.

    fast: one pass. quality: more steps plus a refine pass: the image is upsampled (bicubic) and
    denoised again lightly (img2img), the local counterpart of Leonardo's Alchemy. ultra: the
    image is upscaled with ESRGAN, then refined the same way, in overlapping tiles of the model's
    native size when it is larger (Leonardo's Ultra Upscaler: detail added, not interpolated).
    """

    model_config = ConfigDict(frozen=True)
    steps: int
    refine_scale: float = 1.0  # output side / base side; 1.0 = no refine pass
    refine_denoise: float = 0.0
    refine_upsampler: Literal["bicubic", "esrgan"] = "bicubic"


MODES: dict[str, ModeSettings] = {
    "fast": ModeSettings(steps=20),
    "quality": ModeSettings(steps=40, refine_scale=1.5, refine_denoise=0.35),
    "ultra": ModeSettings(steps=30, refine_scale=2.0, refine_denoise=0.3, refine_upsampler="esrgan"),
}

DEFAULT_GUIDANCE = 7.0


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    prompt_template: str = "{prompt}"
    identity_anchor: str = ""
    style_tokens: str = ""
    camera_tokens: str = ""
    negative_prompt: str = ""
    scheduler: Optional[str] = None
    steps: Optional[int] = Field(default=None, ge=1, le=150)
    guidance_scale: Optional[float] = Field(default=None, ge=1, le=20)
    mode: Optional[Mode] = None
    aspect_ratio: Optional[str] = None

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("prompt_template must contain {prompt}")
        return value

    def compose_prompt(self, prompt: str) -> str:
        """Seed 001's canonical order: identity anchor, the templated prompt, style, camera."""
        body = self.prompt_template.replace("{prompt}", prompt.strip())
        parts = [self.identity_anchor, body, self.style_tokens, self.camera_tokens]
        return ", ".join(part.strip() for part in parts if part.strip())

    def compose_negative(self, negative: Optional[str]) -> Optional[str]:
        parts = [part.strip() for part in (negative or "", self.negative_prompt) if part and part.strip()]
        return ", ".join(parts) if parts else negative


# Leonardo presetStyle values that have no preset of the same name.
_ALIASES = {
    "leonardo": "dynamic", "general": "none", "neutral": "none", "unprocessed": "none",
    "creative": "illustration", "bokeh": "cinematic_closeup", "3d_render": "render_3d",
    "3d": "render_3d", "long_exposure": "photography", "food": "photography", "retro": "film",
}


def normalise_name(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return _ALIASES.get(key, key)


def _read_presets(path: Path) -> dict[str, Preset]:
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PresetError(f"cannot read presets file {path}: {exc}") from exc
    presets = {}
    for name, fields in tables.items():
        try:
            presets[normalise_name(name)] = Preset(name=normalise_name(name), **fields)
        except ValueError as exc:
            raise PresetError(f"preset {name!r} in {path} is invalid: {exc}") from exc
    return presets


def builtin_presets() -> dict[str, Preset]:
    return _read_presets(Path(__file__).with_name("presets") / "builtin.toml")


def user_presets(folder: Optional[Path] = None) -> dict[str, Preset]:
    """User presets: every *.toml in the presets folder (one or more tables per file)."""
    folder = folder or paths.presets_dir()
    presets: dict[str, Preset] = {}
    for file in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        presets.update(_read_presets(file))
    return presets


def all_presets(folder: Optional[Path] = None) -> dict[str, Preset]:
    """Built-in presets, overridden by user presets of the same name."""
    return {**builtin_presets(), **user_presets(folder)}


def get_preset(name: str, folder: Optional[Path] = None) -> Preset:
    presets = all_presets(folder)
    key = normalise_name(name)
    if key not in presets:
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    return presets[key]


def save_user_preset(preset: Preset, folder: Optional[Path] = None) -> Path:
    """Write a preset as <folder>/<name>.toml (atomically)."""
    folder = folder or paths.presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{preset.name}.toml"
    lines = [f"[{preset.name}]"]
    for key, value in preset.model_dump(exclude={"name"}, exclude_none=True).items():
        lines.append(f"{key} = {_toml_value(value)}")
    return write_atomic(target, ("\n".join(lines) + "\n").encode("utf-8"))


def _toml_value(value) -> str:
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return repr(value)
