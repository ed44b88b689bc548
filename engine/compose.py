"""The one place of the core that names concrete adapters: the Engine's default adapter list.

Adding a kind of guidance = its file in adapters/ (an Adapter, engine/adapter.py) and a line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from adapters.appearance import CharacterAppearance
from adapters.controlnet import ControlNetLibrary, ControlNets
from adapters.deep_cache import DeepCache
from adapters.faces import FaceAnalyzer
from adapters.identity import CharacterReferences, FaceIDPlusV2, InstantID
from adapters.inpaint import Inpainting
from adapters.ip_adapter import IPAdapters, StyleContentReferences
from adapters.preprocess import Preprocessors
from adapters.t2i_adapter import T2IAdapterLibrary, T2IAdapters
from adapters.upscale import Upscaler

from . import paths
from .adapter import Adapter
from .speed import Speed, prepare_module
from .tiny.components import components_dir, components_manifest


@dataclass(frozen=True)
class Setup:
    """What adapters are built from: the loaded pipeline, and where they look up the components they name
    (ControlNets, IP-Adapters, face packs, preprocessors, upscalers); default weights/manifest.toml and folder."""

    pipe: Any
    device: torch.device
    dtype: torch.dtype
    allow_pickle: bool = False
    manifest: Any = None
    weights_dir: Optional[Path] = None
    speed: Speed = field(default_factory=Speed)  # models an adapter loads run like the UNet (compiled ControlNets with a compiled UNet)


AdapterFactory = Callable[[Setup], list[Adapter]]


def default_adapters(setup: Setup, *, ip_adapter: str = "vit-h", controlnets: Optional[ControlNetLibrary] = None,
                     ip_adapters: Optional[IPAdapters] = None, t2i_adapters: Optional[T2IAdapterLibrary] = None,
                     instantid: Union[str, Path, None] = None, faceid: Union[str, Path, None] = None, store=None,
                     analyzers: Optional[dict[str, FaceAnalyzer]] = None) -> list[Adapter]:
    """Every kind of guidance, in the order they take part: inpainting checks its mask before any slow
    preprocessing; the character is IP-Adapter instance 0 (adapters/identity.py FACEID_LORA), so it comes
    before the style/content references. Keyword arguments replace one part (tests, benchmarks)."""
    sources = {"manifest": setup.manifest, "weights_dir": setup.weights_dir}
    ip = ip_adapters or IPAdapters(setup.pipe, setup.device, setup.dtype, variant=ip_adapter,
                                   allow_pickle=setup.allow_pickle, **sources)
    library = controlnets or ControlNetLibrary(setup.device, setup.dtype, speed=setup.speed, **sources)
    preprocessors = Preprocessors(setup.weights_dir, device=setup.device, manifest=setup.manifest, allow_pickle=setup.allow_pickle)
    faces = [InstantID(ip, setup.device, setup.dtype, instantid, speed=setup.speed, **sources),
             FaceIDPlusV2(ip, setup.device, setup.dtype, faceid, **sources)]
    return [
        Inpainting(),
        ControlNets(library, preprocessors),
        T2IAdapters(t2i_adapters or T2IAdapterLibrary(setup.device, setup.dtype, **sources), preprocessors),
        CharacterReferences(faces, setup.device, store=store, analyzers=analyzers, **sources),
        CharacterAppearance(ip, setup.device, store=store, **sources),
        StyleContentReferences(ip),
        DeepCache(setup.speed),  # last: it wraps whichever UNet the adapters before it chose (inpainting)
    ]


def defaults(device: torch.device, dtype: torch.dtype, *, ip_adapter: str = "vit-h",
             controlnets: Optional[dict[str, Union[str, Path]]] = None, manifest=None,
             weights_dir: Optional[Path] = None, speed: Optional[Speed] = None) -> AdapterFactory:
    """default_adapters with the user's own ControlNet folders, checked now (before the model loads)."""
    library = ControlNetLibrary(device, dtype, dict(controlnets or {}), manifest=manifest, weights_dir=weights_dir, speed=speed)
    return partial(default_adapters, ip_adapter=ip_adapter, controlnets=library)


def upscaler_loader(setup: Setup) -> Callable[[str], Upscaler]:
    """ESRGAN models by reference, for upscale= and ultra mode, compiled like the UNet when the engine is."""
    def load(reference: str) -> Upscaler:
        upscaler = Upscaler.load(reference, device=setup.device, manifest=setup.manifest, weights_dir=setup.weights_dir)
        prepare_module(upscaler.descriptor.model, setup.speed)
        return upscaler
    return load


def component_sources(model: str) -> dict:
    """Where a model's other components come from: the tiny model's stand-ins for `tiny` (built offline on
    first use, beside it in the cache), else the weights manifest and folder."""
    if model != "tiny":
        return {"manifest": None, "weights_dir": None}
    return {"manifest": components_manifest(), "weights_dir": components_dir(paths.cache_dir())}


def face_locator(device: str = "cpu", pack: str = "antelopev2") -> Optional[Callable[[Any], Optional[tuple]]]:
    """For training's face-aware crop: image -> the largest face's (x1, y1, x2, y2), or None when it has no
    face. None instead of a locator when the face models are not installed (training then centre-crops)."""
    from .errors import WeightsMissingError

    try:
        analyzer = FaceAnalyzer.load(pack, device=device)
    except WeightsMissingError:
        return None

    def largest_face(image) -> Optional[tuple]:
        faces = analyzer.analyze_all(image, what="training image")
        return tuple(float(v) for v in faces[0].bbox) if faces else None

    return largest_face


def character_trigger(name: str) -> tuple[str, str]:
    """For training from a saved character: (its stored name, its identity anchor, or the name when it has none)."""
    from adapters.characters import CharacterStore

    character = CharacterStore().get(name)
    return character.name, character.anchor or character.name


def link_character_lora(name: str, lora: str) -> None:
    """Point the character's profile at its LoRA in the LoRA library."""
    from adapters.characters import CharacterStore

    CharacterStore().set_lora(name, lora)
