"""Low-precision UNet Linear layers through torchao (`pip install 'refgen[fast]'`).

The Linear layers carry most of the SDXL UNet's FLOPs (attention projections and feed-forwards; see
benchmarks/results/precision.md), the convolutions stay in the model's dtype.
int8: int8 weight-only (half the Linear weight memory of fp16, on CPU and CUDA).
fp8: float8 dynamic activations and float8 weights with per-row scales, run by float8 tensor-core matmuls,
which exist only on CUDA GPUs of compute capability 8.9 or more (Ada, Hopper and newer).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import RefgenError

QUANTIZATIONS = ("int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)


class QuantizeError(RefgenError):
    """A quantization that cannot run here: unknown kind, missing torchao, or hardware without fp8 matmuls."""


def check_quantization(kind: str, device: torch.device) -> None:
    """Raise QuantizeError unless `kind` can run on `device` with what is installed (before any weights load)."""
    if kind not in QUANTIZATIONS:
        raise QuantizeError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
    if kind == "fp8":
        _check_fp8_hardware(torch.device(device))
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        raise QuantizeError(f"quantization needs torchao: pip install 'refgen[fast]' ({error})") from error


def quantize_unet(unet: nn.Module, kind: str, device: torch.device) -> None:
    """Quantize the UNet's nn.Linear layers in place (`device`: where the UNet runs)."""
    check_quantization(kind, device)
    from torchao.quantization import quantize_

    quantize_(unet, _config(kind), filter_fn=_fp8_shaped_linear if kind == "fp8" else _any_linear)


def _config(kind: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    if kind == "int8":
        return Int8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _check_fp8_hardware(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability >= FP8_MIN_CAPABILITY:
            return
        found = f"a CUDA GPU of compute capability {capability[0]}.{capability[1]}"
    else:
        found = f"device {device.type}"
    raise QuantizeError(f"fp8 needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper or newer), this is "
                        f"{found}: use quantize='int8' instead")


def _any_linear(module: nn.Module, _name: str) -> bool:
    return isinstance(module, nn.Linear)


def _fp8_shaped_linear(module: nn.Module, _name: str) -> bool:
    # float8 matmuls (torch._scaled_mm over cuBLASLt) need both matrix dimensions divisible by 16; torchao
    # would fail on such a layer at run time, so it stays in the model's dtype.
    return _any_linear(module, _name) and module.in_features % 16 == 0 and module.out_features % 16 == 0


__all__ = ["QUANTIZATIONS", "QuantizeError", "check_quantization", "quantize_unet"]
