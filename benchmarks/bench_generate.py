"""Engine.generate vs diffusers' StableDiffusionXLPipeline.__call__: same components, one process.

Both sides run on the very same module objects (UNet, VAE, text encoders, tokenizers) with the same
scheduler class and config, steps, guidance, size, batch and per-image seeds. Runs alternate
(engine, diffusers, diffusers, engine, ...) after one warm-up of each, and the medians are compared:
ratio = median(engine) / median(diffusers), < 1 means the engine is faster.

    python benchmarks/bench_generate.py --profile cpu-tiny   # tiny random SDXL on the CPU
    python benchmarks/bench_generate.py --profile cpu-sdxl   # full-size random SDXL, CPU bf16, 128px, 4 steps
    python benchmarks/bench_generate.py --profile gpu-sdxl   # full-size random SDXL, fp16, CUDA, 1024px, 30 steps
    python benchmarks/bench_generate.py --dry-run            # full SDXL on meta, parameter counts
    python benchmarks/bench_generate.py --smoke              # full SDXL on CPU bf16, one tiny image, checks

See benchmarks/README.md for the method and for running the GPU profile on the device machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Puts ROOT on sys.path, sets HF_HUB_OFFLINE=1 and the warning filters.
from _common import CpuPeak, Side, environment, gpu_missing, save_report, update_results  # noqa: E402
from _common import gib as _gib, mib as _mib, sync as _sync, timed as _timed  # noqa: E402,F401

import torch  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, photograph"


@dataclass(frozen=True)
class Profile:
    name: str
    model: str  # tiny | sdxl-random
    device: str
    dtype: str
    width: int
    height: int
    steps: int
    batches: tuple[int, ...]
    guidance: float = 7.0
    scheduler: str = "euler"
    runs: int = 5
    threads: Optional[int] = None  # torch intra-op threads; None = torch's default (all cores)


PROFILES = {
    # ~0.4 s (batch 1) / ~1 s (batch 4) per call on one core: long enough to time, short enough
    # for many runs. One thread: on a shared 2-core machine a second OpenMP thread turns any other
    # busy process into 10-100x stalls (measured: a 0.72 s call took 72 s); --threads 2 on a quiet one.
    "cpu-tiny": Profile("cpu-tiny", "tiny", "cpu", "fp32", 128, 128, 20, (1, 4), runs=15, threads=1),
    # The full-size architecture on the CPU (bf16: ~7 GB of weights), small image and few steps:
    # the engine's overheads against SDXL-sized text encoders, UNet and VAE (~10 s per call).
    "cpu-sdxl": Profile("cpu-sdxl", "sdxl-random", "cpu", "bf16", 128, 128, 4, (1,), runs=5, threads=1),
    # TESTBED anchor: SDXL 1024^2, 30 steps, CFG, batch 1 ~2.50 s on an H100 with diffusers.
    "gpu-sdxl": Profile("gpu-sdxl", "sdxl-random", "cuda", "fp16", 1024, 1024, 30, (1, 4), runs=5),
}


def run_case(engine, pipe, profile: Profile, batch: int, runs: int, seed: int, cpu_peak: CpuPeak, log) -> dict:
    import numpy as np

    from engine import GenerationRequest

    device = engine.device
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=None, width=profile.width, height=profile.height, num_images=batch,
        seed=seed, steps=profile.steps, guidance_scale=profile.guidance, scheduler=profile.scheduler, mode="fast",
    )

    def call_engine():
        return engine.generate(request)

    def call_diffusers(output_type="pil"):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        return pipe(
            prompt=PROMPT, negative_prompt=None, width=profile.width, height=profile.height,
            num_images_per_prompt=batch, num_inference_steps=profile.steps, guidance_scale=profile.guidance,
            generator=generators, output_type=output_type,
        )

    eng, dif = Side(), Side()
    # Warm-up, one of each; the diffusers one returns floats so that the two outputs can be compared
    # (proof that both sides computed the same images from the same components).
    ours, eng.warmup_s, _, _ = _timed(call_engine, device, cpu_peak)
    theirs, dif.warmup_s, _, _ = _timed(lambda: call_diffusers("np"), device, cpu_peak)
    ours_px = ours.pixels.astype(np.float64)
    theirs_px = np.asarray(theirs.images, dtype=np.float64)
    max_diff = float(np.abs(ours_px - theirs_px).max()) if ours_px.shape == theirs_px.shape else float("nan")
    finite = bool(np.isfinite(ours_px).all() and np.isfinite(theirs_px).all())
    log(f"  batch {batch}: warm-up engine {eng.warmup_s:.3f} s, diffusers {dif.warmup_s:.3f} s, "
        f"max |pixel diff| {max_diff:.2e}")
    del ours, theirs

    for index in range(runs):
        # ABBA order: engine first on even runs, diffusers first on odd ones (cancels drift and
        # any advantage of going first or second).
        order = [("engine", call_engine, eng), ("diffusers", call_diffusers, dif)]
        if index % 2:
            order.reverse()
        for name, fn, side in order:
            result, elapsed, cpu, peak = _timed(fn, device, cpu_peak)
            side.times.append(elapsed)
            side.cpu_times.append(cpu)
            side.peaks.append(peak)
            del result
        log(f"  batch {batch}: run {index + 1}/{runs} engine {eng.times[-1]:.3f} s (cpu {eng.cpu_times[-1]:.3f}), "
            f"diffusers {dif.times[-1]:.3f} s (cpu {dif.cpu_times[-1]:.3f})")

    e, d = eng.summary(), dif.summary()
    paired = [a / b for a, b in zip(eng.times, dif.times)]
    return {
        "batch": batch,
        "width": profile.width,
        "height": profile.height,
        "steps": profile.steps,
        "guidance": profile.guidance,
        "scheduler": profile.scheduler,
        "seed": seed,
        "runs": runs,
        "engine": {**e, "times_s": eng.times, "cpu_times_s": eng.cpu_times, "peaks_bytes": eng.peaks},
        "diffusers": {**d, "times_s": dif.times, "cpu_times_s": dif.cpu_times, "peaks_bytes": dif.peaks},
        "ratio": e["median_s"] / d["median_s"],
        "cpu_time_ratio": e["cpu_median_s"] / d["cpu_median_s"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "max_abs_pixel_diff": max_diff,
        "finite": finite,
    }


# -- building the models -----------------------------------------------------------------------


def build(profile: Profile, device: torch.device, dtype: torch.dtype, seed: int):
    from engine import Engine
    from engine.loading import ModelInfo

    start = time.perf_counter()
    if profile.model == "tiny":
        from engine.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed).to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        info = ModelInfo("tiny", "tiny", "in-memory (engine.tiny.build_tiny_pipeline)", notice=None)
    else:
        from engine.sdxl_configs import build_random_sdxl_pipeline

        pipe = build_random_sdxl_pipeline(device, dtype, seed)
        info = ModelInfo("sdxl-random", "random", "in-memory (engine.sdxl_configs.build_random_sdxl_pipeline)")
    _sync(device)
    pipe.watermark = None  # the engine does not watermark; neither side should
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(pipe, info, device, dtype)
    return engine, pipe, time.perf_counter() - start


def parameter_counts(pipe) -> dict:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def dry_run(args) -> int:
    """Build full-size SDXL on the meta device (no memory) and check the parameter counts."""
    from engine import sdxl_configs as cfg

    start = time.perf_counter()
    pipe = cfg.build_random_sdxl_pipeline("meta")
    counts = parameter_counts(pipe)
    expected = {
        "unet": cfg.SDXL_UNET_PARAMETERS, "vae": cfg.SDXL_VAE_PARAMETERS,
        "text_encoder": cfg.SDXL_TEXT_ENCODER_PARAMETERS, "text_encoder_2": cfg.SDXL_TEXT_ENCODER_2_PARAMETERS,
    }
    print(f"built full-size SDXL on meta in {time.perf_counter() - start:.2f} s")
    ok = True
    for name, count in counts.items():
        match = count == expected[name]
        ok &= match
        print(f"  {name:15s} {count:>15,d}  expected {expected[name]:>15,d}  {'ok' if match else 'MISMATCH'}")
    total = sum(counts.values())
    print(f"  {'total':15s} {total:>15,d}  ({total * 2 / 2**30:.2f} GiB in fp16)")
    print(f"  vae_scale_factor {pipe.vae_scale_factor}, latent for 1024^2: {1024 // pipe.vae_scale_factor}^2, "
          f"scheduler {type(pipe.scheduler).__name__}")
    return 0 if ok else 1


def smoke(args) -> int:
    """Full-size random SDXL on the CPU (bf16), one small image through both sides.

    Checks that the builder materialises real weights, that both sides run and agree, that the
    outputs are finite, and how large activations get (fp16 overflows above 65504).
    """
    from engine import GenerationRequest

    device, dtype = torch.device("cpu"), torch.bfloat16
    start = time.perf_counter()
    engine, pipe, _ = build(PROFILES["gpu-sdxl"], device, dtype, args.seed)
    print(f"built full-size random SDXL on cpu/bf16 in {time.perf_counter() - start:.1f} s: {parameter_counts(pipe)}")
    largest = {}

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):  # transformers' ModelOutput is a dict
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from tensors(item)

    def hook(name):
        def record(_module, _inputs, output):
            for tensor in tensors(output):
                if tensor.is_floating_point() and tensor.numel():
                    largest[name] = max(largest.get(name, 0.0), float(tensor.detach().abs().max()))
        return record

    handles = []
    for prefix, root in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                         ("text_encoder_2", pipe.text_encoder_2), ("vae.decoder", pipe.vae.decoder)):
        for name, module in root.named_modules():
            if name.count(".") <= 1:
                handles.append(module.register_forward_hook(hook(f"{prefix}.{name}" if name else prefix)))
    size, steps = 128, 2
    start = time.perf_counter()
    ours = engine.generate(GenerationRequest(prompt=PROMPT, width=size, height=size, seed=args.seed, steps=steps,
                                             guidance_scale=7.0, scheduler="euler"))
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = pipe(prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=7.0,
                  generator=[torch.Generator("cpu").manual_seed(args.seed)], output_type="np").images
    diffusers_s = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    import numpy as np

    diff = float(np.abs(ours.pixels.astype(np.float64) - theirs.astype(np.float64)).max())
    print(f"{size}x{size}, {steps} steps (first calls, not a benchmark): engine {engine_s:.1f} s, diffusers {diffusers_s:.1f} s, "
          f"max |pixel diff| {diff:.2e}, finite {bool(np.isfinite(ours.pixels).all())}, "
          f"pixel range [{ours.pixels.min():.3f}, {ours.pixels.max():.3f}]")
    print("largest |activation| per model (bf16 run; fp16 overflows above 65504):")
    for prefix in ("text_encoder.", "text_encoder_2.", "unet", "vae.decoder"):
        name, value = max(((n, v) for n, v in largest.items() if n.startswith(prefix)), key=lambda item: item[1])
        print(f"  {prefix.rstrip('.'):15s} {value:10.4g}  ({name})")
    return 0 if np.isfinite(ours.pixels).all() and max(largest.values()) < 6e4 else 1


# -- reporting ---------------------------------------------------------------------------------


HEADER = ("| batch | size | steps | engine median s (min–max) | diffusers median s (min–max) | ratio | "
          "paired ratio median (min–max) | CPU-time ratio | peak mem engine | peak mem diffusers | max abs pixel diff |")
RULE = "|---:|---|---:|---|---|---:|---|---:|---|---|---:|"


def table_row(case: dict, device_type: str) -> str:
    e, d = case["engine"], case["diffusers"]
    mem = _gib if device_type == "cuda" else (lambda v: "+" + _mib(v))
    # Process CPU time is a contention-proof view of the work done on a CPU; on a GPU it only
    # counts the host's share (and synchronisation spin), so it is not shown there.
    cpu_ratio = "n/a" if device_type == "cuda" else f"{case['cpu_time_ratio']:.3f}"
    return (
        f"| {case['batch']} | {case['width']}x{case['height']} | {case['steps']} "
        f"| {e['median_s']:.3f} ({e['min_s']:.3f}–{e['max_s']:.3f}) "
        f"| {d['median_s']:.3f} ({d['min_s']:.3f}–{d['max_s']:.3f}) "
        f"| **{case['ratio']:.3f}** "
        f"| {case['paired_ratio_median']:.3f} ({case['paired_ratio_min']:.3f}–{case['paired_ratio_max']:.3f}) "
        f"| {cpu_ratio} | {mem(e['peak_bytes'])} | {mem(d['peak_bytes'])} | {case['max_abs_pixel_diff']:.1e} |"
    )


def section(report: dict, command: str) -> str:
    env, profile = report["environment"], report["profile"]
    memory_note = (
        "peak memory = torch.cuda.max_memory_allocated during the run (weights included)"
        if env["device"] == "cuda"
        else "peak memory = rise of the process's resident set (VmHWM − RSS before) during the run"
    )
    lines = [
        f"### {report['label']}",
        "",
        f"- device: {env['device_name']} ({env['device']}, {env['dtype']}), "
        f"torch threads {env['torch_threads']} of {env['cpu_count']} CPUs"
        + (f"; load average (1 min) {report['loadavg_start'][0]:.2f} at the start, "
           f"{env['loadavg_1_5_15'][0]:.2f} at the end (other processes on the machine count)"
           if env.get("loadavg_1_5_15") and report.get("loadavg_start") else ""),
        f"- date: {env['date_utc']}",
        f"- torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
        f"python {env['python']}",
        f"- model: {profile['model']}; scheduler {profile['scheduler']}, CFG {profile['guidance']}, "
        f"{report['runs']} timed runs per side after 1 warm-up each, alternating ABBA, one process",
        f"- command: `{command}`",
        f"- {memory_note}; ratio = median engine / median diffusers (< 1: engine faster); "
        "paired ratio = per-run engine/diffusers of adjacent runs",
        "",
        HEADER,
        RULE,
        *[table_row(case, env["device"]) for case in report["cases"]],
        "",
        f"Raw timings: `{report['json']}`",
    ]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-tiny")
    parser.add_argument("--runs", type=int, help="timed runs per side and case (default: the profile's)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: the profile's, 1,4)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int, help="square image side in pixels")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--scheduler", help="engine scheduler name; both sides use the same class and config")
    parser.add_argument("--device", help="override the profile's device (cpu, cuda, cuda:1)")
    parser.add_argument("--dtype", help="override the profile's dtype (fp32, fp16, bf16)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the profile's; 1 for cpu-*, torch's default for gpu-sdxl)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and results/ alone")
    parser.add_argument("--dry-run", action="store_true",
                        help="build full-size SDXL on the meta device and check parameter counts (no compute)")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="re-render RESULTS.md's section from a results JSON (e.g. one brought back from a GPU machine)")
    parser.add_argument("--smoke", action="store_true",
                        help="build full-size random SDXL on the CPU in bf16 (~7 GB RAM) and run one 128px image "
                             "through both sides (1 thread unless --threads)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        update_results(args.results, report["label"], section(report, report["command"]))
        print(f"updated section {report['label']} of {args.results} from {args.from_json}")
        return 0
    if args.dry_run:
        return dry_run(args)
    if args.smoke:
        torch.set_num_threads(args.threads or 1)  # see README, "Noisy 2-core machines"
        return smoke(args)

    from engine.devices import pick_device

    base = PROFILES[args.profile]
    profile = Profile(
        base.name, base.model, args.device or base.device, args.dtype or base.dtype,
        args.size or base.width, args.size or base.height, args.steps or base.steps,
        tuple(int(b) for b in args.batches.split(",")) if args.batches else base.batches,
        args.guidance if args.guidance is not None else base.guidance,
        args.scheduler or base.scheduler, args.runs or base.runs, args.threads or base.threads,
    )
    if profile.threads:
        torch.set_num_threads(profile.threads)
    # Results of a run that departs from the profile's defaults get their own section and file.
    overrides = [f"{name}{getattr(profile, name)}" for name in ("threads", "device", "dtype", "steps", "scheduler")
                 if getattr(profile, name) != getattr(base, name)]
    if profile.guidance != base.guidance:
        overrides.append(f"cfg{profile.guidance:g}")
    if (profile.width, profile.height) != (base.width, base.height):
        overrides.append(f"size{profile.width}")
    if profile.batches != base.batches:
        overrides.append("batch" + "+".join(map(str, profile.batches)))
    label = "-".join([profile.name, *overrides])
    device, dtype = pick_device(profile.device, profile.dtype)
    if gpu_missing(device):
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    engine, pipe, build_s = build(profile, device, dtype, args.seed)
    from engine.schedulers import build_scheduler

    # The same scheduler class and config on both sides: the engine builds a fresh one per
    # request from pipe.scheduler.config; diffusers uses pipe.scheduler.
    pipe.scheduler = build_scheduler(profile.scheduler, pipe.scheduler.config)
    log(f"{profile.name}: built in {build_s:.1f} s on {device} ({dtype}); "
        f"scheduler {type(pipe.scheduler).__name__}; {torch.get_num_threads()} torch threads")

    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cpu_peak = CpuPeak()
    cases = [run_case(engine, pipe, profile, batch, profile.runs, args.seed, cpu_peak, log) for batch in profile.batches]

    env = environment(device, dtype)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    json_path = HERE / "results" / f"{label}-{stamp}.json"
    command = "python benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "profile": {**asdict(profile), "batches": list(profile.batches)},
        "label": label,
        "environment": env,
        "runs": profile.runs,
        "loadavg_start": loadavg_start,
        "build_s": build_s,
        "command": command.strip(),
        "json": str(json_path.relative_to(ROOT)),
        "cases": cases,
    }
    print(f"\n{profile.name} on {env['device_name']} ({env['dtype']}), {env['date_utc']}, "
          f"torch {env['torch']}, diffusers {env['diffusers']}, {env['torch_threads']} threads")
    print(HEADER)
    print(RULE)
    for case in cases:
        print(table_row(case, device.type))
    if not args.no_write:
        save_report(report, json_path, args.results, label, section(report, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
