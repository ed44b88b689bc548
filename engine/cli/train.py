"""`refgen train NAME IMAGES...` (a character LoRA into the LoRA library) and `refgen loras list|show|delete`.

Ctrl-C during training saves a checkpoint and exits with code 130; `refgen train NAME --resume` continues
the run bit-identically (same device, same thread count). Several GPUs:
`accelerate launch --multi_gpu --num_processes N -m engine.cli train NAME IMAGES...` (or torchrun; on CPUs
`torchrun --nproc_per_node N -m engine.cli train ... --device cpu`, as the tests do).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .error_lines import refgen_errors

loras_app = typer.Typer(help="The local LoRA library ($REFGEN_HOME/loras): what `refgen train` made, by name.",
                        no_args_is_help=True)

# Request field -> the option a user types, so validation errors name the flag.
TRAIN_FLAGS = {
    "images": "IMAGES", "name": "NAME", "trigger": "--trigger", "character": "--character", "base_model": "--model", "rank": "--rank",
    "alpha": "--alpha", "steps": "--steps", "epochs": "--epochs", "learning_rate": "--lr",
    "batch_size": "--batch-size", "gradient_accumulation": "--accumulate", "resolution": "--resolution",
    "crop": "--crop", "seed": "--seed", "precision": "--precision", "optimizer": "--optimizer",
    "checkpoint_every": "--checkpoint-every", "sample_prompts": "--samples", "sample_every": "--sample-every",
}


def train(
    name: Annotated[str, typer.Argument(help="The LoRA's name in the library (letters, digits, '.', '_', '-').")],
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="A folder of photos, or photo files (5-200; 10-15+ recommended). A .txt beside a photo is its caption.")] = None,
    character: Annotated[Optional[str], typer.Option(
        "--character", help="A saved character: its identity anchor is the default trigger, and its profile points to the LoRA.")] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="The words that call the character up in prompts.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model (default sdxl-base; 'tiny' to try it offline).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default 1000).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the photos, instead of --steps.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (default 16).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default: the rank).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default 1e-4).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Photos per step (default 1).")] = None,
    accumulate: Annotated[Optional[int], typer.Option("--accumulate", help="Gradient accumulation steps (default 1).")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Training size, a multiple of 64 (default 1024).")] = None,
    no_buckets: Annotated[bool, typer.Option("--no-buckets", help="Square crops instead of aspect-ratio buckets.")] = False,
    crop: Annotated[Optional[str], typer.Option("--crop", help="auto (around the face when the face models are installed), face or centre.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of every random draw of the run (default 0).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="adamw, or adamw8bit (CUDA + bitsandbytes).")] = None,
    no_checkpointing: Annotated[bool, typer.Option("--no-gradient-checkpointing", help="Faster, but needs more GPU memory.")] = False,
    samples: Annotated[Optional[list[str]], typer.Option("--samples", help="A prompt to sample with fixed seeds (repeatable).")] = None,
    sample_every: Annotated[Optional[int], typer.Option("--sample-every", help="Sample every N steps (default: at the end).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Checkpoint every N steps (default 250).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run of this NAME from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a LoRA of this name and discard its checkpoints.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable or too small photos (reported) instead of stopping.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
) -> None:
    """Train a character LoRA on 10-50 photos and save it in the LoRA library.

    \b
    Examples:
      refgen train mira photos/mira/ --character Mira --samples "mira walking in the rain"
      refgen train mira photos/mira/ --trigger "mira woman" --steps 1500 --rank 32
      refgen train mira --resume                       # after Ctrl-C, or --steps 2000 to train longer
      refgen generate "mira woman reading in a cafe" --lora mira
    """
    from ..training import TrainingInterrupted, TrainingRequest, default_run_dir, train_lora

    chosen = {"trigger": trigger, "base_model": model, "steps": steps, "epochs": epochs, "rank": rank, "alpha": alpha,
              "learning_rate": lr, "batch_size": batch_size, "gradient_accumulation": accumulate,
              "resolution": resolution, "crop": crop, "seed": seed, "precision": precision, "optimizer": optimizer,
              "sample_prompts": samples, "sample_every": sample_every, "checkpoint_every": checkpoint_every}
    options = {key: value for key, value in chosen.items() if value is not None}
    options.update({key: False for key, flag in (("bucketing", no_buckets), ("gradient_checkpointing", no_checkpointing)) if flag})
    if skip_bad:
        options["skip_bad"] = True
    console = Console()
    with refgen_errors(TRAIN_FLAGS, tiny_model=True):
        if resume and not images:
            request = _stored_request(name, default_run_dir(name), options)
        else:
            request = TrainingRequest(**_fresh_fields(name, images, character, options))
        try:
            result = train_lora(request, resume=resume, overwrite=overwrite, device=device)
        except TrainingInterrupted as stopped:
            console.print(f"[yellow]stopped:[/yellow] {escape(str(stopped))}\nresume with: refgen train {escape(name)} --resume",
                          soft_wrap=True)
            raise typer.Exit(code=130)
        if not result.main_process:
            return  # one process of `accelerate launch` / torchrun reports; the others trained alongside it
    # Warnings and skipped photos were logged as they happened; duplicates are listed here.
    for duplicate in result.report.duplicates:
        console.print(f"[yellow]duplicate left out:[/yellow] {escape(duplicate['path'])} (same pixels as "
                      f"{escape(duplicate['same_as'])})", soft_wrap=True)
    console.print(f"[green]trained:[/green] {escape(name)} ({result.steps} steps, last loss {result.losses[-1]:.4f}, "
                  f"{len(result.report.used)} photos, crop: {escape(result.report.crop)}) -> {escape(str(result.path))}",
                  soft_wrap=True)
    for path in result.samples[-len(request.sample_prompts):] if request.sample_prompts else []:
        console.print(f"  sample: {escape(str(path))}", soft_wrap=True)
    if result.request.character:
        console.print(f"character {escape(result.request.character)} now points to LoRA {escape(name)}", soft_wrap=True)
    console.print(f"use it: refgen generate \"{escape(result.request.trigger)}, ...\" --lora {escape(name)}", soft_wrap=True)


def _fresh_fields(name: str, images: Optional[list[Path]], character: Optional[str], options: dict) -> dict:
    from ..training import TrainingDataError

    if not images:
        raise TrainingDataError("give the training photos: a folder or image files (IMAGES)")
    if not character and "trigger" not in options:
        raise TrainingDataError("give --trigger (the words that call the character up) or --character NAME "
                                "(a saved character: its identity anchor becomes the trigger)")
    folder = len(images) == 1 and images[0].is_dir()
    return {"name": name, "images": images[0] if folder else list(images), "character": character, **options}


def _stored_request(name: str, run_dir: Path, options: dict):
    """The request of the run being resumed, from its latest checkpoint; only non-recipe options may change."""
    from ..training import TrainingError, TrainingRequest
    from ..training.checkpoint import latest

    found = latest(run_dir)
    if found is None:
        raise TrainingError(f"nothing to resume: no checkpoints of {name!r} in {run_dir}")
    stored = found.request
    if options.get("epochs") is not None:
        stored.pop("steps", None)
    if options.get("steps") is not None:
        stored.pop("epochs", None)
    return TrainingRequest(**{**stored, **options})


# -- refgen loras ---------------------------------------------------------------------------------


def _library():
    from ..lora_library import LoraLibrary

    return LoraLibrary()


@loras_app.command("list")
def list_loras() -> None:
    """Every LoRA in the library, with its trigger words and training facts.

    \b
    Examples:
      refgen loras list
      refgen generate "mira woman in a garden" --lora mira:0.8
    """
    with refgen_errors():
        library = _library()
        found = library.list()
    console = Console()
    if not found:
        console.print(f"no LoRAs in {escape(str(library.root))}; train one with: refgen train NAME PHOTOS...")
        return
    table = Table(title=f"LoRAs in {library.root}")
    for column in ("name", "trigger", "base model", "rank", "steps", "photos", "size"):
        table.add_column(column, overflow="fold")
    for info in found:
        table.add_row(escape(info.name), escape(", ".join(info.trigger)), escape(info.base_model), _text(info.rank),
                      _text(info.steps), _text(info.images), f"{info.size / 2**20:.1f} MiB")
    console.print(table)


@loras_app.command("show")
def show_lora(name: Annotated[str, typer.Argument(help="A LoRA name from `refgen loras list`.")]) -> None:
    """One LoRA's facts, as JSON (its file, trigger words, base model, rank, steps, training record).

    \b
    Examples:
      refgen loras show mira
      refgen loras show mira | jq .training.dataset    # the photos it learned from, by pixel digest
    """
    with refgen_errors():
        from ..lora_library import read_metadata

        info = _library().get(name)
        record = read_metadata(info.path).get("refgen_training")
    shown = info.as_dict()
    if record:
        shown["training"] = json.loads(record)
    typer.echo(json.dumps(shown, indent=2))


@loras_app.command("delete")
def delete_lora(
    name: Annotated[str, typer.Argument(help="A LoRA name from `refgen loras list`.")],
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep the run's checkpoints and samples.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a LoRA from the library (and its training checkpoints and samples, unless --keep-checkpoints).

    \b
    Examples:
      refgen loras delete mira
      refgen loras delete mira --yes --keep-checkpoints   # keep what `refgen train mira --resume` needs
    """
    from ..training import default_run_dir

    with refgen_errors():
        library = _library()
        info = library.get(name)
        run_dir = default_run_dir(name)
        if not yes:
            typer.confirm(f"delete LoRA {name!r} ({info.path})?", abort=True)
        library.delete(name)
        if run_dir.is_dir() and not keep_checkpoints:
            shutil.rmtree(run_dir)
    Console().print(f"[green]deleted:[/green] {escape(name)}")


def _text(value) -> str:
    return "" if value is None else str(value)
