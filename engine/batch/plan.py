"""The order and batches a manifest runs in: a deterministic function of the manifest's valid lines.

Grouping: lines are grouped by model, then by adapter signature (LoRAs, ControlNet / T2I-Adapter types, reference
kinds, the character's adapter and name, inpainting, upscale, mode), then by size, so each loaded model, adapter
set and shape is reused while it is warm. Models run in the order their first line appears, and within a model its
groups in the order their first line appears; within a group, units run in the order of their first line.

Batching: one engine call makes a request's images as one batch, image i from seed + i with its own generator
(refgen's num_images). Lines whose requests are the same except for the seed (and num_images) and whose seeds follow
on (seed of the next = seed + images of the previous) are merged into one request of up to MAX_MERGED_IMAGES images:
the same pictures, in one batch. A batch of 4 and a batch of 1 differ by float rounding (~1e-4, enough to flip an
8-bit value), so the unit of work is the merged request, never one line of it: the plan is computed from the whole
manifest, never from what is left to do, and a resumed run regenerates a whole unit whose outputs are incomplete and
writes only the missing files. Resume with the same manifest; a line that turns valid between runs (a missing image
file added) may join a unit and change its batch. best_of lines are never merged (their images are ranked together).
Each PNG's provenance records the request that ran (the merged one), so `refgen replay` regenerates it bit-identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from .manifest import BatchLine

MAX_MERGED_IMAGES = 4  # images in one merged batch: Leonardo's own limit above 768 px, safe for SDXL at 1024 on 24 GB


@dataclass(frozen=True)
class WorkUnit:
    """One engine call: a request and the lines whose images it makes, in seed order."""

    model: str
    lines: tuple[BatchLine, ...]

    @property
    def request(self):
        """The request that runs: the first line's, with the unit's images (a single line: the line's own)."""
        first = self.lines[0]
        if len(self.lines) == 1:
            return first.request
        return first.request.model_copy(update={"num_images": self.image_count})

    @property
    def image_count(self) -> int:
        return sum(line.image_count for line in self.lines)

    def slices(self) -> list[tuple[BatchLine, slice]]:
        """Each line with the slice of the unit's images that are its own."""
        parts, start = [], 0
        for line in self.lines:
            parts.append((line, slice(start, start + line.image_count)))
            start += line.image_count
        return parts


def plan_batch(lines: Iterable[BatchLine], max_images: int = MAX_MERGED_IMAGES) -> list[WorkUnit]:
    """Work units for these (valid) lines, grouped and merged as the module docstring says. A line whose id was
    already planned (the same request and seed) is left out: its outputs are the earlier line's."""
    unique: dict[str, BatchLine] = {}
    for line in lines:
        unique.setdefault(line.id, line)
    groups: dict[tuple, list[BatchLine]] = {}
    for line in unique.values():
        groups.setdefault(group_key(line), []).append(line)  # dicts keep first-appearance order
    models = list(dict.fromkeys(key[0] for key in groups))
    ordered = sorted(groups, key=lambda key: models.index(key[0]))  # stable: each model's groups together, one load each
    return [unit for key in ordered for unit in _merged(groups[key], max_images)]


def group_key(line: BatchLine) -> tuple:
    """(model, adapter signature, size) of a line."""
    request = line.request
    character = request.character
    signature = {
        "loras": [(spec.path, spec.weight) for spec in request.loras],
        "controlnets": [unit.type for unit in request.controlnets],
        "t2i_adapters": [unit.type for unit in request.t2i_adapters],
        "references": [reference.kind for reference in request.references],
        "character": None if character is None else (character.adapter, character.name),
        "inpaint": request.mask_image is not None,
        "upscale": request.upscale, "mode": request.mode, "preset": request.preset,
    }
    return line.model, json.dumps(signature, sort_keys=True), (request.width, request.height, request.aspect_ratio)


def _merged(members: list[BatchLine], max_images: int) -> list[WorkUnit]:
    """Units of one group: runs of lines with the same variant key and following seeds, in first-line order."""
    units: list[list[BatchLine]] = []
    for line in sorted(members, key=lambda line: (line.variant_key, line.request.seed, line.number)):
        last = units[-1][-1] if units else None
        if last is not None and _follows(last, line) and sum(item.image_count for item in units[-1]) + line.image_count <= max_images:
            units[-1].append(line)
        else:
            units.append([line])
    units.sort(key=lambda unit: min(line.number for line in unit))
    return [WorkUnit(unit[0].model, tuple(unit)) for unit in units]


def _follows(previous: BatchLine, line: BatchLine) -> bool:
    return (line.variant_key == previous.variant_key and line.request.best_of is None and previous.request.best_of is None
            and line.request.seed == previous.request.seed + previous.image_count)
