"""Provenance: what made an image, written into the PNG itself, and read back for replay.

Two text chunks: `refgen` (JSON, complete and replayable) and `parameters` (the A1111 string
that common prompt readers understand).
"""

from __future__ import annotations

import io
import json
import platform
import warnings
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image, PngImagePlugin

from .errors import ProvenanceError
from .hashing import sha256_file
from .images import load_rgb, pixel_digest, write_atomic
from .schedulers import SCHEDULERS

FORMAT_VERSION = 1
_PACKAGES = ("refgen", "torch", "diffusers", "transformers", "accelerate", "safetensors", "peft")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text A1111, ComfyUI readers, Civitai and others parse."""
    resolved, image = meta["resolved"], meta["image"]
    lines = [resolved["prompt"]]
    if resolved.get("negative_prompt"):
        lines.append(f"Negative prompt: {resolved['negative_prompt']}")
    fields = {
        "Steps": resolved["steps"],
        "Sampler": SCHEDULERS[resolved["scheduler"]].label,
        "CFG scale": resolved["guidance_scale"],
        "Seed": image["seed"],
        "Size": f"{image['width']}x{image['height']}",
        "Model hash": meta["model"].get("short_hash") or None,
        "Model": meta["model"]["reference"],
        "Denoising strength": round(1 - resolved["init_strength"], 3) if resolved.get("init_strength") else None,
        "Lora hashes": ", ".join(f"{Path(l['path']).stem}: {l['sha256'][:12]}" for l in meta["loras"]) or None,
        "Version": f"refgen {meta['versions'].get('refgen', '?')}",
    }
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def _quoted(value) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text) and not text.startswith("refgen") else text


def build_metadata(
    *,
    request: dict,
    resolved: dict,
    index: int,
    size: tuple[int, int],
    model: dict,
    loras: list[dict],
    init_image: Optional[dict],
    scheduler: dict,
    device: dict,
    versions: dict,
) -> dict:
    """One image's provenance record. Everything replay needs is in `resolved`, `model` and `init_image`."""
    return {
        "format": FORMAT_VERSION,
        "request": request,
        "resolved": resolved,
        "image": {"index": index, "seed": resolved["seeds"][index], "width": size[0], "height": size[1]},
        "model": model,
        "loras": loras,
        "init_image": init_image,
        "scheduler": scheduler,
        "device": device,
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def png_bytes(image: Image.Image, meta: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("refgen", json.dumps(meta, sort_keys=True))
    info.add_text("parameters", a1111_parameters(meta))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, meta: dict, path: Path) -> Path:
    """Write the PNG with its provenance atomically (never a partial file under the final name)."""
    return write_atomic(Path(path), png_bytes(image, meta))


def read_metadata(path: Path) -> dict:
    """The `refgen` record of a PNG. Raises ProvenanceError for anything else, a decompression bomb included."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # `.text` would decode every pixel
            with Image.open(path) as image:
                text = image.text.get("refgen") if hasattr(image, "text") else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProvenanceError(f"cannot read {path}: too large to open safely ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise ProvenanceError(f"cannot read {path}: {exc}") from exc
    if not text:
        raise ProvenanceError(f"{path} has no refgen metadata (was it made by refgen, or re-saved by an editor?)")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ProvenanceError(f"{path} has damaged refgen metadata: {exc}") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise ProvenanceError(f"{path} uses metadata format {meta.get('format')}; this refgen reads {FORMAT_VERSION}")
    return meta


# -- records of the inputs, and the way back from them ----------------------------------------------


def request_record(request) -> dict:
    """The request as given, JSON-safe: every image input (of any field, any adapter's units) becomes its
    path, or a marker when it was given in memory."""
    return _labelled(request.model_dump(mode="python"))


def _labelled(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _labelled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_labelled(item) for item in value]
    if isinstance(value, (Image.Image, Path)):
        return source_label(value)
    return value


def source_label(source: Any) -> Optional[str]:
    if source is None:
        return None
    return str(source) if isinstance(source, (str, Path)) else "<in-memory image>"


def image_record(source: Any, image: Optional[Image.Image]) -> Optional[dict]:
    """Where an input image came from and the hash of the file (or of its pixels, in memory)."""
    if image is None:
        return None
    if isinstance(source, (str, Path)):
        return {"path": str(Path(source).resolve()), "sha256": sha256_file(Path(source))}
    return {"path": None, "sha256": pixel_digest(image), "hash_of": "rgb pixels and size"}


def input_record(item, image: Image.Image) -> dict:
    """An image input (control unit, reference) as provenance: its settings and its image's identity."""
    return {**item.model_dump(mode="json", exclude={"image"}), "image": image_record(item.image, image)}


def replay_image(info: dict, what: str, override: Optional[Union[str, Path]] = None) -> Image.Image:
    """An input image named in provenance, checked against its recorded hash."""
    return replay_input(info, what, override)[0]


def replay_input(info: dict, what: str, override: Optional[Union[str, Path]] = None) -> tuple[Image.Image, dict]:
    """replay_image, and the record with the path it was found at."""
    path = Path(override) if override else (Path(info["path"]) if info.get("path") else None)
    if path is None or not path.is_file():
        raise ProvenanceError(
            f"this image was made from a {what} that is not available ({info.get('path') or 'in memory'})"
            + ("; pass it with --init / init_image=" if what == "init image" else "")
        )
    actual = sha256_file(path)
    if info.get("path") and actual != info["sha256"]:
        raise ProvenanceError(f"{what} {path} has changed since the image was made (sha256 {actual[:12]} != {info['sha256'][:12]})")
    return load_rgb(path, what), {**info, "path": str(path.resolve())}


# -- records of the engine --------------------------------------------------------------------------


def model_record(model) -> dict:
    return {
        "reference": model.reference, "kind": model.kind, "location": model.location,
        "hashes": model.hashes, "short_hash": model.short_hash, "vae": model.vae,
    }


def scheduler_record(name: str, base_config) -> dict:
    spec = SCHEDULERS[name]
    return {"name": name, "class": spec.class_name, "options": spec.options, "base_config": jsonable(dict(base_config))}


def device_record(device, dtype, speed: str = "eager", quantize: Optional[str] = None) -> dict:
    """Where and how the pixels were computed: replay matches bit for bit on the same device, dtype, speed mode
    (compiled kernels round differently from eager ones) and quantization."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"type": device.type, "name": name, "dtype": str(dtype).removeprefix("torch."), "speed": speed, "quantize": quantize}


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
