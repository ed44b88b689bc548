"""The training images: found, checked through the safe image loader, de-duplicated by pixel digest, put in
aspect-ratio buckets, cropped (around the face when the face models are installed), then encoded ONCE into
VAE latents and both text encoders' conditioning."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image

from ..errors import InvalidImageError
from ..images import load_rgb, pixel_digest
from ..vae import pil_to_tensor
from .request import MAX_IMAGES, MIN_IMAGES, RECOMMENDED_IMAGES, TrainingDataError, TrainingRequest

log = logging.getLogger("refgen")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
BUCKET_STEP = 64  # SDXL's buckets (kohya, the SDXL paper) are multiples of 64 px
MAX_BUCKET_ASPECT = 2.0

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in the image's pixels
FaceLocator = Callable[[Image.Image], Optional[Box]]  # the largest face's box, or None


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    sha256: str  # engine.images.pixel_digest of the decoded RGB image
    caption: str
    pixels: Image.Image  # resized and cropped to its bucket
    original_size: tuple[int, int]  # (height, width), SDXL's size conditioning
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    crop: str = "centre"  # "centre" or "face"

    @property
    def bucket(self) -> tuple[int, int]:
        return self.pixels.size  # (width, height)


@dataclass
class DatasetReport:
    used: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    duplicates: list[dict] = field(default_factory=list)  # {"path", "same_as"}
    warnings: list[str] = field(default_factory=list)
    crop: str = "centre"  # how images were cropped, and why when not around faces
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> images
    generated: list[str] = field(default_factory=list)  # class images the base model drew for this run


@dataclass
class EncodedDataset:
    """Everything a step reads, computed once: latents and both encoders' conditioning, per image."""

    latents: list[torch.Tensor]  # per image (4, h, w), scaled by the VAE's scaling_factor; h, w per bucket
    prompt_embeds: torch.Tensor  # (N, 77, dim1 + dim2)
    pooled_embeds: torch.Tensor  # (N, projection)
    time_ids: torch.Tensor  # (N, 6): original size, crop top-left, target size
    buckets: list[tuple[int, int]]  # per image (width, height)
    captions: list[str]  # per image (encoded again at each step when the text encoders train)

    def __len__(self) -> int:
        return len(self.latents)


# -- finding and checking -------------------------------------------------------------------------


def find_images(images: Union[Path, list[Path]]) -> list[Path]:
    if isinstance(images, list):
        return [Path(p).expanduser() for p in images]
    folder = Path(images).expanduser()
    if not folder.is_dir():
        raise TrainingDataError(f"image folder not found: {folder}")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise TrainingDataError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def caption_for(path: Path, trigger: str) -> str:
    """kohya's convention: a `.txt` beside the image replaces the trigger-only prompt; the trigger is
    prepended when the caption lacks it, so every image still teaches it."""
    caption_file = path.with_suffix(".txt")
    caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
    if not caption:
        return trigger
    return caption if trigger in caption else f"{trigger}, {caption}"


# -- buckets and crops ----------------------------------------------------------------------------


def bucket_sizes(resolution: int, bucketing: bool = True) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of 64, of at most resolution² pixels and at most 2:1 either way.
    Without bucketing, the one square."""
    if not bucketing:
        return [(resolution, resolution)]
    area = resolution * resolution
    sizes = set()
    for width in range(BUCKET_STEP, 2 * resolution + 1, BUCKET_STEP):
        height = (area // width) // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and max(width, height) / min(width, height) <= MAX_BUCKET_ASPECT:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def cover_crop(image: Image.Image, bucket: tuple[int, int], face: Optional[Box] = None
               ) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers the bucket, then crop it: centred, or shifted the least that keeps the face
    box inside (centred on the face when the face is larger than the crop). Returns (image, (top, left))."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    if face is not None:
        x1, y1, x2, y2 = (value * scale for value in face)
        left = _keep_inside(left, x1, x2, width, resized_w)
        top = _keep_inside(top, y1, y2, height, resized_h)
    return resized.crop((left, top, left + width, top + height)), (top, left)


def _keep_inside(start: int, low: float, high: float, window: int, extent: int) -> int:
    if high - low >= window:
        start = round((low + high - window) / 2)
    elif low < start:
        start = math.floor(low)
    elif high > start + window:
        start = math.ceil(high - window)
    return min(max(start, 0), extent - window)


# -- loading --------------------------------------------------------------------------------------


def load_dataset(request: TrainingRequest, face_locator: Optional[FaceLocator] = None,
                 crop_note: str = "") -> tuple[list[TrainingImage], DatasetReport]:
    """Checked, de-duplicated, bucketed and cropped images. `face_locator` finds the face to keep in the crop
    (None: centre crops, `crop_note` says why)."""
    report = DatasetReport(crop="face" if face_locator else f"centre{f' ({crop_note})' if crop_note else ''}")
    images = prepare_images(find_images(request.images), lambda path: caption_for(path, request.trigger), request,
                            report, face_locator)
    report.used = [str(image.path) for image in images]
    for image in images:
        key = f"{image.bucket[0]}x{image.bucket[1]}"
        report.buckets[key] = report.buckets.get(key, 0) + 1
    _check_count(images, report)
    if face_locator and any(image.crop == "centre" for image in images):
        faceless = [image.path.name for image in images if image.crop == "centre"]
        report.warnings.append(f"no face found in {len(faceless)} image(s), centre-cropped: {', '.join(faceless)}")
    return images, report


def load_class_images(request: TrainingRequest, report: DatasetReport) -> list[TrainingImage]:
    """Prior preservation's class images ("a photo of a woman"), captioned with the class prompt, prepared like
    the character's photos (bad ones refused or skipped into the same report)."""
    images = prepare_images(find_images(request.class_images), lambda path: request.class_prompt, request, report, None)
    if not images:
        raise TrainingDataError(f"no usable class images in {request.class_images}")
    return images


def prepare_images(paths: list[Path], caption_of: Callable[[Path], str], request: TrainingRequest,
                   report: DatasetReport, face_locator: Optional[FaceLocator]) -> list[TrainingImage]:
    buckets = bucket_sizes(request.resolution, request.bucketing)
    seen: dict[str, Path] = {}
    images = []
    for path in paths:
        image = load_rgb_or_report(path, request, report)
        if image is None:
            continue
        digest = pixel_digest(image)
        if digest in seen:
            report.duplicates.append({"path": str(path), "same_as": str(seen[digest])})
            continue
        bucket = nearest_bucket(image.size, buckets)
        if image.width < bucket[0] or image.height < bucket[1]:
            _refuse(path, f"is {image.width}x{image.height}, smaller than its training size {bucket[0]}x{bucket[1]} "
                          f"(resolution {request.resolution})", request, report)
            continue
        seen[digest] = path
        face = face_locator(image) if face_locator else None
        pixels, crop = cover_crop(image, bucket, face)
        images.append(TrainingImage(path, digest, caption_of(path), pixels, (image.height, image.width), crop,
                                    "face" if face else "centre"))
    return images


def load_rgb_or_report(path: Path, request: TrainingRequest, report: DatasetReport) -> Optional[Image.Image]:
    try:
        return load_rgb(path, what=f"training image {path}")
    except InvalidImageError as exc:
        return _refuse(path, f"cannot be read: {exc}", request, report)


def _refuse(path: Path, reason: str, request: TrainingRequest, report: DatasetReport) -> None:
    if not request.skip_bad:
        raise TrainingDataError(f"training image {path} {reason} (skip_bad=True skips such images)")
    report.skipped.append({"path": str(path), "reason": reason})
    log.warning("skipping training image %s: %s", path, reason)
    return None


def _check_count(images: list[TrainingImage], report: DatasetReport) -> None:
    count = len(images)
    if count < MIN_IMAGES:
        dropped = len(report.skipped) + len(report.duplicates)
        raise TrainingDataError(f"{count} usable training images, at least {MIN_IMAGES} are needed"
                                + (f" ({dropped} skipped or duplicate)" if dropped else ""))
    if count > MAX_IMAGES:
        raise TrainingDataError(f"{count} training images, at most {MAX_IMAGES} are supported")
    if count < RECOMMENDED_IMAGES:
        message = (f"only {count} training images: 10-15 or more different photos (angles, light, "
                   "backgrounds) generalise better")
        report.warnings.append(message)
        log.warning(message)


# -- encoding (once, before the loop) -------------------------------------------------------------


@torch.no_grad()
def encode_dataset(pipe, images: list[TrainingImage], device: torch.device) -> EncodedDataset:
    """Latents are the VAE posterior's MEAN, not a sample: they are computed once, and one fixed sample
    would bake one draw of encoder noise into every step, while the mean is the deterministic centre (the
    SDXL posterior's spread is tiny). Encoded in fp32: the SDXL VAE overflows in fp16."""
    vae = pipe.vae.to(device, torch.float32)
    latents = [_latent(vae, image.pixels, device).cpu() for image in images]
    pipe.vae.to("cpu")
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to(device, torch.float32)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    embeds, pooled = zip(*(encode_captions(tokenizers, encoders, [image.caption], device) for image in images))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to("cpu")
    time_ids = torch.tensor([[*image.original_size, *image.crop_top_left, *image.pixels.size[::-1]] for image in images],
                            dtype=torch.float32)
    return EncodedDataset(latents, torch.cat(embeds).cpu(), torch.cat(pooled).cpu(), time_ids,
                          [image.bucket for image in images], [image.caption for image in images])


def _latent(vae, image: Image.Image, device: torch.device) -> torch.Tensor:
    pixels = pil_to_tensor([image]).to(device)
    return (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)[0]


def encode_captions(tokenizers, encoders, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning, as its pipeline computes it: both encoders' penultimate hidden states side by
    side, and the second encoder's pooled projection. `encoders` may be wrapped (DDP) when they train."""
    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds: the pooled conditioning
            pooled = output[0]
        embeds.append(output.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled
