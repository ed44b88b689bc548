"""Turn a model reference into loaded SDXL components.

A reference is one of: `tiny` (built-in random weights), a manifest name (`sdxl-base`), a
local diffusers folder, a Hugging Face repo id already in the local cache, or a single-file
`.safetensors` checkpoint in the original SDXL layout. Nothing here downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import paths, tiny
from .errors import UnknownModelError, UnsafeWeightsError, WeightsMissingError
from .hashing import cached_sha256

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
SINGLE_FILE_CONFIG_ENTRY = "sdxl-base-config"
FP16_VAE_ENTRY = "sdxl-vae-fp16-fix"


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for provenance: how it was named, where from, and the hash of each file."""

    reference: str
    kind: str  # tiny | manifest | folder | hf-cache | single-file
    location: str
    hashes: dict[str, str] = field(default_factory=dict)
    vae: Optional[str] = None  # the replacement VAE, when one was swapped in
    notice: Optional[str] = None

    @property
    def short_hash(self) -> str:
        """A1111's 'Model hash': the first 10 hex digits of the main weights file."""
        if not self.hashes:
            return ""
        main = next((h for name, h in sorted(self.hashes.items()) if name.startswith("unet")), None)
        return (main or next(iter(sorted(self.hashes.values()))))[:10]


def state_dict_keys(path: Path) -> list[str]:
    """The parameter names in a weights file, without loading the tensors of a safetensors file. Pickles
    (read weights-only; callers check the opt-in first) may nest one level, as IP-Adapter's .bin files do
    ({"image_proj": {...}, "ip_adapter": {...}}): those keys come back joined with "."."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            return list(file.keys())
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        return []
    return [f"{outer}.{inner}" if isinstance(value, dict) else outer
            for outer, value in state.items() for inner in (value if isinstance(value, dict) else [None])]


def check_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeWeightsError(
            f"{path.name} is a pickle-based checkpoint, which can run arbitrary code when loaded. "
            "Use a .safetensors file, or opt in with allow_pickle=True (CLI: --allow-pickle) if you trust its source."
        )


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", *PICKLE_SUFFIXES})


def _refuse_pickle_only_folder(folder: Path, allow_pickle: bool) -> None:
    files = _weight_files(folder)
    if files and not allow_pickle and not any(p.suffix == ".safetensors" for p in files):
        raise UnsafeWeightsError(
            f"{folder} holds only pickle weights ({files[0].name}, ...). Convert them to safetensors, "
            "or opt in with allow_pickle=True (CLI: --allow-pickle)."
        )


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): cached_sha256(p) for p in _weight_files(folder)}


def locate(reference: str, allow_pickle: bool = False) -> tuple[str, Path]:
    """(kind, path) for a model reference, without loading anything."""
    from . import weights

    if reference == "tiny":
        return "tiny", tiny.ensure_tiny_model(paths.cache_dir())
    manifest = weights.Manifest.load()
    if reference in manifest.names():
        return "manifest", weights.require(reference, manifest=manifest)
    path = Path(reference).expanduser()
    if path.is_dir() and (path / "model_index.json").exists():
        _refuse_pickle_only_folder(path, allow_pickle)
        return "folder", path
    if path.is_file():
        check_pickle(path, allow_pickle)
        if path.suffix.lower() not in {".safetensors", *PICKLE_SUFFIXES}:
            raise UnknownModelError(f"{path} is not a checkpoint (.safetensors expected)")
        return "single-file", path
    cached = _hf_cache_snapshot(reference)
    if cached is not None:
        _refuse_pickle_only_folder(cached, allow_pickle)
        return "hf-cache", cached
    raise UnknownModelError(
        f"model {reference!r} is not a manifest name ({', '.join(manifest.names())}), a diffusers folder, "
        "a .safetensors checkpoint, nor a repo id in the local Hugging Face cache. "
        "Fetch weights with `refgen weights fetch NAME`, or use --model tiny for an offline smoke run."
    )


def _hf_cache_snapshot(reference: str) -> Optional[Path]:
    """The local snapshot of a repo id, if it is already in the Hugging Face cache (never downloads)."""
    if reference.count("/") != 1 or Path(reference).exists():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # huggingface_hub reads HF_HUB_CACHE once at import; honour a value set later, too.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = Path(snapshot_download(reference, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return folder if (folder / "model_index.json").exists() else None


def load_pipeline(reference: str, dtype: torch.dtype, allow_pickle: bool = False, single_file_config: Optional[Path] = None):
    """(pipeline container, ModelInfo). The pipeline object only holds components and loader mixins."""
    from diffusers import StableDiffusionXLPipeline

    kind, location = locate(reference, allow_pickle)
    common = {"dtype": dtype, "local_files_only": True}
    if kind == "single-file":
        config = single_file_config or _single_file_config()
        pipe = StableDiffusionXLPipeline.from_single_file(str(location), config=str(config), **common)
        hashes = {location.name: cached_sha256(location)}
    else:
        variant = "fp16" if _has_fp16_variant(location) else None
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(location), variant=variant, use_safetensors=not allow_pickle or None, **common
        )
        hashes = folder_hashes(location)
    notice = tiny.TINY_NOTICE if kind == "tiny" else None
    return pipe, ModelInfo(reference, kind, str(location), hashes, notice=notice)


def _has_fp16_variant(folder: Path) -> bool:
    return any(folder.glob("unet/*.fp16.safetensors"))


def _single_file_config() -> Path:
    """diffusers needs SDXL's configs and tokenizers to assemble a single-file checkpoint offline."""
    from . import weights

    try:
        return weights.require(SINGLE_FILE_CONFIG_ENTRY)
    except WeightsMissingError as exc:
        raise WeightsMissingError(
            SINGLE_FILE_CONFIG_ENTRY, exc.missing,
            hint="Single-file checkpoints need SDXL's config and tokenizer files (a few MB) to be assembled offline",
        ) from None


def fp16_safe_vae(dtype: torch.dtype):
    """The fp16-fix VAE when running in fp16 and it has been fetched; else None (the VAE is upcast instead)."""
    from diffusers import AutoencoderKL

    from . import weights

    if dtype != torch.float16:
        return None, None
    manifest = weights.Manifest.load()
    if FP16_VAE_ENTRY not in manifest.names() or weights.missing_files(manifest.get(FP16_VAE_ENTRY)):
        return None, None
    folder = manifest.get(FP16_VAE_ENTRY).folder()
    return AutoencoderKL.from_pretrained(str(folder), dtype=dtype, local_files_only=True), FP16_VAE_ENTRY


INPAINT_CHANNELS = 9  # an SDXL inpainting UNet's input: latents, mask, masked-image latents


def load_inpaint_unet(reference, device: torch.device, dtype: torch.dtype, manifest=None, weights_dir: Optional[Path] = None):
    """An SDXL inpainting UNet (9 input channels): a manifest name (`sdxl-inpainting`), a diffusers model
    folder with unet/, or a UNet folder."""
    from diffusers import UNet2DConditionModel

    from . import weights

    folder = weights.locate(reference, weights_dir, manifest)
    subfolder = "unet" if (folder / "unet").is_dir() else None
    variant = "fp16" if any((folder / (subfolder or "")).glob("*.fp16.safetensors")) else None
    unet = UNet2DConditionModel.from_pretrained(
        str(folder), subfolder=subfolder, variant=variant, dtype=dtype, use_safetensors=True, local_files_only=True
    )
    if unet.config.in_channels != INPAINT_CHANNELS:
        raise ValueError(f"{reference} is not an inpainting UNet: it has {unet.config.in_channels} input channels, not 9")
    return unet.to(device).eval()


def configure_attention(pipe, attention: str, device: torch.device) -> None:
    """SDPA is diffusers' default; xformers when asked for (or 'auto' on CUDA with xformers installed)."""
    if attention not in {"auto", "sdpa", "xformers"}:
        raise ValueError(f"attention must be auto, sdpa or xformers, not {attention!r}")
    wants_xformers = attention == "xformers" or (attention == "auto" and device.type == "cuda" and _has_xformers())
    if wants_xformers:
        if not _has_xformers():
            raise ValueError("attention='xformers' but xformers is not installed (pip install 'refgen[xformers]')")
        pipe.enable_xformers_memory_efficient_attention()


def _has_xformers() -> bool:
    from importlib.util import find_spec

    return find_spec("xformers") is not None
