"""Typed errors. Each message says what went wrong and what the user can do about it."""

from __future__ import annotations


class RefgenError(Exception):
    """Base of every error refgen raises on purpose."""


class WeightsMissingError(RefgenError):
    """A model component is not on disk. Names the manifest entry and the command that fetches it."""

    def __init__(self, entry: str, missing: list[str] | None = None, hint: str = ""):
        self.entry = entry
        self.missing = list(missing or [])
        shown = ", ".join(self.missing[:4]) + (f" and {len(self.missing) - 4} more" if len(self.missing) > 4 else "")
        what = f" (missing: {shown})" if self.missing else ""
        message = (
            f"weights '{entry}' are not on disk{what}. Fetch them with: refgen weights fetch {entry}"
            " -- or, with no network, run a smoke test on the built-in random-weight model: --model tiny"
        )
        super().__init__(message + (f". {hint}" if hint else ""))


class WeightsIntegrityError(RefgenError):
    """A file's sha256 does not match the manifest."""


class UnknownModelError(RefgenError):
    """A model reference that is neither a manifest name, a folder, a cached repo nor a checkpoint file."""


class UnsafeWeightsError(RefgenError):
    """A pickle-based checkpoint was given without the user opting in."""


class InvalidImageError(RefgenError):
    """An input image that cannot be read safely (missing, truncated, not an image, too large)."""


class GenerationCancelled(RefgenError):
    """The per-step callback asked to stop."""


class NonFiniteOutputError(RefgenError):
    """The sampler or the VAE produced NaN/inf or an all-black image."""


class PresetError(RefgenError):
    """An unknown or malformed preset."""


class ProvenanceError(RefgenError):
    """A PNG without refgen metadata, or metadata refgen cannot replay."""
