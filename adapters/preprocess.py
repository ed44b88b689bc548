"""ControlNet preprocessors: turn a photo into the control image a ControlNet expects, cached.

    from adapters.preprocess import get_preprocessor, PreprocessorCache
    canny = get_preprocessor("canny")
    edges = canny(photo, low_threshold=80, high_threshold=160)      # PIL RGB, same size as photo
    edges = PreprocessorCache().run(canny, photo, low_threshold=80)  # the same, computed once

Types (aliases in adapters.controlnet's `CONTROL_ALIASES`):

| type       | how                                                         | weights (manifest entry)  |
| ---------- | ----------------------------------------------------------- | ------------------------- |
| `canny`    | OpenCV Canny; white 1-px edges on black                     | none                      |
| `depth`    | Depth Anything V2 Small (transformers); grey, near = bright | `depth-anything-v2-small` |
| `pose`     | controlnet-aux OpenPose, optional `hands`/`face`; colours   | `annotators-openpose`     |
| `softedge` | controlnet-aux HED; soft white edges on black               | `annotators-hed`          |
| `lineart`  | controlnet-aux realistic lineart (`coarse`); white on black | `annotators-lineart`      |
| `scribble` | Canny (default) or HED edges, thickened and binarised       | none, or `annotators-hed` |

Every result is an RGB image at the input's size: the model-based types run at
`detect_resolution` (short side, default 512, as ControlNet's annotators do) and are resized back.
`normal` is not offered (a normal map needs the NormalBAE annotator, not in the manifest); give a
ready normal map with `preprocess: false` (or `auto`, which `is_preprocessed` recognises).

Weights: nothing here downloads. A missing component raises `WeightsMissingError` naming
`refgen weights fetch NAME`. The annotator files (`.pth`) are pickles: their bytes are read once,
their sha256 is checked against the manifest (or the lock file `refgen weights fetch` wrote), and
only those same bytes are loaded, with `torch.load(weights_only=True)`, into controlnet-aux's network
classes built here (never through controlnet-aux's own loaders, which call `torch.load` unchecked).
A pickle with no recorded hash is refused unless `allow_pickle=True` (still `weights_only`).

Caching: `PreprocessorCache` keys a result by the sha256 of the input's RGB bytes and size, the
type, the resolved options (defaults filled in) and the identity of the weights (file hashes, or the
OpenCV version), and keeps it in memory (LRU) and on disk as a PNG under
`engine.paths.cache_dir() / "preprocess"`, written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import cv2
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.request_types import normalise_type
from engine import paths
from engine import weights as weights_module
from engine.errors import InvalidImageError, RefgenError, UnsafeWeightsError, WeightsIntegrityError
from engine.cache import DiskCache
from engine.images import ImageSource, load_rgb, pixel_digest
from engine.loading import check_pickle

DEPTH_ENTRY = "depth-anything-v2-small"
OPENPOSE_ENTRY = "annotators-openpose"
HED_ENTRY = "annotators-hed"
LINEART_ENTRY = "annotators-lineart"

# Types `is_preprocessed` can judge: every preprocessor type, and `normal` (given as a ready map).
RECOGNISED_MAP_TYPES = ("canny", "depth", "lineart", "normal", "pose", "scribble", "softedge")

CACHE_FORMAT = 1  # bump when the key or the stored PNG changes meaning


class PreprocessorError(RefgenError):
    """A preprocessor that cannot run as asked: bad option, unusable weights file."""


class UnknownControlTypeError(PreprocessorError, ValueError):
    """A control type with no preprocessor. The message lists the available ones."""


# ----------------------------------------------------------------------------------- interface


class Preprocessor:
    """Photo -> control image. Subclasses set `name`, `defaults`, and implement `_run`.

    `__call__(image, **options)` accepts a PIL image of any mode (or a path / bytes; loaded with
    `engine.images.load_rgb`) and returns a PIL RGB image of the same size.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}  # allowed values of string options
    version: ClassVar[int] = 1  # bump when the output for the same input and options changes

    def __call__(self, image: ImageSource, **options: Any) -> Image.Image:
        rgb = load_rgb(image, "control image")
        resolved = self.resolve_options(**options)
        return _as_rgb(self._run(rgb, resolved), rgb.size)

    def resolve_options(self, **options: Any) -> dict[str, Any]:
        """All options with defaults filled in and values coerced to the defaults' types."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "(none)"
            raise PreprocessorError(f"{self.name} preprocessor has no option {', '.join(unknown)}; options: {known}")
        resolved = {
            key: _coerce(self.name, key, options.get(key, default), default) for key, default in self.defaults.items()
        }
        for key, allowed in self.choices.items():
            if resolved[key] not in allowed:
                raise PreprocessorError(
                    f"{self.name} option {key}={resolved[key]!r}: expected one of {', '.join(allowed)}"
                )
        self._validate(resolved)
        return resolved

    def identity(self, options: Mapping[str, Any]) -> str:
        """What the output depends on besides image and options: weight hashes, library versions."""
        raise NotImplementedError

    def _validate(self, options: dict[str, Any]) -> None:
        """Range checks on resolved options (raise PreprocessorError)."""

    def _run(self, image: Image.Image, options: dict[str, Any]) -> Union[Image.Image, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    bad = PreprocessorError(f"{name} option {key}={value!r}: expected {type(default).__name__}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(default, int):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if isinstance(value, bool) or not number.is_integer():
            raise bad
        return int(number)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not np.isfinite(number):
            raise bad
        return number
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value.strip().lower()
    raise bad  # pragma: no cover - every default is one of the above


def _as_rgb(result: Union[Image.Image, np.ndarray], size: tuple[int, int]) -> Image.Image:
    """A preprocessor's raw output as a PIL RGB image of `size` (width, height)."""
    if isinstance(result, Image.Image):
        image = result.convert("RGB")
    else:
        array = np.asarray(result)
        if array.dtype != np.uint8:
            raise PreprocessorError(f"preprocessor returned {array.dtype} pixels, expected uint8")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        image = Image.fromarray(np.ascontiguousarray(array[:, :, :3]), "RGB")
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return image


def _resize_short_side(image: Image.Image, short_side: int) -> np.ndarray:
    """RGB array resized so its short side is `short_side` (the annotators' detect resolution)."""
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.LANCZOS if scale < 1 else Image.BICUBIC
    return np.asarray(image.resize(size, resample) if size != image.size else image)


def _check_detect_resolution(name: str, options: Mapping[str, Any]) -> None:
    value = options["detect_resolution"]
    if not 64 <= value <= 2048:
        raise PreprocessorError(f"{name} option detect_resolution={value}: expected 64 to 2048 pixels")


# --------------------------------------------------------------------------------- canny family


class CannyPreprocessor(Preprocessor):
    """OpenCV Canny on the RGB image (as diffusers' SDXL canny ControlNet was trained): white 1-px
    edges on black. Lower thresholds find more edges."""

    name = "canny"
    defaults = {"low_threshold": 100.0, "high_threshold": 200.0}

    def identity(self, options: Mapping[str, Any]) -> str:
        return f"opencv-{cv2.__version__}"

    def _validate(self, options: dict[str, Any]) -> None:
        low, high = options["low_threshold"], options["high_threshold"]
        if not 0 <= low <= high:
            raise PreprocessorError(
                f"canny thresholds must satisfy 0 <= low_threshold <= high_threshold, got {low} and {high}"
            )

    def _run(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        return cv2.Canny(np.asarray(image), options["low_threshold"], options["high_threshold"])


class ScribblePreprocessor(Preprocessor):
    """A thick, binary sketch of the main contours: Canny edges (default, no weights) or HED soft
    edges (`source: hed`, needs `annotators-hed`), dilated to `thickness` pixels and binarised."""

    name = "scribble"
    defaults = {
        "source": "canny", "thickness": 3, "low_threshold": 100.0, "high_threshold": 200.0, "detect_resolution": 512,
    }
    choices = {"source": ("canny", "hed")}

    def __init__(self, context: "_Context"):
        self._context = context
        self._canny = CannyPreprocessor()
        self._hed: Optional[SoftEdgePreprocessor] = None

    def _softedge(self) -> "SoftEdgePreprocessor":
        if self._hed is None:
            self._hed = SoftEdgePreprocessor.load(self._context)
        return self._hed

    def identity(self, options: Mapping[str, Any]) -> str:
        if options["source"] == "hed":
            return self._softedge().identity(options)
        return self._canny.identity(options)

    def _validate(self, options: dict[str, Any]) -> None:
        if not 1 <= options["thickness"] <= 64:
            raise PreprocessorError(f"scribble option thickness={options['thickness']}: expected 1 to 64 pixels")
        _check_detect_resolution(self.name, options)
        self._canny._validate(options)

    def _run(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        if options["source"] == "hed":
            hed = self._softedge()(image, safe=False, detect_resolution=options["detect_resolution"])
            soft = np.asarray(hed)[:, :, 0]
            from controlnet_aux.util import nms

            edges = nms(soft, 127, 3.0)  # controlnet-aux's own HED scribble recipe: thin, then thicken
        else:
            edges = self._canny._run(image, options)
        size = options["thickness"]
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        thick = cv2.dilate(edges, kernel) if size > 1 else edges
        smooth = cv2.GaussianBlur(thick, (0, 0), max(0.5, size / 3))
        return np.where(smooth > 64, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class _Context:
    weights_dir: Optional[Path]
    device: Any
    manifest: weights_module.Manifest
    allow_pickle: bool

    def folder(self, entry_name: str) -> Path:
        return weights_module.require(entry_name, self.weights_dir, self.manifest)

    def entry(self, entry_name: str) -> weights_module.ManifestEntry:
        return self.manifest.get(entry_name)

    def torch_device(self):
        import torch

        return torch.device(self.device) if self.device is not None else torch.device("cpu")


def _expected_sha256(entry: weights_module.ManifestEntry, folder: Path, relpath: str) -> Optional[str]:
    listed = next((f.sha256 for f in entry.files if f.path == relpath), None)
    return listed or weights_module.read_lock(folder).get(relpath, {}).get("sha256")


def _file_of(context: _Context, entry_name: str, relpath: str) -> tuple[weights_module.ManifestEntry, Path, Path]:
    """(entry, folder, path) of one file of a manifest component; WeightsMissingError if absent."""
    entry = context.entry(entry_name)
    folder = entry.folder(context.weights_dir)
    path = folder / relpath
    if not path.is_file():
        raise weights_module.WeightsMissingError(entry_name, [relpath])
    return entry, folder, path


def _safe_file_hash(context: _Context, entry_name: str, relpath: str) -> str:
    """sha256 of a safetensors/config file (cached by size and mtime), checked when one is recorded."""
    from engine.hashing import cached_sha256

    entry, folder, path = _file_of(context, entry_name, relpath)
    actual = cached_sha256(path)
    expected = _expected_sha256(entry, folder, relpath)
    if expected is not None and actual != expected:
        raise _integrity_error(entry_name, relpath, expected, actual)
    return actual


def _integrity_error(entry_name: str, relpath: str, expected: str, actual: str) -> WeightsIntegrityError:
    return WeightsIntegrityError(
        f"{relpath} of '{entry_name}' has sha256 {actual}, but {expected} was recorded for it: the file changed "
        f"or is corrupt. Delete it and fetch it again: refgen weights fetch {entry_name}"
    )


def _load_checked_state_dict(context: _Context, entry_name: str, relpath: str) -> tuple[dict, str]:
    """(state dict, sha256) of a pickled weights file of a manifest component, loaded safely.

    The file is read once; the sha256 of exactly those bytes must match the manifest's (or the lock
    file's) before `torch.load(weights_only=True)` sees them. With no recorded hash the pickle is
    refused unless the context allows pickles.
    """
    import torch

    entry, folder, path = _file_of(context, entry_name, relpath)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    expected = _expected_sha256(entry, folder, relpath)
    if expected is None:
        check_pickle(path, context.allow_pickle)  # raises UnsafeWeightsError unless the user opted in
    elif actual != expected:
        raise _integrity_error(entry_name, relpath, expected, actual)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for disallowed globals, RuntimeError for a bad archive
        raise UnsafeWeightsError(
            f"{relpath} of '{entry_name}' is not a plain tensor checkpoint torch can load safely ({exc})"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PreprocessorError(f"{relpath} of '{entry_name}' does not hold a flat state dict of tensors")
    return dict(state), actual


def _load_into(module, state: Mapping[str, Any], what: str):
    """load_state_dict with a message that names the file layout problem."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise PreprocessorError(
            f"{what} does not have the expected layout: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise PreprocessorError(f"{what} does not fit the network: {exc}") from exc
    return module.float().eval()


def _openpose_layout(module, state: Mapping[str, Any]) -> dict[str, Any]:
    """OpenPose body/hand files name each conv without its block: `conv1_1.weight` is the network's
    `model0.conv1_1.weight` (pytorch-openpose's conversion of CMU's caffe model, loaded by
    controlnet-aux's `util.transfer`). A file already in the network's own naming is accepted too."""
    names = list(module.state_dict())
    if set(names) <= set(state):
        return {name: state[name] for name in names}
    # Names absent from the file stay absent, so _load_into reports them as missing.
    return {name: state[name.split(".", 1)[1]] for name in names if name.split(".", 1)[1] in state}


def _quiet_import(module_name: str):
    """Import a controlnet-aux module without its import-time deprecation chatter."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module_name)


# -------------------------------------------------------------------------------------- depth


class DepthPreprocessor(Preprocessor):
    """Depth Anything V2 Small (Apache-2.0) through transformers: relative inverse depth, normalised
    per image to 0-255 grey, near = bright (what SDXL depth ControlNets were trained on)."""

    name = "depth"
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, model, processor, identity: str, device):
        self._model, self._processor, self._identity, self._device = model, processor, identity, device

    @classmethod
    def load(cls, context: _Context) -> "DepthPreprocessor":
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = context.folder(DEPTH_ENTRY)
        hashes = [_safe_file_hash(context, DEPTH_ENTRY, f.path)[:16] for f in context.entry(DEPTH_ENTRY).files
                  if f.path.endswith(".safetensors")]
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        device = context.torch_device()
        return cls(model.to(device).eval(), processor, f"{DEPTH_ENTRY}@{'+'.join(hashes)}", device)

    def identity(self, options: Mapping[str, Any]) -> str:
        return self._identity

    def _run(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        import torch

        inputs = self._processor(images=image, return_tensors="pt").to(self._device)
        with torch.inference_mode():
            predicted = self._model(**inputs).predicted_depth  # (1, h, w), larger = nearer
            depth = torch.nn.functional.interpolate(
                predicted[:, None].float(), size=(image.height, image.width), mode="bicubic", align_corners=False
            )[0, 0].cpu().numpy()
        low, high = float(np.min(depth)), float(np.max(depth))
        if not np.isfinite(low) or not np.isfinite(high) or high - low < 1e-12:
            return np.zeros((image.height, image.width), np.uint8)  # flat (or broken) prediction: no depth cue
        return np.round((depth - low) / (high - low) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------- pose


class PosePreprocessor(Preprocessor):
    """controlnet-aux OpenPose: body skeleton (COCO 18 keypoints) on black; `hands` and `face` add
    hand and face keypoints (their models load on first use). Nobody found -> an all-black map."""

    name = "pose"
    defaults = {"hands": False, "face": False, "detect_resolution": 512}

    def __init__(self, context: _Context, body, body_hash: str):
        self._context = context
        self._parts = {"body": (body, body_hash)}
        self._detector = None

    @classmethod
    def load(cls, context: _Context) -> "PosePreprocessor":
        context.folder(OPENPOSE_ENTRY)  # every file present, else WeightsMissingError with the fetch command
        body, body_hash = cls._build(context, "body")
        return cls(context, body, body_hash)

    @staticmethod
    def _build(context: _Context, part: str):
        open_pose = _quiet_import("controlnet_aux.open_pose")
        model_module = _quiet_import("controlnet_aux.open_pose.model")
        face_module = _quiet_import("controlnet_aux.open_pose.face")
        filename = {"body": "body_pose_model.pth", "hand": "hand_pose_model.pth", "face": "facenet.pth"}[part]
        state, sha = _load_checked_state_dict(context, OPENPOSE_ENTRY, filename)
        what = f"{filename} of '{OPENPOSE_ENTRY}'"
        device = context.torch_device()
        # controlnet-aux's Body/Hand/Face load their file themselves with torch.load; build them empty
        # (no __init__) and give them a network holding the checked state dict instead.
        if part == "face":
            estimator = object.__new__(face_module.Face)
            estimator.inference_size = face_module.params["inference_img_size"]
            estimator.sigma = face_module.params["gaussian_sigma"]
            estimator.threshold = face_module.params["heatmap_peak_thresh"]
            estimator.model = _load_into(face_module.FaceNet(), state, what).to(device)
        else:
            network = model_module.bodypose_model() if part == "body" else model_module.handpose_model()
            estimator = object.__new__(open_pose.Body if part == "body" else open_pose.Hand)
            estimator.model = _load_into(network, _openpose_layout(network, state), what).to(device)
        return estimator, sha

    def _part(self, part: str):
        if part not in self._parts:
            self._parts[part] = self._build(self._context, part)
            self._detector = None
        return self._parts[part]

    def identity(self, options: Mapping[str, Any]) -> str:
        parts = ["body"] + (["hand"] if options.get("hands") else []) + (["face"] if options.get("face") else [])
        return OPENPOSE_ENTRY + "@" + "+".join(f"{part}:{self._part(part)[1][:16]}" for part in parts)

    def _validate(self, options: dict[str, Any]) -> None:
        _check_detect_resolution(self.name, options)

    def _run(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        hand = self._part("hand")[0] if options["hands"] else None
        face = self._part("face")[0] if options["face"] else None
        open_pose = _quiet_import("controlnet_aux.open_pose")
        detector = open_pose.OpenposeDetector(self._parts["body"][0], hand, face)
        array = _resize_short_side(image, options["detect_resolution"])
        resolution = options["detect_resolution"]
        return detector(array, detect_resolution=resolution, image_resolution=resolution, include_body=True,
                        include_hand=options["hands"], include_face=options["face"], output_type="np")


# ----------------------------------------------------------------------------- soft edge, lines


class SoftEdgePreprocessor(Preprocessor):
    """controlnet-aux HED (lllyasviel's Apache-2.0 ControlNetHED model): soft white edges on black."""

    name = "softedge"
    defaults = {"safe": False, "detect_resolution": 512}

    def __init__(self, detector, identity: str):
        self._detector, self._identity = detector, identity

    @classmethod
    def load(cls, context: _Context) -> "SoftEdgePreprocessor":
        context.folder(HED_ENTRY)
        hed = _quiet_import("controlnet_aux.hed")
        state, sha = _load_checked_state_dict(context, HED_ENTRY, "ControlNetHED.pth")
        network = _load_into(hed.ControlNetHED_Apache2(), state, f"ControlNetHED.pth of '{HED_ENTRY}'")
        return cls(hed.HEDdetector(network.to(context.torch_device())), f"{HED_ENTRY}@{sha[:16]}")

    def identity(self, options: Mapping[str, Any]) -> str:
        return self._identity

    def _validate(self, options: dict[str, Any]) -> None:
        _check_detect_resolution(self.name, options)

    def _run(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        resolution = options["detect_resolution"]
        return self._detector(_resize_short_side(image, resolution), detect_resolution=resolution,
                              image_resolution=resolution, safe=options["safe"], output_type="np")


class LineartPreprocessor(Preprocessor):
    """controlnet-aux realistic lineart (informative-drawings, MIT): white lines on black;
    `coarse` uses the coarser second model (loaded on first use)."""

    name = "lineart"
    defaults = {"coarse": False, "detect_resolution": 512}

    def __init__(self, context: _Context, detector, fine_hash: str):
        self._context, self._detector = context, detector
        self._hashes = {"sk_model.pth": fine_hash}

    @staticmethod
    def _network(context: _Context, filename: str):
        lineart = _quiet_import("controlnet_aux.lineart")
        state, sha = _load_checked_state_dict(context, LINEART_ENTRY, filename)
        network = _load_into(lineart.Generator(3, 1, 3), state, f"{filename} of '{LINEART_ENTRY}'")
        return network.to(context.torch_device()), sha

    @classmethod
    def load(cls, context: _Context) -> "LineartPreprocessor":
        context.folder(LINEART_ENTRY)
        lineart = _quiet_import("controlnet_aux.lineart")
        fine, sha = cls._network(context, "sk_model.pth")
        return cls(context, lineart.LineartDetector(fine, None), sha)

    def _coarse_hash(self) -> str:
        if "sk_model2.pth" not in self._hashes:
            self._detector.model_coarse, self._hashes["sk_model2.pth"] = self._network(self._context, "sk_model2.pth")
        return self._hashes["sk_model2.pth"]

    def identity(self, options: Mapping[str, Any]) -> str:
        sha = self._coarse_hash() if options.get("coarse") else self._hashes["sk_model.pth"]
        return f"{LINEART_ENTRY}@{sha[:16]}"

    def _validate(self, options: dict[str, Any]) -> None:
        _check_detect_resolution(self.name, options)

    def _run(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        if options["coarse"]:
            self._coarse_hash()
        resolution = options["detect_resolution"]
        return self._detector(_resize_short_side(image, resolution), coarse=options["coarse"],
                              detect_resolution=resolution, image_resolution=resolution, output_type="np")


# ------------------------------------------------------------------------------------ registry

_FACTORIES = {
    "canny": lambda context: CannyPreprocessor(),
    "depth": DepthPreprocessor.load,
    "lineart": LineartPreprocessor.load,
    "pose": PosePreprocessor.load,
    "scribble": ScribblePreprocessor,
    "softedge": SoftEdgePreprocessor.load,
}


def available_control_types() -> tuple[str, ...]:
    """The control types `get_preprocessor` can build (whether or not their weights are on disk)."""
    return tuple(sorted(_FACTORIES))


def _known_type(control_type: str) -> str:
    key = normalise_type(control_type)
    if key not in _FACTORIES:
        hint = " (give a ready normal map with preprocess: false)" if key == "normal" else ""
        raise UnknownControlTypeError(
            f"no preprocessor for control type {control_type!r}{hint}; "
            f"available: {', '.join(available_control_types())}"
        )
    return key


def get_preprocessor(
    control_type: str,
    weights_dir: Union[str, Path, None] = None,
    device: Any = None,
    *,
    manifest: Optional[weights_module.Manifest] = None,
    allow_pickle: bool = False,
) -> Preprocessor:
    """A ready preprocessor for `control_type` (aliases accepted), its weights loaded onto `device`
    (default CPU) from `weights_dir` (default: REFGEN_WEIGHTS / the checkout's weights/).

    Raises UnknownControlTypeError (listing the available types), WeightsMissingError (with the
    `refgen weights fetch NAME` command), WeightsIntegrityError, UnsafeWeightsError.
    """
    key = _known_type(control_type)
    context = _Context(Path(weights_dir).expanduser() if weights_dir is not None else None, device,
                       manifest or weights_module.Manifest.load(), allow_pickle)
    return _FACTORIES[key](context)


# --------------------------------------------------------------------------------------- cache


class PreprocessorCache:
    """Preprocessor results by content: the one memory + disk cache (engine/cache.py) holding PNGs.

    `run(preprocessor, image, **options)` returns the cached result or computes and stores it. The key
    is the sha256 of (input pixels and size, type, resolved options, weights identity, formats).
    Disk files live under `directory` (default `engine.paths.cache_dir() / "preprocess"`, read when
    used), one `<key[:2]>/<key>.png` each, written atomically; unreadable ones count as misses.
    Thread-safe. `hits`/`misses` count lookups.
    """

    def __init__(self, directory: Union[str, Path, None] = None, max_items: int = 16, disk: bool = True):
        self._directory = Path(directory).expanduser() if directory is not None else None
        folder = (lambda: self.directory) if disk else None
        self._store = DiskCache(folder, suffix=".png", encode=_png, decode=_cached_png, max_items=max_items,
                                copy=Image.Image.copy)

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else paths.cache_dir() / "preprocess"

    @property
    def hits(self) -> int:
        return self._store.hits

    @property
    def misses(self) -> int:
        return self._store.misses

    def key(self, preprocessor: Preprocessor, image: Image.Image, options: Mapping[str, Any]) -> str:
        """The cache key of a loaded RGB image and *resolved* options."""
        payload = {
            "format": CACHE_FORMAT,
            "type": preprocessor.name,
            "version": preprocessor.version,
            "image": pixel_digest(image),
            "options": dict(sorted(options.items())),
            "weights": preprocessor.identity(options),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def run(self, preprocessor: Preprocessor, image: ImageSource, **options: Any) -> Image.Image:
        rgb = load_rgb(image, "control image")
        resolved = preprocessor.resolve_options(**options)
        key = self.key(preprocessor, rgb, resolved)
        cached = self.get(key, rgb.size)
        if cached is not None:
            return cached
        result = preprocessor(rgb, **resolved)
        meta = {"type": preprocessor.name, "options": resolved, "weights": preprocessor.identity(resolved)}
        self.put(key, result, meta)
        return result.copy()

    def get(self, key: str, size: Optional[tuple[int, int]] = None) -> Optional[Image.Image]:
        return self._store.get(key, accept=lambda image: size is None or image.size == size)

    def put(self, key: str, image: Image.Image, meta: Optional[Mapping[str, Any]] = None) -> None:
        image = image.convert("RGB")
        self._store.put(key, image, encoded=_png(image, {"key": key, **(meta or {})}))

    def __len__(self) -> int:
        return len(self._store)


def _png(image: Image.Image, meta: Optional[Mapping[str, Any]] = None) -> bytes:
    """The PNG of a result, with what made it in a text chunk (for a person looking at the cache)."""
    info = PngInfo()
    info.add_text("refgen-preprocess", json.dumps(meta or {}, sort_keys=True, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _cached_png(path: Path) -> Optional[Image.Image]:
    try:
        return load_rgb(path, "cached control image")
    except InvalidImageError:
        return None  # a damaged cache file is a miss; the next put replaces it


class Preprocessors:
    """The preprocessors one engine uses: each built on first use and kept, results cached.

    `run(control_type, image, **options)` is what the engine calls for a unit that needs
    preprocessing. `cache=None` makes a default `PreprocessorCache()` (memory + disk).
    """

    def __init__(
        self,
        weights_dir: Union[str, Path, None] = None,
        device: Any = None,
        *,
        cache: Optional[PreprocessorCache] = None,
        manifest: Optional[weights_module.Manifest] = None,
        allow_pickle: bool = False,
    ):
        self.weights_dir, self.device, self.manifest, self.allow_pickle = weights_dir, device, manifest, allow_pickle
        self.cache = cache if cache is not None else PreprocessorCache()
        self._loaded: dict[str, Preprocessor] = {}
        self._lock = threading.Lock()

    def get(self, control_type: str) -> Preprocessor:
        key = _known_type(control_type)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = get_preprocessor(key, self.weights_dir, self.device, manifest=self.manifest,
                                                     allow_pickle=self.allow_pickle)
            return self._loaded[key]

    def run(self, control_type: str, image: ImageSource, **options: Any) -> Image.Image:
        return self.cache.run(self.get(control_type), image, **options)


# ----------------------------------------------------------------------------- is_preprocessed

# Thresholds of is_preprocessed (see its docstring); pixel values are luminance 0-255.
_DARK, _BRIGHT = 40, 215
_GREY_SPREAD, _GREY_SHARE = 12, 0.98
_SMOOTH_LAPLACIAN = 3.0  # mean |Laplacian| at 512 px long side: photos 4-35, depth maps ~1-2


def _map_stats(image: Image.Image) -> dict[str, float]:
    width, height = image.size
    step = max(1, int(np.ceil(np.sqrt(width * height / 1_000_000))))  # ~1 MP by nearest sampling
    rgb = np.asarray(image)[::step, ::step].astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    luma = rgb.mean(axis=2)
    dark, bright = float((luma <= _DARK).mean()), float((luma >= _BRIGHT).mean())
    scale = 512 / max(width, height)
    small = image.convert("L")
    if scale < 1:
        small = small.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BOX)
    laplacian = float(np.abs(cv2.Laplacian(np.asarray(small, np.float32), cv2.CV_32F)).mean())
    vectors = rgb / 127.5 - 1.0
    unit = float((np.abs(np.linalg.norm(vectors, axis=2) - 1.0) <= 0.25).mean())
    return {
        "grey": float((spread <= _GREY_SPREAD).mean()),
        "dark": dark,
        "bright": bright,
        "binary": dark + bright,
        "colour": float((spread >= 100).mean()),
        "laplacian": laplacian,
        "unit": unit,
        "blue_up": float((rgb[:, :, 2] >= 120).mean()),
    }


def is_preprocessed(image: ImageSource, control_type: str) -> bool:
    """Whether `image` already looks like a `control_type` control map (for `preprocess: auto`).

    The rule, on luminance 0-255 (dark <= 40, bright >= 215) and grey = R, G, B within 12 of each other:
    - canny, scribble: >= 98% grey, >= 95% of pixels dark or bright (nearly binary), >= 60% dark
      (white strokes on black) and some bright strokes (>= 0.1%).
    - lineart, softedge: >= 98% grey, >= 50% dark (a black background) and some strokes (>= 0.1%
      not dark); anti-aliased and soft strokes are allowed.
    - depth: >= 98% grey, not nearly binary (< 95% dark or bright), and smooth: mean |Laplacian| of
      the image scaled to 512 px < 3 (photos, even grey ones, have texture: 4 and up).
    - pose: >= 80% dark background and >= 0.1% strongly coloured pixels (channel spread >= 100),
      which are most (>= 50%) of the pixels that are not dark: OpenPose's coloured limbs.
    - normal: >= 85% of pixels encode a unit vector (|RGB/127.5 - 1| within 0.25 of 1) and >= 95%
      face the viewer (blue >= 120).
    Photos fail every rule. Black-on-white sketches are not recognised (they are not what SDXL
    ControlNets take): they go through the preprocessor.
    """
    key = normalise_type(control_type)
    if key not in RECOGNISED_MAP_TYPES:
        raise UnknownControlTypeError(
            f"unknown control type {control_type!r}; known: {', '.join(RECOGNISED_MAP_TYPES)}"
        )
    s = _map_stats(load_rgb(image, "control image"))
    grey = s["grey"] >= _GREY_SHARE
    if key in ("canny", "scribble"):
        return grey and s["binary"] >= 0.95 and s["dark"] >= 0.60 and s["bright"] >= 0.001
    if key in ("lineart", "softedge"):
        return grey and s["dark"] >= 0.50 and (1.0 - s["dark"]) >= 0.001
    if key == "depth":
        return grey and s["binary"] < 0.95 and s["laplacian"] < _SMOOTH_LAPLACIAN
    if key == "pose":
        lit = 1.0 - s["dark"]
        return s["dark"] >= 0.80 and s["colour"] >= 0.001 and lit > 0 and s["colour"] / lit >= 0.5
    return s["unit"] >= 0.85 and s["blue_up"] >= 0.95  # normal
