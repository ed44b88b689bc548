"""What a training run is asked to do, what it reports, and how it fails."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import RefgenError
from ..lora_library import LORA_NAME

MIN_IMAGES, MAX_IMAGES, RECOMMENDED_IMAGES = 5, 200, 10

# Fields that change what is learned. A resume must match them exactly; the rest (steps, samples,
# checkpoint cadence) may change between the interrupted run and the resumed one.
RECIPE_FIELDS = ("images", "trigger", "base_model", "rank", "alpha", "learning_rate", "batch_size",
                 "gradient_accumulation", "resolution", "bucketing", "crop", "seed", "optimizer", "precision",
                 "gradient_checkpointing", "train_text_encoder", "text_encoder_learning_rate", "class_images",
                 "class_prompt", "num_class_images", "prior_loss_weight", "skip_bad")


class TrainingError(RefgenError):
    """A training request refgen cannot run as asked."""


class TrainingDataError(TrainingError):
    """A dataset problem: too few images, an unreadable or too small image, an empty folder."""


class TrainingInterrupted(TrainingError):
    """The run was stopped (Ctrl-C or the caller's stop()); `checkpoint` holds the state to resume from."""

    def __init__(self, message: str, checkpoint: Optional[Path] = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class TrainingRequest(BaseModel):
    """What to train. `images` is a folder or a list of image files; a `.txt` beside an image is its caption.

    Defaults are a character LoRA on SDXL that needs no tuning: rank 16, 1e-4, 1000 steps at 1024 with
    aspect-ratio buckets, gradient checkpointing, bf16 on a GPU.
    """

    model_config = ConfigDict(extra="forbid")

    images: Union[Path, list[Path]]
    name: str
    trigger: Optional[str] = Field(default=None, min_length=1, max_length=200)  # default: the character's anchor
    character: Optional[str] = None  # a saved character profile: its anchor is the default trigger, and it
    #                                  is pointed at the LoRA once trained into the library
    base_model: str = "sdxl-base"
    rank: int = Field(default=16, ge=1, le=256)
    alpha: Optional[float] = Field(default=None, gt=0)  # None: equal to rank (scale 1)
    steps: int = Field(default=1000, ge=1, le=100_000)
    epochs: Optional[int] = Field(default=None, ge=1, le=10_000)  # instead of steps: passes over the images
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0)
    batch_size: int = Field(default=1, ge=1, le=64)
    gradient_accumulation: int = Field(default=1, ge=1, le=256)
    resolution: int = Field(default=1024, ge=64, le=4096)
    bucketing: bool = True  # aspect-ratio buckets of about resolution² pixels; False: square crops
    crop: Literal["auto", "face", "centre"] = "auto"  # auto: around the face when the face models are installed
    seed: int = Field(default=0, ge=0, lt=2**63)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU, fp32 on the CPU
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    train_text_encoder: bool = False  # LoRAs on both CLIP encoders' attention too (captions encoded every step)
    text_encoder_learning_rate: float = Field(default=5e-6, gt=0, le=1.0)  # diffusers' script's text_encoder_lr
    # Prior preservation (DreamBooth): keep the class ("a photo of a woman") as the base model draws it, so the
    # trigger learns the character without every woman becoming her. The folder's images are used; with
    # num_class_images, missing ones are first generated there by the base model from class_prompt.
    class_images: Optional[Path] = None
    class_prompt: Optional[str] = Field(default=None, min_length=1, max_length=200)
    num_class_images: Optional[int] = Field(default=None, ge=1, le=1000)
    prior_loss_weight: float = Field(default=1.0, ge=0, le=10)
    skip_bad: bool = False  # skip unreadable or too small images (reported) instead of stopping
    checkpoint_every: int = Field(default=250, ge=0)  # 0: only when stopped and at the end
    keep_checkpoints: int = Field(default=2, ge=1)
    sample_prompts: list[str] = Field(default_factory=list, max_length=16)
    sample_every: int = Field(default=0, ge=0)  # 0: samples only at the end (when prompts are given)
    sample_seed: int = Field(default=0, ge=0, lt=2**63)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not LORA_NAME.fullmatch(value) or value.endswith(".safetensors"):
            raise ValueError("name must be a plain file name: letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError("resolution must be a multiple of 64 (SDXL's buckets and the UNet's down-sampling)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingRequest":
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError("give steps or epochs, not both")
        if self.trigger is None and self.character is None:
            raise ValueError("give a trigger (the words that call the character up) or a saved character")
        if (self.class_images is None) != (self.class_prompt is None):
            raise ValueError("prior preservation needs both class_images (a folder) and class_prompt")
        return self

    @property
    def network_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: `steps`, or `epochs` passes of `batches_per_epoch` micro-batches."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.gradient_accumulation))

    def recipe(self) -> dict:
        """The fields that decide the weights, as JSON (what a resume must match)."""
        data = self.model_dump(mode="json")
        return {key: data[key] for key in RECIPE_FIELDS}


@dataclass(frozen=True)
class TrainingProgress:
    """What a caller watching a run sees after each optimizer step."""

    step: int  # steps done
    total: int
    loss: float
    elapsed: float  # seconds since the loop (re)started, encoding excluded
    first_step: int = 0  # the step the loop started from (a resumed run starts past 0)

    @property
    def eta(self) -> float:
        done = self.step - self.first_step
        return self.elapsed / done * (self.total - self.step) if done else float("nan")
