"""The tiny model's stand-in components as a weights manifest, each with the recipe that builds it.

`engine.weights.require` runs a recipe on first use under `components_dir(cache)`; the engine then loads
the files through the same loaders as fetched weights (Engine.load("tiny") passes this manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..weights import Manifest, ManifestEntry, WeightFile
from . import (adapters, annotators, build_tiny_unet, face_parsing, faces, save_tiny_controlnet, save_tiny_inpaint_unet, save_tiny_realesrgan,
               save_tiny_union_promax)

COMPONENTS_FOLDER = "tiny-sdxl-components-v1"  # bump when a recipe changes what it writes
COMPONENTS_NOTICE = "random-weight stand-in of the tiny model (smoke runs only)"


def components_dir(cache_dir: Path) -> Path:
    """Where the tiny model's stand-in components are built, beside the tiny model itself."""
    return Path(cache_dir) / COMPONENTS_FOLDER


def _with_unet(save: Callable, **options) -> Callable[[Path], object]:
    """A recipe that needs the tiny model's UNet (ControlNets and adapters are shaped by it)."""
    return lambda folder: save(build_tiny_unet(0), folder, **options)


def _components() -> list[tuple[str, str, str, tuple[str, ...], Callable[[Path], object]]]:
    """(manifest name, kind, local_dir, files, recipe) of every stand-in; names and folders as in
    weights/manifest.toml, files in the layout the engine's loaders read."""
    controlnet = ("config.json", "diffusion_pytorch_model.safetensors")
    return [
        ("controlnet-canny-sdxl", "controlnet", "controlnet-canny-sdxl", controlnet, _with_unet(save_tiny_controlnet, seed=10)),
        ("controlnet-depth-sdxl", "controlnet", "controlnet-depth-sdxl", controlnet, _with_unet(save_tiny_controlnet, seed=11)),
        ("controlnet-openpose-sdxl", "controlnet", "controlnet-openpose-sdxl", controlnet, _with_unet(save_tiny_controlnet, seed=12)),
        ("controlnet-union-sdxl", "controlnet", "controlnet-union-sdxl",
         ("config_promax.json", "diffusion_pytorch_model_promax.safetensors"), save_tiny_union_promax),
        ("sdxl-inpainting", "unet", "sdxl-inpainting", ("unet/config.json", "unet/diffusion_pytorch_model.safetensors"),
         save_tiny_inpaint_unet),
        ("realesrgan-x4plus", "upscaler", "realesrgan", ("RealESRGAN_x4plus.safetensors",), partial(save_tiny_realesrgan, scale=4)),
        ("realesrgan-x2plus", "upscaler", "realesrgan", ("RealESRGAN_x2plus.safetensors",), partial(save_tiny_realesrgan, scale=2)),
        ("ip-adapter-sdxl", "ip-adapter", "ip-adapter", adapters.IP_ADAPTER_FILES, _with_unet(adapters.save_tiny_ip_adapters)),
        ("ip-adapter-faceid-plusv2-sdxl", "ip-adapter", "ip-adapter-faceid", (adapters.FACEID_WEIGHT_NAME,),
         _with_unet(adapters.save_tiny_faceid)),
        ("instantid", "instantid", "instantid", adapters.INSTANTID_FILES, _with_unet(adapters.save_tiny_instantid_folder)),
        *[(f"t2i-adapter-{name}-sdxl", "t2i-adapter", f"t2i-adapter-{name}-sdxl", adapters.T2I_ADAPTER_FILES,
           _with_unet(adapters.save_tiny_t2i_adapter, seed=seed)) for seed, name in enumerate(adapters.T2I_ADAPTER_NAMES, 40)],
        ("insightface-antelopev2", "face-analysis", "insightface/models/antelopev2", faces.ANTELOPEV2_FILES,
         partial(faces.save_tiny_pack, files=faces.ANTELOPEV2_FILES)),
        ("insightface-buffalo-l", "face-analysis", "insightface", faces.BUFFALO_L_FILES,
         partial(faces.save_tiny_pack, files=faces.BUFFALO_L_FILES, seed=1)),
        ("face-parsing", "face-parsing", "face-parsing", ("config.json", "model.safetensors", "preprocessor_config.json"),
         face_parsing.save_tiny_face_parser),
        ("depth-anything-v2-small", "depth-estimator", "depth-anything-v2-small", annotators.DEPTH_FILES,
         annotators.save_tiny_depth_model),
        ("annotators-openpose", "annotator", "annotators-openpose", annotators.OPENPOSE_FILES, annotators.save_openpose),
        ("annotators-hed", "annotator", "annotators-hed", ("ControlNetHED.pth",), annotators.save_hed_folder),
        ("annotators-lineart", "annotator", "annotators-lineart", annotators.LINEART_FILES, annotators.save_lineart_folder),
    ]


def components_manifest() -> Manifest:
    """The stand-ins as a weights manifest: pass it, with `components_dir(cache)`, wherever a loader
    takes `manifest=` / `weights_dir=`, and each component is built on its first `require`."""
    return Manifest(entries=tuple(
        ManifestEntry(name=name, kind=kind, description=COMPONENTS_NOTICE, repo="refgen/tiny", revision="built-in",
                      license="Apache-2.0", local_dir=local_dir, files=tuple(WeightFile(path=f) for f in files), build=recipe)
        for name, kind, local_dir, files, recipe in _components()
    ))
