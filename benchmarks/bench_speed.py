"""The fast path against diffusers: one process, the same weights on disk, the same inputs and seeds.

Sides (each loaded from the same saved model folder, one at a time so that only one copy is in memory):
  diffusers-eager      StableDiffusionXLPipeline as it comes (SDPA): the baseline
  diffusers-compiled   diffusers' own "fast diffusion" recipe: fused QKV, channels_last, torch.compile of the UNet
                       and VAE decode, fullgraph (CUDA: mode max-autotune and its inductor flags; CPU: default mode)
  refgen-eager | refgen-compiled | refgen-max     Engine.load(folder, speed=...), the path users get
  refgen-max-int8 | refgen-max-fp8                 the same with quantize= (opt-in sides: not the same numerics)

Per side and batch: load time, first call (cold compile, in a fresh inductor cache per side), median s/image,
it/s, peak memory (CUDA: max_memory_allocated and the device total nvidia-smi shows; CPU: RSS peak), the share
of the physical floor (FLOPs counted on the meta device / the device's dense bf16 peak) and the max pixel
difference to diffusers-eager (same work). `--warm-start` times a second process's first call on the warm cache.

    python benchmarks/bench_speed.py --profile cpu-tiny
    python benchmarks/bench_speed.py --profile cpu-sdxl --sides diffusers-eager refgen-compiled
    python benchmarks/bench_speed.py --profile gpu-sdxl --warm-start      # on the GPU machine (run_on_gpu_machine.sh)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import CpuPeak, environment, gpu_missing, save_report, timed  # noqa: E402  (sets HF_HUB_OFFLINE, root on path)
from bench_generate import Profile as SpeedProfile  # noqa: E402  (the same fields: model, device, size, steps, batches, runs)

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, photograph"
SIDES = ("diffusers-eager", "diffusers-compiled", "refgen-eager", "refgen-compiled", "refgen-max")
LOW_PRECISION_SIDES = ("refgen-max-int8", "refgen-max-fp8")  # opt-in: different numerics (fp8 needs Ada/Hopper)
# Dense bf16/fp16 tensor throughput, measured on this workplace's H100 (TESTBED.md); the H200 has the same chip.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}


PROFILES = {
    "cpu-tiny": SpeedProfile("cpu-tiny", "tiny", "cpu", "fp32", 128, 128, 20, (1, 4), runs=5, threads=1),
    # The full-size UNet at a small latent (16x16): where inductor with frozen weights gains on a CPU.
    "cpu-sdxl": SpeedProfile("cpu-sdxl", "sdxl-random", "cpu", "bf16", 128, 128, 4, (1,), runs=3),
    # The anchors' setting: SDXL 1024^2, 30 steps, CFG (TESTBED.md: diffusers eager ~2.50 s, TensorRT ~1.47 s on an H100).
    "gpu-sdxl": SpeedProfile("gpu-sdxl", "sdxl-random", "cuda", "bf16", 1024, 1024, 30, (1, 4, 8), runs=5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- the model on disk ---------------------------------------------------------------------------------


def save_model(profile: SpeedProfile, folder: Path, seed: int = 0) -> Path:
    """Random weights of the profile's architecture saved as a diffusers folder: every side loads this."""
    if (folder / "model_index.json").exists():
        return folder
    if profile.model == "tiny":
        from engine.tiny import save_tiny_model

        return save_tiny_model(folder, seed=seed)
    from engine.sdxl_configs import build_random_sdxl_pipeline

    pipe = build_random_sdxl_pipeline("cpu", DTYPES[profile.dtype], seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    gc.collect()
    return folder


# -- the sides ------------------------------------------------------------------------------------------


def diffusers_recipe(pipe, device: torch.device, autotune: bool = True) -> None:
    """diffusers' published recipe ("Accelerate inference of text-to-image diffusion models"), as they show it."""
    if device.type == "cuda":
        config = torch._inductor.config
        config.conv_1x1_as_mm = True
        config.coordinate_descent_tuning = True
        config.epilogue_fusion = False
        config.coordinate_descent_check_all_directions = True
    mode = "max-autotune" if device.type == "cuda" and autotune else None
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)


def load_side(side: str, folder: Path, device: torch.device, dtype: torch.dtype, autotune: bool = True):
    """The loaded pipeline or Engine. autotune False: CUDA compiles without max-autotune (minutes less, a little slower)."""
    if side.startswith("diffusers"):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.watermark = None
        if side == "diffusers-compiled":
            diffusers_recipe(pipe, device, autotune)
        return pipe
    from engine import Engine
    from engine.speed import speed_for

    mode, _, quantize = side.removeprefix("refgen-").partition("-")
    speed = speed_for(mode, device, quantize=quantize or None)
    if not autotune:
        speed = replace(speed, options={key: value for key, value in speed.options.items() if key != "max_autotune"})
    return Engine.load(str(folder), device=str(device), dtype=dtype, speed=speed)


def caller(side: str, loaded, profile: SpeedProfile, batch: int, seed: int) -> Callable[[], np.ndarray]:
    if side.startswith("diffusers"):
        def call():
            generators = [torch.Generator("cpu").manual_seed(seed + index) for index in range(batch)]
            return np.asarray(loaded(prompt=PROMPT, width=profile.width, height=profile.height, num_images_per_prompt=batch,
                                     num_inference_steps=profile.steps, guidance_scale=profile.guidance,
                                     generator=generators, output_type="np").images)
        return call
    from engine import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, width=profile.width, height=profile.height, num_images=batch, seed=seed,
                                steps=profile.steps, guidance_scale=profile.guidance, scheduler="euler", mode="fast")
    return lambda: loaded.generate(request).pixels


def device_total_bytes(device: torch.device) -> Optional[int]:
    """This process's memory on the GPU as nvidia-smi shows it (CUDA context and allocator cache included)."""
    if device.type != "cuda":
        return None
    try:
        lines = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(mib) for pid, mib in (line.split(", ") for line in lines if ", " in line) if int(pid) == os.getpid()]
    return used[0] * 2**20 if used else None


def measure_side(side: str, folder: Path, profile: SpeedProfile, device, dtype, seed: int, log, autotune: bool = True) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.parent / "inductor" / side)  # cold: its own, fresh cache
    torch._dynamo.reset()
    cpu_peak = CpuPeak()
    started = time.perf_counter()
    loaded = load_side(side, folder, device, dtype, autotune)
    record = {"side": side, "load_s": time.perf_counter() - started, "batches": {}}
    for batch in profile.batches:
        call = caller(side, loaded, profile, batch, seed)
        pixels, first_s, _, _ = timed(call, device, cpu_peak)
        times, peaks, device_totals = [], [], []
        for _ in range(profile.runs):
            _, elapsed, _, peak = timed(call, device, cpu_peak)
            times.append(elapsed)
            peaks.append(peak)
            device_totals.append(device_total_bytes(device))
        median = statistics.median(times)
        record["batches"][batch] = {
            "first_call_s": first_s, "compile_s": max(0.0, first_s - median), "times_s": times, "median_s": median,
            "s_per_image": median / batch, "it_per_s": profile.steps / median, "peak_bytes": max(peaks),
            "device_total_bytes": max((t for t in device_totals if t is not None), default=None), "pixels": pixels,
        }
        log(f"  {side} batch {batch}: first call {first_s:.2f} s, median {median:.3f} s ({median / batch:.3f} s/image)")
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def warm_start(side: str, folder: Path, profile: SpeedProfile, batch: int, seed: int, autotune: bool = True) -> float:
    """A second process's first call, with the side's inductor cache from the first process (warm)."""
    command = [sys.executable, __file__, "--profile", profile.name, "--child", side, "--folder", str(folder),
               "--child-batch", str(batch), "--seed", str(seed)] + ([] if autotune else ["--no-autotune"])
    environment_vars = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder.parent / "inductor" / side)}
    output = subprocess.run(command, capture_output=True, text=True, env=environment_vars, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["first_call_s"]


def child(args, profile: SpeedProfile) -> int:
    device, dtype = torch.device(profile.device), DTYPES[profile.dtype]
    loaded = load_side(args.child, Path(args.folder), device, dtype, not args.no_autotune)
    _, first_s, _, _ = timed(caller(args.child, loaded, profile, args.child_batch, args.seed), device, CpuPeak())
    print(json.dumps({"first_call_s": first_s}))
    return 0


# -- the physical floor --------------------------------------------------------------------------------


def flops_per_image(unet_config: dict, vae_config: dict, width: int, height: int, steps: int) -> float:
    """UNet calls (both CFG rows) x steps + one VAE decode, counted on the meta device (no compute)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(unet_config), AutoencoderKL.from_config(vae_config)
        latent = torch.randn(2, unet.config.in_channels, height // 8, width // 8)
        text = torch.randn(2, 77, unet.config.cross_attention_dim)
        pooled = torch.randn(2, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim)
        with FlopCounterMode(display=False) as unet_counter:
            unet(latent, torch.tensor(500.0), encoder_hidden_states=text,
                 added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.randn(2, 6)})
        with FlopCounterMode(display=False) as vae_counter:
            vae.decode(torch.randn(1, vae.config.latent_channels, height // 8, width // 8))
    return steps * unet_counter.get_total_flops() + vae_counter.get_total_flops()


def saved_configs(folder: Path) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.load_config(str(folder), subfolder="unet"),
            AutoencoderKL.load_config(str(folder), subfolder="vae"))


def dry_run(profile: SpeedProfile) -> int:
    """The full-size work of the GPU profile counted on meta: the floor the table's shares are taken of."""
    from engine.sdxl_configs import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

    flops = flops_per_image(SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, profile.width, profile.height, profile.steps)
    print(f"{profile.name}: {flops / 1e12:.0f} TFLOP per image ({profile.width}x{profile.height}, {profile.steps} steps, CFG) "
          f"-> floor {flops / PEAK_FLOPS['H100']:.2f} s at {PEAK_FLOPS['H100'] / 1e12:.0f} TFLOP/s")
    return 0


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for chip, peak in PEAK_FLOPS.items() if chip in name), None)


# -- report ----------------------------------------------------------------------------------------------


def table(records: list[dict], profile: SpeedProfile, floor_s: Optional[float]) -> str:
    baseline = next((r for r in records if r["side"] == "diffusers-eager"), None)
    rows = ["| side | batch | s/image | it/s | vs diffusers eager | first call (cold) | second process (warm) | "
            "peak mem | device total | floor share | max pixel diff |", "|" + "---|" * 11]
    for record in records:
        for batch, case in record["batches"].items():
            base = baseline["batches"][batch] if baseline else None
            ratio = f"{case['median_s'] / base['median_s']:.3f}" if base else "n/a"
            diff = f"{np.abs(case['pixels'] - base['pixels']).max():.2e}" if base else "n/a"
            warm = f"{case['warm_start_s']:.1f} s" if "warm_start_s" in case else "-"
            total = f"{case['device_total_bytes'] / 2**30:.2f} GiB" if case["device_total_bytes"] else "-"
            share = f"{floor_s * batch / case['median_s']:.0%}" if floor_s else "n/a"
            rows.append(f"| {record['side']} | {batch} | {case['s_per_image']:.3f} | {case['it_per_s']:.2f} | {ratio} | "
                        f"{case['first_call_s']:.1f} s | {warm} | {case['peak_bytes'] / 2**30:.2f} GiB | {total} | {share} | {diff} |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-tiny")
    parser.add_argument("--sides", nargs="+", choices=SIDES + LOW_PRECISION_SIDES, default=list(SIDES))
    parser.add_argument("--batches", type=int, nargs="+", help="override the profile's batch sizes")
    parser.add_argument("--runs", type=int, help="override the profile's timed runs per case")
    parser.add_argument("--steps", type=int, help="override the profile's steps")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warm-start", action="store_true", help="also time a second process's first call (warm cache)")
    parser.add_argument("--workdir", type=Path, help="where the model and caches go (default: a temp folder)")
    parser.add_argument("--child", choices=SIDES + LOW_PRECISION_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--no-autotune", action="store_true", help="CUDA: compile without max-autotune (both sides)")
    parser.add_argument("--dry-run", action="store_true", help="count the profile's work at full size on meta and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    overrides = {key: value for key, value in (("batches", tuple(args.batches or ())), ("runs", args.runs), ("steps", args.steps)) if value}
    profile = replace(profile, **overrides)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    if args.child:
        return child(args, profile)
    if args.dry_run:
        return dry_run(profile)
    device, dtype = torch.device(profile.device), DTYPES[profile.dtype]
    if gpu_missing(device):
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refgen-speed-"))
    log = lambda message: print(message, flush=True)  # noqa: E731
    folder = save_model(profile, workdir / "model")
    floor_s = None
    if peak_flops(device):
        floor_s = flops_per_image(*saved_configs(folder), profile.width, profile.height, profile.steps) / peak_flops(device)
    records = []
    for side in args.sides:
        log(f"{side} ...")
        record = measure_side(side, folder, profile, device, dtype, args.seed, log, not args.no_autotune)
        if args.warm_start and "-eager" not in side:
            batch = profile.batches[0]
            record["batches"][batch]["warm_start_s"] = warm_start(side, folder, profile, batch, args.seed, not args.no_autotune)
            log(f"  {side}: second process first call {record['batches'][batch]['warm_start_s']:.1f} s (warm cache)")
        records.append(record)
    env = environment(device, dtype)
    text = table(records, profile, floor_s)
    label = f"speed-{profile.name}"
    body = (f"### {label}: {profile.width}x{profile.height}, {profile.steps} steps, CFG {profile.guidance}, {env['device_name']}, "
            f"{env['dtype']}, {env['date_utc']}\n\n`python benchmarks/bench_speed.py {' '.join(argv or sys.argv[1:])}`"
            f" (torch {env['torch']}, diffusers {env['diffusers']})\n\n{text}\n")
    if device.type == "cuda" and "H100" not in env["device_name"]:
        body += f"\nThis GPU is {env['device_name']}, not the H100 of the anchors: compare ratios, not seconds.\n"
    print(body)
    if not args.no_save:
        for record in records:
            for case in record["batches"].values():
                case.pop("pixels")
        report = {"profile": asdict(profile), "environment": env, "floor_s_per_image": floor_s, "sides": records}
        save_report(report, HERE / "results" / f"{label}.json", HERE / "RESULTS.md", label, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
