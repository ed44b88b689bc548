"""Leonardo's training endpoints over refgen's LoRA trainer: datasets of uploaded images, Elements
(`POST /elements`, Leonardo's user LoRAs) and custom models (`POST /models`), both trained as an SDXL LoRA
on the server's model by `engine.training.train_lora`, as jobs of the one job queue (kind "training").

    settings = TrainingSettings(max_steps=20)            # the server's limits and defaults (refgen serve)
    job_body = element_job(body, settings, base_model)   # checks a POST /elements body: LeonardoRequestError
    train_job(store, job, settings, device=..., dtype=...)   # the worker runs it; the LoRA lands in store.loras
    StoreLoras(store)                                    # what parse_generation's userElements/modelId resolve through

Leonardo -> refgen (TrainingRequest):

| Leonardo (POST /elements)  | refgen                                                                        |
|----------------------------|-------------------------------------------------------------------------------|
| datasetId                  | images: the dataset's uploaded images (5-200, checked when the job runs too)  |
| instance_prompt            | trigger (empty: the element's name)                                           |
| num_train_epochs (1-250)   | steps = epochs x ceil(images / batch_size), at most the server's max_steps   |
| learning_rate              | learning_rate, as given (Leonardo's SDXL defaults, ~1e-6, are far below a     |
|                            | LoRA's usual 1e-4: pass what you mean)                                        |
| resolution (default 1024)  | resolution: a multiple of 8, 64-4096, at most the server's max_resolution     |
| sd_version                 | SDXL versions (SDXL_0_9, SDXL_1_0, LEONARDO_*_XL, VISION_XL, KINO_XL,         |
|                            | ALBEDO_XL) train on the server's model; others (FLUX_DEV, the SDK's default)  |
|                            | are refused naming sd_version                                                 |
| train_text_encoder         | train_text_encoder: LoRAs on both CLIP encoders too (their learning rate:     |
|                            | refgen's default, 5e-6)                                                       |
| lora_focus                 | General, Character, Style or Object: recorded, no effect on the recipe        |

POST /models ("train a custom model") is the same LoRA, with `strength` (VERY_LOW, LOW, MEDIUM, HIGH) as
25/50/100/150 epochs and the server's learning rate; sd_version must be absent (Leonardo's v1_5/v2 are not
SDXL). A generation whose modelId is a trained custom model runs on its base model with its LoRA at 1.

The LoRA files live in the store's folder (`<store>/loras/element-<id>.safetensors`, `model-<uuid>...`), a
LoraLibrary of their own, so ids never collide with the user's $REFGEN_HOME/loras names.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import RefgenError
from .leonardo import LeonardoRequestError
from .progress import JobProgress
from .store import AssetStore, Generation, Output, UnknownAssetError

log = logging.getLogger("refgen.trainings")

MIN_IMAGES = 5  # engine.training's limits (checked here before queueing; the trainer checks again)
MAX_IMAGES = 200
SDXL_VERSIONS = ("SDXL_0_9", "SDXL_1_0", "LEONARDO_DIFFUSION_XL", "LEONARDO_LIGHTNING_XL", "VISION_XL", "KINO_XL", "ALBEDO_XL")
LORA_FOCUS = ("General", "Character", "Style", "Object")
MODEL_STRENGTH_EPOCHS = {"VERY_LOW": 25, "LOW": 50, "MEDIUM": 100, "HIGH": 150}
MODEL_TYPES = ("GENERAL", "BUILDINGS", "CHARACTERS", "ENVIRONMENTS", "FASHION", "ILLUSTRATIONS", "GAME_ITEMS",
               "GRAPHICAL_ELEMENTS", "PHOTOGRAPHY", "PIXEL_ART", "PRODUCT_DESIGN", "TEXTURES", "UI_ELEMENTS", "VECTOR")
ELEMENT_KEYS = {"name", "description", "datasetId", "instance_prompt", "lora_focus", "train_text_encoder", "resolution",
                "sd_version", "num_train_epochs", "learning_rate"}
MODEL_KEYS = {"name", "description", "datasetId", "instance_prompt", "modelType", "nsfw", "resolution", "sd_version",
              "strength"}


@dataclass(frozen=True)
class TrainingSettings:
    """The server's training recipe and limits. `max_steps`/`max_resolution` cap what a request asks for
    (None: no cap); `learning_rate` is for custom models (Elements carry their own)."""

    rank: int = 16
    batch_size: int = 1
    learning_rate: float = 1e-4
    seed: int = 0
    max_steps: Optional[int] = None
    max_resolution: Optional[int] = None


class StoreLoras:
    """parse_generation's `trained` resolver over the store: COMPLETE elements and custom models only."""

    def __init__(self, store: AssetStore):
        self.store = store

    def element(self, lora_id: int) -> Optional[Path]:
        try:
            training = self.store.training("element", lora_id)
        except UnknownAssetError:
            return None
        return self._file(training, f"element {lora_id}")

    def model(self, model_id: str) -> Optional[tuple[str, Path]]:
        try:
            training = self.store.training("model", model_id)
        except UnknownAssetError:
            return None
        return training.job.body.get("base_model") or "", self._file(training, f"custom model {model_id}")

    def _file(self, training, what: str) -> Path:
        if training.job.status != "COMPLETE":
            reason = f": {training.job.error}" if training.job.error else ""
            raise RefgenError(f"{what} is not trained (status {training.job.status}{reason})")
        path = self.store.loras / f"{training.lora}.safetensors"
        if not path.is_file():
            raise RefgenError(f"{what}: its LoRA file {path} is missing")
        return path


# ------------------------------------------------------------------------------------- request bodies

def element_job(body: Mapping[str, Any], store: AssetStore, settings: TrainingSettings, base_model: str) -> dict:
    """A POST /elements body checked -> the training job's body. LeonardoRequestError names the field."""
    _known(body, ELEMENT_KEYS, "element")
    version = body.get("sd_version", "FLUX_DEV")  # Leonardo's (and its SDKs') default
    if version not in SDXL_VERSIONS:
        raise LeonardoRequestError("sd_version", f"{version!r} is not served: refgen trains SDXL LoRAs only "
                                                 f"(give one of {', '.join(SDXL_VERSIONS)})")
    focus = body.get("lora_focus")
    if not isinstance(focus, str) or focus.capitalize() not in LORA_FOCUS:
        raise LeonardoRequestError("lora_focus", f"must be one of {', '.join(LORA_FOCUS)}, got {focus!r}")
    epochs = _whole(body, "num_train_epochs", 1, 250, required=True)
    learning_rate = _positive(body, "learning_rate")
    return {**_common(body, store, settings, base_model, default_resolution=1024),
            "epochs": epochs, "learning_rate": learning_rate,
            "train_text_encoder": bool(_optional_bool(body, "train_text_encoder"))}


def model_job(body: Mapping[str, Any], store: AssetStore, settings: TrainingSettings, base_model: str) -> dict:
    """A POST /models body checked -> the training job's body."""
    _known(body, MODEL_KEYS, "custom model")
    if body.get("sd_version") is not None:
        raise LeonardoRequestError("sd_version", f"{body['sd_version']!r} is not served: refgen trains SDXL only; leave "
                                                 "sd_version out to train on the server's SDXL model")
    if not isinstance(body.get("instance_prompt"), str) or not body["instance_prompt"].strip():
        raise LeonardoRequestError("instance_prompt", "is required (the words that call up what was trained)")
    strength = body.get("strength", "MEDIUM")
    if strength not in MODEL_STRENGTH_EPOCHS:
        raise LeonardoRequestError("strength", f"must be one of {', '.join(MODEL_STRENGTH_EPOCHS)}, got {strength!r}")
    if body.get("modelType") is not None and body["modelType"] not in MODEL_TYPES:
        raise LeonardoRequestError("modelType", f"must be one of {', '.join(MODEL_TYPES)}, got {body['modelType']!r}")
    _optional_bool(body, "nsfw")
    return {**_common(body, store, settings, base_model, default_resolution=512),
            "epochs": MODEL_STRENGTH_EPOCHS[strength], "learning_rate": settings.learning_rate}


def _common(body: Mapping, store: AssetStore, settings: TrainingSettings, base_model: str, default_resolution: int) -> dict:
    name = body.get("name", "placeholder")
    if not isinstance(name, str) or not name.strip():
        raise LeonardoRequestError("name", f"must be a non-empty string, got {name!r}")
    for key in ("description", "instance_prompt"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise LeonardoRequestError(key, f"must be a string, got {body[key]!r}")
    trigger = (body.get("instance_prompt") or "").strip() or name.strip()
    if len(trigger) > 200:
        raise LeonardoRequestError("instance_prompt", "at most 200 characters")
    resolution = _whole(body, "resolution", 64, 4096) or default_resolution
    if resolution % 64:
        raise LeonardoRequestError("resolution", f"must be a multiple of 64 (SDXL's training buckets), got {resolution}")
    if settings.max_resolution is not None and resolution > settings.max_resolution:
        log.warning("training resolution %d capped at the server's %d", resolution, settings.max_resolution)
        resolution = settings.max_resolution
    dataset_id = body.get("datasetId")
    try:
        count = len(store.dataset(dataset_id).images)
    except UnknownAssetError:
        raise LeonardoRequestError("datasetId", f"unknown dataset {dataset_id!r}") from None
    if not MIN_IMAGES <= count <= MAX_IMAGES:
        raise LeonardoRequestError("datasetId", f"dataset {dataset_id} has {count} uploaded images; training needs "
                                                f"{MIN_IMAGES}-{MAX_IMAGES} (10-15 varied ones work best)")
    return {"datasetId": dataset_id, "trigger": trigger, "resolution": resolution, "base_model": base_model}


def _known(body: Mapping, keys: set, what: str) -> None:
    if not isinstance(body, Mapping):
        raise LeonardoRequestError("body", f"must be a JSON object, got {type(body).__name__}")
    for key in body:
        if key not in keys:
            raise LeonardoRequestError(key, f"unknown field (not part of Leonardo's {what} request)")


def _whole(body: Mapping, key: str, low: int, high: int, required: bool = False) -> Optional[int]:
    value = body.get(key)
    if value is None:
        if required:
            raise LeonardoRequestError(key, "is required")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LeonardoRequestError(key, f"must be a whole number from {low} to {high}, got {value!r}")
    return value


def _positive(body: Mapping, key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise LeonardoRequestError(key, f"must be a number above 0 and at most 1, got {value!r}")
    return float(value)


def _optional_bool(body: Mapping, key: str) -> Optional[bool]:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise LeonardoRequestError(key, f"must be true or false, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------ the job

def train_job(store: AssetStore, job: Generation, settings: TrainingSettings, *, device=None, dtype=None) -> list[Output]:
    """Run one training job: the dataset's images as they are now -> `<store>/loras/<lora>.safetensors`.
    Progress goes to the job's record; deleting the element (its job) stops the run at the next step."""
    from ..lora_library import LoraLibrary
    from ..training import TrainingDataError, TrainingError, TrainingRequest, train_lora
    from ..training.checkpoint import checkpoints
    from pydantic import ValidationError

    body = job.body
    try:
        images = store.dataset_paths(body["datasetId"])
    except UnknownAssetError:
        raise TrainingDataError(f"dataset {body['datasetId']} was deleted before the training ran") from None
    if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
        raise TrainingDataError(f"dataset {body['datasetId']} has {len(images)} images; training needs {MIN_IMAGES}-{MAX_IMAGES}")
    steps = body["epochs"] * math.ceil(len(images) / settings.batch_size)
    if settings.max_steps is not None:
        steps = min(steps, settings.max_steps)
    try:
        request = TrainingRequest(images=images, name=body["lora"], trigger=body["trigger"], base_model=body["base_model"],
                                  rank=settings.rank, steps=steps, learning_rate=body["learning_rate"],
                                  batch_size=settings.batch_size, resolution=body["resolution"], seed=settings.seed,
                                  train_text_encoder=body.get("train_text_encoder", False))
    except ValidationError as exc:
        raise TrainingError(f"cannot train: {exc.errors()[0]['msg']}") from None
    watcher = _Watcher(store, job.id)
    run_dir = training_run_dir(store, body["lora"])
    resume = bool(checkpoints(run_dir))  # a server stopped mid-run: the re-claimed job continues where it was
    log.info("training %s: %d images, %d steps at %d px on %s%s", body["lora"], len(images), steps, body["resolution"],
             body["base_model"], " (resumed)" if resume else "")
    result = train_lora(request, library=LoraLibrary(store.loras), overwrite=True, resume=resume, run_dir=run_dir,
                        device=device, dtype=dtype, progress=False, on_step=watcher.on_step, stop=watcher.stop)
    shutil.rmtree(run_dir, ignore_errors=True)  # API trainings are not extended later: the LoRA is all that stays
    if not store.job_exists(job.id):  # deleted while the file was being written: nothing names it any more
        result.path.unlink(missing_ok=True)
    return []


def training_run_dir(store: AssetStore, lora: str) -> Path:
    """A training job's checkpoints: `<store>/training/<lora>` (removed when it completes or is deleted)."""
    return store.root / "training" / lora


class _Watcher(JobProgress):
    """on_step/stop for train_lora: progress with the loss, and stop() once the element or model was deleted."""

    def on_step(self, progress) -> None:
        self.report({"step": progress.step, "total": progress.total, "loss": _finite(progress.loss),
                     "elapsed": round(progress.elapsed, 3)}, last=progress.step == progress.total)

    def stop(self) -> bool:
        return not self.wanted()


def _finite(value: Any) -> Optional[float]:
    """A loss for JSON: NaN or infinity (a diverged run) is None, which JSON answers can carry."""
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None
