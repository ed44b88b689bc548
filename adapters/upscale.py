"""ESRGAN / Real-ESRGAN super-resolution through spandrel, tiled, with alpha kept.

    up = Upscaler.load("realesrgan-x4plus")          # manifest name, or a .safetensors / .pth file
    big = up.upscale(Image.open("in.png"))             # PIL in, PIL out at up.scale x the size
    pixels = up.upscale_pixels(result.pixels)          # (N, H, W, 3) float [0, 1] -> (N, sH, sW, 3)

Loading: the state dict is read here (safetensors first; pickles only with allow_pickle, and then
through torch.load(weights_only=True)), unwrapped (`params_ema`, `module.` ...) and handed to
spandrel, which detects the layout (Real-ESRGAN `conv_first/body.N.rdbM...` or the original
ESRGAN `model.N...`) and the hyperparameters from tensor shapes. Only the ESRGAN family is
accepted (spandrel ids `ESRGAN` = RRDBNet incl. Real-ESRGAN x4plus/x2plus, BSRGAN, ESRGAN+;
`Compact` = Real-ESRGAN's SRVGGNetCompact); anything else is an UpscaleError naming what it found.

Inference: the image is cut into tiles (default 512 input pixels, 32 overlap) that cover the
border exactly. In each region two tiles share, the outer quarter next to a tile's edge (where zero
padding distorts a convnet's output) gets weight 0, and the middle half is a linear cross-fade;
outputs are accumulated as weighted sum / weight sum. No seams, and a tiled result matches the
untiled one wherever the overlap covers the model's effective receptive field (measured on tiny
random ESRGANs: a full-width cross-fade was off by up to 8/255, this by <= 1/255 at the same
tiles). Real-ESRGAN's own tiler keeps 10 px of context per side and cuts hard. On CUDA out-of-memory the tile size
is halved and the image restarted, down to MIN_TILE. fp16 on CUDA, fp32 on CPU; a tile that comes
back non-finite in half precision is redone in fp32 (and fp32 is kept from then on).

Alpha: RGB goes through the model, the alpha channel is resized with Lanczos (clamped to each
pixel's neighbourhood range, so no ringing) and reattached: transparent regions stay exactly
transparent. Grey inputs come back grey (L / LA), everything else RGB /
RGBA.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from engine.tiling import blend_tiles, tile_starts  # noqa: F401  (tile_starts: part of this module's API)
from engine import weights
from engine.errors import InvalidImageError, RefgenError, UnknownModelError
from engine.hashing import cached_sha256
from engine.images import MAX_INPUT_PIXELS, ImageSource, _open, _to_rgb
from engine.loading import PICKLE_SUFFIXES, check_pickle
from engine.request import default_upscaler

log = logging.getLogger("refgen.upscale")

# spandrel architecture ids refgen accepts, with a readable name for messages.
ESRGAN_FAMILY = {
    "ESRGAN": "ESRGAN / Real-ESRGAN RRDBNet",
    "Compact": "Real-ESRGAN SRVGGNetCompact",
}
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
MIN_TILE = 64  # out-of-memory halving stops here
MIN_USER_TILE = 16
MAX_OUTPUT_PIXELS = 1 << 28  # 16384 x 16384: a 4096-px square at x4; the float accumulators take ~4 GB
MANIFEST_KIND = "upscaler"
# In-memory, exact nearest-neighbour stand-ins (SRVGGNetCompact with zero weights): handy in tests.
TINY_REFERENCES = {"tiny-x4": 4, "tiny-x2": 2}
TINY_NOTICE = (
    "{name}: a built-in stand-in upscaler for offline smoke runs ({what}); "
    "fetch a real one with `refgen weights fetch realesrgan-x4plus`"
)
TINY_MODEL_REFERENCES = {"tiny": default_upscaler(4), f"tiny-{default_upscaler(4)}": default_upscaler(4),
                         f"tiny-{default_upscaler(2)}": default_upscaler(2)}  # the tiny model's random Real-ESRGAN files

Progress = Union[bool, Callable[[int, int], None]]


class UpscaleError(RefgenError):
    """An upscaler that cannot be loaded or run: not ESRGAN-family, unreadable, out of memory."""


@dataclass(frozen=True)
class UpscalerInfo:
    """What was loaded, for provenance."""

    reference: str
    path: Optional[str]
    sha256: Optional[str]
    architecture: str
    scale: int
    tags: tuple[str, ...] = ()
    manifest_entry: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["tags"] = list(self.tags)
        return record


# ------------------------------------------------------------------------------------ loading


def resolve_reference(reference: Union[str, Path], allow_pickle: bool = False, *, manifest=None,
                      weights_dir: Optional[Path] = None) -> tuple[Path, Optional[str]]:
    """(weights file, manifest entry name or None) for a manifest name or a checkpoint path. Names are
    looked up in `manifest` under `weights_dir` (default: weights/manifest.toml and the weights folder)."""
    path = Path(reference).expanduser()
    if path.is_file():
        _check_suffix(path)
        check_pickle(path, allow_pickle)
        return path, None
    manifest = manifest or weights.Manifest.load()
    name = str(reference)
    if name in manifest.names():
        folder = weights.require(name, weights_dir, manifest)  # WeightsMissingError names the fetch command
        entry = manifest.get(name)
        files = [folder / f.path for f in entry.files if Path(f.path).suffix.lower() in {".safetensors", *PICKLE_SUFFIXES}]
        if not files:
            raise UpscaleError(f"manifest entry '{name}' lists no weights file (.safetensors or .pth)")
        chosen = next((f for f in files if f.suffix.lower() == ".safetensors"), files[0])
        check_pickle(chosen, allow_pickle)
        return chosen, name
    if path.exists():
        raise UnknownModelError(f"{path} is a folder; give the upscaler's weights file (.safetensors or .pth)")
    known = [e.name for e in manifest.entries if e.kind == MANIFEST_KIND]
    raise UnknownModelError(
        f"upscaler {name!r} is neither a manifest name ({', '.join(known) or 'none listed'}) nor an existing "
        ".safetensors/.pth file. Fetch one with `refgen weights fetch NAME`."
    )


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in {".safetensors", *PICKLE_SUFFIXES}:
        raise UpscaleError(f"{path.name} is not a checkpoint file (.safetensors, or .pth with --allow-pickle)")


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint on the CPU, unwrapped from `params_ema` & co."""
    path = Path(path)
    _check_suffix(path)
    check_pickle(path, allow_pickle)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...: a damaged or foreign file
            raise UpscaleError(f"cannot read {path.name} as safetensors ({exc}); is the file complete?") from exc
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for whole pickled modules / TorchScript, EOF for truncation
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UpscaleError(
                f"cannot read {path.name} as a plain state dict with torch.load(weights_only=True): {first}"
            ) from exc
    return canonical_state_dict(raw, path.name)


def canonical_state_dict(raw: Any, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Unwrap the containers checkpoints come in: {'params_ema': {...}} (Real-ESRGAN .pth),
    flat 'params_ema.'-prefixed keys (the same, flattened into safetensors), 'module.' (DataParallel)."""
    from spandrel import canonicalize_state_dict

    if not isinstance(raw, dict):
        raise UpscaleError(f"{source} holds a {type(raw).__name__}, not a state dict of tensors")
    state = canonicalize_state_dict(raw)
    for prefix in ("params_ema.", "params-ema.", "params.", "module.", "netG.", "model_state_dict.", "state_dict."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UpscaleError(f"{source} contains no tensors")
    return tensors


def describe_state_dict(state: dict[str, torch.Tensor], source: str = "state dict"):
    """spandrel's ImageModelDescriptor for an ESRGAN-family state dict, else UpscaleError."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        descriptor = ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError:
        sample = ", ".join(sorted(state)[:4])
        raise UpscaleError(
            f"{source} is not an ESRGAN-family upscaler: no super-resolution architecture matches its "
            f"{len(state)} tensors (e.g. {sample}). Expected Real-ESRGAN keys (conv_first, body.0.rdb1.conv1, "
            "conv_last) or original ESRGAN keys (model.0, model.1.sub.0.RDB1.conv1.0)."
        ) from None
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError, AssertionError, ZeroDivisionError) as exc:
        detail = str(exc).strip().splitlines()
        raise UpscaleError(
            f"{source} has upscaler-like keys but its tensors do not form a valid model "
            f"({detail[0][:300] if detail else type(exc).__name__}). ESRGAN weights need 32 grow channels."
        ) from exc
    arch = descriptor.architecture
    if arch.id not in ESRGAN_FAMILY:
        raise UpscaleError(
            f"{source} is a {arch.name} model ({descriptor.purpose}, x{descriptor.scale}), not ESRGAN-family; "
            f"refgen's upscaler takes {' or '.join(ESRGAN_FAMILY.values())} weights"
        )
    if not isinstance(descriptor, ImageModelDescriptor):  # pragma: no cover - ESRGAN ids are image models
        raise UpscaleError(f"{source} is not a single-image model")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscaleError(
            f"{source} maps {descriptor.input_channels} to {descriptor.output_channels} channels; an RGB upscaler "
            "(3 to 3) is needed"
        )
    if descriptor.size_requirements.square:  # pragma: no cover - not in the ESRGAN family
        raise UpscaleError(f"{source} needs square inputs, which tiling does not provide")
    return descriptor


def tiny_state_dict(scale: int = 4) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's SRVGGNetCompact with all-zero weights: its output is the nearest-neighbour
    upsampling it adds as a residual base, so the `tiny` stand-in gives a plain enlarged image."""
    features = 4
    return {
        "body.0.weight": torch.zeros(features, 3, 3, 3),
        "body.0.bias": torch.zeros(features),
        "body.1.weight": torch.full((features,), 0.25),  # PReLU
        "body.2.weight": torch.zeros(3 * scale * scale, features, 3, 3),
        "body.2.bias": torch.zeros(3 * scale * scale),
    }


# ------------------------------------------------------------------------------------- images


def load_image(source: ImageSource, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """The image decoded and upright per EXIF, mode kept (alpha included). InvalidImageError when
    it is missing, not an image, truncated or above the pixel limit: the checks of load_rgb."""
    image = source if isinstance(source, Image.Image) else _open(source, what)
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImageError(f"{what} is {width}x{height}: more than the {max_pixels // 2**20} MP limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{what} cannot be decoded ({exc}); is the file complete?") from exc


_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def split_alpha(image: Image.Image) -> tuple[Image.Image, Optional[Image.Image], bool]:
    """(RGB image for the model, alpha channel or None, whether the input is greyscale)."""
    grey = image.mode in _GREY_MODES
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A"), grey
    return _to_rgb(image), None, grey


def upscale_alpha(alpha: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos-resized alpha, clamped to the min/max of each source pixel's 3x3 neighbourhood: edges
    stay smooth, but a pixel inside a fully transparent (or opaque) area stays exactly 0 (or 255),
    with no ringing lobes bringing the hidden colours of transparent pixels into view."""
    from PIL import ImageFilter

    smooth = np.asarray(alpha.resize(size, Image.Resampling.LANCZOS))
    low = np.asarray(alpha.filter(ImageFilter.MinFilter(3)).resize(size, Image.Resampling.NEAREST))
    high = np.asarray(alpha.filter(ImageFilter.MaxFilter(3)).resize(size, Image.Resampling.NEAREST))
    return Image.fromarray(np.clip(smooth, low, high).astype(np.uint8))


# ------------------------------------------------------------------------------------- tiling


def _pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right like spandrel does: reflect as far as possible, then replicate."""
    if not pad_h and not pad_w:
        return x
    h, w = x.shape[-2:]
    reflect_h, reflect_w = min(pad_h, h - 1), min(pad_w, w - 1)
    x = torch.nn.functional.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_h > reflect_h or pad_w > reflect_w:
        x = torch.nn.functional.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return x


class _Reporter:
    """A tqdm bar over tiles, a callback(done, total), or nothing."""

    def __init__(self, progress: Progress, desc: str):
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress) and self.callback is None
        self.desc = desc
        self.bar = None
        self.done = 0
        self.total = 0

    def start(self, total: int) -> None:
        self.done, self.total = 0, total
        if self.callback is not None:
            self.callback(0, total)
        elif self.enabled:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit="tile", leave=False)
            else:
                self.bar.reset(total=total)

    def advance(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)
        elif self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------- upscaler


class Upscaler:
    """A loaded ESRGAN-family model on one device/dtype. Build with `Upscaler.load(...)`."""

    def __init__(self, descriptor, info: UpscalerInfo, device: Union[str, torch.device, None] = None,
                 dtype: Union[str, torch.dtype, None] = None):
        from engine.devices import pick_device

        try:
            self.device, self.dtype = pick_device(str(device) if device is not None else None, dtype)
        except (ValueError, RuntimeError) as exc:
            raise UpscaleError(f"cannot run the upscaler on device={device!r} dtype={dtype!r}: {exc}") from exc
        if self.dtype == torch.float16 and not descriptor.supports_half:
            self.dtype = torch.float32
        if self.dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
            self.dtype = torch.float32
        try:
            self.descriptor = descriptor.to(self.device).to(self.dtype).eval()
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise UpscaleError(f"cannot move the upscaler to {self.device}: {exc}") from exc
        self.info = info
        self.notice: Optional[str] = None
        self.scale: int = int(descriptor.scale)
        self.align: int = max(1, int(descriptor.size_requirements.multiple_of))

    # -- construction

    @classmethod
    def load(cls, reference: Union[str, Path], device: Union[str, torch.device, None] = None,
             dtype: Union[str, torch.dtype, None] = None, allow_pickle: bool = False, *, manifest=None,
             weights_dir: Optional[Path] = None) -> "Upscaler":
        """From a manifest name (`realesrgan-x4plus`, looked up in `manifest` under `weights_dir`), a
        .safetensors / .pth (allow_pickle) file, `tiny` / `tiny-realesrgan-x2plus` (the tiny model's random
        Real-ESRGAN, built on first use in its cache folder), or `tiny-x4` / `tiny-x2` (nearest-neighbour)."""
        name = str(reference)
        if name in TINY_REFERENCES:
            up = cls.from_state_dict(tiny_state_dict(TINY_REFERENCES[name]), device, dtype, name=name)
            up.notice = TINY_NOTICE.format(name=name, what="nearest-neighbour, no detail added")
            return up
        if name in TINY_MODEL_REFERENCES:
            from engine import paths
            from engine.tiny.components import components_dir, components_manifest

            up = cls.load(TINY_MODEL_REFERENCES[name], device, dtype, manifest=components_manifest(),
                          weights_dir=components_dir(paths.cache_dir()))
            up.notice = TINY_NOTICE.format(name=name, what="random Real-ESRGAN weights")
            return up
        path, entry = resolve_reference(reference, allow_pickle, manifest=manifest, weights_dir=weights_dir)
        state = read_state_dict(path, allow_pickle)
        descriptor = describe_state_dict(state, path.name)
        info = UpscalerInfo(
            reference=str(reference),
            path=str(path),
            sha256=cached_sha256(path),
            architecture=descriptor.architecture.id,
            scale=int(descriptor.scale),
            tags=tuple(descriptor.tags),
            manifest_entry=entry,
        )
        return cls(descriptor, info, device, dtype)

    @classmethod
    def from_state_dict(cls, state_dict: dict, device: Union[str, torch.device, None] = None,
                        dtype: Union[str, torch.dtype, None] = None, name: str = "state dict") -> "Upscaler":
        """From tensors already in memory (no file, so no path or hash in the provenance)."""
        state = canonical_state_dict(state_dict, name)
        descriptor = describe_state_dict(state, name)
        info = UpscalerInfo(name, None, None, descriptor.architecture.id, int(descriptor.scale), tuple(descriptor.tags))
        return cls(descriptor, info, device, dtype)

    @property
    def architecture(self) -> str:
        return self.info.architecture

    def identity(self) -> dict[str, Any]:
        """Provenance record: reference, path, sha256, architecture, scale, tags, manifest entry, device, dtype."""
        return {**self.info.as_dict(), "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    def __repr__(self) -> str:
        return (f"Upscaler({self.info.reference!r}, {self.architecture} x{self.scale}, "
                f"{self.device}, {str(self.dtype).replace('torch.', '')})")

    # -- public entry points

    def upscale(self, image: ImageSource, tile: Optional[int] = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                progress: Progress = True) -> Image.Image:
        """PIL (or a path / bytes) in, PIL out at scale x the size; alpha kept, grey stays grey."""
        picture = load_image(image)
        rgb, alpha, grey = split_alpha(picture)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        y = self._run(x, tile, overlap, progress)[0]
        pixels = (y.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        result = Image.fromarray(pixels)  # (H, W, 3) uint8 -> RGB
        if grey:
            result = result.convert("L")
        if alpha is not None:
            result.putalpha(upscale_alpha(alpha, result.size))
        if picture.info.get("icc_profile"):
            result.info["icc_profile"] = picture.info["icc_profile"]
        return result

    def upscale_pixels(self, pixels: np.ndarray, tile: Optional[int] = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                       progress: Progress = False) -> np.ndarray:
        """(N, H, W, 3) float in [0, 1] -> (N, H*scale, W*scale, 3) float32 in [0, 1]; (H, W, 3) also works."""
        array = np.asarray(pixels)
        single = array.ndim == 3
        if single:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise UpscaleError(f"pixels must be (N, H, W, 3), got shape {tuple(np.shape(pixels))}")
        if array.dtype.kind != "f":
            raise UpscaleError(f"pixels must be floats in [0, 1], got {array.dtype}")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise UpscaleError("pixels contain NaN or inf")
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).clamp(0, 1)
        out = np.ascontiguousarray(self._run(x, tile, overlap, progress).permute(0, 2, 3, 1).numpy())
        return out[0] if single else out

    # -- the tiled loop

    def _run(self, x: torch.Tensor, tile: Optional[int], overlap: int, progress: Progress) -> torch.Tensor:
        n, _, h, w = x.shape
        if h * w * self.scale**2 > MAX_OUTPUT_PIXELS:
            raise UpscaleError(
                f"a {w}x{h} image at x{self.scale} would be {w * self.scale}x{h * self.scale}, above the "
                f"{MAX_OUTPUT_PIXELS // 2**20} MP output limit; crop or downscale it first, or use a x2 model"
            )
        pad_w, pad_h = self.descriptor.size_requirements.get_padding(w, h)
        padded = _pad(x, pad_h, pad_w)
        ph, pw = padded.shape[-2:]
        tile, overlap = self._check_tiling(tile, overlap, ph, pw)
        reporter = _Reporter(progress, f"upscale x{self.scale}")
        try:
            while True:
                out_of_memory = False
                reporter.start(self._tile_count(ph, pw, tile, overlap) * n)
                try:
                    results = [self._tiled(padded[i : i + 1], tile, overlap, reporter) for i in range(n)]
                except torch.cuda.OutOfMemoryError:
                    out_of_memory = True
                if not out_of_memory:
                    break
                # Outside the except block, so the failed attempt's tensors are freed first.
                results = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                smaller = (min(tile, max(ph, pw)) // 2) // self.align * self.align
                if smaller < MIN_TILE:
                    raise UpscaleError(
                        f"out of GPU memory even with {min(tile, max(ph, pw))}-pixel tiles on {self.device} "
                        f"(tiles stop shrinking at {MIN_TILE} px); free GPU memory or run on the CPU (--device cpu)"
                    )
                log.warning("upscale: out of GPU memory with %d-pixel tiles, retrying with %d", tile, smaller)
                tile, overlap = smaller, min(overlap, smaller // 4)
        finally:
            reporter.close()
        out = torch.cat(results, 0)[:, :, : h * self.scale, : w * self.scale]
        return out.clamp_(0, 1)

    def _check_tiling(self, tile: Optional[int], overlap: int, ph: int, pw: int) -> tuple[int, int]:
        if overlap < 0:
            raise UpscaleError(f"overlap must be >= 0, got {overlap}")
        if not tile:  # 0 / None: the whole image in one pass
            tile = max(ph, pw)
        elif tile < MIN_USER_TILE:
            raise UpscaleError(f"tile must be at least {MIN_USER_TILE} pixels (or 0 for no tiling), got {tile}")
        tile = max(self.align, tile // self.align * self.align)
        if tile < max(ph, pw) and overlap * 2 > tile:
            raise UpscaleError(f"overlap ({overlap}) must be at most half the tile size ({tile})")
        return tile, overlap

    def _tile_count(self, h: int, w: int, tile: int, overlap: int) -> int:
        return len(tile_starts(h, min(tile, h), overlap, self.align)) * len(tile_starts(w, min(tile, w), overlap, self.align))

    def _tiled(self, x: torch.Tensor, tile: int, overlap: int, reporter: _Reporter) -> torch.Tensor:
        _, _, h, w = x.shape
        return blend_tiles(x, (min(tile, h), min(tile, w)), overlap, self._forward, self.scale, self.align, reporter.advance)

    def _forward(self, tile: torch.Tensor) -> torch.Tensor:
        """One tile through the model: (1, 3, h, w) CPU float32 -> (1, 3, h*s, w*s) CPU float32 in [0, 1]."""
        with torch.inference_mode():
            result = self._call_model(tile.to(self.device, self.dtype))
            if not torch.isfinite(result).all():
                if self.dtype == torch.float32:
                    raise UpscaleError("the upscaler produced NaN/inf values in float32; the weights are broken")
                log.warning("upscale: non-finite output in %s, switching to float32", self.dtype)
                self.dtype = torch.float32
                self.descriptor = self.descriptor.to(torch.float32)
                result = self._call_model(tile.to(self.device, self.dtype))
            result = result.float().cpu()
        expected = (tile.shape[-2] * self.scale, tile.shape[-1] * self.scale)
        if tuple(result.shape[-2:]) != expected or result.shape[1] != 3:
            raise UpscaleError(f"the model returned {tuple(result.shape)} for a {tuple(tile.shape)} tile")
        return result

    def _call_model(self, tile: torch.Tensor) -> torch.Tensor:
        return self.descriptor(tile)  # spandrel: pads if needed, clamps to [0, 1]
