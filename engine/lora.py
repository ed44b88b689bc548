"""LoRAs per request, through diffusers' loaders (diffusers and kohya layouts both load).

Each file is loaded once as a named adapter (named by its hash) and kept; a request only
switches which adapters are active and with what weight.
"""

from __future__ import annotations

from pathlib import Path

from .errors import RefgenError
from .hashing import cached_sha256
from .loading import check_pickle
from .request import LoraSpec


class LoraError(RefgenError):
    """A LoRA file that is missing or does not fit the model."""


class LoraSet:
    def __init__(self, pipe, allow_pickle: bool = False):
        self._pipe = pipe
        self._allow_pickle = allow_pickle
        self._adapters: dict[str, str] = {}  # sha256 -> adapter name
        self._active = False

    def activate(self, specs: list[LoraSpec]) -> list[dict]:
        """Make exactly `specs` active; returns their identities for provenance."""
        if not specs:
            if self._active:
                self._pipe.disable_lora()
                self._active = False
            return []
        identities = [self._identity(spec) for spec in specs]
        names = [self._ensure_loaded(spec, ident["sha256"]) for spec, ident in zip(specs, identities)]
        self._pipe.enable_lora()
        self._pipe.set_adapters(names, adapter_weights=[spec.weight for spec in specs])
        self._active = True
        return identities

    def _identity(self, spec: LoraSpec) -> dict:
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise LoraError(f"LoRA file not found: {path}")
        check_pickle(path, self._allow_pickle)
        return {"path": str(path), "weight": spec.weight, "sha256": cached_sha256(path)}

    def _ensure_loaded(self, spec: LoraSpec, sha256: str) -> str:
        if sha256 not in self._adapters:
            name = f"lora_{sha256[:12]}"
            try:
                self._pipe.load_lora_weights(str(Path(spec.path).expanduser()), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise LoraError(f"LoRA {spec.path} does not fit this model: {exc}") from exc
            self._adapters[sha256] = name
        return self._adapters[sha256]
