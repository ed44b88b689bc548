"""train_lora: prepare (data, model, LoRA), loop (accelerate), checkpoint, sample, save into the library.

The recipe is diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py`: a frozen UNet in the working
precision, a peft LoRA on the attention projections kept in fp32, DDPM noise and the epsilon (or v) MSE
objective, AdamW over the LoRA factors, gradients clipped at 1.0, accelerate for gradient accumulation and
several processes (`accelerate launch -m engine.cli train ...`: each process draws its own micro-batches,
the first one writes files). Latents and text embeddings are computed once before the loop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from .. import paths
from ..devices import pick_device
from . import checkpoint as checkpoints
from .data import DatasetReport, EncodedDataset, TrainingImage, encode_dataset, load_class_images, load_dataset
from .loop import LORA_TARGETS, TEXT_LORA_TARGETS, BatchPlan, TextEncoders, add_lora, make_optimizer, micro_batch, training_loss
from .output import save_lora
from .request import TrainingError, TrainingInterrupted, TrainingProgress, TrainingRequest

log = logging.getLogger("refgen")

MAX_GRAD_NORM = 1.0  # diffusers' script's default


@dataclass
class TrainingSetup:
    """A prepared run: the UNet carrying a fresh LoRA, the noise scheduler, the encoded data, the batch plan."""

    request: TrainingRequest
    pipe: object  # the base pipeline (its text encoders and VAE on the CPU; used for samples)
    unet: torch.nn.Module
    scheduler: object
    dataset: EncodedDataset
    report: DatasetReport
    images: list[TrainingImage]
    device: torch.device
    dtype: torch.dtype
    plan: BatchPlan
    trainable: dict[str, torch.nn.Parameter]  # "unet.<name>", "text_encoder.<name>", "text_encoder_2.<name>"
    text_encoders: tuple = ()  # the two CLIP encoders when they train
    prior: Optional["PriorPreservation"] = None

    @property
    def total_steps(self) -> int:
        return self.request.total_steps(self.plan.batches_per_epoch)

    def micro_batch(self, index: int):
        return micro_batch(self.dataset, self.plan, index, self.scheduler.config.num_train_timesteps, self.device)

    def class_batch(self, index: int):
        return micro_batch(self.prior.dataset, self.prior.plan, index, self.scheduler.config.num_train_timesteps,
                           self.device)

    def digests(self) -> list[str]:
        """What a resume must find again: the photos' pixel digests, then the class images' (prefixed)."""
        return [image.sha256 for image in self.images] + [f"class:{d}" for d in (self.prior.digests if self.prior else [])]


@dataclass
class PriorPreservation:
    """The class images, encoded once, and their own batch plan; each step adds their loss times the weight."""

    images: list[TrainingImage]
    dataset: EncodedDataset
    plan: BatchPlan
    generated: list[Path]

    @property
    def digests(self) -> list[str]:
        return [image.sha256 for image in self.images]


@dataclass(frozen=True)
class TrainingResult:
    path: Path
    losses: list[float]
    report: DatasetReport
    steps: int = 0
    run_dir: Optional[Path] = None
    samples: list[Path] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a several-process run (they write nothing)
    request: Optional[TrainingRequest] = None  # as run: a character's anchor filled in as the trigger


def default_run_dir(name: str) -> Path:
    """Checkpoints and samples of a run: $REFGEN_HOME/training/<name>."""
    return paths.data_dir() / "training" / name


# -- preparing ------------------------------------------------------------------------------------


def prepare_training(request: TrainingRequest, *, device=None, dtype=None) -> TrainingSetup:
    """Load and check the data, load the base model, encode everything once, add the LoRA."""
    from diffusers import DDPMScheduler

    from ..loading import load_pipeline

    request = with_character_trigger(request)
    device, dtype = training_device(request, device, dtype)
    locator, note = _face_locator(request.crop)
    images, report = load_dataset(request, locator, note)
    pipe, _ = load_pipeline(request.base_model, torch.float32)
    dataset = encode_dataset(pipe, images, device)
    unet = pipe.unet.to(device, dtype)
    prior = _prior_preservation(pipe, unet, request, report, device, dtype) if request.class_images else None
    trainable = add_lora(unet, request, LORA_TARGETS, "unet")
    if request.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    text_encoders = _trainable_text_encoders(pipe, request, device, dtype, trainable) if request.train_text_encoder else ()
    _release_unneeded(pipe, request)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    plan = BatchPlan(dataset.buckets, request.batch_size, request.seed)
    return TrainingSetup(request, pipe, unet, scheduler, dataset, report, images, device, dtype, plan, trainable,
                         text_encoders, prior)


def _prior_preservation(pipe, unet, request: TrainingRequest, report: DatasetReport, device, dtype) -> PriorPreservation:
    """Class images: generated by the base model up to num_class_images (before any LoRA exists), then loaded,
    checked and encoded like the photos."""
    from .samples import fill_class_images

    generated = fill_class_images(pipe, unet, request, device, dtype)
    report.generated = [str(path) for path in generated]
    images = load_class_images(request, report)
    dataset = encode_dataset(pipe, images, device)
    return PriorPreservation(images, dataset, BatchPlan(dataset.buckets, request.batch_size, request.seed, "class"), generated)


def _release_unneeded(pipe, request: TrainingRequest) -> None:
    """Drop what the loop never touches once everything is encoded: full-size SDXL's fp32 VAE and text encoders
    are about 3.5 GB of host memory. Samples need all of them; text-encoder training keeps the encoders."""
    if request.sample_prompts:
        return
    pipe.vae = None
    if not request.train_text_encoder:
        pipe.text_encoder = pipe.text_encoder_2 = None


def _trainable_text_encoders(pipe, request: TrainingRequest, device, dtype, trainable: dict) -> tuple:
    """Both CLIP encoders on the training device with LoRAs on their attention (q/k/v/out projections)."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for part, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
        encoder.to(device, dtype)
        trainable.update(add_lora(encoder, request, TEXT_LORA_TARGETS, part))
        if request.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        encoder.train()
    return encoders


def with_character_trigger(request: TrainingRequest) -> TrainingRequest:
    """A request naming a saved character: its profile's spelling of the name, and its identity anchor as the
    trigger unless one is given (UnknownCharacterError, listing the known ones, when there is no such profile)."""
    if request.character is None:
        return request
    from ..compose import character_trigger

    name, anchor = character_trigger(request.character)
    return request.model_copy(update={"character": name, "trigger": request.trigger or anchor})


def training_device(request: TrainingRequest, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """fp32 on CPU, bf16 on a GPU (request.precision, or `dtype` given to train_lora). fp16 is refused:
    without loss scaling its gradients underflow."""
    wanted = dtype if dtype is not None else (None if request.precision == "auto" else request.precision)
    chosen, picked = pick_device(device, wanted)
    if picked == torch.float16:
        if wanted is not None:
            raise TrainingError("fp16 training is not supported (it needs loss scaling): use bf16 or fp32")
        picked = torch.bfloat16
    return chosen, picked


def _face_locator(crop: str):
    """(locator, why-not note): the face models (on the CPU: a few photos) when crop is auto/face and they are
    installed."""
    if crop == "centre":
        return None, "asked for"
    from ..compose import face_locator

    locator = face_locator("cpu")
    if locator is None:
        if crop == "face":
            raise TrainingError("crop='face' needs the face models: refgen weights fetch insightface-antelopev2 "
                                "(or use crop='centre')")
        log.info("training images are centre-cropped: the face models are not installed "
                 "(refgen weights fetch insightface-antelopev2 enables face-aware crops)")
        return None, "face models not installed: refgen weights fetch insightface-antelopev2"
    return locator, ""


# -- running --------------------------------------------------------------------------------------


def train_lora(request: TrainingRequest, out_dir: Union[str, Path, None] = None, *, library=None,
               overwrite: bool = False, resume: bool = False, run_dir: Union[str, Path, None] = None,
               device=None, dtype=None, progress: bool = True,
               on_step: Optional[Callable[[TrainingProgress], None]] = None,
               stop: Optional[Callable[[], bool]] = None) -> TrainingResult:
    """Train a LoRA and write it as `<name>.safetensors` (kohya layout, ss_* metadata): into the local LoRA
    library (default, so `loras=["<name>"]` finds it) or into `out_dir` when one is given.

    Checkpoints go to `run_dir` (default $REFGEN_HOME/training/<name>) every `checkpoint_every` steps and when
    the run is stopped: Ctrl-C (in the main thread) or `stop()` returning True finish the current step, save a
    checkpoint and raise TrainingInterrupted. `resume=True` continues from the latest checkpoint, bit-identical
    to an uninterrupted run on the same device. `on_step` is called after every optimizer step.
    A name already in the library, or a run folder with checkpoints, is refused before any work unless
    `overwrite` (or `resume`).
    """
    from ..lora_library import LoraLibrary

    library = library or LoraLibrary()
    destination = Path(out_dir).expanduser() / f"{request.name}.safetensors" if out_dir is not None else library.path(request.name)
    run_dir = Path(run_dir).expanduser() if run_dir is not None else default_run_dir(request.name)
    _check_fresh(request, destination, run_dir, overwrite, resume)
    setup = prepare_training(request, device=device, dtype=dtype)
    request = setup.request  # a character's anchor filled in as the trigger
    if overwrite and not resume:  # only now that the photos and the model are known good: bad input loses nothing
        for path in checkpoints.checkpoints(run_dir):
            path.unlink()
    accelerator = _accelerator(request, setup.device)
    optimizer = make_optimizer(request, setup.trainable, setup.device)
    start, losses = _resume_point(setup, run_dir, optimizer, resume)
    unet, *text_encoders, optimizer = accelerator.prepare(setup.unet, *setup.text_encoders, optimizer)
    loop = Loop(setup, accelerator, unet, optimizer, run_dir, losses, tuple(text_encoders))
    with _ctrl_c_stops() as pressed:
        loop.run(start, progress, on_step, lambda: pressed() or bool(stop and stop()))
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(unet), request, setup.images, setup.report, setup.total_steps, destination,
                  tuple(accelerator.unwrap_model(encoder) for encoder in text_encoders),
                  setup.prior.images if setup.prior else [])
        log.info("LoRA %s saved: %s", request.name, destination)
        if request.character and destination == library.path(request.name):
            from ..compose import link_character_lora

            link_character_lora(request.character, request.name)
    accelerator.wait_for_everyone()
    return TrainingResult(destination, loop.losses, setup.report, setup.total_steps, run_dir, loop.samples,
                          accelerator.is_main_process, request)


def _check_fresh(request: TrainingRequest, destination: Path, run_dir: Path, overwrite: bool, resume: bool) -> None:
    if destination.exists() and not (overwrite or resume):
        raise TrainingError(f"{destination} already exists: choose another name, delete it "
                            f"(refgen loras delete {request.name}) or pass overwrite=True")
    found = checkpoints.checkpoints(run_dir)
    if found and not (overwrite or resume):
        raise TrainingError(f"run {request.name!r} has checkpoints in {run_dir / checkpoints.FOLDER} (latest "
                            f"{found[-1].name}): resume it (resume=True, refgen train --resume) or start over "
                            "(overwrite=True, which deletes them)")
    if resume and not found:
        raise TrainingError(f"nothing to resume: no checkpoints in {run_dir / checkpoints.FOLDER}")


def _resume_point(setup: TrainingSetup, run_dir: Path, optimizer, resume: bool) -> tuple[int, list[float]]:
    if not resume:
        return 0, []
    found = checkpoints.latest(run_dir)
    checkpoints.check_resumable(found, setup.request.recipe(), setup.digests())
    checkpoints.restore(found.path, setup.trainable, optimizer)
    log.info("resuming %s from %s (step %d of %d)", setup.request.name, found.path, found.step, setup.total_steps)
    return found.step, list(found.losses)


def _accelerator(request: TrainingRequest, device: torch.device):
    """accelerate for gradient accumulation and several processes. Precision is the frozen weights' dtype with
    fp32 LoRA factors (no autocast), so accelerate's process-wide mixed-precision setting stays untouched and
    runs of different precisions can follow each other in one process (a server)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Text encoder 1's last layer feeds nothing SDXL reads (the penultimate hidden states are the conditioning):
    # its LoRA gets no gradient, which DDP must be told about.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if request.train_text_encoder else []
    try:
        return Accelerator(gradient_accumulation_steps=request.gradient_accumulation, kwargs_handlers=handlers,
                           cpu=device.type == "cpu", device_placement=False)
    except ValueError as exc:  # accelerate's state is per process: e.g. a CUDA run after a CPU one
        raise TrainingError(f"accelerate cannot run this training in this process ({exc}); start a new process") from exc


@contextmanager
def _ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one aborts at once.
    Only the main thread can take signals: elsewhere (a server's worker) the caller's stop() is the way."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed: list[bool] = []

    def on_interrupt(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        log.warning("Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


class Loop:
    """The optimizer steps of one run, with its checkpoints and samples."""

    def __init__(self, setup: TrainingSetup, accelerator, unet, optimizer, run_dir: Path, losses: list[float],
                 text_encoders: tuple = ()):
        self.setup, self.accelerator, self.unet, self.optimizer = setup, accelerator, unet, optimizer
        self.run_dir, self.losses = run_dir, losses
        self.text = TextEncoders((setup.pipe.tokenizer, setup.pipe.tokenizer_2), text_encoders) if text_encoders else None
        self.samples: list[Path] = []

    def run(self, start: int, progress: bool, on_step, should_stop: Callable[[], bool]) -> None:
        from tqdm.auto import tqdm

        request, total = self.setup.request, self.setup.total_steps
        bar = tqdm(total=total, initial=start, desc=f"training {request.name}", unit="step",
                   disable=not progress or not self.accelerator.is_main_process)
        started = time.perf_counter()
        try:
            for step in range(start, total):
                if should_stop():
                    path = self.checkpoint(step)
                    raise TrainingInterrupted(f"training {request.name} stopped at step {step} of {total}; "
                                              f"checkpoint {path}", path)
                self.losses.append(self.step(step))
                bar.update(1)
                bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
                if on_step is not None:
                    on_step(TrainingProgress(step + 1, total, self.losses[-1], time.perf_counter() - started, start))
                done = step + 1
                if request.checkpoint_every and done % request.checkpoint_every == 0 and done < total:
                    self.checkpoint(done)
                if request.sample_prompts and request.sample_every and done % request.sample_every == 0 and done < total:
                    self.sample(done)
        finally:
            bar.close()
        self.checkpoint(total)
        if request.sample_prompts:
            self.sample(total)

    def step(self, step: int) -> float:
        """One optimizer step over `gradient_accumulation` micro-batches; returns the mean loss (all processes)."""
        setup, accelerator = self.setup, self.accelerator
        accumulation = setup.request.gradient_accumulation
        total = torch.zeros((), device=setup.device)
        for micro in range(accumulation):
            index = (step * accumulation + micro) * accelerator.num_processes + accelerator.process_index
            with accelerator.accumulate(self.unet, *(self.text.encoders if self.text else ())):
                loss = training_loss(self.unet, setup.scheduler, setup.micro_batch(index), setup.dtype, self.text)
                if setup.prior is not None:  # DreamBooth's prior-preservation term, on its own batch of class images
                    prior_loss = training_loss(self.unet, setup.scheduler, setup.class_batch(index), setup.dtype, self.text)
                    loss = loss + setup.request.prior_loss_weight * prior_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(setup.trainable.values()), MAX_GRAD_NORM)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        return accelerator.reduce(total / accumulation, reduction="mean").item()

    def checkpoint(self, step: int) -> Optional[Path]:
        if not self.accelerator.is_main_process:
            return None
        return checkpoints.save_checkpoint(self.run_dir, step, self.setup.trainable, self.optimizer, self.setup.request,
                                           self.setup.digests(), self.losses)

    def sample(self, step: int) -> None:
        if self.accelerator.is_main_process:
            from .samples import write_samples

            self.samples += write_samples(self.setup, self.accelerator.unwrap_model(self.unet), step, self.run_dir)
