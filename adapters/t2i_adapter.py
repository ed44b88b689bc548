"""T2I-Adapter image guidance: TencentARC's SDXL adapters (canny, lineart, sketch, depth-midas, openpose).

A T2I-Adapter is a small network (~79M parameters for SDXL, against ~1.25B for an SDXL ControlNet) that turns a
control picture into four feature maps, added inside the UNet's down blocks (diffusers'
`down_intrablock_additional_residuals`). The features depend on the picture only, not on the latents or the
step, so they are computed once per pass, not at every step: the fast control path.

A unit is a `T2IAdapterUnit {type, image, weight 0-2, start, end, preprocess, fit}`, like a ControlNet unit
(same preprocessors, fit modes, provenance and replay). Against diffusers' `StableDiffusionXLAdapterPipeline`:
- `weight` is `adapter_conditioning_scale`: the features are multiplied by it (0 == no unit, exactly);
- `end` is `adapter_conditioning_factor`: step i of n runs while (i+1)/n <= end, which is the pipeline's
  `i < int(n * factor)` (counted without its float rounding); `start` (not in diffusers) skips the first
  steps the same way a ControlNet window does.
Several units (and ControlNets, and IdentityNet) combine in one UNet call: their features are summed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from engine.adapter import Frame
from engine.conditioning import Guidance
from engine.request_types import T2IAdapterUnit, active_at, normalise_type, t2i_adapter_type

from .controlnet import ControlError, ImageUnits, control_tensor

# The published SDXL T2I-Adapters in weights/manifest.toml, by the control type that feeds them.
DEFAULT_MODELS = {
    "canny": "t2i-adapter-canny-sdxl",
    "lineart": "t2i-adapter-lineart-sdxl",
    "scribble": "t2i-adapter-sketch-sdxl",
    "depth": "t2i-adapter-depth-midas-sdxl",
    "pose": "t2i-adapter-openpose-sdxl",
}
RESIDUALS = "down_intrablock_additional_residuals"  # the UNet keyword T2I-Adapter features go to


class T2IAdapterError(ControlError):
    """A T2I-Adapter that cannot be served: a folder that holds no T2IAdapter, a size it cannot take."""


class T2IAdapterLibrary:
    """The T2I-Adapters an engine can use by type: manifest names by default (fetched with `refgen weights
    fetch`, or the tiny model's stand-ins with `manifest` / `weights_dir`), your own folders by `register`.
    Each is loaded on first use and kept."""

    def __init__(self, device: torch.device, dtype: torch.dtype, references: Optional[dict[str, Union[str, Path]]] = None,
                 *, manifest=None, weights_dir: Optional[Path] = None):
        self._device, self._dtype = device, dtype
        self._manifest, self._weights_dir = manifest, weights_dir
        self._references: dict[str, Union[str, Path, torch.nn.Module]] = dict(DEFAULT_MODELS)
        self._loaded: dict[str, torch.nn.Module] = {}
        for adapter_type, reference in (references or {}).items():
            self.register(adapter_type, reference)

    def register(self, adapter_type: str, reference: Union[str, Path, torch.nn.Module]) -> None:
        """Serve `adapter_type` with a diffusers T2IAdapter folder (checked now), a manifest name or a loaded model."""
        key = t2i_adapter_type(adapter_type)
        if isinstance(reference, (str, Path)) and Path(reference).expanduser().is_dir():
            check_folder(Path(reference).expanduser())
        self._references[key] = reference
        self._loaded.pop(key, None)

    def model(self, adapter_type: str) -> torch.nn.Module:
        key = normalise_type(adapter_type)
        if key not in self._loaded:
            reference = self._references[key]
            if isinstance(reference, torch.nn.Module):
                self._loaded[key] = reference.to(self._device, self._dtype).eval()
            else:
                self._loaded[key] = load_t2i_adapter(reference, self._dtype, self._weights_dir, self._manifest).to(self._device)
        return self._loaded[key]


def check_folder(folder: Path) -> None:
    """A folder given as a T2I-Adapter must hold diffusers' T2IAdapter config (fails when given, not when used)."""
    try:
        class_name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise T2IAdapterError(f"{folder} has no readable config.json ({exc}): not a diffusers T2I-Adapter folder") from None
    if class_name != "T2IAdapter":
        raise T2IAdapterError(f"{folder} holds a {class_name or 'model without _class_name'} config, not a T2IAdapter")


def load_t2i_adapter(reference: Union[str, Path], dtype: torch.dtype, weights_dir=None, manifest=None) -> torch.nn.Module:
    """A folder or manifest name -> diffusers' T2IAdapter, safetensors only (the fp16 variant when that is what is there)."""
    from diffusers import T2IAdapter

    from engine import weights

    folder = weights.locate(reference, weights_dir, manifest)
    variant = "fp16" if any(folder.glob("*.fp16.safetensors")) else None
    return T2IAdapter.from_pretrained(str(folder), dtype=dtype, variant=variant, use_safetensors=True,
                                      local_files_only=True).eval()


@dataclass(frozen=True)
class ReadyAdapter:
    """One unit's features, scaled by its weight and batched like the latents (both CFG halves)."""

    features: tuple[torch.Tensor, ...]
    weight: float
    start: float
    end: float


def adapter_features(model, unit: T2IAdapterUnit, frame: Frame) -> ReadyAdapter:
    """The adapter run once on the unit's picture fitted to the frame; as diffusers' adapter pipeline does: one
    image through the adapter, features times the weight, repeated over the images and the CFG halves."""
    step = model.total_downscale_factor
    if frame.width % step or frame.height % step:
        raise T2IAdapterError(f"T2I-Adapters need sides that are multiples of {step} px; this pass is "
                              f"{frame.width}x{frame.height}")
    pixels = control_tensor(unit.image, frame.width, frame.height, unit.fit, 1, model)
    rows = frame.batch * (2 if frame.guided else 1)
    with torch.inference_mode():
        features = tuple((feature * unit.weight).repeat(rows, 1, 1, 1) for feature in model(pixels))
    return ReadyAdapter(features, unit.weight, unit.start, unit.end)


class AdapterGuidance(Guidance):
    """The summed features of the units active at a step (engine Contribution)."""

    def __init__(self, ready: list[ReadyAdapter]):
        self._ready = ready

    def unet_kwargs(self, latent_input, timestep, step: int, total: int, cond) -> dict:
        active = [unit.features for unit in self._ready if active_at(unit.weight, unit.start, unit.end, step, total)]
        if not active:
            return {}  # exactly "no unit"
        # A new list of new tensors every step: the UNet pops the list as it consumes it.
        return {RESIDUALS: [sum(parts) for parts in zip(*active)]}


class T2IAdapters(ImageUnits):
    """T2I-Adapter units, an Adapter (engine/adapter.py): preprocessed, recorded and replayed like ControlNet units;
    each pass runs each unit's adapter once, and its features join every step inside its window."""

    field = "t2i_adapters"
    unit = T2IAdapterUnit
    what = "adapter image"
    library: T2IAdapterLibrary

    def guidance(self, units: list[T2IAdapterUnit], frame: Frame) -> Guidance:
        return AdapterGuidance([adapter_features(self.library.model(unit.type), unit, frame) for unit in units])
