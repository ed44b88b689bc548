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
import shutil
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
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
LEGEND = ("s/image and it/s: this side's median run (on a shared machine they drift between sides: compare the "
          "paired column). Peak mem: CUDA max_memory_allocated above what was resident before the side loaded (the "
          "kept baseline); CPU: resident-memory growth during a call (the weights are memory-mapped). Max pixel diff: "
          "against the first side, same seeds. (x s): the first call in the benchmark's own process (for a later "
          "batch, that shape's compile).")
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


def save_controlnet(folder: Path, seed: int = 10) -> Path:
    """A ControlNet of the saved model's UNet (SDXL ControlNet layout, its zero-convs randomised so that it does
    the work of a trained one), saved beside it: every side of `--case controlnet` loads this."""
    target = folder.parent / "controlnet"
    if not (target / "config.json").exists():
        from diffusers import UNet2DConditionModel

        from bench_guidance import full_size_controlnet

        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        full_size_controlnet(unet, "cpu", unet.dtype, seed).save_pretrained(str(target), safe_serialization=True)
        del unet
        gc.collect()
    return target


def save_references(folder: Path) -> dict:
    """Style (IP-Adapter) and Character Reference (InstantID: face adapter + IdentityNet, insightface packs) weights
    for the saved model's UNet, written by the tests' builders in the published layouts (bench_references.py): the
    parts that run in every step (IP-Adapter key/value projections in each cross-attention, IdentityNet, a ControlNet
    of the UNet) are the UNet's size; the image and face encoders, which run once per request, are tiny."""
    root = folder.parent / "references"
    index = root / "weights.json"
    if not index.exists():
        from diffusers import UNet2DConditionModel

        from bench_references import _tests_module, build_character_weights

        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        ip_root = _tests_module("tiny_ip_adapter").save_tiny_ip_adapter(unet, root / "IP-Adapter")
        weights = build_character_weights(unet, root / "character", ip_root)
        index.write_text(json.dumps({key: str(value) for key, value in weights.items()}))
        del unet
        gc.collect()
    return {key: Path(value) for key, value in json.loads(index.read_text()).items()}


def reference_adapters(weights: dict, device: torch.device):
    """The engine's adapters with those weights (as tests/test_character_reference.py equips an engine)."""
    from adapters.ip_adapter import IPAdapters
    from bench_references import load_analyzers
    from engine.compose import default_adapters

    analyzers = load_analyzers(weights["packs"], device)
    return lambda setup: default_adapters(setup, ip_adapters=IPAdapters(setup.pipe, setup.device, setup.dtype, reference=weights["ip"]),
                                          analyzers=analyzers, instantid=weights["instantid"], faceid=weights["faceid"])


def reference_fields() -> dict:
    """A style reference and an InstantID character (the tiny face packs find the same face in any picture)."""
    from PIL import Image

    from engine.request_types import CharacterReference, Reference

    def picture(seed: int):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (512, 512, 3), np.uint8))

    return {"references": [Reference(kind="style", image=picture(101))],
            "character": CharacterReference(images=[picture(103)], adapter="instantid")}


def control_image(profile):
    from bench_guidance import control_images

    return control_images(profile.width, profile.height, seed=1)[0]


CASES = {"plain": "", "controlnet": "1 ControlNet (canny, weight 1)",
         "references": "1 style reference + an InstantID character (refgen only: diffusers has no InstantID pipeline)",
         "esrgan": "Real-ESRGAN x4 (RRDBNet nf64 nb23, random) of the profile's image size, untiled (refgen only)"}


@dataclass(frozen=True)
class Case:
    """What every side runs besides the plain model: a ControlNet unit, style + character references, or ESRGAN."""

    name: str = "plain"
    controlnet: Optional[Path] = None
    references: Optional[dict] = None

    @classmethod
    def prepare(cls, name: str, folder: Path) -> "Case":
        if name == "controlnet":
            return cls(name, controlnet=save_controlnet(folder))
        if name == "references":
            return cls(name, references=save_references(folder))
        return cls(name)

    def request_fields(self, profile) -> dict:
        if self.controlnet is not None:
            from engine.request_types import ControlUnit

            return {"controlnets": [ControlUnit(type="canny", image=control_image(profile), preprocess=False)]}
        return reference_fields() if self.references is not None else {}

    def pipeline_arguments(self, profile) -> dict:
        return {} if self.controlnet is None else {"image": control_image(profile), "controlnet_conditioning_scale": 1.0}


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
    if getattr(pipe, "controlnet", None) is not None:
        pipe.controlnet.to(memory_format=torch.channels_last)
        pipe.controlnet = torch.compile(pipe.controlnet, mode=mode, fullgraph=True)


def load_side(side: str, folder: Path, device: torch.device, dtype: torch.dtype, autotune: bool = True, case: Case = Case()):
    """The loaded pipeline, Engine or (esrgan) upscaler. autotune False: CUDA compiles without max-autotune (minutes
    less, a little slower)."""
    if side.startswith("diffusers"):
        import diffusers

        extra = {}
        if case.controlnet is not None:
            extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(str(case.controlnet), dtype=dtype, local_files_only=True)
        kind = diffusers.StableDiffusionXLControlNetPipeline if extra else diffusers.StableDiffusionXLPipeline
        pipe = kind.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.watermark = None
        if side == "diffusers-compiled":
            diffusers_recipe(pipe, device, autotune)
        return pipe
    from engine import Engine
    from engine.speed import prepare_module, speed_for

    mode, _, quantize = side.removeprefix("refgen-").partition("-")
    speed = speed_for(mode, device, quantize=quantize or None)
    if not autotune:
        speed = replace(speed, options={key: value for key, value in speed.options.items() if key != "max_autotune"})
    if case.name == "esrgan":  # what engine.compose.upscaler_loader does with a loaded upscaler
        upscaler = random_realesrgan(device, dtype)
        prepare_module(upscaler.descriptor.model, speed)
        return upscaler
    if case.references is not None:
        return Engine.load(str(folder), device=str(device), dtype=dtype, speed=speed, adapters=reference_adapters(case.references, device))
    controlnets = None if case.controlnet is None else {"canny": str(case.controlnet)}
    return Engine.load(str(folder), device=str(device), dtype=dtype, speed=speed, controlnets=controlnets)


def random_realesrgan(device, dtype):
    """Real-ESRGAN x4plus's architecture with random weights, in its published key layout (tests/esrgan_layouts.py)."""
    from adapters.upscale import Upscaler
    from bench_references import _tests_module

    state = _tests_module("esrgan_layouts").realesrgan_state_dict(4, nf=64, nb=23, seed=0)
    return Upscaler.from_state_dict(state, device=device, dtype=dtype, name="random RRDBNet x4 nf64 nb23")


def caller(side: str, loaded, profile, batch: int, seed: int, case: Case = Case()) -> Callable[[], np.ndarray]:
    if case.name == "esrgan":
        pixels = np.random.default_rng(seed).random((profile.height, profile.width, 3), dtype=np.float32)
        return lambda: loaded.upscale_pixels(pixels[None].repeat(batch, 0), tile=None)
    if side.startswith("diffusers"):
        extra = case.pipeline_arguments(profile)

        def call():
            generators = [torch.Generator("cpu").manual_seed(seed + index) for index in range(batch)]
            return np.asarray(loaded(prompt=PROMPT, width=profile.width, height=profile.height, num_images_per_prompt=batch,
                                     num_inference_steps=profile.steps, guidance_scale=profile.guidance,
                                     generator=generators, output_type="np", **extra).images)
        return call
    from engine import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, width=profile.width, height=profile.height, num_images=batch, seed=seed,
                                steps=profile.steps, guidance_scale=profile.guidance, scheduler="euler", mode="fast",
                                **case.request_fields(profile))
    return lambda: loaded.generate(request).pixels


def nvidia_driver() -> Optional[str]:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


def measure_side(side: str, folder: Path, profile: SpeedProfile, device, dtype, seed: int, log, autotune: bool = True,
                 case: Case = Case(), loaded=None, paired: Optional[dict] = None) -> dict:
    """One side's load, first call and timed runs per batch. `paired` (batch -> the baseline's call): each timed run
    alternates with one of the baseline's (ABBA), so the ratio of the pairs cancels the machine's drift."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.parent / "inductor" / side)  # cold: its own, fresh cache
    torch._dynamo.reset()
    cpu_peak = CpuPeak()
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the baseline's, when kept
    started = time.perf_counter()
    loaded = loaded if loaded is not None else load_side(side, folder, device, dtype, autotune, case)
    record = {"side": side, "load_s": time.perf_counter() - started, "batches": {}}
    for batch in profile.batches:
        call = caller(side, loaded, profile, batch, seed, case)
        pixels, first_s, _, _ = timed(call, device, cpu_peak)
        times, base_times, peaks, device_totals = [], [], [], []
        for index in range(profile.runs):
            order = [(call, times), *([(paired[batch], base_times)] if paired else [])]
            for fn, into in order[:: -1 if index % 2 else 1]:
                _, elapsed, _, peak = timed(fn, device, cpu_peak)
                into.append(elapsed)
                if into is times:
                    peaks.append(peak - resident)
            device_totals.append(device_total_bytes(device))
        median = statistics.median(times)
        record["batches"][batch] = {
            "first_call_s": first_s, "compile_s": max(0.0, first_s - median), "times_s": times, "median_s": median,
            "s_per_image": median / batch, "it_per_s": profile.steps / median, "peak_bytes": max(peaks),
            "device_total_bytes": max((t for t in device_totals if t is not None), default=None), "pixels": pixels,
            "baseline_times_s": base_times,
            "paired_ratio": statistics.median(a / b for a, b in zip(times, base_times)) if base_times else None,
        }
        log(f"  {side} batch {batch}: first call {first_s:.2f} s, median {median:.3f} s ({median / batch:.3f} s/image)"
            + (f", paired ratio {record['batches'][batch]['paired_ratio']:.3f}" if base_times else ""))
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def first_call_in_new_process(side: str, folder: Path, profile: SpeedProfile, batch: int, seed: int, cache: Path,
                              autotune: bool = True, case: str = "plain") -> float:
    """A fresh process's first call with inductor's cache in `cache`: empty = a cold compile, filled = a warm start.
    In a process of their own, kernels compiled for an earlier side cannot be reused from memory unseen."""
    command = [sys.executable, __file__, "--profile", profile.name, "--child", side, "--folder", str(folder),
               "--child-batch", str(batch), "--seed", str(seed), "--case", case] + ([] if autotune else ["--no-autotune"])
    environment_vars = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    output = subprocess.run(command, capture_output=True, text=True, env=environment_vars, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["first_call_s"]


def child(args, profile: SpeedProfile) -> int:
    device, dtype = torch.device(profile.device), DTYPES[profile.dtype]
    folder = Path(args.folder)
    case = Case.prepare(args.case, folder)
    loaded = load_side(args.child, folder, device, dtype, not args.no_autotune, case)
    _, first_s, _, _ = timed(caller(args.child, loaded, profile, args.child_batch, args.seed, case), device, CpuPeak())
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


def table(records: list[dict], floor_s: Optional[float]) -> str:
    """One row per side and batch; ratios against the first side (the baseline), from runs paired with its runs."""
    baseline = records[0]
    rows = [f"| side | batch | s/image | it/s | vs {baseline['side']} (paired runs) | new process, empty cache | new process, cache filled | "
            "peak mem | device total | floor share | max pixel diff |", "|" + "---|" * 11]
    for record in records:
        for batch, entry in record["batches"].items():
            base = baseline["batches"][batch]
            ratio = entry["paired_ratio"] or entry["median_s"] / base["median_s"]
            cold = f"{entry['cold_start_s']:.1f} s" if "cold_start_s" in entry else f"({entry['first_call_s']:.1f} s)"
            warm = f"{entry['warm_start_s']:.1f} s" if "warm_start_s" in entry else "-"
            total = f"{entry['device_total_bytes'] / 2**30:.2f} GiB" if entry["device_total_bytes"] else "-"
            share = f"{floor_s * batch / entry['median_s']:.0%}" if floor_s else "n/a"
            rows.append(f"| {record['side']} | {batch} | {entry['s_per_image']:.3f} | {entry['it_per_s']:.2f} | {ratio:.3f} | "
                        f"{cold} | {warm} | {entry['peak_bytes'] / 2**30:.2f} GiB | {total} | {share} | "
                        f"{np.abs(entry['pixels'] - base['pixels']).max():.2e} |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-tiny")
    parser.add_argument("--sides", nargs="+", choices=SIDES + LOW_PRECISION_SIDES, default=list(SIDES))
    parser.add_argument("--batches", type=int, nargs="+", help="override the profile's batch sizes")
    parser.add_argument("--runs", type=int, help="override the profile's timed runs per case")
    parser.add_argument("--steps", type=int, help="override the profile's steps")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--case", choices=sorted(CASES), default="plain",
                        help="what every side runs besides the plain model: " + "; ".join(f"{k}: {v}" for k, v in CASES.items() if v))
    parser.add_argument("--warm-start", action="store_true",
                        help="compiled sides: time a new process's first call with an empty inductor cache, then with it filled")
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
    case = Case.prepare(args.case, folder)
    sides = [side for side in args.sides if args.case in ("plain", "controlnet") or side.startswith("refgen")]
    floor_s = None
    if peak_flops(device) and case.name == "plain":  # the count covers the UNet and the VAE, nothing more
        floor_s = flops_per_image(*saved_configs(folder), profile.width, profile.height, profile.steps) / peak_flops(device)
    # The first side (diffusers-eager by default) stays loaded: every other side's runs alternate with its runs.
    baseline = load_side(sides[0], folder, device, dtype, not args.no_autotune, case)
    base_calls = {batch: caller(sides[0], baseline, profile, batch, args.seed, case) for batch in profile.batches}
    records = []
    for side in sides:
        log(f"{side} ...")
        kept = {"loaded": baseline} if side == sides[0] else {"paired": base_calls}
        compile_times = args.warm_start and "-eager" not in side
        if compile_times:  # cold: a new process and an empty cache; it leaves the cache filled for this process
            first = partial(first_call_in_new_process, side, folder, profile, profile.batches[0], args.seed,
                            workdir / "inductor" / side, not args.no_autotune, args.case)
            shutil.rmtree(workdir / "inductor" / side, ignore_errors=True)
            cold = first()
        record = measure_side(side, folder, profile, device, dtype, args.seed, log, not args.no_autotune, case, **kept)
        if compile_times:
            record["batches"][profile.batches[0]].update(cold_start_s=cold, warm_start_s=first())
            log(f"  {side}: a new process's first call: {cold:.1f} s with an empty cache, "
                f"{record['batches'][profile.batches[0]]['warm_start_s']:.1f} s with the cache filled")
        records.append(record)
    env = {**environment(device, dtype), "driver": nvidia_driver() if device.type == "cuda" else None}
    text = table(records, floor_s)
    label = f"speed-{profile.name}" + ("" if args.case == "plain" else f"-{args.case}")
    body = (f"### {label}: {profile.width}x{profile.height}, {profile.steps} steps, CFG {profile.guidance}, "
            f"{CASES[case.name] + ', ' if CASES[case.name] else ''}{env['device_name']}, "
            f"{env['dtype']}, {env['date_utc']}\n\n`python benchmarks/bench_speed.py {' '.join(argv or sys.argv[1:])}`"
            f" (torch {env['torch']}, diffusers {env['diffusers']}{', driver ' + env['driver'] if env['driver'] else ''})\n\n{text}\n"
            f"\n{LEGEND}\n")
    if device.type == "cuda" and "H100" not in env["device_name"]:
        body += f"\nThis GPU is {env['device_name']}, not the H100 of the anchors: compare ratios, not seconds.\n"
    print(body)
    if not args.no_save:
        for record in records:
            for entry in record["batches"].values():
                entry.pop("pixels")
        report = {"profile": asdict(profile), "case": args.case, "environment": env, "floor_s_per_image": floor_s, "sides": records}
        save_report(report, HERE / "results" / f"{label}.json", HERE / "RESULTS.md", label, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
