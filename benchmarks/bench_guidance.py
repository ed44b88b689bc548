"""Issue 3's costs: ControlNet units (plain vs 1 vs 2), a T2I-Adapter unit, and ESRGAN x4 of a 1024x1024 image.

Part `controlnet`: per-image time of plain txt2img, one ControlNet unit, two units (two different
ControlNets) and one T2I-Adapter unit (issue 10: its features are computed once, not per step) through
Engine.generate, as ratios to plain txt2img, and each case against diffusers' own pipeline on the very same
components in the same process: StableDiffusionXLPipeline (plain), StableDiffusionXLControlNetPipeline (one
unit), the same with MultiControlNetModel (two units) and StableDiffusionXLAdapterPipeline (T2I-Adapter).
All eight variants alternate (forward order on even rounds, reversed on odd ones) after one warm-up
each; medians are compared.

Part `esrgan`: time and peak memory of adapters.upscale.Upscaler.upscale on a 1024x1024 image with
the default tiling (tile 512, overlap 32) and untiled, on random-weight Real-ESRGAN RRDBNets (the
tests' builder, tests/esrgan_layouts.py). On the CPU the full-size network (23 blocks, 64 features,
~38 TFLOP for a 1024^2 input) is timed on a 128x128 crop and extrapolated (labelled as such).

    python benchmarks/bench_guidance.py --profile cpu-tiny    # tiny SDXL + tiny ControlNets, CPU (~4-5 min)
    python benchmarks/bench_guidance.py --profile gpu-sdxl    # full-size random SDXL + ControlNets, fp16, CUDA
    python benchmarks/bench_guidance.py --dry-run             # the gpu-sdxl models on the meta device: shapes, counts
    python benchmarks/bench_guidance.py --parts esrgan        # one part only

Method and reporting as benchmarks/bench_generate.py (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# _common puts the repository root on sys.path and sets HF_HUB_OFFLINE=1 and the warning filters.
from _common import ROOT, BenchProfile, CpuPeak, compare, Side, environment, gib, gpu_missing, mib, save_report, sync, timed, update_results  # noqa: E402

import bench_generate as bg  # noqa: E402  (build(), PROMPT, parameter_counts())
import numpy as np  # noqa: E402
import torch  # noqa: E402

PARTS = ("controlnet", "esrgan")


# -- profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EsrganCase:
    model: str  # a key of the profile's esrgan_models
    size: int  # square input side in pixels (a centre crop of the 1024x1024 test image when smaller)
    tile: Optional[int]  # None: untiled (the whole image in one pass)
    overlap: int = 32

    @property
    def name(self) -> str:
        tiling = f"tiled {self.tile}/{self.overlap}" if self.tile else "untiled"
        return f"{self.model} {self.size}x{self.size} {tiling}"


@dataclass(frozen=True)
class Profile(BenchProfile):
    esrgan_models: tuple[tuple[str, int, int], ...] = ()  # (name, features nf, RRDB blocks nb); grow channels 32
    esrgan_cases: tuple[EsrganCase, ...] = ()
    esrgan_runs: int = 3
    esrgan_dtype: str = "fp32"


FULL_RRDB = ("full", 64, 23)  # RealESRGAN_x4plus / x2plus: 16,697,987 parameters at x4
TILED = dict(tile=512, overlap=32)  # adapters.upscale.DEFAULT_TILE / DEFAULT_OVERLAP
# engine.tiling.tile_starts keeps every tile at the full tile size and lets neighbours overlap more:
# a 1024-px side at tile 512 / overlap 32 gets 3 tiles of 512 (starts 0, 256, 512), 9 tiles and
# 2.25x the image's pixels through the model. The same 3 tiles per side evened out to the smallest
# size that still overlaps by 32 are ceil((1024 + 2 * 32) / 3) = 363 px: 9 tiles, 1.13x the pixels.
# Timed as its own case (tile=363) to show what evening out the tiles would save.
EVENED = dict(tile=363, overlap=32)

PROFILES = {
    # Tiny SDXL (engine/tiny.py) with two tiny ControlNets (tests/tiny_controlnet.py, live zero-convs);
    # a small RRDBNet (the tests' default: 8 features, 1 block) on the full 1024^2 image, and the
    # full-size RRDBNet on a 128^2 crop. One thread: see README, "Noisy 2-core machines".
    "cpu-tiny": Profile(
        "cpu-tiny", "tiny", "cpu", "fp32", 128, 128, 20, runs=15, threads=1,
        esrgan_models=(("small", 8, 1), FULL_RRDB),
        esrgan_cases=(EsrganCase("small", 1024, **TILED), EsrganCase("small", 1024, **EVENED),
                      EsrganCase("small", 1024, None), EsrganCase("small", 128, None),
                      EsrganCase("full", 64, None), EsrganCase("full", 128, None)),
        esrgan_runs=3, esrgan_dtype="fp32",
    ),
    # Full-size random SDXL with two full-size random SDXL ControlNets (ControlNetModel.from_unet of
    # the full UNet, zero-convs randomised), TESTBED's 1024^2 / 30 steps; full-size RRDBNet in fp16.
    "gpu-sdxl": Profile(
        "gpu-sdxl", "sdxl-random", "cuda", "fp16", 1024, 1024, 30, runs=5,
        esrgan_models=(FULL_RRDB,),
        esrgan_cases=(EsrganCase("full", 1024, **TILED), EsrganCase("full", 1024, **EVENED),
                      EsrganCase("full", 1024, None), EsrganCase("full", 128, None)),
        esrgan_runs=5, esrgan_dtype="fp16",
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_empty_fp32_warning() -> None:
    """ModelMixin.to warns "modules ... that should be kept in float32: []" on every dtype cast of a
    model built in code (ControlNetLibrary.register casts too); with an empty list it means nothing."""
    import logging

    logging.getLogger("diffusers.models.modeling_utils").addFilter(
        lambda record: "should be kept in float32: []" not in record.getMessage())


def _tests_module(name: str):
    """A helper module of the test suite (tests/ is not a package)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    return __import__(name)


def alternate(variants: list[tuple[str, Callable[[], object]]], sides: dict[str, Side], runs: int,
              device: torch.device, cpu_peak: CpuPeak, on_result: Optional[Callable[[str, object], None]] = None) -> None:
    """`runs` rounds over all variants: forward order on even rounds, reversed on odd ones."""
    for index in range(runs):
        order = variants if index % 2 == 0 else variants[::-1]
        for name, fn in order:
            result, elapsed, cpu, peak = timed(fn, device, cpu_peak)
            if on_result is not None:
                on_result(name, result)
            del result
            side = sides[name]
            side.times.append(elapsed)
            side.cpu_times.append(cpu)
            side.peaks.append(peak)
        log(f"  run {index + 1}/{runs}: " + ", ".join(f"{name} {sides[name].times[-1]:.3f}" for name, _ in variants))


def _side_record(side: Side) -> dict:
    return {**side.summary(), "times_s": side.times, "cpu_times_s": side.cpu_times, "peaks_bytes": side.peaks}


# -- ControlNets -------------------------------------------------------------------------------


def _live_convs(controlnet) -> list:
    """The layers ControlNetModel.from_unet zero-initialises (a fresh ControlNet changes nothing)."""
    return [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out]


def full_size_controlnet(unet, device, dtype, seed: int):
    """ControlNetModel.from_unet(unet) (SDXL ControlNet layout, 1.25 B parameters for the full UNet),
    built directly on `device`, in `dtype`, with its zero-convs randomised (N(0, 1/fan_in), as the
    rest of engine.sdxl_configs' random weights): same FLOPs and memory as a published SDXL ControlNet.
    On the meta device nothing is allocated and nothing randomised."""
    from diffusers import ControlNetModel

    device = torch.device(device)
    with torch.device(device):
        controlnet = ControlNetModel.from_unet(unet)
    torch.nn.Module.to(controlnet, dtype=dtype)  # ModelMixin.to would warn about an empty keep-in-fp32 list
    if device.type != "meta":
        generator = torch.Generator(device).manual_seed(seed)
        with torch.no_grad():
            for conv in _live_convs(controlnet):
                conv.weight.normal_(0.0, 1.0 / math.sqrt(conv.weight[0].numel()), generator=generator)
                conv.bias.normal_(0.0, 0.01, generator=generator)
    return controlnet.eval().requires_grad_(False)


def build_controlnets(profile: Profile, pipe, device: torch.device, dtype: torch.dtype, seed: int) -> list:
    if profile.model == "tiny":
        builder = _tests_module("tiny_controlnet").build_tiny_controlnet  # live zero-convs, N(0, 0.3)
        return [torch.nn.Module.to(builder(pipe.unet, seed + offset), device, dtype) for offset in (10, 11)]
    return [full_size_controlnet(pipe.unet, device, dtype, seed + offset) for offset in (10, 11)]


def control_images(width: int, height: int, seed: int):
    """A canny-like edge map (white strokes on black) and a depth-like map (smooth, grey), both RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    edges = np.zeros((height, width, 3), np.uint8)
    for _ in range(16):
        thick = max(1, width // 256)
        if rng.random() < 0.5:
            row = int(rng.integers(0, height - thick))
            edges[row : row + thick, int(rng.integers(0, width // 2)) : int(rng.integers(width // 2, width))] = 255
        else:
            col = int(rng.integers(0, width - thick))
            edges[int(rng.integers(0, height // 2)) : int(rng.integers(height // 2, height)), col : col + thick] = 255
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    depth = 0.6 * (1 - np.hypot(xx - 0.5, yy - 0.6)) + 0.4 * yy
    depth = (255 * (depth - depth.min()) / (np.ptp(depth) or 1)).astype(np.uint8)
    return Image.fromarray(edges), Image.fromarray(np.stack([depth] * 3, -1))


# (case, ControlNet units, T2I-Adapter units)
CN_CASES = (("plain", 0, 0), ("1 unit", 1, 0), ("2 units", 2, 0), ("1 T2I-Adapter unit", 0, 1))
DIFFUSERS_PIPELINES = {"plain": "StableDiffusionXLPipeline", "1 unit": "StableDiffusionXLControlNetPipeline",
                       "2 units": "StableDiffusionXLControlNetPipeline + MultiControlNetModel",
                       "1 T2I-Adapter unit": "StableDiffusionXLAdapterPipeline"}


def full_size_t2i_adapter(device, dtype):
    """TencentARC's SDXL T2I-Adapter architecture (full_adapter_xl, channels [320, 640, 1280, 1280], 2 res blocks,
    downscale 16: 79,028,160 parameters), random (PyTorch's default init, nothing zero), built on `device`."""
    from diffusers import T2IAdapter

    with torch.device(device):
        adapter = T2IAdapter(in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=16,
                             adapter_type="full_adapter_xl")
    return torch.nn.Module.to(adapter, dtype=dtype).eval().requires_grad_(False)


def build_t2i_adapter(profile: Profile, pipe, device: torch.device, dtype: torch.dtype, seed: int):
    if profile.model == "tiny":
        from engine.tiny.adapters import build_tiny_t2i_adapter

        return torch.nn.Module.to(build_tiny_t2i_adapter(pipe.unet, seed + 12), device, dtype)
    torch.manual_seed(seed + 12)
    return full_size_t2i_adapter(device, dtype)


def run_controlnet(profile: Profile, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets import MultiControlNetModel

    from adapters.t2i_adapter import T2IAdapters
    from engine.request_types import ControlUnit, T2IAdapterUnit
    from engine import GenerationRequest
    from engine.schedulers import build_scheduler

    _quiet_empty_fp32_warning()
    start = time.perf_counter()
    engine, pipe, _ = bg.build(profile, device, dtype, seed)
    # The same scheduler class and config on both sides (the engine builds its own per request
    # from pipe.scheduler.config; the diffusers pipelines below share pipe.scheduler).
    pipe.scheduler = build_scheduler(profile.scheduler, pipe.scheduler.config)
    controlnets = build_controlnets(profile, pipe, device, dtype, seed)
    from adapters.controlnet import ControlNets

    library = engine.adapter(ControlNets).library
    for control_type, controlnet in zip(("canny", "depth"), controlnets):
        library.register(control_type, controlnet)  # the same module objects diffusers calls
    adapter = build_t2i_adapter(profile, pipe, device, dtype, seed)
    engine.adapter(T2IAdapters).library.register("canny", adapter)
    sync(device)
    build_s = time.perf_counter() - start
    one = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnets[0], add_watermarker=False)
    two = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=MultiControlNetModel(controlnets),
                                              add_watermarker=False)
    t2i = StableDiffusionXLAdapterPipeline(**pipe.components, adapter=adapter)
    for p in (one, two, t2i):
        p.watermark = None
        p.set_progress_bar_config(disable=True)
    counts = {"unet": sum(p.numel() for p in pipe.unet.parameters()),
              "controlnets": [sum(p.numel() for p in c.parameters()) for c in controlnets],
              "t2i_adapter": sum(p.numel() for p in adapter.parameters())}
    log(f"controlnet/{profile.name}: built in {build_s:.1f} s on {device} ({dtype}); UNet {counts['unet']:,} "
        f"parameters, ControlNets {', '.join(f'{c:,}' for c in counts['controlnets'])}, T2I-Adapter {counts['t2i_adapter']:,}; "
        f"{torch.get_num_threads()} torch threads")

    edges, depth = control_images(profile.width, profile.height, seed)
    units = [ControlUnit(type="canny", image=edges, preprocess=False),
             ControlUnit(type="depth", image=depth, preprocess=False)]
    adapter_units = [T2IAdapterUnit(type="canny", image=edges, preprocess=False)]
    batch = profile.batch

    def engine_call(n: int, t: int):
        request = GenerationRequest(
            prompt=bg.PROMPT, negative_prompt=None, width=profile.width, height=profile.height, num_images=batch,
            seed=seed, steps=profile.steps, guidance_scale=profile.guidance, scheduler=profile.scheduler, mode="fast",
            controlnets=units[:n], t2i_adapters=adapter_units[:t],
        )
        return lambda: engine.generate(request)

    def diffusers_call(n: int, t: int, output_type: str = "pil"):
        def call():
            common = dict(
                prompt=bg.PROMPT, negative_prompt=None, width=profile.width, height=profile.height,
                num_images_per_prompt=batch, num_inference_steps=profile.steps, guidance_scale=profile.guidance,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)], output_type=output_type,
            )
            if t:
                return t2i(image=edges, adapter_conditioning_scale=1.0, **common)
            if n == 0:
                return pipe(**common)
            if n == 1:
                return one(image=edges, controlnet_conditioning_scale=1.0, **common)
            return two(image=[edges, depth], controlnet_conditioning_scale=[1.0, 1.0], **common)
        return call

    cpu_peak = CpuPeak()
    sides, checks, variants = {}, {}, []
    for case, n, t in CN_CASES:
        eng, dif = Side(), Side()
        ours, eng.warmup_s, _, _ = timed(engine_call(n, t), device, cpu_peak)
        theirs, dif.warmup_s, _, _ = timed(diffusers_call(n, t, "np"), device, cpu_peak)
        ours_px, theirs_px = ours.pixels.astype(np.float64), np.asarray(theirs.images, dtype=np.float64)
        diff = float(np.abs(ours_px - theirs_px).max()) if ours_px.shape == theirs_px.shape else float("nan")
        checks[case] = {"max_abs_pixel_diff": diff,
                        "finite": bool(np.isfinite(ours_px).all() and np.isfinite(theirs_px).all()),
                        "pixels": ours_px}
        log(f"  {case}: warm-up engine {eng.warmup_s:.3f} s, diffusers {dif.warmup_s:.3f} s, max |pixel diff| {diff:.2e}")
        sides[f"engine/{case}"], sides[f"diffusers/{case}"] = eng, dif
        variants += [(f"engine/{case}", engine_call(n, t)), (f"diffusers/{case}", diffusers_call(n, t))]
        del ours, theirs
    # Proof that the units are live: each changes the image.
    changes = {case: float(np.abs(checks[case]["pixels"] - checks["plain"]["pixels"]).max()) for case, *_ in CN_CASES}
    for check in checks.values():
        del check["pixels"]

    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    alternate(variants, sides, profile.runs, device, cpu_peak)

    cases = []
    for case, n, t in CN_CASES:
        eng, dif = sides[f"engine/{case}"], sides[f"diffusers/{case}"]
        cases.append({
            "case": case, "units": n, "t2i_units": t, "diffusers_pipeline": DIFFUSERS_PIPELINES[case], "batch": batch,
            "engine": _side_record(eng), "diffusers": _side_record(dif),
            "engine_vs_diffusers": compare(eng, dif),
            "engine_vs_plain": compare(eng, sides["engine/plain"]),
            "diffusers_vs_plain": compare(dif, sides["diffusers/plain"]),
            "max_change_vs_plain": changes[case],
            **checks[case],
        })
    return {"part": "controlnet", "build_s": build_s, "parameters": counts, "loadavg_start": loadavg_start,
            "runs": profile.runs, "cases": cases,
            "control_types": ["canny", "depth"], "control_unit": {"weight": 1.0, "start": 0.0, "end": 1.0},
            "t2i_adapter_unit": {"type": "canny", "weight": 1.0, "start": 0.0, "end": 1.0}}


# -- ESRGAN ------------------------------------------------------------------------------------


def rrdbnet_macs_per_pixel(nf: int, nb: int, gc: int = 32, scale: int = 4) -> int:
    """Multiply-accumulates per input pixel of a Real-ESRGAN RRDBNet x4 (3x3 convs only)."""
    assert scale == 4
    k = 9
    rdb = sum((nf + c * gc) * gc * k for c in range(4)) + (nf + 4 * gc) * nf * k
    low = 3 * nf * k + nb * 3 * rdb + nf * nf * k  # conv_first, trunk, conv_body at the input size
    high = nf * nf * k * 4 + (nf * nf * k + nf * nf * k + nf * 3 * k) * 16  # conv_up1 (2x), up2, hr, last (4x)
    return low + high


def test_image(size: int, seed: int):
    """A 1024x1024-style photo stand-in: smooth colour gradients, some structure and noise (RGB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * yy), 0.5 + 0.4 * np.cos(5 * yy), 0.4 + 0.3 * xx * yy], -1)
    base += 0.15 * (np.sin(80 * xx) * np.sin(60 * yy))[..., None] + rng.normal(0, 0.03, base.shape)
    return Image.fromarray((255 * base.clip(0, 1)).astype(np.uint8))


def tile_plan(size: int, tile: Optional[int], overlap: int, align: int) -> tuple[int, int]:
    """(number of tiles, model input pixels) for a square image, as adapters.upscale tiles it."""
    from engine.tiling import tile_starts

    if not tile or tile >= size:
        return 1, size * size
    starts = tile_starts(size, tile, overlap, align)
    return len(starts) ** 2, len(starts) ** 2 * tile * tile


def run_esrgan(profile: Profile, device: torch.device, seed: int) -> dict:
    from adapters.upscale import Upscaler

    realesrgan_state_dict = _tests_module("esrgan_layouts").realesrgan_state_dict
    start = time.perf_counter()
    models, upscalers = {}, {}
    for name, nf, nb in profile.esrgan_models:
        state = realesrgan_state_dict(4, nf=nf, nb=nb, seed=seed)
        upscalers[name] = Upscaler.from_state_dict(state, device=device, dtype=profile.esrgan_dtype,
                                                   name=f"random RRDBNet x4 nf{nf} nb{nb}")
        models[name] = {"nf": nf, "nb": nb, "gc": 32, "scale": 4, "parameters": sum(v.numel() for v in state.values()),
                        "macs_per_input_pixel": rrdbnet_macs_per_pixel(nf, nb)}
    sync(device)
    build_s = time.perf_counter() - start
    full_image = test_image(1024, seed)

    def source(size: int):
        if size == full_image.width:
            return full_image
        left = (full_image.width - size) // 2
        return full_image.crop((left, left, left + size, left + size))

    tiles_seen: dict[str, list[int]] = {}
    sys_seen: dict[str, list[float]] = {}  # kernel CPU seconds per call (page faults of big tensors), warm-up first

    def call(case: EsrganCase):
        image, upscaler = source(case.size), upscalers[case.model]

        def progress(done: int, total: int) -> None:  # records the tiles actually run (OOM retries show)
            if done == 0:
                tiles_seen.setdefault(case.name, []).append(total)

        def run():
            before = os.times().system
            result = upscaler.upscale(image, tile=case.tile, overlap=case.overlap, progress=progress)
            sys_seen.setdefault(case.name, []).append(os.times().system - before)
            return result

        return run

    described = ", ".join(f"{n} ({m['parameters']:,} parameters)" for n, m in models.items())
    log(f"esrgan/{profile.name}: {described} "
        f"built in {build_s:.1f} s on {device} ({profile.esrgan_dtype}); {torch.get_num_threads()} torch threads")
    cpu_peak = CpuPeak()
    sides, outputs, variants = {}, {}, []
    for case in profile.esrgan_cases:
        side = Side()
        result, side.warmup_s, _, _ = timed(call(case), device, cpu_peak)
        outputs[case.name] = np.asarray(result, dtype=np.int16)
        log(f"  {case.name}: warm-up {side.warmup_s:.3f} s -> {result.width}x{result.height}")
        sides[case.name] = side
        variants.append((case.name, call(case)))
    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    alternate(variants, sides, profile.esrgan_runs, device, cpu_peak)

    cases = []
    for case in profile.esrgan_cases:
        side, model = sides[case.name], models[case.model]
        tiles, model_pixels = tile_plan(case.size, case.tile, case.overlap, upscalers[case.model].align)
        flops = 2 * model["macs_per_input_pixel"] * model_pixels
        median = statistics.median(side.times)
        record = {
            "name": case.name, "model": case.model, "size": case.size, "tile": case.tile, "overlap": case.overlap,
            "tiles": tiles, "tiles_run": sorted(set(tiles_seen.get(case.name, []))), "model_input_pixels": model_pixels,
            "flops": flops, "tflop_per_s": flops / median / 1e12, "s_per_mp_input": median / (case.size ** 2 / 1e6),
            "dtype_after": str(upscalers[case.model].dtype).removeprefix("torch."),
            "sys_times_s": sys_seen[case.name][1:], "sys_median_s": statistics.median(sys_seen[case.name][1:]),
            **_side_record(side),
        }
        untiled = EsrganCase(case.model, case.size, None)
        if case.tile and untiled.name in sides:
            record["vs_untiled"] = compare(side, sides[untiled.name])
            record["max_abs_diff_vs_untiled_8bit"] = int(np.abs(outputs[case.name] - outputs[untiled.name]).max())
        cases.append(record)
    report = {"part": "esrgan", "build_s": build_s, "models": models, "loadavg_start": loadavg_start,
              "runs": profile.esrgan_runs, "cases": cases, "extrapolations": extrapolate(cases, models),
              "scaling_checks": scaling_checks(cases)}
    return report


def _user_s(case: dict) -> float:
    """Median user-mode CPU seconds per call: process CPU time less kernel time, run by run."""
    return statistics.median(c - k for c, k in zip(case["cpu_times_s"], case["sys_times_s"]))


def scaling_checks(cases: list[dict]) -> list[dict]:
    """Per model timed untiled at two or more sizes: how its seconds per MP of input change from the
    smallest to the largest size (1.0: cost linear in pixels, what an extrapolation assumes), in wall
    time and in user-mode CPU time (without the kernel's page-fault work for fresh large tensors)."""
    out = []
    for name in dict.fromkeys(c["model"] for c in cases):
        sizes = {c["size"]: c for c in cases if c["model"] == name and not c["tile"]}
        if len(sizes) >= 2:
            low, high = sizes[min(sizes)], sizes[max(sizes)]
            scale = (low["size"] / high["size"]) ** 2
            out.append({"model": name, "from_size": low["size"], "to_size": high["size"],
                        "s_per_mp_ratio": high["s_per_mp_input"] / low["s_per_mp_input"],
                        "user_s_per_mp_ratio": _user_s(high) / _user_s(low) * scale})
    return out


def extrapolate(cases: list[dict], models: dict) -> list[dict]:
    """Per model measured only below 1024^2: seconds for 1024^2 (untiled, and with each tiling the
    profile times) from its seconds per MP of model input at its largest measured size. Assumes cost
    linear in pixels: an EXTRAPOLATION, not a measurement."""
    out = []
    tilings = list(dict.fromkeys((c["tile"], c["overlap"]) for c in cases if c["tile"]))
    for name in models:
        measured = [c for c in cases if c["model"] == name]
        if not measured or any(c["size"] >= 1024 for c in measured):
            continue
        base = max(measured, key=lambda c: c["size"])
        per_pixel = base["median_s"] / base["model_input_pixels"]
        for tile, overlap in [(None, None), *tilings]:
            tiles, pixels = tile_plan(1024, tile, overlap or 0, 1)
            out.append({"model": name, "from_size": base["size"], "size": 1024, "tile": tile, "overlap": overlap,
                        "tiles": tiles, "model_input_pixels": pixels, "estimated_s": per_pixel * pixels,
                        "flops": 2 * models[name]["macs_per_input_pixel"] * pixels})
    return out


# -- reporting ---------------------------------------------------------------------------------


def _range(side: dict, scale: float = 1.0) -> str:
    return f"{side['median_s'] / scale:.3f} ({side['min_s'] / scale:.3f}–{side['max_s'] / scale:.3f})"


def _paired(c: dict) -> str:
    return f"{c['paired_ratio_median']:.3f} ({c['paired_ratio_min']:.3f}–{c['paired_ratio_max']:.3f})"


def _mem(device_type: str, value: int) -> str:
    return gib(value) if device_type == "cuda" else "+" + mib(value)


def _header(report: dict, part: str) -> list[str]:
    env = report["environment"]
    load = ""
    if env.get("loadavg_1_5_15") and report.get("loadavg_start"):
        load = (f"; load average (1 min) {report['loadavg_start'][0]:.2f} at the start, "
                f"{env['loadavg_1_5_15'][0]:.2f} at the end (other processes on the machine count)")
    versions = f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}"
    if part == "esrgan":
        versions += f", spandrel {env.get('spandrel')}"
    return [
        f"### {report['label']}",
        "",
        f"- device: {env['device_name']} ({env['device']}, {env['dtype']}), torch threads {env['torch_threads']} of "
        f"{env['cpu_count']} CPUs{load}",
        f"- date: {env['date_utc']}",
        f"- {versions}, python {env['python']}{', CUDA ' + env['cuda'] if env['device'] == 'cuda' and env.get('cuda') else ''}",
        f"- command: `{report['command']}`",
    ]


def controlnet_section(report: dict) -> str:
    profile, dev = report["profile"], report["environment"]["device"]
    cases = report["cases"]
    batch = profile["batch"]
    counts = report["parameters"]
    lines = _header(report, "controlnet") + [
        f"- model: {profile['model']} (UNet {counts['unet']:,} parameters) + two ControlNets "
        f"({', '.join(f'{c:,}' for c in counts['controlnets'])} parameters; canny and depth units, weight 1, "
        f"active on all steps, preprocess off)"
        + (f" + a T2I-Adapter ({counts['t2i_adapter']:,} parameters; a canny unit, weight 1, all steps)" if "t2i_adapter" in counts
           else "") + f"; {profile['width']}x{profile['height']}, {profile['steps']} steps, "
        f"{profile['scheduler']}, CFG {profile['guidance']}, batch {batch}",
        f"- {report['runs']} timed rounds after 1 warm-up per variant; each round runs all {2 * len(cases)} variants, forward order "
        "on even rounds and reversed on odd ones; one process, the same module objects on both sides",
        "- peak memory: " + ("torch.cuda.max_memory_allocated during the call (weights included)" if dev == "cuda"
                             else "rise of the process's resident set (VmHWM − RSS before) during the call"),
        "",
        "**Cost of ControlNet and T2I-Adapter units** (× plain = median / median of plain txt2img on the same side; paired = "
        "per-round ratios):",
        "",
        "| case | engine s per image median (min–max) | engine × plain | paired × plain median (min–max) | "
        "CPU-time × plain | engine peak mem | diffusers s per image median (min–max) | diffusers × plain |",
        "|---|---|---:|---|---:|---|---|---:|",
    ]
    for c in cases:
        ep, dp = c["engine_vs_plain"], c["diffusers_vs_plain"]
        plain = c["case"] == "plain"
        lines.append(
            f"| {c['case']} | {_range(c['engine'], batch)} | **{ep['ratio']:.3f}** | "
            f"{'—' if plain else _paired(ep)} | {ep['cpu_time_ratio']:.3f} | {_mem(dev, c['engine']['peak_bytes'])} | "
            f"{_range(c['diffusers'], batch)} | {dp['ratio']:.3f} |"
        )
    lines += [
        "",
        "**Engine vs diffusers** (ratio = median engine / median diffusers, < 1: the engine is faster; "
        "max abs pixel diff compares the warm-up outputs, float pixels in [0, 1]):",
        "",
        "| case | diffusers pipeline | engine median s | diffusers median s | ratio | paired ratio median (min–max) | "
        "CPU-time ratio | peak mem engine | peak mem diffusers | max abs pixel diff | max change vs plain |",
        "|---|---|---:|---:|---:|---|---:|---|---|---:|---:|",
    ]
    for c in cases:
        ed = c["engine_vs_diffusers"]
        cpu = "n/a" if dev == "cuda" else f"{ed['cpu_time_ratio']:.3f}"
        lines.append(
            f"| {c['case']} | {c['diffusers_pipeline']} | {c['engine']['median_s']:.3f} | {c['diffusers']['median_s']:.3f} | "
            f"**{ed['ratio']:.3f}** | {_paired(ed)} | {cpu} | {_mem(dev, c['engine']['peak_bytes'])} | "
            f"{_mem(dev, c['diffusers']['peak_bytes'])} | {c['max_abs_pixel_diff']:.1e} | "
            f"{'—' if c['case'] == 'plain' else format(c['max_change_vs_plain'], '.2f')} |"
        )
    lines += ["", f"Raw timings: `{report['json']}`"]
    return "\n".join(lines)


def esrgan_section(report: dict) -> str:
    dev, models = report["environment"]["device"], report["models"]
    lines = _header(report, "esrgan") + [
        "- models: random-weight Real-ESRGAN RRDBNet x4 (tests/esrgan_layouts.py, loaded through "
        "`Upscaler.from_state_dict`, i.e. spandrel): "
        + "; ".join(f"`{n}` = {m['nf']} features, {m['nb']} RRDB block{'s' if m['nb'] != 1 else ''}, {m['parameters']:,} parameters, "
                    f"{2 * m['macs_per_input_pixel'] / 1e6:.2f} MFLOP per input pixel" for n, m in models.items()),
        f"- input: a 1024x1024 RGB test image (smaller sizes: its centre crop); call: `Upscaler.upscale(image, "
        f"tile=..., overlap=...)`, PIL in, PIL out; {report['runs']} timed rounds after 1 warm-up per case, "
        "all cases in each round, order reversed on odd rounds",
        "- peak memory: " + ("torch.cuda.max_memory_allocated during the call (weights included)" if dev == "cuda"
                             else "rise of the process's resident set (VmHWM − RSS before) during the call"),
        "",
        "| model | input | tiling | tiles (model input MP) | median s (min–max) | s per MP of input | TFLOP/s | "
        "CPU-time median s (of which kernel) | peak mem | × untiled (paired) | max abs diff vs untiled (8-bit) |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for c in report["cases"]:
        tiling = f"tile {c['tile']}, overlap {c['overlap']}" if c["tile"] else "untiled"
        versus, diff = "—", "—"
        if "vs_untiled" in c:
            v = c["vs_untiled"]
            versus = f"**{v['ratio']:.2f}** ({v['paired_ratio_median']:.2f})"
            diff = str(c["max_abs_diff_vs_untiled_8bit"])
        retried = "" if c["tiles_run"] in ([], [c["tiles"]]) else f", tiles run {c['tiles_run']} (OOM retry)"
        lines.append(
            f"| {c['model']} | {c['size']}x{c['size']} | {tiling} | {c['tiles']} ({c['model_input_pixels'] / 1e6:.3g}){retried} | "
            f"{_range(c)} | {c['s_per_mp_input']:.2f} | {c['tflop_per_s']:.3f} | {c['cpu_median_s']:.3f} ({c['sys_median_s']:.3f}) | "
            f"{_mem(dev, c['peak_bytes'])} | {versus} | {diff} |"
        )
    wanted = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(report["profile"]["esrgan_dtype"])
    fell_back = [c["name"] for c in report["cases"] if c.get("dtype_after") not in (None, wanted)]
    if fell_back:
        lines += ["", f"**Note**: non-finite {wanted} output made the upscaler switch to float32 during: "
                      f"{', '.join(fell_back)} (adapters/upscale.py); those times are partly float32."]
    extrapolations = report.get("extrapolations") or []
    if extrapolations:
        lines += [
            "",
            "**EXTRAPOLATED, not measured**: " + ", ".join(dict.fromkeys(
                f"the `{e['model']}` model from its measured {e['from_size']}x{e['from_size']} time" for e in extrapolations))
            + ", scaled to a 1024x1024 image on this device by model input pixels (assumes cost linear in pixels):",
            "",
            "| model | input | tiling | model input MP | TFLOP | estimated s |",
            "|---|---|---|---:|---:|---:|",
        ]
        for e in extrapolations:
            tiling = f"tile {e['tile']}, overlap {e['overlap']} ({e['tiles']} tiles)" if e["tile"] else "untiled"
            lines.append(f"| {e['model']} | 1024x1024 | {tiling} | {e['model_input_pixels'] / 1e6:.2f} | "
                         f"{e['flops'] / 1e12:.1f} | ~{e['estimated_s']:.0f} (~{e['estimated_s'] / 60:.1f} min) |")
    checks = scaling_checks(report["cases"])
    if checks:
        lines += ["", "Seconds per MP of input, largest over smallest untiled size (1.00 = linear in pixels, "
                      "what the extrapolation assumes), wall time (user-mode CPU time only): " + "; ".join(
                          f"`{c['model']}` {c['to_size']}² / {c['from_size']}²: **{c['s_per_mp_ratio']:.2f}** "
                          f"({c['user_s_per_mp_ratio']:.2f})" for c in checks) + "."]
    lines += ["", f"Raw timings: `{report['json']}`"]
    return "\n".join(lines)


SECTIONS = {"controlnet": controlnet_section, "esrgan": esrgan_section}


# -- dry run: the gpu-sdxl models on the meta device ---------------------------------------------


def dry_run() -> int:
    """Builds what `--profile gpu-sdxl` builds, on the meta device (no memory, no compute), checks
    parameter counts and runs the shapes of one CFG step (2 ControlNets + UNet) and one untiled ESRGAN pass."""
    from diffusers.models.controlnets import MultiControlNetModel
    from torch.utils.flop_counter import FlopCounterMode

    from adapters.upscale import Upscaler
    from engine import sdxl_configs as cfg

    profile = PROFILES["gpu-sdxl"]
    ok = True
    start = time.perf_counter()
    pipe = cfg.build_random_sdxl_pipeline("meta")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        torch.nn.Module.to(module, dtype=torch.float16)  # free on meta; the GPU profile's dtype
    counts = bg.parameter_counts(pipe)
    expected = {"unet": cfg.SDXL_UNET_PARAMETERS, "vae": cfg.SDXL_VAE_PARAMETERS,
                "text_encoder": cfg.SDXL_TEXT_ENCODER_PARAMETERS, "text_encoder_2": cfg.SDXL_TEXT_ENCODER_2_PARAMETERS}
    for name, count in counts.items():
        ok &= count == expected[name]
        print(f"  {name:15s} {count:>15,d}  expected {expected[name]:>15,d}  {'ok' if count == expected[name] else 'MISMATCH'}")
    controlnets = [full_size_controlnet(pipe.unet, "meta", torch.float16, seed) for seed in (10, 11)]
    cn_params = [sum(p.numel() for p in c.parameters()) for c in controlnets]
    print(f"  {'controlnet x2':15s} {cn_params[0]:>15,d}  each ({cn_params[0] * 2 / 2**30:.2f} GiB in fp16), "
          f"built in {time.perf_counter() - start:.1f} s with the SDXL pipeline")
    total = sum(counts.values()) + sum(cn_params)
    print(f"  {'total':15s} {total:>15,d}  ({total * 2 / 2**30:.2f} GiB of weights in fp16)")

    # One CFG step at 1024^2 on meta: 2 ControlNets (diffusers' MultiControlNetModel) -> UNet.
    latent = profile.height // pipe.vae_scale_factor
    cond_dim = pipe.unet.config.cross_attention_dim
    with torch.no_grad(), torch.device("meta"):
        half = dict(dtype=torch.float16)
        sample, t = torch.empty(2, 4, latent, latent, **half), torch.tensor(999.0)
        hidden = torch.empty(2, 77, cond_dim, **half)
        added = {"text_embeds": torch.empty(2, pipe.text_encoder_2.config.projection_dim, **half),
                 "time_ids": torch.empty(2, 6, **half)}
        images = [torch.empty(2, 3, profile.height, profile.width, **half) for _ in controlnets]
        with FlopCounterMode(display=False) as cn_flops:
            down, mid = MultiControlNetModel(controlnets)(sample, t, hidden, images, [1.0, 1.0], added_cond_kwargs=added,
                                                          return_dict=False)
        out = pipe.unet(sample, t, hidden, added_cond_kwargs=added, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
    shape_ok = tuple(out.shape) == (2, 4, latent, latent) and len(down) == 9
    ok &= shape_ok
    print(f"  one CFG step at {profile.width}x{profile.height} on meta: 2 ControlNets -> {len(down)} down residuals "
          f"{tuple(down[0].shape)}..{tuple(down[-1].shape)} + mid {tuple(mid.shape)}; UNet out {tuple(out.shape)} "
          f"{'ok' if shape_ok else 'MISMATCH'}")

    # The T2I-Adapter: its parameter count, and its 4 features consumed by the UNet in the same step as the ControlNets.
    adapter = full_size_t2i_adapter("meta", torch.float16)
    t2i_params = sum(p.numel() for p in adapter.parameters())
    with torch.no_grad(), torch.device("meta"):
        with FlopCounterMode(display=False) as t2i_flops:
            features = [f.repeat(2, 1, 1, 1) for f in adapter(torch.empty(1, 3, profile.height, profile.width, **half))]
        shapes = [tuple(f.shape[1:]) for f in features]
        with FlopCounterMode(display=False) as unet_flops:
            out = pipe.unet(sample, t, hidden, added_cond_kwargs=added, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, down_intrablock_additional_residuals=features, return_dict=False)[0]
    t2i_ok = t2i_params == 79_028_160 and not features and tuple(out.shape) == (2, 4, latent, latent)
    ok &= t2i_ok
    print(f"  t2i-adapter     {t2i_params:>15,d}  (TencentARC SDXL: 79,028,160); features {shapes} all consumed by the UNet "
          f"with the 2 ControlNets' residuals {'ok' if t2i_ok else 'MISMATCH'}")
    unet_run = profile.steps * unet_flops.get_total_flops()
    print(f"  FLOPs at {profile.width}x{profile.height}, {profile.steps} CFG steps: UNet {unet_run / 1e12:.0f} TFLOP; "
          f"a ControlNet unit +{cn_flops.get_total_flops() / 2 * profile.steps / unet_run:.1%} (every step); "
          f"a T2I-Adapter unit +{t2i_flops.get_total_flops() / unet_run:.2%} (once: {t2i_flops.get_total_flops() / 1e12:.2f} TFLOP)")

    # The zero-conv randomisation, for real, on the tiny UNet: the residuals must not be zero.
    from engine.tiny import build_tiny_unet

    tiny = build_tiny_unet(0)
    live = full_size_controlnet(tiny, "cpu", torch.float32, 10)
    nonzero = all(float(conv.weight.abs().max()) > 0 for conv in _live_convs(live))
    ok &= nonzero
    print(f"  zero-convs randomised (checked on the tiny UNet's ControlNet): {'ok' if nonzero else 'FAILED'}")

    # ESRGAN: the full-size RRDBNet through Upscaler on meta, 1024^2 untiled, and the tile plan.
    realesrgan_state_dict = _tests_module("esrgan_layouts").realesrgan_state_dict
    name, nf, nb = FULL_RRDB
    state = realesrgan_state_dict(4, nf=nf, nb=nb)
    params = sum(v.numel() for v in state.values())
    # Upscaler takes real devices only (engine.devices): loaded through spandrel on the CPU, then moved to meta in fp16.
    upscaler = Upscaler.from_state_dict(state, device="cpu", dtype="fp32", name="full")
    model = torch.nn.Module.to(upscaler.descriptor.model, "meta", torch.float16)
    with torch.inference_mode():
        y = model(torch.empty(1, 3, 1024, 1024, device="meta", dtype=torch.float16))
    esr_ok = params == 16_697_987 and tuple(y.shape) == (1, 3, 4096, 4096) and y.dtype == torch.float16
    ok &= esr_ok
    tiles, pixels = tile_plan(1024, 512, 32, upscaler.align)
    flops = 2 * rrdbnet_macs_per_pixel(nf, nb)
    print(f"  RRDBNet x4 nf{nf} nb{nb}: {params:,} parameters (RealESRGAN_x4plus: 16,697,987), {upscaler.architecture} "
          f"via spandrel, {str(y.dtype).removeprefix('torch.')} on meta; 1024x1024 -> {tuple(y.shape)} "
          f"{'ok' if esr_ok else 'MISMATCH'}")
    print(f"  1024x1024 at tile 512 / overlap 32: {tiles} tiles, {pixels / 1e6:.2f} MP of model input "
          f"({pixels / 1024**2:.2f}x the image); {flops * 1024**2 / 1e12:.1f} TFLOP untiled, {flops * pixels / 1e12:.1f} tiled")
    print("dry run " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


# -- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-tiny")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: controlnet, esrgan (default both)")
    parser.add_argument("--runs", type=int, help="ControlNet part: timed rounds (default: the profile's)")
    parser.add_argument("--esrgan-runs", type=int, help="ESRGAN part: timed rounds (default: the profile's)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int, help="ControlNet part: square image side in pixels")
    parser.add_argument("--device", help="override the profile's device (cpu, cuda, cuda:1)")
    parser.add_argument("--dtype", help="override the profile's dtype for the ControlNet part (fp32, fp16, bf16)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the profile's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and results/ alone")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the gpu-sdxl models on the meta device; counts and shapes, no compute")
    parser.add_argument("--from-json", type=Path, metavar="JSON", help="re-render RESULTS.md's section from a results JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        update_results(args.results, report["label"], SECTIONS[report["part"]](report))
        print(f"updated section {report['label']} of {args.results} from {args.from_json}")
        return 0
    if args.dry_run:
        return dry_run()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2

    from engine.devices import pick_device

    base = PROFILES[args.profile]
    profile = replace(
        base, device=args.device or base.device, dtype=args.dtype or base.dtype,
        width=args.size or base.width, height=args.size or base.height, steps=args.steps or base.steps,
        runs=args.runs or base.runs, esrgan_runs=args.esrgan_runs or base.esrgan_runs, threads=args.threads or base.threads,
    )
    if profile.threads:
        torch.set_num_threads(profile.threads)
    # A run that departs from the profile's defaults gets its own sections and files.
    overrides = [f"{name}{getattr(profile, name)}" for name in ("threads", "device", "dtype", "steps")
                 if getattr(profile, name) != getattr(base, name)]
    if (profile.width, profile.height) != (base.width, base.height):
        overrides.append(f"size{profile.width}")
    label = "-".join([profile.name, *overrides])
    device, dtype = pick_device(profile.device, profile.dtype)
    if gpu_missing(device):
        return 2
    command = ("python benchmarks/bench_guidance.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for part in parts:
        report = run_controlnet(profile, device, dtype, args.seed) if part == "controlnet" else run_esrgan(profile, device, args.seed)
        gc.collect()  # the part's models go before the next part (its GPU peak memory counts what is left)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        part_label = f"{part}-{label}"
        json_path = HERE / "results" / f"{part_label}-{stamp}.json"
        part_dtype = dtype if part == "controlnet" else pick_device(str(device), profile.esrgan_dtype)[1]
        report.update({
            "label": part_label,
            "profile": {**asdict(profile), "esrgan_cases": [asdict(c) for c in profile.esrgan_cases]},
            "environment": environment(device, part_dtype, ("spandrel",)),
            "command": command,
            "json": str(json_path.relative_to(ROOT)),
        })
        text = SECTIONS[part](report)
        print("\n" + text + "\n")
        if not args.no_write:
            save_report(report, json_path, args.results, part_label, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
