"""Face parsing for the character mask: which pixels of a reference photo are hair, clothing, accessories.

    from adapters.face_parsing import FaceParser, parts_mask, mask_preview
    parser = FaceParser.load()                          # the `face-parsing` manifest entry
    labels = parser.labels(photo)                       # (H, W) uint8 class ids at the photo's own size
    mask = parts_mask(labels, "face+hair+outfit")       # (H, W) bool: what the reference carries besides the face
    preview = mask_preview(photo, mask)                 # the mask tinted over the photo (`refgen character show`)

Model: `jonathandinu/face-parsing`, a SegFormer (nvidia/mit-b5) fine-tuned on CelebAMask-HQ, loaded with
transformers' SegformerForSemanticSegmentation + SegformerImageProcessor from the manifest entry's folder
(`local_files_only`). Nothing here downloads: the files are checked with `engine.weights.require` first
(a missing one raises WeightsMissingError naming `refgen weights fetch face-parsing`). LICENSE: the model
card says MIT; the CelebAMask-HQ training data is for non-commercial research and education only.

Inference follows the model card: the processor resizes to 512x512 and normalises, the logits (1/4 of
that) are upsampled bilinearly to the image's size and the argmax is the class id. Above
MAX_LOGIT_PIXELS the logits are upsampled to a size of that many pixels instead and the label map is
resized to the image with nearest neighbour (19 float logits per pixel of a 24 MP photo would be 1.8 GB).

The class table (CLASSES, the checkpoint's id2label; NOT the BiSeNet/face-parsing.PyTorch order, where
hair is 17): 0 background, 1 skin, 2 nose, 3 eye_g (glasses), 4 l_eye, 5 r_eye, 6 l_brow, 7 r_brow,
8 l_ear, 9 r_ear, 10 mouth, 11 u_lip, 12 l_lip, 13 hair, 14 hat, 15 ear_r (earrings), 16 neck_l
(necklace), 17 neck, 18 cloth. `FaceParser.load` refuses a checkpoint whose labels differ.

The parts table (`parts_mask(labels, keep)`): the mask is what an APPEARANCE reference carries BESIDES
the face; the face itself (identity) goes through the identity adapter. Ideogram calls these parts
"hair, clothing, and accessories".

    keep                 classes in the mask
    "face"               none (the face alone: an empty mask)
    "face+hair"          hair, hat
    "face+hair+outfit"   hair, hat, cloth, neck_l (necklace), ear_r (earrings), eye_g (glasses)
    "all"                every class but background (face, neck and all of the above)

Choices: a hat counts with the hair (the parser labels headwear where the hair would be, so a hair mask
without it would have a hat-shaped hole in the silhouette). Glasses, earrings and a necklace are
accessories, so they come with the outfit, not with the face, although they sit on it. FACE_CLASSES
(skin, nose, eyes, brows, ears, mouth, lips) is what the identity adapter covers; the neck is body skin,
neither face nor outfit (BODY_CLASSES), so only "all" keeps it.

Conventions: images are anything `engine.images.load_rgb` reads (path, bytes, PIL) or an RGB uint8
array; an unreadable one raises InvalidImageError. No module-level state: a FaceParser holds its model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Optional, Union

import numpy as np
from PIL import Image

from engine import weights as weights_module
from engine.errors import InvalidImageError, RefgenError
from engine.hashing import cached_sha256
from engine.images import ImageSource, load_rgb

log = logging.getLogger("refgen")

ENTRY_NAME = "face-parsing"
FACE_PARSING_KIND = "face-parsing"
# Above this many pixels the logits are upsampled to this size and the labels resized (nearest).
MAX_LOGIT_PIXELS = 4 * 1024 * 1024

# The checkpoint's id2label (config.json of jonathandinu/face-parsing), name -> class id.
CLASSES: Mapping[str, int] = MappingProxyType({
    "background": 0, "skin": 1, "nose": 2, "eye_g": 3, "l_eye": 4, "r_eye": 5, "l_brow": 6, "r_brow": 7,
    "l_ear": 8, "r_ear": 9, "mouth": 10, "u_lip": 11, "l_lip": 12, "hair": 13, "hat": 14, "ear_r": 15,
    "neck_l": 16, "neck": 17, "cloth": 18,
})
CLASS_NAMES: tuple[str, ...] = tuple(sorted(CLASSES, key=CLASSES.__getitem__))  # index = class id
NUM_CLASSES = len(CLASSES)

FACE_CLASSES = frozenset(
    CLASSES[name] for name in ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                               "mouth", "u_lip", "l_lip")
)
BODY_CLASSES = frozenset({CLASSES["neck"]})
HAIR_CLASSES = frozenset({CLASSES["hair"], CLASSES["hat"]})
OUTFIT_CLASSES = frozenset({CLASSES["cloth"]})
ACCESSORY_CLASSES = frozenset({CLASSES["eye_g"], CLASSES["ear_r"], CLASSES["neck_l"]})

Keep = Literal["face", "face+hair", "face+hair+outfit", "all"]
# keep -> the class ids its mask holds (besides the face, which the identity adapter carries).
PARTS: Mapping[str, frozenset[int]] = MappingProxyType({
    "face": frozenset(),
    "face+hair": HAIR_CLASSES,
    "face+hair+outfit": HAIR_CLASSES | OUTFIT_CLASSES | ACCESSORY_CLASSES,
    "all": frozenset(range(1, NUM_CLASSES)),
})
KEEP_VALUES: tuple[str, ...] = tuple(PARTS)

ImageInput = Union[ImageSource, np.ndarray]
PREVIEW_COLOR = (255, 40, 150)
PREVIEW_ALPHA = 0.55


# ------------------------------------------------------------------------------------- errors


class FaceParsingError(RefgenError):
    """Base of the face parsing errors."""


class FaceParsingModelError(FaceParsingError):
    """The checkpoint is on disk but is not the expected face parser (unreadable, other classes, other keys)."""


class PartsSelectionError(FaceParsingError, ValueError):
    """A malformed argument: an unknown `keep`, a label map or mask of the wrong shape or type."""


# ------------------------------------------------------------------------------------- parts


def parts_mask(labels: np.ndarray, keep: str) -> np.ndarray:
    """(H, W) bool: the pixels of `labels` (class ids, as `FaceParser.labels` returns) whose class `keep`
    selects (see PARTS). "face" gives an all-False mask of the same size."""
    if keep not in PARTS:
        raise PartsSelectionError(f"keep must be one of {', '.join(KEEP_VALUES)}; got {keep!r}")
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise PartsSelectionError(f"labels must be an (H, W) integer array of class ids, got {labels.dtype} {labels.shape}")
    classes = sorted(PARTS[keep])
    if not classes:
        return np.zeros(labels.shape, dtype=bool)
    return np.isin(labels, classes)


def class_mask(labels: np.ndarray, names: Union[str, tuple[str, ...], list[str]]) -> np.ndarray:
    """(H, W) bool of the named classes (names from CLASSES), for callers that need their own choice."""
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [name for name in names if name not in CLASSES]
    if unknown:
        raise PartsSelectionError(f"unknown class {', '.join(unknown)}; known: {', '.join(CLASS_NAMES)}")
    return np.isin(np.asarray(labels), [CLASSES[name] for name in names])


def mask_preview(image: ImageInput, mask: np.ndarray, color: tuple[int, int, int] = PREVIEW_COLOR,
                 alpha: float = PREVIEW_ALPHA) -> Image.Image:
    """The photo with the mask's pixels tinted `color` (RGB), for showing what a reference carries."""
    rgb = np.asarray(_load_image(image), dtype=np.float32)
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise PartsSelectionError(f"mask is {mask.shape[1::-1]} (w, h) but the image is {rgb.shape[1::-1]}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise PartsSelectionError(f"alpha must be between 0 and 1, got {alpha}")
    tint = np.asarray(color, dtype=np.float32).reshape(1, 1, 3)
    selected = mask.astype(bool)[..., None]
    out = np.where(selected, rgb * (1.0 - float(alpha)) + tint * float(alpha), rgb)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def _load_image(image: ImageInput) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape[:2]:
            raise InvalidImageError(f"image array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        return Image.fromarray(image, "RGB")
    return load_rgb(image, what="image")


# ------------------------------------------------------------------------------------- model


class FaceParser:
    """A loaded face parsing model: `labels(image)` is its per-pixel class map."""

    def __init__(self, model: Any, processor: Any, *, device: Any, dtype: Any, entry: str = ENTRY_NAME,
                 folder: Optional[Path] = None, source: Optional[Mapping[str, str]] = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.entry = entry
        self.folder = folder
        self.source = dict(source or {})  # repo, revision, license of the manifest entry

    @classmethod
    def load(
        cls,
        name: str = ENTRY_NAME,
        device: Optional[str] = None,
        weights_dir: Optional[Union[str, Path]] = None,
        manifest: Optional[weights_module.Manifest] = None,
    ) -> "FaceParser":
        """Load the manifest entry `name` (default `face-parsing`) on `device` (default: CUDA when there is
        one, in fp16; else CPU in fp32).

        Raises WeightsMissingError (with the fetch command) when its files are not on disk, and
        FaceParsingModelError when they are there but are not a CelebAMask-HQ SegFormer parser.
        """
        from engine.devices import pick_device

        loaded_manifest = manifest or weights_module.Manifest.load()
        entry = loaded_manifest.get(name)
        folder = weights_module.require(entry.name, weights_dir, loaded_manifest)
        torch_device, dtype = pick_device(None if device is None else str(device), None)
        model, processor = _load_segformer(entry.name, folder)
        model = model.to(device=torch_device, dtype=dtype).eval()
        log.info("face parsing: %s from %s on %s (%s)", entry.name, folder, torch_device, entry.license_label)
        source = {"repo": entry.repo, "revision": entry.revision, "license": entry.license}
        return cls(model, processor, device=torch_device, dtype=dtype, entry=entry.name, folder=folder, source=source)

    def describe(self) -> dict[str, Any]:
        """What parsed the image, for provenance: the entry, its source, the weights' sha256, device and dtype."""
        weights = None
        if self.folder is not None and (self.folder / "model.safetensors").is_file():
            weights = cached_sha256(self.folder / "model.safetensors")
        return {
            "entry": self.entry,
            **self.source,
            "weights_sha256": weights,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.model.config.id2label.items()}

    def labels(self, image: ImageInput) -> np.ndarray:
        """(H, W) uint8 class ids (CLASSES) at the image's own size."""
        import torch

        picture = _load_image(image)
        width, height = picture.size
        inputs = self.processor(images=picture, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            logits = self.model(pixel_values=pixel_values).logits.float()  # (1, classes, h/4, w/4)
            out_h, out_w = _logit_size(width, height)
            upsampled = torch.nn.functional.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
            labels = upsampled.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        if labels.shape != (height, width):
            labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
        return labels

    def mask(self, image: ImageInput, keep: str) -> np.ndarray:
        """parts_mask(self.labels(image), keep)."""
        if keep not in PARTS:  # before running the model
            raise PartsSelectionError(f"keep must be one of {', '.join(KEEP_VALUES)}; got {keep!r}")
        return parts_mask(self.labels(image), keep)


def _logit_size(width: int, height: int) -> tuple[int, int]:
    """(h, w) to upsample the logits to: the image's size, or that shape scaled to MAX_LOGIT_PIXELS."""
    if width * height <= MAX_LOGIT_PIXELS:
        return height, width
    scale = (MAX_LOGIT_PIXELS / float(width * height)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def _load_segformer(entry_name: str, folder: Path) -> tuple[Any, Any]:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    try:
        processor = SegformerImageProcessor.from_pretrained(str(folder), local_files_only=True)
        model, info = SegformerForSemanticSegmentation.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise FaceParsingModelError(f"'{entry_name}' in {folder} cannot be loaded as a SegFormer: {exc}") from exc
    wrong = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    wrong = {kind: keys for kind, keys in wrong.items() if keys}
    if wrong:  # from_pretrained would leave these randomly initialised: refuse rather than parse noise
        detail = "; ".join(f"{kind}: {', '.join(map(str, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
                           for kind, keys in wrong.items())
        raise FaceParsingModelError(f"'{entry_name}' in {folder} does not match the SegFormer layout ({detail})")
    labels = {int(k): str(v) for k, v in model.config.id2label.items()}
    if labels != dict(enumerate(CLASS_NAMES)):
        raise FaceParsingModelError(
            f"'{entry_name}' in {folder} has other classes than CelebAMask-HQ's in this order "
            f"({', '.join(CLASS_NAMES)}): {labels}"
        )
    return model, processor
