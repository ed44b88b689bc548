"""LoRA training for SDXL (first increment): a folder of photos and a trigger word in, one kohya-layout
`.safetensors` LoRA out.

The recipe is diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py` without its accelerate
wrapping: a frozen UNet, a peft LoRA on the attention projections (`unet.add_adapter`), DDPM noise and
the epsilon (or v) MSE objective, AdamW over the LoRA parameters only. Latents and text embeddings are
computed once before the loop (the text encoders are not trained yet), so a step runs only the UNet.

Deferred to later increments: aspect-ratio bucketing and a face-aware crop (images are centre-cropped
to a square here), text-encoder training, the local LoRA library (`loras=["name"]`) and the CLI. The
result is written into the `out_dir` the caller gives.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from PIL import Image

from .devices import pick_device
from .errors import InvalidImageError, RefgenError
from .images import load_rgb, pixel_digest, write_atomic
from .provenance import package_versions
from .vae import pil_to_tensor

log = logging.getLogger("refgen")

MIN_IMAGES, MAX_IMAGES, RECOMMENDED_IMAGES = 5, 200, 10
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' SDXL DreamBooth script's UNet targets
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class TrainingError(RefgenError):
    """A training request refgen cannot run as asked."""


class TrainingDataError(TrainingError):
    """A dataset problem: too few images, an unreadable or too small image, an empty folder."""


class TrainingRequest(BaseModel):
    """What to train. `images` is a folder or a list of image files; a `.txt` beside an image is its caption."""

    model_config = ConfigDict(extra="forbid")

    images: Union[Path, list[Path]]
    name: str
    trigger: str = Field(min_length=1, max_length=200)
    base_model: str = "sdxl-base"
    rank: int = Field(default=16, ge=1, le=256)
    alpha: Optional[float] = Field(default=None, gt=0)  # None: equal to rank (scale 1)
    steps: int = Field(default=1000, ge=1, le=100_000)
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0)
    batch_size: int = Field(default=1, ge=1, le=64)
    resolution: int = Field(default=1024, ge=64, le=4096)
    seed: int = Field(default=0, ge=0, lt=2**63)
    train_text_encoder: bool = False
    skip_bad: bool = False  # skip unreadable or too small images (reported) instead of stopping

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.fullmatch(value):
            raise ValueError("name must be a plain file name: letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_eight(cls, value: int) -> int:
        if value % 8:
            raise ValueError("resolution must be a multiple of 8 (the VAE's scale factor)")
        return value

    @property
    def network_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    sha256: str  # engine.images.pixel_digest of the decoded RGB image
    caption: str
    pixels: Image.Image  # cropped and resized to the training resolution
    original_size: tuple[int, int]  # (height, width), SDXL's size conditioning
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


@dataclass
class DatasetReport:
    used: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    duplicates: list[dict] = field(default_factory=list)  # {"path", "same_as"}
    warnings: list[str] = field(default_factory=list)


@dataclass
class EncodedDataset:
    """Everything a step reads, computed once: latents and both encoders' conditioning, per image."""

    latents: torch.Tensor  # (N, 4, h, w), scaled by the VAE's scaling_factor
    prompt_embeds: torch.Tensor  # (N, 77, dim1 + dim2)
    pooled_embeds: torch.Tensor  # (N, projection)
    time_ids: torch.Tensor  # (N, 6): original size, crop top-left, target size


@dataclass
class TrainingBatch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    added_cond: dict  # {"text_embeds", "time_ids"}, the UNet's added_cond_kwargs


@dataclass
class TrainingSetup:
    """A prepared run: the UNet carrying a fresh LoRA, the noise scheduler, the encoded data, and the one
    generator every random draw comes from."""

    request: TrainingRequest
    unet: torch.nn.Module
    scheduler: object
    dataset: EncodedDataset
    report: DatasetReport
    images: list[TrainingImage]
    generator: torch.Generator
    device: torch.device

    def batches(self) -> Iterator[TrainingBatch]:
        return draw_batches(self.dataset, self.request.batch_size, self.scheduler.config.num_train_timesteps,
                            self.generator, self.device)


@dataclass(frozen=True)
class TrainingResult:
    path: Path
    losses: list[float]
    report: DatasetReport


# -- dataset --------------------------------------------------------------------------------------


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


def centre_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Short side resized to `resolution`, then the centre square: (image, (top, left)) as the diffusers
    script records the crop. Aspect-ratio bucketing and a face-aware crop come later."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    top, left = (height - resolution) // 2, (width - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution)), (top, left)


def load_dataset(request: TrainingRequest) -> tuple[list[TrainingImage], DatasetReport]:
    report = DatasetReport()
    seen: dict[str, Path] = {}
    images = []
    for path in find_images(request.images):
        image = _checked_image(path, request, report)
        if image is None:
            continue
        digest = pixel_digest(image)
        if digest in seen:
            report.duplicates.append({"path": str(path), "same_as": str(seen[digest])})
            continue
        seen[digest] = path
        pixels, crop = centre_crop(image, request.resolution)
        images.append(TrainingImage(path, digest, caption_for(path, request.trigger), pixels, (image.height, image.width), crop))
        report.used.append(str(path))
    _check_count(images, report)
    return images, report


def _checked_image(path: Path, request: TrainingRequest, report: DatasetReport) -> Optional[Image.Image]:
    """The decoded image, or None when it is bad and skip_bad is set (the reason goes in the report)."""
    try:
        image = load_rgb(path, what=f"training image {path}")
    except InvalidImageError as exc:
        return _refuse(path, f"cannot be read: {exc}", request, report)
    if min(image.size) < request.resolution:
        return _refuse(path, f"is {image.width}x{image.height}, smaller than the training resolution "
                             f"{request.resolution}x{request.resolution}", request, report)
    return image


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
    latents = torch.cat([_latent(vae, image.pixels, device) for image in images])
    pipe.vae.to("cpu")
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to(device, torch.float32)
    embeds, pooled = zip(*(_text(pipe, image.caption, device) for image in images))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to("cpu")
    time_ids = torch.tensor([[*image.original_size, *image.crop_top_left, *image.pixels.size[::-1]] for image in images],
                            dtype=torch.float32)
    return EncodedDataset(latents.cpu(), torch.cat(embeds).cpu(), torch.cat(pooled).cpu(), time_ids)


def _latent(vae, image: Image.Image, device: torch.device) -> torch.Tensor:
    pixels = pil_to_tensor([image]).to(device)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def _text(pipe, caption: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both SDXL encoders through the pipeline's own encode_prompt (penultimate hidden states, pooled)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=caption, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


# -- the loop -------------------------------------------------------------------------------------


def draw_batches(dataset: EncodedDataset, batch_size: int, num_train_timesteps: int,
                 generator: torch.Generator, device: torch.device) -> Iterator[TrainingBatch]:
    """Batches forever: image order from successive permutations, then noise and timesteps, all drawn
    on the CPU from `generator` so a seed gives the same run on any device."""
    order = _index_stream(len(dataset.latents), generator)
    while True:
        index = torch.tensor([next(order) for _ in range(batch_size)])
        latents = dataset.latents[index]
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
        added = {"text_embeds": dataset.pooled_embeds[index].to(device), "time_ids": dataset.time_ids[index].to(device)}
        yield TrainingBatch(latents.to(device), noise.to(device), timesteps.to(device),
                            dataset.prompt_embeds[index].to(device), added)


def _index_stream(count: int, generator: torch.Generator) -> Iterator[int]:
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def training_loss(unet, scheduler, batch: TrainingBatch, dtype: torch.dtype) -> torch.Tensor:
    """MSE between the UNet's prediction and its target: the noise (epsilon) or the velocity (v)."""
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    added = {key: value.to(dtype) for key, value in batch.added_cond.items()}
    prediction = unet(noisy.to(dtype), batch.timesteps, batch.prompt_embeds.to(dtype),
                      added_cond_kwargs=added, return_dict=False)[0]
    return F.mse_loss(prediction.float(), _target(scheduler, batch).float(), reduction="mean")


def _target(scheduler, batch: TrainingBatch) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return batch.noise
    if kind == "v_prediction":
        return scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    raise TrainingError(f"the base model's prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def add_lora(unet, request: TrainingRequest, generator: torch.Generator) -> list[torch.nn.Parameter]:
    """peft's LoRA on the attention projections, as diffusers' script adds it; returns the trainable
    parameters. peft draws the gaussian lora_A init from torch's global RNG: it is redrawn here, same
    distribution (std 1/r), from the run's generator, so the seed alone fixes the run."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=request.rank, lora_alpha=request.network_alpha, init_lora_weights="gaussian",
                        target_modules=LORA_TARGETS)
    unet.add_adapter(config)
    trainable = []
    for name, parameter in unet.named_parameters():
        if "lora_" not in name:
            continue
        parameter.data = parameter.data.float()  # LoRA factors train in fp32 over frozen bf16/fp32 weights
        if "lora_A" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) / request.rank)
        parameter.requires_grad_(True)
        trainable.append(parameter)
    return trainable


def prepare_training(request: TrainingRequest, *, device=None, dtype=None) -> TrainingSetup:
    """Load and check the data, load the base model, encode everything once, add the LoRA."""
    from diffusers import DDPMScheduler

    from .loading import load_pipeline

    if request.train_text_encoder:
        raise TrainingError("train_text_encoder=True is not yet supported: this version trains the UNet only")
    device, dtype = _training_device(device, dtype)
    images, report = load_dataset(request)
    pipe, _ = load_pipeline(request.base_model, torch.float32)
    dataset = encode_dataset(pipe, images, device)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    unet = pipe.unet.to(device, dtype)
    add_lora(unet, request, generator)
    unet.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingSetup(request, unet, scheduler, dataset, report, images, generator, device)


def _training_device(device, dtype) -> tuple[torch.device, torch.dtype]:
    """fp32 on CPU; bf16 on a GPU by default. fp16 is refused: without loss scaling its gradients underflow."""
    chosen, picked = pick_device(device, dtype if dtype is not None else None)
    if picked == torch.float16:
        if dtype is not None:
            raise TrainingError("fp16 training is not supported yet (it needs loss scaling): use bf16 or fp32")
        picked = torch.bfloat16
    return chosen, picked


@dataclass(frozen=True)
class TrainingProgress:
    """What a caller watching a run sees after each optimizer step."""

    step: int  # steps done
    total: int
    loss: float
    elapsed: float  # seconds since the loop started (encoding excluded)

    @property
    def eta(self) -> float:
        return self.elapsed / self.step * (self.total - self.step) if self.step else float("nan")


class TrainingInterrupted(TrainingError):
    """The run was stopped (Ctrl-C or the caller's stop()); `checkpoint` holds the state to resume from."""

    def __init__(self, message: str, checkpoint: Optional[Path] = None):
        super().__init__(message)
        self.checkpoint = checkpoint


def train_lora(request: TrainingRequest, out_dir: Union[str, Path, None] = None, *, library=None,
               overwrite: bool = False, device=None, dtype=None, progress: bool = True,
               on_step: Optional[Callable[[TrainingProgress], None]] = None,
               stop: Optional[Callable[[], bool]] = None) -> TrainingResult:
    """Train a LoRA and write it as `<name>.safetensors` (kohya layout, ss_* metadata): into the local LoRA
    library (default, so `loras=["<name>"]` finds it) or into `out_dir` when one is given.

    `on_step` is called after every optimizer step; `stop` is polled between steps and ends the run with
    TrainingInterrupted when it returns True. A name already in the library is refused before any work,
    unless `overwrite`.
    """
    from .lora_library import LoraLibrary

    library = library or LoraLibrary()
    destination = (Path(out_dir).expanduser() / f"{request.name}.safetensors") if out_dir is not None else library.path(request.name)
    if destination.exists() and not overwrite:
        raise TrainingError(f"{destination} already exists: choose another name, delete it "
                            f"(refgen loras delete {request.name}) or pass overwrite=True")
    setup = prepare_training(request, device=device, dtype=dtype)
    losses = run_steps(setup, progress, on_step, stop)
    save_lora(setup, destination)
    return TrainingResult(destination, losses, setup.report)


def run_steps(setup: TrainingSetup, progress: bool, on_step=None, stop=None) -> list[float]:
    import time

    from tqdm.auto import tqdm

    trainable = [p for p in setup.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=setup.request.learning_rate, weight_decay=1e-4)  # the script's default
    dtype = next(p.dtype for p in setup.unet.parameters() if not p.requires_grad)
    losses = []
    total = setup.request.steps
    bar = tqdm(range(total), desc=f"training {setup.request.name}", unit="step", disable=not progress)
    batches = setup.batches()
    started = time.perf_counter()
    for step in bar:
        if stop is not None and stop():
            raise TrainingInterrupted(f"training {setup.request.name} stopped at step {step} of {total}")
        loss = training_loss(setup.unet, setup.scheduler, next(batches), dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(TrainingProgress(step + 1, total, losses[-1], time.perf_counter() - started))
    bar.close()
    return losses


# -- output ---------------------------------------------------------------------------------------


def kohya_state_dict(unet, alpha: float) -> dict[str, torch.Tensor]:
    """peft's state dict -> kohya keys (`lora_unet_<diffusers module path>.lora_down.weight`, `.lora_up`,
    `.alpha`) through diffusers' own converter, the way its training script's --output_kohya_format does.
    The converter writes alpha = rank; the request's alpha replaces it."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict

    peft_state = {f"unet.{key}": value for key, value in get_peft_model_state_dict(unet).items()}
    state = convert_state_dict_to_kohya(peft_state)
    return {key: (torch.tensor(alpha) if key.endswith(".alpha") else value.detach().float().cpu().contiguous())
            for key, value in state.items()}


def training_metadata(setup: TrainingSetup) -> dict[str, str]:
    request, images = setup.request, setup.images
    tags: dict[str, int] = {}
    for image in images:
        for tag in (part.strip() for part in image.caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    refgen = {
        "request": request.model_dump(mode="json"),
        "seed": request.seed,
        "dataset": [{"path": str(image.path), "sha256": image.sha256, "caption": image.caption} for image in images],
        "skipped": setup.report.skipped,
        "duplicates": setup.report.duplicates,
        "packages": package_versions(),
    }
    return {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": request.base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(request.rank),
        "ss_network_alpha": str(request.network_alpha),
        "ss_resolution": f"({request.resolution}, {request.resolution})",
        "ss_max_train_steps": str(request.steps),
        "ss_steps": str(request.steps),
        "ss_learning_rate": str(request.learning_rate),
        "ss_unet_lr": str(request.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_network_train_unet_only": "True",
        "ss_train_batch_size": str(request.batch_size),
        "ss_seed": str(request.seed),
        "ss_num_train_images": str(len(images)),
        "ss_output_name": request.name,
        "ss_tag_frequency": json.dumps({request.name: tags}),
        "ss_trigger_words": json.dumps([request.trigger]),
        "refgen_training": json.dumps(refgen, sort_keys=True),
    }


def save_lora(setup: TrainingSetup, path: Path) -> Path:
    from safetensors.torch import save

    data = save(kohya_state_dict(setup.unet, setup.request.network_alpha), metadata=training_metadata(setup))
    return write_atomic(path, data)
