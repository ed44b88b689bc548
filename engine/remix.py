"""Remix: a new picture that keeps an existing one's structure.

Recipe: the image is the init image at a moderate init_strength (colours and layout carry over)
and, at the same time, a depth or canny ControlNet unit made from the same image (the structure
is held even where the prompt pulls elsewhere). Everything else is an ordinary request, so every
other field (preset, seed, LoRAs, aspect...) can be added.

| control | keeps                          | needs                                         |
|---------|--------------------------------|-----------------------------------------------|
| canny   | outlines and fine edges        | controlnet-canny-sdxl                         |
| depth   | 3D layout; surfaces may change | controlnet-depth-sdxl, depth-anything-v2-small |
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from PIL import Image

from .request_types import ControlUnit

from .request import GenerationRequest

REMIX_INIT_STRENGTH = 0.35  # Leonardo's meaning: how close to the original (0.1-0.9)
REMIX_CONTROL_WEIGHT = 0.6
REMIX_CONTROL_END = 0.8  # release the structure for the last steps so details can settle


def remix_request(
    image: Union[str, Path, Image.Image],
    prompt: str,
    control: Literal["canny", "depth"] = "canny",
    init_strength: float = REMIX_INIT_STRENGTH,
    control_weight: float = REMIX_CONTROL_WEIGHT,
    **fields,
) -> GenerationRequest:
    """The Remix recipe as a GenerationRequest; `fields` are any other request fields."""
    unit = ControlUnit(type=control, image=image, weight=control_weight, end=REMIX_CONTROL_END, preprocess=True)
    return GenerationRequest(prompt=prompt, init_image=image, init_strength=init_strength, controlnets=[unit], **fields)
