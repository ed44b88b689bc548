"""Batch runs (issue 15): images/s of `run_batch` (grouped, merged batches, results file, resume) against running
the same 64-line manifest one line at a time, on the tiny model, CPU, in one process.

Two manifests, written to a temp folder:
- pack: 16 prompts x 4 following seeds (an NPC pack: 4 variants of each character). run_batch merges each prompt's 4
  lines into one batch of 4 (engine/batch/plan.py).
- distinct: 64 prompts without seeds (seeds derived from the line ids): nothing can merge, so this measures what the
  batch machinery costs over plain generate calls (ids, pixel digests, results file, the skip check).

Sides (each writes its PNGs into a fresh folder; PNG writing is timed on every side):
- batch        read_manifest + run_batch with the Engine loaded once (the command loads it once too; the load is
               reported apart)
- one-by-one   a fresh Engine.generate per line in manifest order, result.save() (a loop over the lines)
- load-per-line  Engine.load("tiny") + generate + save per line, as a naive script would (pack only)
- resume check run_batch again over the complete folder: every line skipped (reported apart, 1 run per round)
Rounds alternate the order of the sides (forward, then reversed); medians over rounds; wall and process CPU time.
One `refgen generate` process per line (import + load + one image) is measured `--cli-runs` times, apart.

The pack's merged batches are not bit-identical to batch-1 runs of the same seeds (float rounding in batched
kernels): the largest 8-bit difference between the batch side's PNGs and the one-by-one side's is reported.

    python benchmarks/bench_batch.py                 # ~2.5 min on the 2-core dev machine; writes the results
    python benchmarks/bench_batch.py --rounds 1 --no-write
    python benchmarks/bench_batch.py --from-json benchmarks/results/batch-cpu-tiny.json   # re-render the tables
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, ROOT, CpuPeak, environment, timed, save_report

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine import Engine, GenerationRequest  # noqa: E402
from engine.batch import plan_batch, read_manifest, run_batch  # noqa: E402

SETTINGS = {"width": 64, "height": 64, "steps": 10}
RESULTS_JSON = HERE / "results" / "batch-cpu-tiny.json"


def manifests(folder: Path) -> dict[str, Path]:
    pack = [{"prompt": f"portrait of npc {n}, fantasy", **SETTINGS, "seed": 1000 + 10 * n + k} for n in range(16) for k in range(4)]
    distinct = [{"prompt": f"a prop number {n}, game asset", **SETTINGS} for n in range(64)]
    paths = {}
    for name, lines in (("pack", pack), ("distinct", distinct)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return paths


def batch_side(engine: Engine, manifest: Path, out: Path):
    summary = run_batch(read_manifest(manifest, model="tiny"), out, lambda model: engine)
    assert summary.failed == 0 and summary.images_written == 64, summary
    return summary


def one_by_one(engine: Engine, manifest: Path, out: Path, load_each: bool = False) -> None:
    for number, text in enumerate(manifest.read_text().splitlines(), 1):
        request = GenerationRequest(**json.loads(text))
        runner = Engine.load("tiny", device="cpu", dtype="fp32") if load_each else engine
        runner.generate(request).save(out, stem=f"line{number:03d}")


def fresh(root: Path, name: str) -> Path:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def max_png_difference(batch_out: Path, single_out: Path, manifest: Path) -> int:
    """Largest 8-bit difference between the batch side's picture of each line and the one-by-one side's."""
    worst = 0
    for line in read_manifest(manifest, model="tiny").valid:
        (single,) = single_out.glob(f"line{line.number:03d}-*.png")
        with Image.open(batch_out / line.output_names()[0]) as a, Image.open(single) as b:
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        worst = max(worst, int(diff))
    return worst


def cli_process_seconds(runs: int, folder: Path) -> list[float]:
    """Wall seconds of one `refgen generate --model tiny` process (import, load, one image, save)."""
    times = []
    for run in range(runs):
        command = [sys.executable, "-m", "engine.cli", "generate", "a prop", "--model", "tiny", "--steps", str(SETTINGS["steps"]),
                   "--width", "64", "--height", "64", "--seed", str(run), "--out", str(folder / "cli")]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        times.append(time.perf_counter() - start)
    return times


def quiet_libraries() -> None:
    """64 model loads on the load-per-line side: no progress bars or tiny-model notices in the output."""
    import logging

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    logging.getLogger("refgen").setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cli-runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", type=Path, help="re-render the tables from a results JSON, measure nothing")
    args = parser.parse_args()
    if args.from_json:
        return write(json.loads(args.from_json.read_text()), args.no_write)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    device = torch.device("cpu")
    env = environment(device, torch.float32)
    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    paths = manifests(root)
    started = time.perf_counter()
    load_start = time.perf_counter()
    engine = Engine.load("tiny", device="cpu", dtype="fp32")
    load_s = time.perf_counter() - load_start
    engine.generate(GenerationRequest(prompt="warm up", **SETTINGS, seed=0, num_images=4))
    engine.generate(GenerationRequest(prompt="warm up", **SETTINGS, seed=0))
    cpu_peak = CpuPeak()
    sides = {
        ("pack", "batch"): lambda out: batch_side(engine, paths["pack"], out),
        ("pack", "one-by-one"): lambda out: one_by_one(engine, paths["pack"], out),
        ("pack", "load-per-line"): lambda out: one_by_one(engine, paths["pack"], out, load_each=True),
        ("distinct", "batch"): lambda out: batch_side(engine, paths["distinct"], out),
        ("distinct", "one-by-one"): lambda out: one_by_one(engine, paths["distinct"], out),
    }
    times = {key: [] for key in sides}
    cpu = {key: [] for key in sides}
    resume = {name: [] for name in paths}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for key in order:
            out = fresh(root, f"{key[0]}-{key[1]}")
            _, wall, cpu_s, _ = timed(lambda: sides[key](out), device, cpu_peak)
            times[key].append(wall)
            cpu[key].append(cpu_s)
            if key[1] == "batch":
                _, wall, _, _ = timed(lambda: run_batch(read_manifest(paths[key[0]], model="tiny"), out, lambda m: engine), device, cpu_peak)
                resume[key[0]].append(wall)
        print(f"round {round_index + 1}: " + ", ".join(f"{k[0]}/{k[1]} {times[k][-1]:.2f}s" for k in sides), flush=True)
    units = {name: len(plan_batch(read_manifest(path, model="tiny").valid)) for name, path in paths.items()}
    difference = max_png_difference(root / "pack-batch", root / "pack-one-by-one", paths["pack"])
    cli_times = cli_process_seconds(args.cli_runs, root)
    report = {
        "benchmark": "batch-cpu-tiny", "environment": env, "command": " ".join(["python", *sys.argv]),
        "settings": {**SETTINGS, "lines": 64, "model": "tiny", "dtype": "fp32", "rounds": args.rounds,
                     "scheduler": "dpmpp_2m_karras (default)", "guidance": 7.0},
        "engine_load_s": load_s, "units": units, "pack_batch_vs_one_by_one_max_png_diff": difference,
        "cli_process_per_line_s": cli_times,
        "sides": {f"{name}/{side}": {"times_s": times[(name, side)], "cpu_s": cpu[(name, side)],
                                     "median_s": statistics.median(times[(name, side)]),
                                     "images_per_s": 64 / statistics.median(times[(name, side)])}
                  for name, side in sides},
        "resume_check_s": {name: values for name, values in resume.items()},
        "total_s": time.perf_counter() - started,
    }
    shutil.rmtree(root, ignore_errors=True)
    write(report, args.no_write)


def write(report: dict, dry: bool) -> None:
    text = render(report)
    print(text)
    if not dry:
        save_report(report, RESULTS_JSON, HERE / "RESULTS.md", "batch-cpu-tiny", text, markdown=True)


def render(report: dict) -> str:
    env, sides = report["environment"], report["sides"]
    rows = []
    for name in ("pack", "distinct"):
        base = sides[f"{name}/one-by-one"]["median_s"]
        for side in ("batch", "one-by-one", "load-per-line"):
            entry = sides.get(f"{name}/{side}")
            if entry is None:
                continue
            times, cpu_times = entry["times_s"], entry["cpu_s"]
            single = sides[f"{name}/one-by-one"]
            paired = [b / a for a, b in zip(times, single["times_s"])]  # same round: the same drift of the machine
            cpu_speed = statistics.median(single["cpu_s"]) / statistics.median(cpu_times)
            rows.append(f"| {name} | {side} | {entry['median_s']:.2f} ({min(times):.2f}–{max(times):.2f}) | "
                        f"{entry['images_per_s']:.1f} | {base / entry['median_s']:.2f} | {statistics.median(paired):.2f} | "
                        f"{statistics.median(cpu_times):.2f} | **{64 / statistics.median(cpu_times):.1f}** | **{cpu_speed:.2f}** |")
    cli = report["cli_process_per_line_s"]
    resume = report["resume_check_s"]
    settings = report["settings"]
    return "\n".join([
        f"### batch-cpu-tiny: `refgen batch` (run_batch) vs one line at a time, {env['device_name']}, {env['date_utc']}",
        "",
        f"`{report['command']}` (torch {env['torch']}, diffusers {env['diffusers']}, torch threads {env['torch_threads']} of "
        f"{env['cpu_count']} CPUs, load average {env['loadavg_1_5_15'][0]:.2f} at the start)",
        "",
        f"64 lines, model tiny, fp32, {settings['width']}x{settings['height']}, {settings['steps']} steps, "
        f"{settings['scheduler']}, CFG {settings['guidance']}; {settings['rounds']} rounds alternating the order of the sides, "
        "one process, every side writes its PNGs. pack: 16 prompts x 4 following seeds "
        f"({report['units']['pack']} work units after merging); distinct: 64 prompts without seeds "
        f"({report['units']['distinct']} units).",
        "",
        "| manifest | side | wall s median (min–max) | images/s (wall) | × one-by-one (wall) | × one-by-one (paired rounds) "
        "| CPU s median | images per CPU s | × one-by-one (CPU time) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Engine.load('tiny') once: {report['engine_load_s']:.2f} s (outside the table). Resume check (a second run over the "
        f"complete folder, every line skipped): pack {statistics.median(resume['pack']):.2f} s, distinct "
        f"{statistics.median(resume['distinct']):.2f} s for 64 lines. One `refgen generate` process per line (import, load, "
        f"one image): {statistics.median(cli):.2f} s per line ({len(cli)} runs: {', '.join(f'{t:.2f}' for t in cli)}). "
        f"Merged batches vs batch-1 runs of the same seeds: max 8-bit difference {report['pack_batch_vs_one_by_one_max_png_diff']} "
        "(float rounding of batched kernels; a line's pictures are reproducible within its batch, which resume keeps).",
        "",
        "On a shared 2-core machine wall times drift with other work; process CPU time (user + sys, one torch thread) "
        "does not count waiting for a core, so the CPU-time columns are the contention-proof figures (bold).",
        "",
        "Raw figures: `benchmarks/results/batch-cpu-tiny.json`",
    ])


if __name__ == "__main__":
    main()
