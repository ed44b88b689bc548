"""Typed errors. Each message says what went wrong and what the user can do about it."""

from __future__ import annotations


class RefgenError(Exception):
    """Base of every error refgen raises on purpose."""


class WeightsMissingError(RefgenError):
    """A model component is not on disk. Names the manifest entry and the command that fetches it."""

    def __init__(self, entry: str, missing: list[str] | None = None, hint: str = ""):
        self.entry = entry
        self.missing = list(missing or [])
        self.hint = hint
        super().__init__(self.describe(offer_tiny=True))

    def describe(self, offer_tiny: bool) -> str:
        """The message; `offer_tiny` adds the `--model tiny` way out, for commands that have that option."""
        shown = ", ".join(self.missing[:4]) + (f" and {len(self.missing) - 4} more" if len(self.missing) > 4 else "")
        what = f" (missing: {shown})" if self.missing else ""
        message = f"weights '{self.entry}' are not on disk{what}. Fetch them with: refgen weights fetch {self.entry}"
        if offer_tiny:
            message += " -- or, with no network, run a smoke test on the built-in random-weight model: --model tiny"
        return message + (f". {self.hint}" if self.hint else "")


class WeightsIntegrityError(RefgenError):
    """A file's sha256 does not match the manifest."""


class WeightsDownloadError(RefgenError):
    """`refgen weights fetch` could not download: no network, hub offline mode, an HTTP error.
    `missing` lists what is still not on disk ("name: files (in folder)"), and then the message
    ends with the way to work offline."""

    OFFLINE_HINT = (
        "With no network, every refgen command runs on the built-in random-weight model (nothing to fetch): "
        'add --model tiny, e.g. refgen generate "a red fox" --model tiny'
    )

    def __init__(self, reason: str, missing: list[str] | None = None):
        self.reason = reason
        self.missing = list(missing or [])
        super().__init__(self.describe())

    def describe(self, also_missing: list[str] | None = None) -> str:
        missing = [*self.missing, *(also_missing or [])]
        if not missing:
            return self.reason
        return "\n  ".join([self.reason, *(f"still missing: {line}" for line in missing), self.OFFLINE_HINT])


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


class DeviceError(RefgenError, ValueError):
    """A device or dtype this machine cannot run (no GPU, unknown name, fp16 on CPU)."""


class OutputPathError(RefgenError):
    """An output path refgen cannot write to (e.g. a folder where a file is meant)."""
