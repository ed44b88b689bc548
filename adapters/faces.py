"""The face layer of Character Reference: detect, align and embed faces with insightface.

    from adapters.faces import FaceAnalyzer, identity_score, keypoints_image
    faces = FaceAnalyzer.load("antelopev2")             # InstantID's encoder; "buffalo_l" for FaceID
    face = faces.analyze(photo)                          # the largest face: bbox, kps, embedding, crop
    ref = faces.embed([photo_1, photo_2])                # several references, averaged, unit length
    score = faces.score_image(generated, ref)            # ArcFace cosine similarity, None: no face
    kps_map = keypoints_image(face.kps, photo.size)      # the picture InstantID's IdentityNet is fed

Models: insightface model packs from the weights manifest (`insightface-antelopev2`,
`insightface-buffalo-l`), loaded with insightface's own `FaceAnalysis`, detection and recognition
only. Nothing here downloads: the pack's files are checked with `engine.weights.require` first (a
missing one raises WeightsMissingError naming `refgen weights fetch NAME`), and insightface is given
the pack's folder by absolute path, which it uses as is (its download runs only for a folder that does
not exist). LICENSE: insightface's pretrained models are for non-commercial research only.

ONNX providers are passed explicitly: CUDAExecutionProvider (then CPU as fallback) when the device is
CUDA and onnxruntime-gpu offers it, else CPUExecutionProvider.

Conventions: images are anything `engine.images.load_rgb` reads (path, bytes, PIL) or an RGB uint8
array; faces come largest first (box area); boxes are (x1, y1, x2, y2) and keypoints (5, 2) in the
image's pixels, keypoints in insightface's order (eye, eye, nose tip, mouth corner, mouth corner, the
image's left one first); embeddings are 512-d float32, L2-normalised, so identity_score is their dot
product (ArcFace cosine similarity: ~1 same picture, roughly > 0.4 same person with the real models).

Caching: detection + recognition results (boxes, keypoints, embeddings) are kept in memory (LRU,
bounded) and on disk (<cache dir>/faces, one small .npz per image) keyed by the sha256 of the image's
RGB pixels and the analyzer's identity (pack, file hashes, detector settings); a `face_cache()` can be
shared by several analyzers. Aligned crops are cut per call (cheap).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional, Sequence, Union

import cv2
import numpy as np
from PIL import Image

from engine import paths
from engine import weights as weights_module
from engine.errors import InvalidImageError, RefgenError
from engine.hashing import cached_sha256
from engine.cache import DiskCache, Folder
from engine.images import ImageSource, load_rgb, pixel_digest

log = logging.getLogger("refgen")

# Pack name (insightface's) -> manifest entry.
PACK_ENTRIES = {"antelopev2": "insightface-antelopev2", "buffalo_l": "insightface-buffalo-l"}
EMBEDDING_DIM = 512
DEFAULT_MIN_FACE = 64
FACE_ANALYSIS_KIND = "face-analysis"

# InstantID's keypoint picture: one colour per keypoint (eye, eye, nose, mouth, mouth), limbs from
# each keypoint to the nose in that keypoint's colour at 60 %, then a filled dot on every keypoint.
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMB_BRIGHTNESS = 0.6
KPS_LIMB_HALF_WIDTH = 4
KPS_DOT_RADIUS = 10

Select = Union[Literal["largest", "single"], int]
ImageInput = Union[ImageSource, np.ndarray]


# ------------------------------------------------------------------------------------- errors


class FaceError(RefgenError):
    """Base of the face layer's errors."""


class NoFaceError(FaceError):
    """No face was detected in an image."""


class FaceTooSmallError(FaceError):
    """The selected face's box is smaller than `min_face` pixels."""


class MultipleFacesError(FaceError):
    """Several faces where the caller asked for exactly one (select="single")."""


class FaceIndexError(FaceError, IndexError):
    """select=INDEX beyond the faces found."""


class FaceSelectionError(FaceError, ValueError):
    """A malformed argument: an unknown `select`, a negative `min_face`, a bad crop size or embedding."""


class FaceModelError(FaceError):
    """A face pack that is on disk but cannot be used (unknown pack, unreadable model, missing task)."""


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face. Arrays are read-only (they may be shared with the cache)."""

    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2 in image pixels
    kps: np.ndarray  # (5, 2) float32: eye, eye, nose tip, mouth corner, mouth corner
    det_score: float
    embedding: np.ndarray  # (512,) float32, L2-normalised ArcFace identity
    crop: Image.Image  # aligned RGB crop (insightface's norm_crop), crop_size x crop_size
    image_size: tuple[int, int]  # (width, height) of the analysed image
    embedding_norm: float = 1.0  # length of the raw ArcFace output (InstantID is fed the raw vector)

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@dataclass(frozen=True, eq=False)
class _Detection:
    """What the models computed for one face (cached); crops are cut from it per call."""

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray
    embedding_norm: float

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0.0) * max(self.bbox[3] - self.bbox[1], 0.0))


def face_cache(folder: Folder = None, max_entries: int = 256) -> DiskCache:
    """Detections by (analyzer identity, image pixels), bounded in memory, backed by .npz files in
    `folder` when one is given (FaceAnalyzer.load uses <cache dir>/faces), so a reference seen in an
    earlier session skips detection and recognition too."""
    if max_entries < 1:
        raise ValueError("max_entries must be at least 1")
    return DiskCache(folder, suffix=".npz", encode=_detections_npz, decode=_detections_from_npz, max_items=max_entries)


def _detections_from_npz(path: Path) -> Optional[tuple[_Detection, ...]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return tuple(
                _Detection(_frozen(box), _frozen(kps), float(score), _frozen(embedding), float(norm))
                for box, kps, score, embedding, norm in zip(data["bbox"], data["kps"], data["det_score"], data["embedding"],
                                                            data["embedding_norm"])
            )
    except (OSError, ValueError, KeyError):
        return None  # damaged: analyse again


def _detections_npz(detections: tuple[_Detection, ...]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, bbox=np.array([d.bbox for d in detections], np.float32).reshape(-1, 4),
             kps=np.array([d.kps for d in detections], np.float32).reshape(-1, 5, 2),
             det_score=np.array([d.det_score for d in detections], np.float64),
             embedding_norm=np.array([d.embedding_norm for d in detections], np.float64),
             embedding=np.array([d.embedding for d in detections], np.float32).reshape(-1, EMBEDDING_DIM))
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- analyzer


class FaceAnalyzer:
    """insightface detection + recognition over one model pack. Build it with `FaceAnalyzer.load`."""

    def __init__(
        self,
        app: Any,
        *,
        pack: str,
        entry: str,
        folder: Path,
        model_files: dict[str, Path],
        providers: list,
        device: str,
        det_size: tuple[int, int],
        det_thresh: float,
        identity: str,
        cache: Optional[DiskCache] = None,
    ):
        self.app = app
        self.pack = pack
        self.entry = entry
        self.folder = folder
        self.model_files = dict(model_files)
        self.providers = list(providers)
        self.device = device
        self.det_size = det_size
        self.det_thresh = det_thresh
        self.identity = identity
        self.cache = cache if cache is not None else face_cache()

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        pack: str = "antelopev2",
        device: Optional[str] = None,
        det_size: tuple[int, int] = (640, 640),
        weights_dir: Optional[Union[str, Path]] = None,
        *,
        det_thresh: float = 0.5,
        cache: Optional[DiskCache] = None,
        manifest: Optional[weights_module.Manifest] = None,
    ) -> "FaceAnalyzer":
        """Load a pack ("antelopev2", "buffalo_l", or a face-analysis manifest entry name).

        Raises WeightsMissingError (with the fetch command) when the pack is not on disk, and
        FaceModelError when its files are there but insightface cannot use them.
        """
        loaded_manifest = manifest or weights_module.Manifest.load()
        pack_name, entry = _resolve_pack(pack, loaded_manifest)
        det_size = _check_det_size(det_size)
        if not 0.0 < float(det_thresh) < 1.0:
            raise FaceSelectionError(f"det_thresh must be between 0 and 1, got {det_thresh}")
        folder = weights_module.require(entry.name, weights_dir, loaded_manifest)
        pack_dir = _pack_dir(entry, folder)
        torch_device = _resolve_device(device)
        providers = onnx_providers(torch_device)
        uses_cuda = _provider_name(providers[0]) == "CUDAExecutionProvider"
        ctx_id = (torch_device.index or 0) if uses_cuda else -1
        app = _build_face_analysis(entry.name, pack_dir, providers, ctx_id, det_size, float(det_thresh))
        model_files = {task: Path(model.model_file) for task, model in app.models.items()}
        identity = _analyzer_identity(pack_name, model_files, det_size, float(det_thresh))
        device_label = f"cuda:{torch_device.index or 0}" if uses_cuda else "cpu"
        log.info("face analysis: %s from %s on %s (%s)", pack_name, pack_dir, device_label, entry.license_label)
        return cls(
            app,
            pack=pack_name,
            entry=entry.name,
            folder=pack_dir,
            model_files=model_files,
            providers=providers,
            device=device_label,
            det_size=det_size,
            det_thresh=float(det_thresh),
            identity=identity,
            cache=cache if cache is not None else face_cache(lambda: paths.cache_dir() / "faces"),
        )

    def describe(self) -> dict[str, Any]:
        """What produced the embeddings, for provenance."""
        return {
            "pack": self.pack,
            "entry": self.entry,
            "files": {task: path.name for task, path in sorted(self.model_files.items())},
            "identity": self.identity,
            "det_size": list(self.det_size),
            "det_thresh": self.det_thresh,
            "providers": [_provider_name(p) for p in self.providers],
        }

    # ---------------------------------------------------------------------------- analysis

    def analyze_all(self, image: ImageInput, *, what: str = "image", crop_size: int = 112) -> list[Face]:
        """Every face in the image, largest first (possibly none)."""
        rgb = _load_image(image, what)
        crop_size = _check_crop_size(crop_size)
        detections = self._detections(rgb, what)
        pixels = np.asarray(rgb)
        return [_to_face(d, pixels, crop_size, rgb.size) for d in detections]

    def analyze(
        self,
        image: ImageInput,
        select: Select = "largest",
        min_face: int = DEFAULT_MIN_FACE,
        *,
        what: str = "image",
        crop_size: int = 112,
    ) -> Face:
        """One face: the largest (default), the only one (select="single": several faces is an
        error), or select=INDEX into the faces sorted largest first.

        Raises NoFaceError, FaceTooSmallError (box smaller than min_face px on its short side),
        MultipleFacesError, FaceIndexError; InvalidImageError for an unreadable image.
        """
        _check_select(select)
        if isinstance(min_face, bool) or not isinstance(min_face, (int, float)) or min_face < 0:
            raise FaceSelectionError(f"min_face must be a number of pixels >= 0, got {min_face!r}")
        rgb = _load_image(image, what)
        crop_size = _check_crop_size(crop_size)
        detections = self._detections(rgb, what)
        count = len(detections)
        if count == 0:
            raise NoFaceError(f"no face found in {what}; use a photo where one face is clearly visible")
        if select == "single" and count > 1:
            raise MultipleFacesError(
                f"{what} shows {count} faces but exactly one is needed here; crop it to one face, "
                f"or pick one with select=0..{count - 1} (0 = largest)"
            )
        if isinstance(select, int):
            if not 0 <= select < count:
                raise FaceIndexError(
                    f"face index {select} is out of range: {count} face{'s' if count != 1 else ''} found in "
                    f"{what} (valid: 0..{count - 1}, sorted largest first)"
                )
            chosen = detections[select]
        else:
            chosen = detections[0]
        width = float(chosen.bbox[2] - chosen.bbox[0])
        height = float(chosen.bbox[3] - chosen.bbox[1])
        if min(width, height) < min_face:
            raise FaceTooSmallError(
                f"the face in {what} is {width:.0f}x{height:.0f} px, smaller than the {min_face:g} px "
                "minimum (min_face); use a photo where the face is larger"
            )
        return _to_face(chosen, np.asarray(rgb), crop_size, rgb.size)

    def embed(
        self,
        images: Union[Sequence[ImageInput], ImageInput],
        *,
        select: Select = "largest",
        min_face: int = DEFAULT_MIN_FACE,
        label: str = "reference image",
    ) -> np.ndarray:
        """The identity of one or several reference images: the normalised mean of their faces'
        embeddings, (512,) float32 of unit length. Errors name the image ("reference image 2")."""
        items = _as_image_list(images)
        if not items:
            raise FaceSelectionError("embed needs at least one reference image")
        embeddings = []
        for number, image in enumerate(items, start=1):
            what = f"the {label}" if len(items) == 1 else f"{label} {number}"
            embeddings.append(self.analyze(image, select=select, min_face=min_face, what=what).embedding)
        return mean_identity(embeddings, "the references")

    def score_image(
        self, image: ImageInput, reference_embedding: Union[np.ndarray, Face], *, what: str = "image"
    ) -> Optional[float]:
        """ArcFace cosine similarity of the image's largest face to a reference identity, or None
        when the image has no face (record "no face"). Any size of face counts here."""
        faces = self.analyze_all(image, what=what)
        if not faces:
            return None
        return identity_score(faces[0].embedding, reference_embedding)

    # ---------------------------------------------------------------------------- internals

    def _detections(self, rgb: Image.Image, what: str) -> tuple[_Detection, ...]:
        key = hashlib.sha256(f"{self.identity}|{pixel_digest(rgb)}".encode()).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # skimage deprecations inside insightface
                found = self.app.get(bgr)
        except RefgenError:
            raise
        except Exception as exc:  # onnxruntime/insightface failure on this input
            raise FaceError(f"face analysis failed on {what}: {exc}") from exc
        detections = []
        for face in found:
            if face.kps is None or getattr(face, "embedding", None) is None:
                raise FaceModelError(
                    f"pack {self.pack!r} gave a face without keypoints or embedding; "
                    f"check it with: refgen weights verify {self.entry}"
                )
            detections.append(
                _Detection(
                    bbox=_frozen(np.asarray(face.bbox, np.float32).reshape(4)),
                    kps=_frozen(np.asarray(face.kps, np.float32).reshape(5, 2)),
                    det_score=float(face.det_score),
                    embedding=_frozen(_unit(face.embedding, f"the embedding of a face in {what}")),
                    embedding_norm=float(np.linalg.norm(np.asarray(face.embedding, np.float64))),
                )
            )
        # Largest first; equal areas keep the detector's order (by score).
        ordered = tuple(sorted(detections, key=lambda d: -d.area))
        self.cache.put(key, ordered)
        return ordered


# ------------------------------------------------------------------------------------- functions


def identity_score(face_embedding: Union[np.ndarray, Face], reference_embedding: Union[np.ndarray, Face]) -> float:
    """ArcFace cosine similarity of two identity embeddings (or Faces), in [-1, 1]."""
    first = _embedding_of(face_embedding, "face_embedding")
    second = _embedding_of(reference_embedding, "reference_embedding")
    if first.shape != second.shape:
        raise FaceSelectionError(
            f"embeddings differ in size ({first.shape[0]} vs {second.shape[0]}): were they made by different packs?"
        )
    value = float(np.dot(_unit(first, "face_embedding"), _unit(second, "reference_embedding")))
    return min(1.0, max(-1.0, value))


def keypoints_image(
    kps: Union[np.ndarray, Sequence[Sequence[float]]],
    size: tuple[int, int],
    *,
    from_size: Optional[tuple[int, int]] = None,
) -> Image.Image:
    """The five-keypoint picture InstantID's IdentityNet (ControlNet) is conditioned on.

    Black RGB canvas of `size` (width, height); a stick from each eye and mouth corner to the nose in
    that keypoint's colour at 60 % brightness, then a dot of radius 10 on every keypoint: red, green
    (eyes), blue (nose), yellow, magenta (mouth corners). `kps` are in the canvas' pixels, or in the
    pixels of an image of `from_size` that the canvas is a resize of.
    """
    width, height = (int(value) for value in size)
    if width < 1 or height < 1:
        raise FaceSelectionError(f"size must be a positive (width, height), got {size!r}")
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise FaceSelectionError(f"kps must be five finite (x, y) points, got shape {points.shape}")
    if from_size is not None:
        source_width, source_height = from_size
        points = points * np.array([width / source_width, height / source_height])
    canvas = np.zeros((height, width, 3), np.uint8)
    nose = points[2]
    for index in (0, 1, 3, 4):
        dimmed = tuple(int(channel * KPS_LIMB_BRIGHTNESS) for channel in KPS_COLORS[index])
        _draw_stick(canvas, points[index], nose, dimmed)
    for index, (x, y) in enumerate(points):
        cv2.circle(canvas, (int(x), int(y)), KPS_DOT_RADIUS, KPS_COLORS[index], thickness=-1)
    return Image.fromarray(canvas, "RGB")


def onnx_providers(device: Any) -> list:
    """ONNX Runtime providers for a torch device: CUDA (+ CPU fallback) when asked for and
    available (onnxruntime-gpu), else CPU."""
    import onnxruntime

    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            index = getattr(device, "index", None) or 0
            return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        log.warning("face analysis runs on CPU: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------- helpers


def _resolve_pack(pack: str, manifest: weights_module.Manifest) -> tuple[str, weights_module.ManifestEntry]:
    if pack in PACK_ENTRIES:
        return pack, manifest.get(PACK_ENTRIES[pack])
    if pack in manifest.names() and manifest.get(pack).kind == FACE_ANALYSIS_KIND:
        entry = manifest.get(pack)
        by_entry = {v: k for k, v in PACK_ENTRIES.items()}
        return by_entry.get(pack, PurePosixPath(entry.files[0].path).parent.name or pack), entry
    known = sorted(set(PACK_ENTRIES) | {e.name for e in manifest.entries if e.kind == FACE_ANALYSIS_KIND})
    raise FaceModelError(f"unknown face pack {pack!r}; known: {', '.join(known)}")


def _pack_dir(entry: weights_module.ManifestEntry, folder: Path) -> Path:
    """The one folder holding the entry's .onnx files (what insightface scans)."""
    parents = {PurePosixPath(f.path).parent for f in entry.files if f.path.endswith(".onnx")}
    if len(parents) != 1:
        raise FaceModelError(f"manifest entry {entry.name!r} must list .onnx files in one folder, got {sorted(map(str, parents))}")
    return (folder / str(parents.pop())).resolve()


def _build_face_analysis(
    entry_name: str, pack_dir: Path, providers: list, ctx_id: int, det_size: tuple[int, int], det_thresh: float
) -> Any:
    from insightface.app import FaceAnalysis

    if not pack_dir.is_dir():  # require() saw the files; never let insightface fetch a missing folder
        raise weights_module.WeightsMissingError(entry_name, [str(pack_dir)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # An absolute `name` is used as the model folder by every insightface version (0.7's
            # os.path.join(root, "models", name) returns it; 2.x takes an existing folder directly).
            app = FaceAnalysis(
                name=str(pack_dir),
                root=str(pack_dir.parent.parent),
                providers=providers,
                allowed_modules=["detection", "recognition"],
            )
            app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)
    except Exception as exc:  # corrupt ONNX, wrong model in the folder, provider failure
        raise FaceModelError(
            f"could not load face pack '{entry_name}' from {pack_dir}: {type(exc).__name__}: {exc}. "
            f"Check the files with: refgen weights verify {entry_name}"
        ) from exc
    missing = [task for task in ("detection", "recognition") if task not in app.models]
    if missing:
        raise FaceModelError(
            f"face pack '{entry_name}' in {pack_dir} has no {' or '.join(missing)} model insightface recognises. "
            f"Check the files with: refgen weights verify {entry_name}"
        )
    return app


def _analyzer_identity(pack: str, files: dict[str, Path], det_size: tuple[int, int], det_thresh: float) -> str:
    parts = [pack, f"det_size={det_size[0]}x{det_size[1]}", f"det_thresh={det_thresh:g}"]
    parts += [f"{task}={cached_sha256(path)}" for task, path in sorted(files.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _resolve_device(device: Any):
    """The engine's device rules (DeviceError for a GPU this machine lacks), never a silent CPU fallback."""
    from engine.devices import pick_device

    return pick_device(None if device is None else str(device), None)[0]


def _provider_name(provider: Any) -> str:
    return str(provider[0]) if isinstance(provider, (tuple, list)) else str(provider)


def _check_det_size(det_size: Any) -> tuple[int, int]:
    try:
        width, height = (int(value) for value in det_size)
    except (TypeError, ValueError):
        raise FaceSelectionError(f"det_size must be (width, height), got {det_size!r}") from None
    if width < 32 or height < 32 or width % 32 or height % 32:
        raise FaceSelectionError(f"det_size must be positive multiples of 32, got {width}x{height}")
    return width, height


def _check_crop_size(crop_size: Any) -> int:
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 112 or crop_size % 112:
        raise FaceSelectionError(f"crop_size must be 112, 224 or another multiple of 112, got {crop_size!r}")
    return crop_size


def _check_select(select: Any) -> None:
    if isinstance(select, bool) or not (select in ("largest", "single") or isinstance(select, int)):
        raise FaceSelectionError(f"select must be 'largest', 'single' or a face index (0 = largest), got {select!r}")


def _load_image(image: ImageInput, what: str) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImageError(f"{what}: an array must be RGB uint8 of shape (height, width, 3), got {image.dtype} {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image), "RGB")
    return load_rgb(image, what=what)


def _as_image_list(images: Any) -> list:
    if isinstance(images, (str, Path, bytes, Image.Image, np.ndarray)):
        return [images]
    return list(images)


def _to_face(detection: _Detection, pixels: np.ndarray, crop_size: int, image_size: tuple[int, int]) -> Face:
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skimage's SimilarityTransform.estimate
        aligned = face_align.norm_crop(pixels, landmark=np.asarray(detection.kps), image_size=crop_size)
    return Face(
        bbox=detection.bbox,
        kps=detection.kps,
        det_score=detection.det_score,
        embedding=detection.embedding,
        crop=Image.fromarray(aligned, "RGB"),
        image_size=(int(image_size[0]), int(image_size[1])),
        embedding_norm=detection.embedding_norm,
    )


def _embedding_of(value: Union[np.ndarray, Face], name: str) -> np.ndarray:
    array = value.embedding if isinstance(value, Face) else np.asarray(value)
    array = np.asarray(array, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise FaceSelectionError(f"{name} is empty")
    return array


def mean_identity(embeddings: Sequence[np.ndarray], what: str) -> np.ndarray:
    """The unit-length mean of several faces' embeddings: one identity for a character or a set of photos."""
    mean = np.mean(np.stack([np.asarray(e, np.float64).reshape(-1) for e in embeddings]), axis=0)
    return _unit(mean, f"the mean embedding of {what} (are they all of the same person? their faces cancel out)")


def ranking(scores: Sequence[Optional[float]]) -> list[int]:
    """Indices best first: highest identity score first, no face (None) last, ties in their given order."""
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0)))


def _unit(vector: Any, what: str) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(array))
    if not np.isfinite(array).all() or norm < 1e-12:
        raise FaceError(f"{what} is zero or not finite; the face model output is unusable")
    return (array / norm).astype(np.float32)


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


def _draw_stick(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, colour: tuple[int, int, int]) -> None:
    """A filled ellipse from start to end, KPS_LIMB_HALF_WIDTH px thick on each side of the line."""
    dx, dy = float(start[0] - end[0]), float(start[1] - end[1])
    centre = (int((start[0] + end[0]) / 2), int((start[1] + end[1]) / 2))
    half_length = int(math.hypot(dx, dy) / 2)
    angle = int(math.degrees(math.atan2(dy, dx)))
    outline = cv2.ellipse2Poly(centre, (half_length, KPS_LIMB_HALF_WIDTH), angle, 0, 360, 1)
    cv2.fillConvexPoly(canvas, outline, colour)
