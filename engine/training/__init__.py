"""LoRA training for SDXL: a folder of photos and a trigger word in, one kohya-layout `.safetensors` LoRA out,
saved into the local LoRA library (`loras=["<name>"]`).

    from engine.training import TrainingRequest, train_lora
    result = train_lora(TrainingRequest(images="photos/mira", name="mira", trigger="mira woman"))

Modules: request (what to train), data (images -> buckets -> crops -> latents and embeddings, once),
loop (batches, objective, LoRA, optimizer), checkpoint (resumable state), samples, output (kohya file),
run (train_lora: the whole run with accelerate).
"""

from .data import DatasetReport, EncodedDataset, TrainingImage, bucket_sizes, load_dataset
from .request import (
    TrainingDataError, TrainingError, TrainingInterrupted, TrainingProgress, TrainingRequest,
)
from .run import TrainingResult, TrainingSetup, default_run_dir, prepare_training, train_lora

__all__ = [
    "DatasetReport", "EncodedDataset", "TrainingDataError", "TrainingError", "TrainingImage", "TrainingInterrupted",
    "TrainingProgress", "TrainingRequest", "TrainingResult", "TrainingSetup", "bucket_sizes", "default_run_dir",
    "load_dataset", "prepare_training", "train_lora",
]
