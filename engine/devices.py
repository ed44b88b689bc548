"""Which device and dtype a run uses: one place, shared by the Engine, the face analyzer, the upscaler
and the API server (which checks a --device before listening)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import DeviceError

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def pick_device(device: Optional[str], dtype: Union[str, torch.dtype, None]) -> tuple[torch.device, torch.dtype]:
    """Default: CUDA in fp16 when there is a GPU, else CPU in fp32.

    Raises DeviceError (a ValueError) for a device this machine does not have or a dtype it cannot run,
    before any weights are read.
    """
    chosen = _usable_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return chosen, torch.float16 if chosen.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise DeviceError(f"unknown dtype {dtype!r}; use one of fp16, bf16, fp32")
        dtype = _DTYPES[dtype.lower()]
    if chosen.type == "cpu" and dtype == torch.float16:
        raise DeviceError("fp16 needs a GPU; on CPU use fp32 (default) or bf16")
    return chosen, dtype


def _usable_device(name: str) -> torch.device:
    try:
        chosen = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device type {chosen.type!r} is not supported; use cpu, cuda or cuda:N")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA GPU on this machine; use cpu")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' asked for, but this machine has no Apple GPU")
    return chosen
