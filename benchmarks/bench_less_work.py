"""Less work, measured: deep_cache (adapters/deep_cache.py) and guidance_cutoff, side by side.

(i)   UNet FLOPs per call, full vs DeepCache's shallow path, on the full-size SDXL UNet built on the meta device
      (no weights, no compute: torch's FlopCounterMode counts from shapes), 128x128 latent, batch 2 (CFG) and 1;
(ii)  the FLOP reduction per image at 30 steps for deep_cache k = 2, 3, 5 and guidance_cutoff 0.3, 0.5, 0.7;
(iii) on the tiny random-weight model: max and mean abs pixel difference from the full computation for the
      same seeds, and the wall time ratio (whole generate, median of runs). Random weights say nothing about
      image quality: (iii) checks the mechanism and the overhead, not what a real model's images look like.

Writes a markdown table to benchmarks/results/less_work.md.

    .venv/bin/python benchmarks/bench_less_work.py [--steps 30] [--size 256] [--seeds 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import HERE, environment  # noqa: F401 (puts the repository root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from adapters.deep_cache import FullPath, ShallowPath  # noqa: E402
from engine.sampling import last_guided_step  # noqa: E402

INTERVALS = (2, 3, 5)
CUTOFFS = (0.3, 0.5, 0.7)
RESULTS = HERE / "results" / "less_work.md"


# -- (i) FLOPs per UNet call --------------------------------------------------------------------------------------


def sdxl_inputs(rows: int) -> tuple:
    """A CFG call's inputs at a 128x128 latent (1024 px), on the meta device."""
    with torch.device("meta"):
        return (torch.empty(rows, 4, 128, 128), torch.tensor(500.0), torch.empty(rows, 77, 2048),
                {"text_embeds": torch.empty(rows, 1280), "time_ids": torch.empty(rows, 6)})


def flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def per_call_flops() -> dict:
    """{(path, rows): FLOPs} for the plain UNet, our full path and the shallow path."""
    from engine.sdxl_configs import build_sdxl_unet_on_meta

    unet = build_sdxl_unet_on_meta().eval()
    full, shallow = FullPath(unet), ShallowPath(unet)
    counts = {}
    with torch.inference_mode():
        for rows in (2, 1):
            sample, timestep, context, added = sdxl_inputs(rows)
            deep = full(sample, timestep, context, added)[1]
            counts["plain", rows] = flops(lambda: unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added))
            counts["full", rows] = flops(lambda: full(sample, timestep, context, added))
            counts["shallow", rows] = flops(lambda: shallow(sample, timestep, deep, context, added))
    return counts


# -- (ii) per image ------------------------------------------------------------------------------------------------


def deep_cache_flops(counts: dict, steps: int, interval: int) -> int:
    full_calls = len(range(0, steps, interval))  # calls 0, k, 2k, ...
    return full_calls * counts["full", 2] + (steps - full_calls) * counts["shallow", 2]


def cutoff_flops(counts: dict, steps: int, cutoff: float) -> int:
    guided = last_guided_step(steps, cutoff) + 1  # steps 0..int(steps x cutoff) run both CFG rows
    return guided * counts["full", 2] + (steps - guided) * counts["full", 1]


def per_image(counts: dict, steps: int) -> dict:
    baseline = steps * counts["full", 2]
    plans = {f"deep_cache={k}": deep_cache_flops(counts, steps, k) for k in INTERVALS}
    plans |= {f"guidance_cutoff={c}": cutoff_flops(counts, steps, c) for c in CUTOFFS}
    return {"baseline": baseline, **plans}


# -- (iii) the tiny model: pixels and wall time -----------------------------------------------------------------------


def tiny_engine():
    from engine import Engine
    from engine.tiny import save_tiny_model

    folder = save_tiny_model(Path(tempfile.mkdtemp()) / "tiny-sdxl", seed=0)
    return Engine.load(str(folder), device="cpu", dtype="fp32")


def generate(engine, seed: int, size: int, steps: int, **fields) -> tuple[np.ndarray, float]:
    from engine import GenerationRequest

    request = GenerationRequest(prompt="a lighthouse at night", width=size, height=size, steps=steps, guidance_scale=5.0,
                                scheduler="euler", seed=seed, **fields)
    started = time.perf_counter()
    pixels = engine.generate(request).pixels
    return pixels, time.perf_counter() - started


def tiny_figures(steps: int, size: int, seeds: int, runs: int) -> dict:
    """{plan: (max abs diff, mean abs diff, wall ratio, seconds)} against the full computation, same seeds. The timed
    runs go round the plans in turn, so that a change of machine load touches every plan alike."""
    engine = tiny_engine()
    generate(engine, 0, size, 2)  # warm-up: first-call allocations out of the timings
    plans = {"full": {}, **{f"deep_cache={k}": {"deep_cache": k} for k in INTERVALS},
             **{f"guidance_cutoff={c}": {"guidance_cutoff": c} for c in CUTOFFS}}
    pixels = {name: np.stack([generate(engine, seed, size, steps, **fields)[0] for seed in range(seeds)])
              for name, fields in plans.items()}
    times = {name: [] for name in plans}
    for _ in range(runs):
        for name, fields in plans.items():
            times[name].append(generate(engine, 0, size, steps, **fields)[1])
    seconds = {name: statistics.median(values) for name, values in times.items()}
    figures = {}
    for name in plans:
        differences = np.abs(pixels[name] - pixels["full"])
        figures[name] = (float(differences.max()), float(differences.mean()), seconds[name] / seconds["full"], seconds[name])
        print(f"tiny {name}: {seconds[name]:.3f} s per image", flush=True)
    return figures


# -- the report ---------------------------------------------------------------------------------------------------------


def report(counts: dict, image: dict, tiny: dict, args, env: dict) -> str:
    gflop = lambda value: f"{value / 1e9:,.0f}"  # noqa: E731
    lines = [f"# Less work: deep_cache and guidance_cutoff ({env['date_utc']})", "",
             f"Device: {env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}, "
             f"diffusers {env['diffusers']}. Command: `.venv/bin/python benchmarks/bench_less_work.py --steps {args.steps} "
             f"--size {args.size} --seeds {args.seeds} --runs {args.runs}`", "",
             "## UNet FLOPs per call (full-size SDXL UNet on the meta device, 128x128 latent)", "",
             "| path | batch 2 (CFG) GFLOP | batch 1 GFLOP |", "|---|---:|---:|"]
    for path in ("plain", "full", "shallow"):
        lines.append(f"| {path} | {gflop(counts[path, 2])} | {gflop(counts[path, 1])} |")
    lines += ["", f"Shallow / full per call: {counts['shallow', 2] / counts['full', 2]:.4f}. "
              "(plain = diffusers' UNet forward; full = deep_cache's decomposition of it, the same computation.)", "",
              f"## Per image, {args.steps} steps (UNet only; ControlNets, VAE and text encoders not counted)", "",
              "| plan | UNet TFLOP / image | FLOP reduction | speed-up bound | tiny: max abs px diff | tiny: mean abs px diff | tiny: wall time ratio | tiny: s / image |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, total in image.items():
        tiny_name = "full" if name == "baseline" else name
        worst, mean, ratio, seconds = tiny[tiny_name]
        lines.append(f"| {name} | {total / 1e12:,.1f} | {1 - total / image['baseline']:.1%} | "
                     f"{image['baseline'] / total:.2f}x | {worst:.4f} | {mean:.5f} | {ratio:.3f} | {seconds:.3f} |")
    lines += ["", f"Tiny model: random weights, {args.size}x{args.size} px, {args.steps} steps, euler, guidance 5, "
              f"seeds 0..{args.seeds - 1}; pixel differences in 0..1 against the full computation with the same seed; "
              f"wall time = whole generate (text encoders and VAE included), median of {args.runs} runs taken in turns, "
              f"over the full computation's; load average at the start {env['loadavg_1_5_15']}. The tiny UNet's share of a "
              "generation is not full-size SDXL's, so the wall ratio is no prediction for SDXL: the FLOP columns are."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=256, help="tiny model image side in px")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per plan on the tiny model")
    args = parser.parse_args()
    counts = per_call_flops()
    assert counts["plain", 2] == counts["full", 2], "the full path must be the same computation as the UNet"
    text = report(counts, per_image(counts, args.steps), tiny_figures(args.steps, args.size, args.seeds, args.runs), args,
                  environment(torch.device("cpu"), torch.float32))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
