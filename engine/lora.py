"""LoRAs per request, through diffusers' loaders (diffusers and kohya layouts both load).

Each file is loaded once as a named adapter (named by its hash) and kept; a request only
switches which adapters are active and with what weight.

diffusers does not refuse a LoRA made for another model on its own: keys that belong to no
component are skipped with a log line, keys for layers the model lacks are dropped when some
others match, and a file that fails half-way (UNet loaded, text encoder refused) leaves its UNet
half installed and switched on. So after each load the adapter's layers are counted against the
file's, and whatever a failed load left behind is deleted.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .errors import RefgenError
from .hashing import cached_sha256
from .loading import check_pickle, state_dict_keys
from .lora_library import LoraLibrary
from .provenance import package_versions
from .request import LoraSpec
from .speed import unfused_attention

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraError(RefgenError):
    """A LoRA file that is missing or does not fit the model."""


class PeftVersionError(LoraError):
    """The installed peft cannot load LoRAs into this diffusers/transformers: an install problem, not the file's."""


@dataclass(frozen=True)
class LoraPatch:
    """LoRAs one generation switches on: the request's files, and already loaded peft adapters by name
    (an adapter's own LoRA, such as FaceID's)."""

    specs: tuple[LoraSpec, ...] = ()
    keep: dict[str, float] = field(default_factory=dict)


class LoraSet:
    order = 1  # after the IP-Adapters (a SharedModel, engine/adapter.py): loading FaceID switches its LoRA on

    def __init__(self, pipe, allow_pickle: bool = False, library: Optional[LoraLibrary] = None):
        self._pipe = pipe
        self._allow_pickle = allow_pickle
        self._library = library or LoraLibrary()  # a bare name in a request ("mira") is a library LoRA
        self._adapters: dict[str, str] = {}  # sha256 -> adapter name
        self._active = False  # may any adapter be switched on? (diffusers switches on what it loads)

    def activate(self, specs: list[LoraSpec], keep: Optional[dict[str, float]] = None) -> list[dict]:
        """Make exactly `specs` active, plus the already loaded peft adapters in `keep` (name -> weight: an
        adapter's own LoRA, such as FaceID's); returns the identities of `specs` for provenance."""
        keep = keep or {}
        if not specs and not keep:
            self._deactivate()
            return []
        identities = [self._identity(spec) for spec in specs]
        try:
            names = [self._ensure_loaded(spec, ident["sha256"]) for spec, ident in zip(specs, identities)]
        except BaseException:
            self._deactivate()  # a LoRA loaded before the failing one must not stay on
            raise
        # The same file twice (by content) is one adapter at the summed weight: that is what applying
        # it twice means, and set_adapters given a name twice does not do it.
        weights: dict[str, float] = {}
        for name, spec in zip(names, specs):
            weights[name] = weights.get(name, 0.0) + spec.weight
        weights.update(keep)
        self._pipe.enable_lora()
        self._pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        self._active = True
        return identities

    def identities(self, specs: list[LoraSpec]) -> list[dict]:
        """The files' identities for provenance (checked to exist and be allowed before anything loads)."""
        return [self._identity(spec) for spec in specs]

    @contextmanager
    def applied(self, patches: list[LoraPatch]) -> Iterator[tuple]:
        """Exactly these LoRAs on for the `with` block, all off after it (the weights stay loaded)."""
        keep = {name: weight for patch in patches for name, weight in patch.keep.items()}
        specs = [spec for patch in patches for spec in patch.specs]
        # LoRA layers wrap to_q/to_k/to_v: fused projections (speed="max") would run without them.
        with unfused_attention(self._pipe.unet) if specs or keep else nullcontext():
            self.activate(specs, keep)
            try:
                yield ()
            finally:
                self._deactivate()

    def _deactivate(self) -> None:
        if self._active:
            self._pipe.disable_lora()
            self._active = False

    def _identity(self, spec: LoraSpec) -> dict:
        path = lora_file(spec.path, self._library, self._allow_pickle)
        return {"path": str(path), "weight": spec.weight, "sha256": cached_sha256(path)}

    def _ensure_loaded(self, spec: LoraSpec, sha256: str) -> str:
        if sha256 not in self._adapters:
            name = f"lora_{sha256[:12]}"
            path = self._library.resolve(spec.path)
            self._active = True  # from here on, layers of this adapter may be installed and on
            try:
                self._pipe.load_lora_weights(str(path), adapter_name=name)
                self._check_applied(path, name)
            except LoraError:
                self._discard(name)
                raise
            except (ValueError, ImportError, KeyError, RuntimeError, TypeError, OSError) as exc:
                self._discard(name)
                if is_peft_version_refusal(exc):
                    raise PeftVersionError(peft_version_message(exc)) from exc
                raise LoraError(f"LoRA {path} does not fit this model (is it an SDXL LoRA?): {exc}") from exc
            self._adapters[sha256] = name
        return self._adapters[sha256]

    def _check_applied(self, path: Path, name: str) -> None:
        """Every LoRA layer of the file must have landed on a layer of the model."""
        applied = self._installed_layers(name)
        in_file = _lora_layers_in_file(path)
        if applied == 0:
            raise LoraError(
                f"LoRA {path} matches no layer of this model: it was made for another architecture "
                "(SD 1.5, SD 3, Flux, ...), not SDXL"
            )
        if in_file is not None and applied < in_file:
            raise LoraError(
                f"LoRA {path} has {in_file} layers but only {applied} exist in this model: "
                "it was made for another model or variant"
            )

    def _installed_layers(self, name: str) -> int:
        from peft.tuners.tuners_utils import BaseTunerLayer

        count = 0
        for component in _COMPONENTS:
            model = getattr(self._pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and any(
                    name in getattr(module, attr, {}) for attr in module.adapter_layer_names
                ):
                    count += 1
        return count

    def _discard(self, name: str) -> None:
        """Delete whatever a failed load installed under `name` (diffusers keeps loaded halves)."""
        try:
            self._pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass


def lora_file(reference: str, library: LoraLibrary, allow_pickle: bool = False) -> Path:
    """A request's LoRA (a file, or a name in the library) as a file that exists and may be loaded."""
    path = library.resolve(reference)
    if not path.is_file():
        raise LoraError(library.missing_message(reference))
    check_pickle(path, allow_pickle)
    return path


def is_peft_version_refusal(exc: BaseException) -> bool:
    """diffusers and transformers refuse a missing or too old peft with a ValueError that names "PEFT"
    ("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")."""
    return "PEFT" in str(exc)


def peft_version_message(exc: BaseException) -> str:
    versions = package_versions()
    installed = ", ".join(f"{name} {versions[name]}" for name in ("peft", "diffusers", "transformers"))
    return (f"LoRAs cannot be loaded with the installed packages ({installed}): {exc}. "
            "Reinstall refgen's tested dependency set: pip install -c constraints.txt -e . (see README, Set-up)")


def _lora_layers_in_file(path: Path):
    """How many LoRA layers (down/A projections) a file holds; None when the layout is not a plain LoRA."""
    keys = state_dict_keys(path)
    count = sum(1 for key in keys if key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight")))
    return count or None
