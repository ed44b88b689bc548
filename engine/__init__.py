"""refgen's engine: `from engine import Engine, GenerationRequest, ControlUnit, T2IAdapterUnit, Reference, CharacterReference`.

Names are resolved on first use (PEP 562) for import cost, not to hide a cycle (engine/ and adapters/
import each other in one direction only; tests/test_layering.py checks it): `import engine.api.server`
or `engine.cli` must not load torch, diffusers and OpenCV before a command or a job needs them.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "engine.engine",
    "GenerationResult": "engine.engine",
    "GenerationRequest": "engine.request",
    "LoraSpec": "engine.request",
    "ControlUnit": "engine.request_types",
    "T2IAdapterUnit": "engine.request_types",
    "Reference": "engine.request_types",
    "CharacterReference": "engine.request_types",
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
    "Speed": "engine.speed",
    "SpeedError": "engine.speed",
    "QuantizeError": "engine.quantize",
    "train_lora": "engine.training",
    "TrainingRequest": "engine.training",
    "TrainingResult": "engine.training",
    "TrainingError": "engine.training",
    "TrainingDataError": "engine.training",
    "TrainingProgress": "engine.training",
    "TrainingInterrupted": "engine.training",
    "LoraLibrary": "engine.lora_library",
    "LoraLibraryError": "engine.lora_library",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
