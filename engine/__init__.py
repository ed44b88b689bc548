"""refgen's engine: `from engine import Engine, GenerationRequest`."""

from .engine import Engine, GenerationResult
from .errors import (
    GenerationCancelled,
    InvalidImageError,
    NonFiniteOutputError,
    RefgenError,
    UnsafeWeightsError,
    WeightsMissingError,
)
from .request import GenerationRequest, LoraSpec
from .sampling import StepInfo

__all__ = [
    "Engine", "GenerationRequest", "GenerationResult", "LoraSpec", "StepInfo",
    "RefgenError", "WeightsMissingError", "UnsafeWeightsError", "InvalidImageError",
    "GenerationCancelled", "NonFiniteOutputError",
]
