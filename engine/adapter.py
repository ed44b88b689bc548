"""The adapter seam: how a kind of guidance takes part in a generation without the Engine naming it.

An `Adapter` turns its part of a request into a `Prepared` (None when the request does not use it), and turns
its provenance record back into one for replay. A `Prepared` says what it patches on the shared models for
one generation, what it adds to each denoising step, what it records, and may take part in the few places
where a kind of guidance changes the path (the prompt, the UNet, the start latents, the decoded pixels, the
result). Every hook does nothing by default, so an adapter overrides only what it changes.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional, Protocol, Sequence

import torch
from PIL import Image

from .conditioning import Guidance
from .request import GenerationRequest, ResolvedRequest
from .sampling import Start


@dataclass(frozen=True)
class Context:
    """What an adapter may use while it prepares: the engine's models and the request's init image."""

    pipe: Any  # the diffusers pipeline that holds the shared models (UNet, VAE, text encoders)
    device: torch.device
    dtype: torch.dtype
    loras: Any  # the engine's LoraSet: an adapter's own LoRA (FaceID's) is switched on with the request's
    inpaint_unet: Any = None  # a 9-channel inpainting UNet, when one is loaded
    init_image: Optional[Image.Image] = None


@dataclass(frozen=True)
class Frame:
    """One sampling pass as an adapter sees it: output size, batch, classifier-free guidance."""

    width: int
    height: int
    batch: int
    guided: bool
    whole: bool = True  # False for one tile of a tiled refine: guidance tied to the whole picture stays out


class SharedModel(Protocol):
    """A model several adapters patch together: the patches of one generation are applied in one go (all
    IP-Adapter instances load in one diffusers call) and undone when the generation ends."""

    order: int  # entered in ascending order (the IP-Adapters before the LoRAs: loading FaceID switches its LoRA on)

    def applied(self, patches: list) -> ContextManager[tuple[Guidance, ...]]:
        """Apply these patches for the `with` block, restore the model after it; yields per-step guidance."""


class Prepared:
    """One adapter's part in one generation."""

    def record(self) -> dict:
        """Fields of the ResolvedRequest this adapter fills (its inputs' provenance, read back by replay)."""
        return {}

    def prompt(self, prompt: str) -> str:
        return prompt

    def patches(self, frame: Frame) -> list[tuple[SharedModel, Any]]:
        """(model, patch) pairs to apply for the generation, restored when it ends."""
        return []

    def guidance(self, frame: Frame) -> tuple[Guidance, ...]:
        """Per-step contributions for one pass of this size."""
        return ()

    def unet(self, unet):
        """The UNet the base pass runs (an inpainting UNet replaces the model's own)."""
        return unet

    def start(self, start: Start) -> Optional[tuple[torch.Tensor, Guidance]]:
        """Start latents of the base pass and the guidance tied to them, when this adapter owns the start."""
        return None

    def decoded(self, pixels):
        """The base pass's decoded (N, H, W, 3) pixels, changed where this adapter needs it (inpainting composites)."""
        return pixels

    def finish(self, result, resolved: ResolvedRequest):
        """The GenerationResult, annotated or reordered (a character's identity scores)."""
        return result


class Adapter(Protocol):
    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional[Prepared]:
        """This adapter's part of `request`, its inputs loaded and checked; None when the request does not use it."""

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional[Prepared]:
        """The same part again from the provenance record, its inputs checked against their recorded hashes."""


@contextmanager
def patched(prepared: Sequence[Prepared], frame: Frame, *extra: tuple[SharedModel, Any]) -> Iterator[tuple[Guidance, ...]]:
    """Every patch of one generation, applied model by model; all undone on exit, also when the generation
    raises or is cancelled. Yields the per-step guidance the patched models contribute."""
    groups: dict[Any, list] = {}
    for model, patch in [*extra, *(pair for p in prepared for pair in p.patches(frame))]:
        groups.setdefault(model, []).append(patch)
    with ExitStack() as stack:
        guidance: list[Guidance] = []
        for model in sorted(groups, key=lambda m: m.order):
            guidance += stack.enter_context(model.applied(groups[model]))
        yield tuple(guidance)
