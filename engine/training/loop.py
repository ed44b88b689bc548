"""The training step: batches from the encoded data, DDPM noise, the epsilon/v objective, the LoRA.

Every random draw is derived from (seed, purpose, index) (`draw_generator`): which images form micro-batch
g, its noise and timesteps, the LoRA's initial A factors. A run is then a pure function of its request, so
resuming at step s needs only the weights and optimizer state (checkpoint.py), and the draws are made on
the CPU so a seed gives the same batches on any device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import EncodedDataset
from .request import TrainingError, TrainingRequest

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' SDXL DreamBooth script's UNet targets
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # and its text-encoder targets


@dataclass
class TrainingBatch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    added_cond: dict  # {"text_embeds", "time_ids"}, the UNet's added_cond_kwargs
    captions: list[str]


@dataclass
class TextEncoders:
    """The two CLIP encoders while they train (possibly DDP-wrapped) and their tokenizers."""

    tokenizers: tuple
    encoders: tuple


def draw_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"refgen-training/{seed}/{purpose}/{index}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class BatchPlan:
    """Which images micro-batch g holds. Each epoch shuffles the images, groups them by bucket (a batch has
    one shape), cuts each group into batches and shuffles the batches: every image once per epoch."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, purpose: str = "instance"):
        self.buckets, self.batch_size, self.seed, self.purpose = buckets, batch_size, seed, purpose
        counts: dict[tuple[int, int], int] = {}
        for bucket in buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        self.batches_per_epoch = sum(math.ceil(count / batch_size) for count in counts.values())
        self._epochs: dict[int, list[list[int]]] = {}

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: self._epoch(epoch)}  # one epoch kept: batches are asked for in order
        return self._epochs[epoch][position]

    def _epoch(self, epoch: int) -> list[list[int]]:
        generator = draw_generator(self.seed, f"{self.purpose}/epoch", epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index in torch.randperm(len(self.buckets), generator=generator).tolist():
            groups.setdefault(self.buckets[index], []).append(index)
        batches = [group[start:start + self.batch_size]
                   for group in groups.values() for start in range(0, len(group), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def micro_batch(dataset: EncodedDataset, plan: BatchPlan, index: int, num_train_timesteps: int,
                device: torch.device) -> TrainingBatch:
    """Micro-batch `index` of the run: its images from the plan, its noise and timesteps from its own draw."""
    chosen = torch.tensor(plan.indices(index))
    latents = torch.stack([dataset.latents[i] for i in chosen.tolist()])
    generator = draw_generator(plan.seed, f"{plan.purpose}/noise", index)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (len(chosen),), generator=generator)
    added = {"text_embeds": dataset.pooled_embeds[chosen].to(device), "time_ids": dataset.time_ids[chosen].to(device)}
    return TrainingBatch(latents.to(device), noise.to(device), timesteps.to(device),
                         dataset.prompt_embeds[chosen].to(device), added, [dataset.captions[i] for i in chosen.tolist()])


def training_loss(unet, scheduler, batch: TrainingBatch, dtype: torch.dtype,
                  text: "TextEncoders | None" = None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target: the noise (epsilon) or the velocity (v). With `text`
    (the encoders train), the captions are encoded now, with gradients, instead of read from the cache."""
    from .data import encode_captions

    embeds, added = batch.prompt_embeds, dict(batch.added_cond)
    if text is not None:
        embeds, added["text_embeds"] = encode_captions(text.tokenizers, text.encoders, batch.captions, batch.latents.device)
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    added = {key: value.to(dtype) for key, value in added.items()}
    prediction = unet(noisy.to(dtype), batch.timesteps, embeds.to(dtype),
                      added_cond_kwargs=added, return_dict=False)[0]
    return F.mse_loss(prediction.float(), _target(scheduler, batch).float(), reduction="mean")


def _target(scheduler, batch: TrainingBatch) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return batch.noise
    if kind == "v_prediction":
        return scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    raise TrainingError(f"the base model's prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def add_lora(model, request: TrainingRequest, targets: list[str], part: str) -> dict[str, torch.nn.Parameter]:
    """peft's LoRA on `targets` of `model` (the UNet or a text encoder), as diffusers' script adds it; returns
    the trainable parameters by name, prefixed with `part`. peft draws the gaussian lora_A init from torch's
    global RNG: it is redrawn here, same distribution (std 1/r), from the run's own draw, so the seed alone
    fixes the run."""
    from peft import LoraConfig

    model.requires_grad_(False)
    config = LoraConfig(r=request.rank, lora_alpha=request.network_alpha, init_lora_weights="gaussian",
                        target_modules=targets)
    model.add_adapter(config)
    generator = draw_generator(request.seed, f"lora-init/{part}", 0)
    trainable = {}
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            continue
        parameter.data = parameter.data.float()  # LoRA factors train in fp32 over frozen bf16/fp32 weights
        if "lora_A" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) / request.rank)
        parameter.requires_grad_(True)
        trainable[f"{part}.{name}"] = parameter
    return trainable


def make_optimizer(request: TrainingRequest, trainable: dict[str, torch.nn.Parameter], device: torch.device):
    """AdamW (diffusers' script's defaults: betas 0.9/0.999, weight decay 1e-4, eps 1e-8), the text encoders'
    LoRAs in a group of their own at text_encoder_learning_rate; 8-bit AdamW from bitsandbytes on CUDA, which
    keeps the two moment tensors in 8 bits (about 3/4 less optimizer memory)."""
    unet = [p for name, p in trainable.items() if name.startswith("unet.")]
    text = [p for name, p in trainable.items() if not name.startswith("unet.")]
    groups = [{"params": unet, "lr": request.learning_rate}]
    if text:
        groups.append({"params": text, "lr": request.text_encoder_learning_rate})
    settings = dict(betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    if request.optimizer == "adamw":
        return torch.optim.AdamW(groups, **settings)
    if device.type != "cuda":
        raise TrainingError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); use optimizer='adamw' here")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise TrainingError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                            "(or use optimizer='adamw')") from exc
    return bitsandbytes.optim.AdamW8bit(groups, **settings)
