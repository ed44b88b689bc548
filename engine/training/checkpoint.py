"""Training checkpoints: one safetensors file per checkpoint (no pickle), written atomically.

A checkpoint holds what the next step depends on and nothing else can rebuild: the LoRA factors and the
optimizer's state, plus the step count. Every random draw of a step is derived from (seed, step), not
from a generator carried along, so there is no RNG state to save and a resumed run continues bit-identically.

    tensors   lora/<parameter name>            the trainable LoRA factors (fp32)
              optimizer/<index>/<key>          the optimizer's per-parameter state (AdamW: step, exp_avg,
                                               exp_avg_sq; bitsandbytes' 8-bit AdamW: its own keys)
    metadata  format, step, request (JSON), recipe (JSON: the fields that decide the weights), dataset (pixel digests),
              losses (per step so far), optimizer (class), param_groups (JSON), scalar state (JSON)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..images import write_atomic
from .request import TrainingError

FORMAT = "refgen-training-checkpoint/1"
FOLDER = "checkpoints"
NAME = re.compile(r"step-(\d{6,})\.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    recipe: dict
    dataset: list[str]
    losses: list[float]
    request: dict  # the whole TrainingRequest of the run, as JSON (what `refgen train NAME --resume` reruns)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / FOLDER / f"step-{step:06d}.safetensors"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (staging files of an interrupted write are not checkpoints)."""
    folder = run_dir / FOLDER
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.fullmatch(p.name)), key=lambda p: int(NAME.fullmatch(p.name)[1]))


def save_checkpoint(run_dir: Path, step: int, parameters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    request, dataset: list[str], losses: list[float]) -> Path:
    from safetensors.torch import save

    tensors = {f"lora/{name}": value.detach().float().cpu().contiguous() for name, value in parameters.items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "recipe": json.dumps(request.recipe(), sort_keys=True),
        "request": request.model_dump_json(),
        "dataset": json.dumps(dataset),
        "losses": json.dumps(losses),
        "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,  # accelerate wraps it
        "param_groups": json.dumps(state["param_groups"]),
        "scalars": json.dumps(scalars),
    }
    path = write_atomic(checkpoint_path(run_dir, step), save(tensors, metadata=metadata))
    for old in checkpoints(run_dir)[:-request.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TrainingError(f"{path} is not a refgen training checkpoint")
        return Checkpoint(path, int(meta["step"]), json.loads(meta["recipe"]), json.loads(meta["dataset"]),
                          json.loads(meta["losses"]), json.loads(meta["request"]))
    except TrainingError:
        raise
    except Exception as exc:  # safetensors' own error kinds, KeyError, ValueError
        raise TrainingError(f"training checkpoint {path} cannot be read: {exc}") from exc


def restore(path: Path, parameters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Load the LoRA factors into `parameters` (in place) and the optimizer's state."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    names = {key[len("lora/"):] for key in stored if key.startswith("lora/")}
    if names != set(parameters):
        raise TrainingError(f"checkpoint {path} holds other LoRA layers than this run builds "
                            f"({len(names)} stored, {len(parameters)} here): was the base model changed?")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(stored[f"lora/{name}"])
    state: dict[int, dict] = {}
    for key, value in stored.items():
        if key.startswith("optimizer/"):
            _, index, entry = key.split("/", 2)
            state.setdefault(int(index), {})[entry] = value
    for index, entries in json.loads(meta["scalars"]).items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def latest(run_dir: Path) -> Optional[Checkpoint]:
    found = checkpoints(run_dir)
    return read_checkpoint(found[-1]) if found else None


def check_resumable(checkpoint: Checkpoint, recipe: dict, dataset: list[str]) -> None:
    """A resume continues THE run: the same recipe and the same images, or it is refused (naming what changed)."""
    changed = sorted(key for key in set(recipe) | set(checkpoint.recipe) if recipe.get(key) != checkpoint.recipe.get(key))
    if changed:
        details = "; ".join(f"{key}: {checkpoint.recipe.get(key)!r} -> {recipe.get(key)!r}" for key in changed)
        raise TrainingError(f"cannot resume from {checkpoint.path}: the request differs in {details}. "
                            "Resume with the same settings (only steps, samples and checkpoint cadence may change), "
                            "or start a new run with another name")
    if dataset != checkpoint.dataset:
        raise TrainingError(f"cannot resume from {checkpoint.path}: the training images changed "
                            f"({len(checkpoint.dataset)} then, {len(dataset)} now, or different pixels)")
