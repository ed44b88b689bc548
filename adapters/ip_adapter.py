"""Style Reference and Content Reference through an SDXL IP-Adapter (diffusers' loaders).

Following InstantStyle, each kind of reference feeds the adapter into one attention layer only:
- style   -> the first cross-attention up block's second attention (SDXL: up_blocks.0.attentions.1),
             which carries colour, texture and brushwork but little layout;
- content -> the last cross-attention down block's second attention (SDXL: down_blocks.2.attentions.1),
             which carries layout and subject but little style.
So a style image does not drag its subject along, and a content image does not force its style.
Style and content in one request are two instances of the same adapter with their own images
and scales. Without references the adapter is unloaded: the UNet is exactly the plain one.

Strength (Leonardo's `weight` 0-2 or `strengthType`, never both) -> adapter scale on that layer:

| strengthType | weight range | weight used | adapter scale |
|--------------|--------------|-------------|---------------|
| Low          | 0   - 0.4    | 0.2         | 0.2           |
| Mid          | 0.4 - 0.8    | 0.6         | 0.6           |
| High         | 0.8 - 1.2    | 1.0         | 1.0           |
| Ultra        | 1.2 - 1.6    | 1.4         | 1.4           |
| Max          | 1.6 - 2      | 1.8         | 1.8           |

(adapter scale = weight: InstantStyle's recommended scale on the style layer is 1.0.)

Several style images: their CLIP image embeddings are averaged with weights proportional to their
`influence`, so only the ratio matters ((1, 1) behaves as (0.5, 0.5)); the adapter scale is the
influence-weighted mean of their weights.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.conditioning import Guidance
from engine.errors import RefgenError
from engine import paths
from engine.hashing import cached_sha256
from engine.images import load_rgb, write_atomic

StrengthType = Literal["Low", "Mid", "High", "Ultra", "Max"]
STRENGTH_WEIGHTS: dict[str, float] = {"Low": 0.2, "Mid": 0.6, "High": 1.0, "Ultra": 1.4, "Max": 1.8}
DEFAULT_WEIGHT = STRENGTH_WEIGHTS["High"]

IP_ADAPTER_ENTRY = "ip-adapter-sdxl"
# The published variants: `vit-h` projects the CLIP image embedding to 4 tokens; `plus` resamples the
# encoder's penultimate hidden states to 16 tokens (more detail carried over, stronger likeness).
WEIGHT_FILES = {
    "vit-h": "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    "plus": "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
}
IMAGE_ENCODER_FOLDER = "models/image_encoder"
KINDS = ("style", "content")


class ReferenceError(RefgenError):
    """A reference that cannot be used (unknown kind, unusable image, adapter that does not fit)."""


class Reference(BaseModel):
    """One Style or Content Reference image of a request."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    kind: Literal["style", "content"]
    image: Union[str, Path, Image.Image]
    weight: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    strength_type: Optional[StrengthType] = None
    influence: float = Field(default=1.0, gt=0.0, le=100.0)  # style only: relative to the other style images

    @model_validator(mode="after")
    def _one_strength(self) -> "Reference":
        if self.weight is not None and self.strength_type is not None:
            raise ValueError("give weight or strength_type, not both")
        return self

    @property
    def scale(self) -> float:
        if self.weight is not None:
            return self.weight
        return STRENGTH_WEIGHTS[self.strength_type] if self.strength_type else DEFAULT_WEIGHT


def block_scales(unet, kind: str, scale: float) -> dict:
    """diffusers' per-block IP-Adapter scale dict putting `scale` on the InstantStyle layer only."""
    if kind == "style":
        index = next(i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions"))
        count = len(unet.up_blocks[index].attentions)
        return {"up": {f"block_{index}": [scale if i == 1 else 0.0 for i in range(count)]}}
    index = max(i for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions"))
    count = len(unet.down_blocks[index].attentions)
    return {"down": {f"block_{index}": [scale if i == 1 else 0.0 for i in range(count)]}}


class IPAdapterGuidance(Guidance):
    """Image embeddings for each loaded adapter instance, CFG-batched (unconditional half first)."""

    def __init__(self, image_embeds: list[torch.Tensor]):
        self._image_embeds = image_embeds

    def unet_kwargs(self, latent_input, timestep, step: int, total: int, cond) -> dict:
        return {"added_cond_kwargs": {"image_embeds": self._image_embeds}}


class IPAdapters:
    """The IP-Adapter instances of an engine: loaded for the kinds a request uses, unloaded otherwise."""

    def __init__(self, pipe, device, dtype, reference: Union[str, Path] = IP_ADAPTER_ENTRY,
                 variant: Literal["vit-h", "plus"] = "vit-h", image_encoder_folder: str = IMAGE_ENCODER_FOLDER,
                 cache_size: int = 64):
        self._pipe, self._device, self._dtype = pipe, device, dtype
        self._reference, self._encoder_folder = str(reference), image_encoder_folder
        self._weight_file, self._hidden_states = WEIGHT_FILES[variant], variant == "plus"
        self._loaded: tuple[str, ...] = ()
        self._encoder_id: Optional[str] = None  # encoder file hash + output kind: worked out once, on first need
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self.encoder_runs = 0  # how many times the image encoder ran (the cache's effect is observable)

    def guidance(self, references: list[Reference], batch: int, guided: bool) -> Optional[IPAdapterGuidance]:
        kinds = tuple(kind for kind in KINDS if any(r.kind == kind for r in references))
        self._ensure(kinds)
        if not kinds:
            return None
        scales, embeds = [], []
        for kind in kinds:
            chosen = [r for r in references if r.kind == kind]
            positive, negative = self._combined(chosen)
            scales.append(block_scales(self._pipe.unet, kind, _weighted_scale(chosen)))
            rows = [negative] * batch + [positive] * batch if guided else [positive] * batch
            embeds.append(torch.stack(rows).to(self._device, self._dtype))  # (2B or B, 1, D), as diffusers batches it
        self._pipe.set_ip_adapter_scale(scales)
        return IPAdapterGuidance(embeds)

    def _ensure(self, kinds: tuple[str, ...]) -> None:
        if kinds == self._loaded:
            return
        if self._loaded:
            self._pipe.unload_ip_adapter()
            self._loaded = ()
        if kinds:
            folder = self._folder()
            self._pipe.load_ip_adapter(
                str(folder), subfolder=str(Path(self._weight_file).parent), weight_name=[Path(self._weight_file).name] * len(kinds),
                image_encoder_folder=self._encoder_folder, local_files_only=True,
            )
            self._pipe.image_encoder.to(self._device, self._dtype)
            self._pipe.unet.encoder_hid_proj.to(self._device, self._dtype)
            self._loaded = kinds

    def _folder(self) -> Path:
        from engine import weights

        folder = Path(self._reference).expanduser()
        return folder if folder.is_dir() else weights.require(self._reference)

    def _combined(self, references: list[Reference]) -> tuple[torch.Tensor, torch.Tensor]:
        """Influence-weighted mean of the references' embeddings (only the ratio of influences matters)."""
        encoded = [self._encode(r.image) for r in references]
        total = sum(r.influence for r in references)
        positive = sum((r.influence / total) * pos for r, (pos, _) in zip(references, encoded))
        return positive, encoded[0][1]

    def _encode(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP image embedding and its unconditional counterpart, cached by image content + encoder
        identity (the encoder file's sha256 and which output is used), in memory and on disk."""
        picture = load_rgb(image, "reference image")
        if self._encoder_id is None:
            self._encoder_id = self._encoder_identity(self._folder())
        key = hashlib.sha256(picture.tobytes() + f"{picture.size}|{self._encoder_id}".encode()).hexdigest()
        if key not in self._cache:
            self._cache[key] = self._from_disk(key) or self._run_encoder(picture, key)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _encoder_identity(self, folder: Path) -> str:
        encoder = folder / self._encoder_folder / "model.safetensors"
        digest = cached_sha256(encoder) if encoder.is_file() else self._reference
        return f"{digest}|hidden_states={self._hidden_states}"

    def _run_encoder(self, picture: Image.Image, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import save

        with torch.inference_mode():
            positive, negative = self._pipe.encode_image(picture, self._device, 1, output_hidden_states=self._hidden_states)
        self.encoder_runs += 1
        tensors = {"positive": positive.float().cpu().contiguous(), "negative": negative.float().cpu().contiguous()}
        write_atomic(paths.cache_dir() / "references" / f"{key}.safetensors", save(tensors))
        return positive, negative  # (1, D) each; plus: (1, tokens, D)

    def _from_disk(self, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file

        file = paths.cache_dir() / "references" / f"{key}.safetensors"
        try:
            tensors = load_file(str(file))
        except (OSError, ValueError, RuntimeError):
            return None  # absent or damaged: encode again
        return tensors["positive"].to(self._device, self._dtype), tensors["negative"].to(self._device, self._dtype)


def _weighted_scale(references: list[Reference]) -> float:
    total = sum(r.influence for r in references)
    return sum(r.influence * r.scale for r in references) / total
