"""Character Reference: keep one person's identity across images, from a photo or a saved profile.

Two face-embedding adapters behind one interface (`IdentityAdapter.plan`):
- `instantid` (default): InstantID. Its face adapter (a Resampler over the 512-d ArcFace embedding of
  insightface's antelopev2 pack) feeds 16 identity tokens to the UNet's cross-attention through an
  IP-Adapter, and IdentityNet, a ControlNet that attends to those face tokens instead of the text,
  is fed a five-keypoint picture (from the reference, or from `pose_image`). Strongest likeness.
- `faceid`: IP-Adapter FaceID-Plus-v2. The ArcFace embedding (buffalo_l pack) gives 4 tokens, which
  a Resampler refines with the CLIP hidden states of the aligned face crop; the file's LoRA is active
  while a character is used. Lighter: no ControlNet, so the face is free to move.

Strength (`weight` 0-2 or `strength_type` Low/Mid/High, never both) -> scales, one table, linear
between its rows:

| strengthType | weight range | weight used | adapter scale | IdentityNet scale (InstantID) |
|--------------|--------------|-------------|---------------|-------------------------------|
|              | 0            |             | 0 (no character: exactly the plain image)     |
| Low          | 0    - 0.66  | 0.33        | 0.40          | 0.30                          |
| Mid          | 0.66 - 1.32  | 0.99        | 0.80          | 0.80                          |
| High         | 1.32 - 2     | 1.66        | 1.00          | 1.00                          |
|              | 2            |             | 1.20          | 1.20                          |

Mid is InstantID's published default (0.8 / 0.8). The FaceID LoRA stays at 1.0 for any weight > 0
(it adapts the UNet to the adapter's tokens; scaling it down does not weaken the likeness evenly).

Several images (a profile's anchors or `images=[...]`) are averaged: the identity is the normalised
mean of their ArcFace embeddings; the face crop (FaceID) and the keypoints (InstantID) are the first
image's. A profile whose embeddings were made with another insightface pack than the adapter's is
re-embedded from its stored anchor images (embeddings of different recognisers are not comparable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

IdentityAdapterName = Literal["instantid", "faceid"]
CharacterStrength = Literal["Low", "Mid", "High"]

CHARACTER_WEIGHTS: dict[str, float] = {"Low": 0.33, "Mid": 0.99, "High": 1.66}
DEFAULT_CHARACTER_WEIGHT = CHARACTER_WEIGHTS["Mid"]
# weight -> (adapter scale, IdentityNet scale): the table above, interpolated linearly.
_TABLE_WEIGHTS = (0.0, 0.33, 0.99, 1.66, 2.0)
_TABLE_ADAPTER = (0.0, 0.40, 0.80, 1.00, 1.20)
_TABLE_IDENTITYNET = (0.0, 0.30, 0.80, 1.00, 1.20)


def character_scales(weight: float) -> tuple[float, float]:
    """(adapter scale, IdentityNet scale) for a Character Reference weight 0-2."""
    return (float(np.interp(weight, _TABLE_WEIGHTS, _TABLE_ADAPTER)),
            float(np.interp(weight, _TABLE_WEIGHTS, _TABLE_IDENTITYNET)))


class CharacterReference(BaseModel):
    """The Character Reference of a request: a saved character by name, or 1-5 photos of one person."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    name: Optional[str] = Field(default=None, min_length=1, max_length=64)
    images: list[Union[str, Path, Image.Image]] = Field(default_factory=list, max_length=5)
    weight: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    strength_type: Optional[CharacterStrength] = None
    adapter: IdentityAdapterName = "instantid"
    face_index: Optional[int] = Field(default=None, ge=0, le=63)  # which face of each photo; None: the largest
    pose_image: Optional[Union[str, Path, Image.Image]] = None  # InstantID: face position/orientation from here

    @model_validator(mode="after")
    def _consistent(self) -> "CharacterReference":
        if self.weight is not None and self.strength_type is not None:
            raise ValueError("give weight or strength_type, not both")
        if (self.name is None) == (not self.images):
            raise ValueError("a character reference needs a saved character `name` or `images` (one or the other)")
        if self.pose_image is not None and self.adapter != "instantid":
            raise ValueError("pose_image steers InstantID's keypoints; the faceid adapter has none")
        return self

    @property
    def scale(self) -> float:
        """The weight 0-2 this reference runs at."""
        if self.weight is not None:
            return self.weight
        return CHARACTER_WEIGHTS[self.strength_type] if self.strength_type else DEFAULT_CHARACTER_WEIGHT
