"""Cost of Style / Content Reference (IP-Adapter, adapters/ip_adapter.py) and of its encoder cache.

Part 1, generation: per-image time of Engine.generate for plain txt2img, one style reference, and a
style + a content reference (two adapter instances), as ratios to plain txt2img. Each case runs on
its own Engine (identical tiny weights, same seed), so its IP-Adapter stays loaded between calls:
the steady cost of a reference. Two more variants share one engine and unload its adapter at the start
of each timed call, so every call pays unload + load (what a worker pays when consecutive requests
use different kinds of reference). All variants alternate (forward order on even rounds,
reversed on odd ones) after one warm-up each; medians are compared. The reference embeddings are
cached after the warm-up, so these times hold no encoder run (Part 2 measures that).

Part 2, reference encoder (IPAdapters._encode of one 512x512 RGB image): each round takes a new
image and times (a) its first encode (cold: neither cache has it, the CLIP image encoder runs and
the embedding is written to the disk cache), (b) the same image again in the same IPAdapters (memory
cache), (c) the same image in a fresh IPAdapters on the same pipeline (disk cache under
engine.paths.cache_dir()). `encoder_runs` is recorded for each step to show the cache working.
REFGEN_HOME points at a new temporary folder, so the disk cache starts empty.

Character Reference is not part of generation yet (adapters/characters.py stores profiles only), so
it is not measured.

    python benchmarks/bench_references.py --profile cpu-tiny    # tiny SDXL + tiny IP-Adapter, CPU, 1 thread (~2 min)

Method and reporting as benchmarks/bench_guidance.py (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# _common puts the repository root on sys.path and sets HF_HUB_OFFLINE=1 and the warning filters.
from _common import ROOT, CpuPeak, Side, environment, gpu_missing, mib, gib, save_report, timed, update_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, photograph"  # bench_generate.PROMPT


@dataclass(frozen=True)
class Profile:
    name: str
    model: str  # tiny
    device: str
    dtype: str
    width: int
    height: int
    steps: int
    batch: int = 1
    guidance: float = 7.0
    scheduler: str = "euler"
    runs: int = 15
    encoder_runs: int = 15
    reference_side: int = 512  # reference images are reference_side x reference_side RGB
    threads: Optional[int] = None


PROFILES = {
    # Tiny SDXL (engine/tiny.py) with the tests' tiny IP-Adapter (tests/tiny_ip_adapter.py: the published
    # h94/IP-Adapter vit-h layout, a 2-layer CLIP vision encoder). One thread: see README, "Noisy 2-core machines".
    "cpu-tiny": Profile("cpu-tiny", "tiny", "cpu", "fp32", 128, 128, 20, runs=15, encoder_runs=15, threads=1),
}

STYLE_WEIGHT, CONTENT_WEIGHT = 1.0, 0.7


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tests_module(name: str):
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    return __import__(name)


def _picture(seed: int, side: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), np.uint8))


def compare(a: Side, b: Side) -> dict:
    paired = [x / y for x, y in zip(a.times, b.times)]
    return {
        "ratio": statistics.median(a.times) / statistics.median(b.times),
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "cpu_time_ratio": statistics.median(a.cpu_times) / statistics.median(b.cpu_times),
    }


def _side_record(side: Side) -> dict:
    return {**side.summary(), "times_s": side.times, "cpu_times_s": side.cpu_times, "peaks_bytes": side.peaks}


def build_engine(profile: Profile, device, dtype, seed: int, ip_root: Optional[Path]):
    from adapters.ip_adapter import IPAdapters
    from engine import Engine
    from engine.loading import ModelInfo
    from engine.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.watermark = None
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(pipe, ModelInfo("tiny", "tiny", "in-memory (engine.tiny.build_tiny_pipeline)", notice=None), device, dtype)
    if ip_root is not None:
        engine.ip_adapters = IPAdapters(pipe, device, dtype, reference=ip_root)
    return engine


def run(profile: Profile, device, dtype, seed: int, home: Path) -> dict:
    from adapters.ip_adapter import Reference
    from engine import GenerationRequest

    start = time.perf_counter()
    ip_root = _tests_module("tiny_ip_adapter").save_tiny_ip_adapter(
        build_engine(profile, device, dtype, 0, None).pipe.unet, home / "IP-Adapter")
    engines = {name: build_engine(profile, device, dtype, 0, ip_root)
               for name in ("plain", "style", "style+content", "switching")}
    build_s = time.perf_counter() - start
    unet_params = sum(p.numel() for p in engines["plain"].pipe.unet.parameters())
    log(f"references/{profile.name}: 4 tiny engines + tiny IP-Adapter built in {build_s:.1f} s on {device}; "
        f"{torch.get_num_threads()} torch threads; REFGEN_HOME={home}")

    style_img, content_img = _picture(101, profile.reference_side), _picture(102, profile.reference_side)
    style = Reference(kind="style", image=style_img, weight=STYLE_WEIGHT)
    content = Reference(kind="content", image=content_img, weight=CONTENT_WEIGHT)

    def request(refs):
        return GenerationRequest(
            prompt=PROMPT, negative_prompt=None, width=profile.width, height=profile.height, num_images=profile.batch,
            seed=seed, steps=profile.steps, guidance_scale=profile.guidance, scheduler=profile.scheduler, mode="fast",
            references=refs,
        )

    cases = [  # (variant name, engine, references, description)
        ("plain", "plain", [], "plain txt2img"),
        ("style", "style", [style], f"1 style reference (weight {STYLE_WEIGHT})"),
        ("style+content", "style+content", [style, content],
         f"style (weight {STYLE_WEIGHT}) + content (weight {CONTENT_WEIGHT}) references"),
        ("style, reloading", "switching", [style], "1 style reference, adapter reloaded every call"),
        ("style+content, reloading", "switching", [style, content], "style + content, adapter reloaded every call"),
    ]
    cpu_peak = CpuPeak()
    sides, variants, warm_pixels = {}, [], {}

    for name, engine_name, refs, _ in cases:
        engine, req = engines[engine_name], request(refs)
        side = Side()
        result, side.warmup_s, _, _ = timed(lambda e=engine, r=req: e.generate(r), device, cpu_peak)
        warm_pixels[name] = result.pixels
        log(f"  {name}: warm-up {side.warmup_s:.3f} s")
        sides[name] = side
        if engine_name == "switching":  # unload first: every timed call pays unload + load, whatever the order
            variants.append((name, lambda e=engine, r=req: (e.ip_adapters._ensure(()), e.generate(r))[1]))
        else:
            variants.append((name, lambda e=engine, r=req: e.generate(r)))
    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    runs_before = {n: e.ip_adapters.encoder_runs for n, e in engines.items()}
    for index in range(profile.runs):
        order = variants if index % 2 == 0 else variants[::-1]
        for name, fn in order:
            result, elapsed, cpu, peak = timed(fn, device, cpu_peak)
            del result
            side = sides[name]
            side.times.append(elapsed)
            side.cpu_times.append(cpu)
            side.peaks.append(peak)
        log(f"  run {index + 1}/{profile.runs}: " + ", ".join(f"{n} {sides[n].times[-1]:.3f}" for n, _ in variants))
    encoder_runs_during_timing = {n: e.ip_adapters.encoder_runs - runs_before[n] for n, e in engines.items()}

    plain = sides["plain"]
    gen_cases = []
    for name, engine_name, refs, description in cases:
        side = sides[name]
        record = {"case": name, "engine": engine_name, "references": len(refs), "description": description,
                  **_side_record(side), "vs_plain": compare(side, plain),
                  "max_change_vs_plain": float(np.abs(warm_pixels[name] - warm_pixels["plain"]).max())}
        if name.endswith("reloading"):
            steady = sides[name.removesuffix(", reloading")]
            record["vs_steady"] = compare(side, steady)
            record["max_abs_diff_vs_steady"] = float(np.abs(warm_pixels[name] - warm_pixels[name.removesuffix(", reloading")]).max())
        gen_cases.append(record)

    encoder = run_encoder(profile, engines["style"], device, dtype, ip_root, cpu_peak)
    return {"build_s": build_s, "unet_parameters": unet_params, "ip_adapter": describe_ip_adapter(ip_root),
            "loadavg_start": loadavg_start, "runs": profile.runs, "cases": gen_cases,
            "encoder_runs_during_timed_generation": encoder_runs_during_timing, "encoder": encoder}


def describe_ip_adapter(ip_root: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    adapter = load_file(str(ip_root / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors"))
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(ip_root / "models" / "image_encoder"))
    return {"adapter_parameters": sum(v.numel() for v in adapter.values()),
            "image_encoder_parameters": sum(p.numel() for p in encoder.parameters()),
            "image_encoder_image_size": encoder.config.image_size}


def run_encoder(profile: Profile, engine, device, dtype, ip_root: Path, cpu_peak: CpuPeak) -> dict:
    """Per round, a new image: cold encode, repeat (memory cache), fresh IPAdapters (disk cache)."""
    from adapters.ip_adapter import IPAdapters

    steps = ("cold", "memory", "disk")
    sides = {s: Side() for s in steps}
    runs = {s: [] for s in steps}
    cache_files = []
    adapters = engine.ip_adapters
    adapters._ensure(("style",))  # loaded already (the style engine); the image encoder is on the pipeline
    first_call = None
    for index in range(profile.encoder_runs + 1):  # round 0: warm-up (its cold time is the first call of the process)
        picture = _picture(1000 + index, profile.reference_side)
        fresh = IPAdapters(engine.pipe, device, dtype, reference=ip_root)
        results = {}
        for step, target in (("cold", adapters), ("memory", adapters), ("disk", fresh)):
            before = target.encoder_runs
            (pos, neg), elapsed, cpu, peak = timed(lambda t=target: t._encode(picture), device, cpu_peak)
            results[step] = pos
            if index == 0:
                if step == "cold":
                    first_call = {"s": elapsed, "encoder_runs": target.encoder_runs - before}
                continue
            sides[step].times.append(elapsed)
            sides[step].cpu_times.append(cpu)
            sides[step].peaks.append(peak)
            runs[step].append(target.encoder_runs - before)
        same = all(torch.equal(results["cold"].float().cpu(), results[s].float().cpu()) for s in ("memory", "disk"))
        if not same:
            raise RuntimeError("cached reference embedding differs from the encoded one")
        if index:
            log(f"  encoder round {index}/{profile.encoder_runs}: " + ", ".join(
                f"{s} {sides[s].times[-1] * 1e3:.2f} ms (encoder runs {runs[s][-1]})" for s in steps))
    from engine import paths

    cache_files = sorted((paths.cache_dir() / "references").glob("*.safetensors"))
    return {
        "reference_side": profile.reference_side, "rounds": profile.encoder_runs, "first_call": first_call,
        "steps": {s: {**_side_record(sides[s]), "encoder_runs": runs[s], "encoder_runs_total": sum(runs[s])} for s in steps},
        "disk_cache_files": len(cache_files),
        "disk_cache_file_bytes": cache_files[0].stat().st_size if cache_files else None,
        "embeddings_identical": True,
    }


# -- reporting ---------------------------------------------------------------------------------


def _range(side: dict, scale: float = 1.0, unit: float = 1.0, fmt: str = ".3f") -> str:
    return (f"{side['median_s'] / scale / unit:{fmt}} ({side['min_s'] / scale / unit:{fmt}}–"
            f"{side['max_s'] / scale / unit:{fmt}})")


def _paired(c: dict) -> str:
    return f"{c['paired_ratio_median']:.3f} ({c['paired_ratio_min']:.3f}–{c['paired_ratio_max']:.3f})"


def _mem(device_type: str, value: int) -> str:
    return gib(value) if device_type == "cuda" else "+" + mib(value)


def section(report: dict) -> str:
    env, profile = report["environment"], report["profile"]
    dev, batch = env["device"], profile["batch"]
    load = ""
    if env.get("loadavg_1_5_15") and report.get("loadavg_start"):
        load = (f"; load average (1 min) {report['loadavg_start'][0]:.2f} at the start, "
                f"{env['loadavg_1_5_15'][0]:.2f} at the end (other processes on the machine count)")
    ip = report["ip_adapter"]
    lines = [
        f"### {report['label']}",
        "",
        f"- device: {env['device_name']} ({env['device']}, {env['dtype']}), torch threads {env['torch_threads']} of "
        f"{env['cpu_count']} CPUs{load}",
        f"- date: {env['date_utc']}",
        f"- torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, python {env['python']}"
        f"{', CUDA ' + env['cuda'] if dev == 'cuda' and env.get('cuda') else ''}",
        f"- command: `{report['command']}`",
        f"- model: {profile['model']} (UNet {report['unet_parameters']:,} parameters) + the tests' tiny IP-Adapter "
        f"(tests/tiny_ip_adapter.py, published vit-h layout: {ip['adapter_parameters']:,} adapter parameters, CLIP vision "
        f"encoder {ip['image_encoder_parameters']:,} parameters at {ip['image_encoder_image_size']} px); "
        f"{profile['width']}x{profile['height']}, {profile['steps']} steps, {profile['scheduler']}, CFG {profile['guidance']}, "
        f"batch {batch}; reference images {profile['reference_side']}x{profile['reference_side']} RGB",
        f"- {report['runs']} timed rounds after 1 warm-up per variant; each round runs all 5 variants, forward order on "
        "even rounds and reversed on odd ones; one process. `plain`, `style` and `style+content` each have their own "
        "engine (identical weights), so the adapter stays loaded; the two `reloading` variants share one engine and "
        "unload the IP-Adapter before each timed call, so each call pays unload + load",
        f"- encoder runs during the timed generations: {sum(report['encoder_runs_during_timed_generation'].values())} "
        "(embeddings cached since the warm-up: these times are the UNet's extra attention, not the encoder)",
        "- peak memory: " + ("torch.cuda.max_memory_allocated during the call (weights included)" if dev == "cuda"
                             else "rise of the process's resident set (VmHWM − RSS before) during the call"),
        "- **Character Reference is not measured: it is not part of generation yet** (character profiles are "
        "stored, `refgen character ...`, but no request uses them)",
        "",
        "**Cost of references per image** (× plain = median / median of plain txt2img; paired = per-round ratios):",
        "",
        "| case | s per image median (min–max) | × plain | paired × plain median (min–max) | CPU-time × plain | "
        "peak mem | max change vs plain |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for c in report["cases"]:
        vp = c["vs_plain"]
        is_plain = c["case"] == "plain"
        lines.append(
            f"| {c['description']} | {_range(c, batch)} | **{vp['ratio']:.3f}** | {'—' if is_plain else _paired(vp)} | "
            f"{vp['cpu_time_ratio']:.3f} | {_mem(dev, c['peak_bytes'])} | "
            f"{'—' if is_plain else format(c['max_change_vs_plain'], '.2f')} |"
        )
    reloads = [c for c in report["cases"] if "vs_steady" in c]
    if reloads:
        lines += ["", "Reloading against the steady case (same references, adapter kept loaded): " + "; ".join(
            f"{c['case']}: **{c['vs_steady']['ratio']:.3f}x** (paired {c['vs_steady']['paired_ratio_median']:.3f}), "
            f"+{(c['median_s'] - next(x for x in report['cases'] if x['case'] == c['case'].removesuffix(', reloading'))['median_s']) * 1e3:.0f} ms, "
            f"max abs diff {c['max_abs_diff_vs_steady']:.1e}" for c in reloads) + "."]
    enc = report["encoder"]
    names = {"cold": "first encode (cold: not cached, encoder runs, written to disk)",
             "memory": "same image again, same IPAdapters (memory cache)",
             "disk": "same image, fresh IPAdapters (disk cache)"}
    cold = enc["steps"]["cold"]["median_s"]
    lines += [
        "",
        f"**Reference encoder** (`IPAdapters._encode` of one {enc['reference_side']}x{enc['reference_side']} image; "
        f"{enc['rounds']} rounds after 1 warm-up round, a new image each round; REFGEN_HOME a new empty temporary "
        "folder; times include loading the picture and hashing it for the cache key):",
        "",
        "| step | ms median (min–max) | × cold | encoder_runs per call (total over rounds) |",
        "|---|---|---:|---|",
    ]
    for step in ("cold", "memory", "disk"):
        s = enc["steps"][step]
        per_call = sorted(set(s["encoder_runs"]))
        lines.append(f"| {names[step]} | {_range(s, unit=1e-3, fmt='.2f')} | {s['median_s'] / cold:.3f} | "
                     f"{', '.join(map(str, per_call))} ({s['encoder_runs_total']}) |")
    first = enc["first_call"]
    lines += ["", f"The very first encode of the process (warm-up round, included above in no median): "
                  f"{first['s'] * 1e3:.1f} ms, encoder_runs {first['encoder_runs']}. Disk cache after the run: "
                  f"{enc['disk_cache_files']} files of {enc['disk_cache_file_bytes']} bytes; cached embeddings are "
                  "identical to the encoded ones (checked every round).",
              "", f"Raw timings: `{report['json']}`"]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-tiny")
    parser.add_argument("--runs", type=int, help="timed generation rounds (default: the profile's)")
    parser.add_argument("--encoder-runs", type=int, help="timed encoder rounds (default: the profile's)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the profile's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and results/ alone")
    parser.add_argument("--from-json", type=Path, metavar="JSON", help="re-render RESULTS.md's section from a results JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        update_results(args.results, report["label"], section(report))
        print(f"updated section {report['label']} of {args.results} from {args.from_json}")
        return 0
    from engine.engine import pick_device

    base = PROFILES[args.profile]
    profile = replace(base, runs=args.runs or base.runs, encoder_runs=args.encoder_runs or base.encoder_runs,
                      steps=args.steps or base.steps, threads=args.threads or base.threads)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    overrides = [f"{n}{getattr(profile, n)}" for n in ("threads", "steps") if getattr(profile, n) != getattr(base, n)]
    label = "-".join(["references", profile.name, *overrides])
    device, dtype = pick_device(profile.device, profile.dtype)
    if gpu_missing(device):
        return 2
    command = ("python benchmarks/bench_references.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="refgen-bench-references-") as tmp:
        previous = os.environ.get("REFGEN_HOME")
        os.environ["REFGEN_HOME"] = tmp  # an empty disk cache (engine.paths reads it on every call)
        try:
            report = run(profile, device, dtype, args.seed, Path(tmp))
        finally:
            if previous is None:
                os.environ.pop("REFGEN_HOME", None)
            else:
                os.environ["REFGEN_HOME"] = previous
    json_path = HERE / "results" / f"{label}-{stamp}.json"
    report.update({"label": label, "profile": asdict(profile), "environment": environment(device, dtype),
                   "command": command, "json": str(json_path.relative_to(ROOT))})
    text = section(report)
    print("\n" + text + "\n")
    if not args.no_write:
        save_report(report, json_path, args.results, label, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
