"""Numerical cost of low-precision UNet Linear layers (engine/quantize.py) on the full-size SDXL UNet.

The SDXL base 1.0 UNet from its published config (engine/sdxl_configs.py) with random weights, in bf16 on
the CPU (~5 GB), runs one forward at a small latent as the reference; then the same UNet with
  - bf16 Linear inputs and weights multiplied in fp32 (the control: how far rounding alone moves this output);
  - fp8 (EMULATED on the CPU): each Linear's input and weight rounded to float8_e4m3fn with per-row scales
    (per token, per output feature), multiplied in fp32 and scaled back: the numerics of torchao's dynamic
    float8 per-row path (Float8DynamicActivationFloat8WeightConfig), which itself needs an Ada/Hopper GPU;
  - int8 weight-only through torchao (quantize_unet(unet, "int8")), the real path, run on the CPU.
Reported: relative L2 and max abs error of the UNet output vs the bf16 reference, and the share of the UNet's
FLOPs in Linear layers (FlopCounterMode on the meta device at a 128x128 latent, i.e. a 1024x1024 image).

    python benchmarks/bench_precision.py            # peak RSS 6.1 GB, ~6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

from _common import HERE, environment  # also puts the repository root on sys.path

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from engine.quantize import quantize_unet  # noqa: E402
from engine.sdxl_configs import _materialize, build_sdxl_unet_on_meta  # noqa: E402

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def unet_inputs(batch: int, latent: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """SDXL-shaped UNet inputs: two text encoders' hidden states (77 x 2048), pooled text (1280), 6 time ids."""
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)
    return {"sample": noise(batch, 4, latent, latent), "timestep": torch.tensor(500.0),
            "encoder_hidden_states": noise(batch, 77, 2048),
            "added_cond_kwargs": {"text_embeds": noise(batch, 1280), "time_ids": time_ids.to(device, dtype)}}


@torch.no_grad()
def forward(unet: nn.Module, inputs: dict) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    output = unet(**inputs, return_dict=False)[0].float()
    return output, time.perf_counter() - start


def errors(output: torch.Tensor, reference: torch.Tensor) -> dict:
    return {"relative_l2": ((output - reference).norm() / reference.norm()).item(),
            "max_abs": (output - reference).abs().max().item(), "reference_max_abs": reference.abs().max().item()}


# -- fp8 by emulation ----------------------------------------------------------------------------


def to_fp8_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and fp32 scales, one scale per row (last dimension), as torchao's PerRow."""
    amax = tensor.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def upcast_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """No rounding at all: the control for fp8, whose products are fp32 where bf16's are not."""
    return tensor.float(), torch.ones(*tensor.shape[:-1], 1)


def emulated_linear(layer: nn.Linear, inputs: torch.Tensor, to_rows=to_fp8_rows) -> torch.Tensor:
    """What torch._scaled_mm computes for a per-row float8 Linear: fp8 x fp8 products accumulated in fp32."""
    quantized_inputs, input_scale = to_rows(inputs)
    quantized_weight, weight_scale = to_rows(layer.weight)
    output = (quantized_inputs.float() @ quantized_weight.float().T) * input_scale * weight_scale.T
    if layer.bias is not None:
        output = output + layer.bias.float()
    return output.to(inputs.dtype)


@contextmanager
def emulated(unet: nn.Module, to_rows=to_fp8_rows):
    """The UNet's Linear layers (those quantize_unet's fp8 filter takes) through emulated_linear; restored after."""
    layers = [m for m in unet.modules() if isinstance(m, nn.Linear) and m.in_features % 16 == 0 == m.out_features % 16]
    for layer in layers:
        layer.forward = lambda inputs, layer=layer: emulated_linear(layer, inputs, to_rows)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


# -- where the FLOPs are --------------------------------------------------------------------------


def linear_flop_share(batch: int = 2, latent: int = 128) -> tuple[float, int]:
    """(share of the UNet's FLOPs in nn.Linear layers, total FLOPs) of one forward, counted on meta."""
    unet = build_sdxl_unet_on_meta().eval()
    inputs = unet_inputs(batch, latent, torch.device("meta"), torch.float32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(**inputs, return_dict=False)
    by_module = counter.get_flop_counts()
    linear_names = {name for name, module in unet.named_modules() if isinstance(module, nn.Linear)}
    root = type(unet).__name__
    linear = sum(sum(by_module.get(f"{root}.{name}", {}).values()) for name in linear_names)
    total = counter.get_total_flops()
    return linear / total, total


# -- report ---------------------------------------------------------------------------------------


def build_unet(dtype: torch.dtype, seed: int) -> nn.Module:
    return _materialize(build_sdxl_unet_on_meta(), CPU, dtype, torch.Generator().manual_seed(seed))


def markdown(env: dict, args, rows: list[tuple], share: float, total: int) -> str:
    lines = [
        "# Low-precision UNet Linear layers: output error on the full-size SDXL UNet",
        "",
        f"Measured {env['date_utc']} on {env['device_name']} (CPU, {env['torch_threads']} threads), torch "
        f"{env['torch']}, diffusers {env['diffusers']}, torchao {env['torchao']}; `python benchmarks/bench_precision.py`.",
        f"SDXL base 1.0 UNet architecture, random weights, bf16; one forward, batch {args.batch}, "
        f"{args.latent}x{args.latent} latent, 77x2048 text states, timestep 500. Errors are of the UNet output "
        "against the bf16 UNet's. Random weights (variance-preserving init) pass a perturbation through ~70 blocks "
        "with little damping, so compare rows with the fp32-products row (the bf16 rounding floor), not with zero.",
        "",
        "| Linear layers | how it ran | relative L2 error | max abs error | forward, s |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {how} | {err['relative_l2']:.2e} | {err['max_abs']:.2e} | {seconds:.1f} |"
              for name, how, err, seconds in rows]
    lines += ["", f"Reference output max abs: {rows[0][2]['reference_max_abs']:.2f}. fp8 is **emulated** on the CPU "
              "(per-row float8_e4m3fn input and weight, fp32 products): its numerics, not its speed. Forward times are "
              "one run each on a shared machine: not a speed comparison.", "",
              f"Share of UNet FLOPs in nn.Linear layers (FlopCounterMode, meta device, batch 2, 128x128 latent = "
              f"1024x1024 image): **{share:.1%}** of {total / 1e12:.2f} TFLOP per forward.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "precision.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    share, total = linear_flop_share()
    print(f"Linear share of UNet FLOPs: {share:.1%} of {total / 1e12:.2f} TFLOP")
    unet = build_unet(torch.bfloat16, seed=0)
    inputs = unet_inputs(args.batch, args.latent, CPU, torch.bfloat16)
    reference, seconds = forward(unet, inputs)
    rows = [("bf16 (reference)", "eager", errors(reference, reference), seconds)]
    with emulated(unet, upcast_rows) as count:  # the floor: how much fp32 products alone move the output
        output, seconds = forward(unet, inputs)
    rows.append(("bf16 weights and inputs, fp32 products", f"emulated, {count} layers", errors(output, reference), seconds))
    with emulated(unet) as count:
        output, seconds = forward(unet, inputs)
    rows.append(("fp8 per-row, dynamic activations", f"EMULATED, {count} layers", errors(output, reference), seconds))
    quantize_unet(unet, "int8", CPU)  # last: it replaces the bf16 weights
    output, seconds = forward(unet, inputs)
    rows.append(("int8 weight-only", "torchao, eager", errors(output, reference), seconds))
    for row in rows:
        print(row)
    text = markdown(environment(CPU, torch.bfloat16, extra_packages=("torchao",)), args, rows, share, total)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
