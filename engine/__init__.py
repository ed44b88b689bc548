"""refgen's engine: `from engine import Engine, GenerationRequest, ControlUnit, Reference, CharacterReference`.

Names are resolved on first use, so that importing a leaf module (engine.errors, engine.weights)
from an adapter does not pull in the whole engine, and adapters can depend on engine modules
while the engine depends on adapters.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "engine.engine",
    "GenerationResult": "engine.engine",
    "GenerationRequest": "engine.request",
    "LoraSpec": "engine.request",
    "ControlUnit": "adapters.controlnet",
    "Reference": "adapters.ip_adapter",
    "CharacterReference": "adapters.identity",
    "StepInfo": "engine.sampling",
    "RefgenError": "engine.errors",
    "WeightsMissingError": "engine.errors",
    "UnsafeWeightsError": "engine.errors",
    "InvalidImageError": "engine.errors",
    "GenerationCancelled": "engine.errors",
    "NonFiniteOutputError": "engine.errors",
    "DeviceError": "engine.errors",
    "ProvenanceError": "engine.errors",
    "OutputPathError": "engine.errors",
    "WeightsDownloadError": "engine.errors",
    "ControlNetFolderError": "adapters.controlnet",
    "LoraError": "engine.lora",
    "PeftVersionError": "engine.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
