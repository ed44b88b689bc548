"""Cost of Style / Content Reference (IP-Adapter, adapters/ip_adapter.py) and of Character Reference
(adapters/identity.py: InstantID and FaceID-Plus-v2), and of their encoder caches.

Part 1, generation: per-image time of Engine.generate for plain txt2img, one style reference, a
style + a content reference (two adapter instances), a character reference through InstantID (face
adapter + IdentityNet ControlNet), a character reference through FaceID-Plus-v2 (face adapter + its
LoRA), and style + character (InstantID), as ratios to plain txt2img. Each case runs on
its own Engine (identical tiny weights, same seed), so its adapters stay loaded between calls:
the steady cost of a reference. Two more variants share one engine and unload its adapter at the start
of each timed call, so every call pays unload + load (what a worker pays when consecutive requests
use different kinds of reference). All variants alternate (forward order on even rounds,
reversed on odd ones) after one warm-up each; medians are compared. The reference embeddings are
cached after the warm-up, so these times hold no encoder run (Part 2 measures that); likewise the
character's face analysis (FaceAnalyzer caches detections by image hash) and the identity score of the
output (same seed, same output: cached after the warm-up), so the character rows hold no face analysis.

Part 2, reference encoder (IPAdapters.encode of one 512x512 RGB image): each round takes a new
image and times (a) its first encode (cold: neither cache has it, the CLIP image encoder runs and
the embedding is written to the disk cache), (b) the same image again in the same IPAdapters (memory
cache), (c) the same image in a fresh IPAdapters on the same pipeline (disk cache under
engine.paths.cache_dir()). `encoder_runs` is recorded for each step to show the cache working.
REFGEN_HOME points at a new temporary folder, so the disk cache starts empty.
The same round then encodes the image as a character: CharacterReferences.identity for InstantID
(antelopev2) and for FaceID (buffalo_l), cold (analyzer cache cleared) and again (detection cache),
FaceID's face crop through the CLIP encoder (IPAdapters.encode(crop, hidden_states=True): cold, memory
cache, disk cache in a fresh IPAdapters), and the identity score of one output-sized image (the face
analysis every character output pays), cold and cached. Face analyses run = face-cache misses.

The face packs are the tests' tiny insightface packs (tests/tiny_faces.py: a constant SCRFD-shaped
detector that always reports the astronaut's face, a small random ArcFace), not the real ones.

    python benchmarks/bench_references.py --profile cpu-tiny    # tiny SDXL + tiny adapters, CPU, 1 thread (~4 min)
    python benchmarks/bench_references.py --dry-run             # full-size SDXL + FaceID/InstantID layouts on meta

There is no gpu-sdxl profile yet; full_size_character_state_dicts() builds the full-size character weights one would use.

Method and reporting as benchmarks/bench_guidance.py (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
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
from _common import ROOT, BenchProfile, CpuPeak, compare, Side, environment, gpu_missing, mib, gib, save_report, timed, update_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, photograph"  # bench_generate.PROMPT
MANIFEST = ROOT / "weights" / "manifest.toml"  # the committed manifest: where the tiny packs are written


@dataclass(frozen=True)
class Profile(BenchProfile):
    runs: int = 15
    encoder_runs: int = 15
    reference_side: int = 512  # reference images are reference_side x reference_side RGB

PROFILES = {
    # Tiny SDXL (engine/tiny.py) with the tests' tiny IP-Adapter (tests/tiny_ip_adapter.py: the published
    # h94/IP-Adapter vit-h layout, a 2-layer CLIP vision encoder). One thread: see README, "Noisy 2-core machines".
    "cpu-tiny": Profile("cpu-tiny", "tiny", "cpu", "fp32", 128, 128, 20, runs=15, encoder_runs=15, threads=1),
}

STYLE_WEIGHT, CONTENT_WEIGHT = 1.0, 0.7
CHARACTER_STRENGTH = "Mid"  # identity.py's default: adapter scale 0.8, IdentityNet scale 0.8
CHARACTER_ADAPTERS = ("instantid", "faceid")


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


def _side_record(side: Side) -> dict:
    return {**side.summary(), "times_s": side.times, "cpu_times_s": side.cpu_times, "peaks_bytes": side.peaks}


def build_character_weights(unet, root: Path, ip_root: Path) -> dict:
    """The tests' tiny character weights (tests/test_character_reference.py, fixture `weights`): FaceID-Plus-v2
    and InstantID (face adapter + IdentityNet) in the published layouts, and tiny insightface packs."""
    tf = _tests_module("tiny_faces")
    instantid = _tests_module("tiny_instantid")
    encoder_hidden = _tests_module("tiny_ip_adapter").build_tiny_image_encoder().config.hidden_size
    packs = root / "packs"
    for entry in ("insightface-antelopev2", "insightface-buffalo-l"):
        seed = 0 if entry.endswith("antelopev2") else 5  # two recognisers: their embeddings differ
        tf.write_pack(packs, [tf.ASTRONAUT_FACE], entry_name=entry, manifest_path=MANIFEST, seed=seed)
    instantid.save_tiny_instantid(unet, root / "instantid")
    instantid.save_tiny_identitynet(unet, root / "instantid")
    faceid = _tests_module("tiny_faceid").save_tiny_faceid(unet, root / "faceid", clip_hidden=encoder_hidden).parent
    return {"ip": ip_root, "faceid": faceid, "instantid": root / "instantid", "packs": packs}


def load_analyzers(packs: Path, device) -> dict:
    """One FaceAnalyzer per pack, shared by every engine (so one detection cache per pack)."""
    from adapters.faces import FaceAnalyzer
    from engine.weights import Manifest

    return {pack: FaceAnalyzer.load(pack, device=str(device), weights_dir=packs, manifest=Manifest.load(MANIFEST))
            for pack in ("antelopev2", "buffalo_l")}


def build_engine(profile: Profile, device, dtype, seed: int, weights: Optional[dict], analyzers: Optional[dict] = None):
    from adapters.ip_adapter import IPAdapters
    from engine import Engine
    from engine.compose import Setup, default_adapters
    from engine.loading import ModelInfo
    from engine.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.watermark = None
    pipe.set_progress_bar_config(disable=True)
    adapters = None
    if weights is not None:  # as tests/test_character_reference.py's _equip
        faces = {"faceid": weights["faceid"], "instantid": weights["instantid"]} if "faceid" in weights else {}
        adapters = default_adapters(Setup(pipe, device, dtype), ip_adapters=IPAdapters(pipe, device, dtype, reference=weights["ip"]),
                                    analyzers=analyzers, **faces)
    return Engine(pipe, ModelInfo("tiny", "tiny", "in-memory (engine.tiny.build_tiny_pipeline)", notice=None), device, dtype,
                  adapters=adapters)


def ip_adapters(engine):
    from adapters.ip_adapter import StyleContentReferences

    return engine.adapter(StyleContentReferences).ip_adapters


def characters(engine):
    from adapters.identity import CharacterReferences

    return engine.adapter(CharacterReferences)


ENGINES = ("plain", "style", "style+content", "switching", "instantid", "faceid", "style+instantid")


def run(profile: Profile, device, dtype, seed: int, home: Path) -> dict:
    from engine.request_types import CharacterReference
    from engine.request_types import Reference
    from engine import GenerationRequest

    start = time.perf_counter()
    unet = build_engine(profile, device, dtype, 0, None).pipe.unet
    ip_root = _tests_module("tiny_ip_adapter").save_tiny_ip_adapter(unet, home / "IP-Adapter")
    weights = build_character_weights(unet, home / "character", ip_root)
    analyzers = load_analyzers(weights["packs"], device)
    engines = {name: build_engine(profile, device, dtype, 0, weights, analyzers) for name in ENGINES}
    build_s = time.perf_counter() - start
    unet_params = sum(p.numel() for p in engines["plain"].pipe.unet.parameters())
    log(f"references/{profile.name}: {len(engines)} tiny engines + tiny IP-Adapter, FaceID, InstantID and face packs "
        f"built in {build_s:.1f} s on {device}; {torch.get_num_threads()} torch threads; REFGEN_HOME={home}")

    style_img, content_img = _picture(101, profile.reference_side), _picture(102, profile.reference_side)
    style = Reference(kind="style", image=style_img, weight=STYLE_WEIGHT)
    content = Reference(kind="content", image=content_img, weight=CONTENT_WEIGHT)
    face_img = _picture(103, profile.reference_side)  # the tiny detector reports the same face in any photo
    characters = {adapter: CharacterReference(images=[face_img], adapter=adapter, strength_type=CHARACTER_STRENGTH)
                  for adapter in CHARACTER_ADAPTERS}

    def request(refs, character=None):
        return GenerationRequest(
            prompt=PROMPT, negative_prompt=None, width=profile.width, height=profile.height, num_images=profile.batch,
            seed=seed, steps=profile.steps, guidance_scale=profile.guidance, scheduler=profile.scheduler, mode="fast",
            references=refs, character=character,
        )

    strength = f"strength {CHARACTER_STRENGTH}"
    cases = [  # (variant name, engine, references, character, description)
        ("plain", "plain", [], None, "plain txt2img"),
        ("style", "style", [style], None, f"1 style reference (weight {STYLE_WEIGHT})"),
        ("style+content", "style+content", [style, content], None,
         f"style (weight {STYLE_WEIGHT}) + content (weight {CONTENT_WEIGHT}) references"),
        ("style, reloading", "switching", [style], None, "1 style reference, adapter reloaded every call"),
        ("style+content, reloading", "switching", [style, content], None, "style + content, adapter reloaded every call"),
        ("character instantid", "instantid", [], characters["instantid"],
         f"character reference, InstantID ({strength}: face adapter + IdentityNet)"),
        ("character faceid", "faceid", [], characters["faceid"],
         f"character reference, FaceID-Plus-v2 ({strength}: face adapter + LoRA)"),
        ("style+character instantid", "style+instantid", [style], characters["instantid"],
         f"style (weight {STYLE_WEIGHT}) + character reference, InstantID ({strength})"),
    ]
    cpu_peak = CpuPeak()
    sides, variants, warm_pixels = {}, [], {}

    for name, engine_name, refs, character, _ in cases:
        engine, req = engines[engine_name], request(refs, character)
        side = Side()
        result, side.warmup_s, _, _ = timed(lambda e=engine, r=req: e.generate(r), device, cpu_peak)
        warm_pixels[name] = result.pixels
        log(f"  {name}: warm-up {side.warmup_s:.3f} s")
        sides[name] = side
        if engine_name == "switching":  # unload first: every timed call pays unload + load, whatever the order
            variants.append((name, lambda e=engine, r=req: (ip_adapters(e).unload(), e.generate(r))[1]))
        else:
            variants.append((name, lambda e=engine, r=req: e.generate(r)))
    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    runs_before = {n: ip_adapters(e).encoder_runs for n, e in engines.items()}
    analyses_before = {p: a.cache.misses for p, a in analyzers.items()}
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
    encoder_runs_during_timing = {n: ip_adapters(e).encoder_runs - runs_before[n] for n, e in engines.items()}
    face_analyses_during_timing = {p: a.cache.misses - analyses_before[p] for p, a in analyzers.items()}

    plain = sides["plain"]
    gen_cases = []
    for name, engine_name, refs, character, description in cases:
        side = sides[name]
        record = {"case": name, "engine": engine_name, "references": len(refs), "description": description,
                  "character": None if character is None else character.adapter,
                  **_side_record(side), "vs_plain": compare(side, plain),
                  "max_change_vs_plain": float(np.abs(warm_pixels[name] - warm_pixels["plain"]).max())}
        if name.endswith("reloading"):
            steady = sides[name.removesuffix(", reloading")]
            record["vs_steady"] = compare(side, steady)
            record["max_abs_diff_vs_steady"] = float(np.abs(warm_pixels[name] - warm_pixels[name.removesuffix(", reloading")]).max())
        gen_cases.append(record)

    encoder = run_encoder(profile, engines, device, dtype, weights, cpu_peak)
    return {"build_s": build_s, "unet_parameters": unet_params, "ip_adapter": describe_ip_adapter(ip_root),
            "character_weights": describe_character(weights, analyzers),
            "loadavg_start": loadavg_start, "runs": profile.runs, "cases": gen_cases,
            "encoder_runs_during_timed_generation": encoder_runs_during_timing,
            "face_analyses_during_timed_generation": face_analyses_during_timing, "encoder": encoder}


def describe_ip_adapter(ip_root: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    adapter = load_file(str(ip_root / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors"))
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(ip_root / "models" / "image_encoder"))
    return {"adapter_parameters": sum(v.numel() for v in adapter.values()),
            "image_encoder_parameters": sum(p.numel() for p in encoder.parameters()),
            "image_encoder_image_size": encoder.config.image_size}


def describe_character(weights: dict, analyzers: dict) -> dict:
    from safetensors.torch import load_file

    def count(file: Path) -> int:
        return sum(v.numel() for v in load_file(str(file)).values())

    identitynet = weights["instantid"] / "ControlNetModel" / "diffusion_pytorch_model.safetensors"
    return {"faceid_parameters": count(weights["faceid"] / "ip-adapter-faceid-plusv2_sdxl.safetensors"),
            "instantid_parameters": count(weights["instantid"] / "ip-adapter.safetensors"),
            "identitynet_parameters": count(identitynet),
            "face_analysis": {pack: a.describe() for pack, a in analyzers.items()}}


# Part 2's groups: (what is timed, what counts the model runs, its steps in order; the first is cold).
ENCODER_GROUPS = {
    "style": ("style image, `IPAdapters.encode(image)` (CLIP image embedding)", "encoder_runs",
              ("cold", "memory", "disk")),
    "instantid": ("character photo for InstantID, `CharacterReferences.identity` (antelopev2 face analysis, ArcFace "
                  "embedding, keypoint picture)", "face analyses", ("cold", "cached")),
    "faceid": ("character photo for FaceID, `CharacterReferences.identity` (buffalo_l face analysis, ArcFace embedding, "
               "aligned face crop)", "face analyses", ("cold", "cached")),
    "faceid-crop": ("FaceID's face crop, `IPAdapters.encode(crop, hidden_states=True)` (CLIP hidden states)",
                    "encoder_runs", ("cold", "memory", "disk")),
    "score": ("identity score of one output-sized image, `CharacterReferences.score` (antelopev2 face analysis of the "
              "output, as every character output pays)", "face analyses", ("cold", "cached")),
}
STEP_NAMES = {"cold": "cold (not cached)", "memory": "again, same IPAdapters (memory cache)",
              "disk": "again, fresh IPAdapters (disk cache)", "cached": "again (FaceAnalyzer detection cache)"}


def run_encoder(profile: Profile, engines: dict, device, dtype, weights: dict, cpu_peak: CpuPeak) -> dict:
    """Per round, a new image: each group's cold step, then its cached steps (see ENCODER_GROUPS)."""
    from engine.request_types import CharacterReference
    from adapters.ip_adapter import IPAdapters
    from engine import paths

    sides = {(g, s): Side() for g, (_, _, steps) in ENCODER_GROUPS.items() for s in steps}
    runs = {key: [] for key in sides}
    first_call = {}
    for index in range(profile.encoder_runs + 1):  # round 0: warm-up (its cold time is the first call of the process)
        picture = _picture(1000 + index, profile.reference_side)
        output = _picture(5000 + index, profile.width)

        def measure(group, step, fn, counter):
            before = counter()
            result, elapsed, cpu, peak = timed(fn, device, cpu_peak)
            if index == 0:
                if step == "cold":
                    first_call[group] = {"s": elapsed, "runs": counter() - before}
                return result
            side = sides[(group, step)]
            side.times.append(elapsed)
            side.cpu_times.append(cpu)
            side.peaks.append(peak)
            runs[(group, step)].append(counter() - before)
            return result

        def encodes(group, name, image, hidden_states):  # cold, memory cache, disk cache (a fresh IPAdapters)
            fresh = IPAdapters(engines[name].pipe, device, dtype, reference=weights["ip"])
            results = [measure(group, step, lambda t=target: t.encode(image, hidden_states), lambda t=target: t.encoder_runs)[0]
                       for step, target in (("cold", ip_adapters(engines[name])), ("memory", ip_adapters(engines[name])),
                                            ("disk", fresh))]
            if not all(torch.equal(results[0].float().cpu(), r.float().cpu()) for r in results[1:]):
                raise RuntimeError(f"{group}: cached embedding differs from the encoded one")

        def analyses(group, adapter, fn):  # cold (the pack's detection cache cleared), then cached
            analyzer = characters(engines[adapter]).analyzer(adapter)
            analyzer.cache.clear()
            return [measure(group, step, fn, lambda: analyzer.cache.misses) for step in ("cold", "cached")]

        encodes("style", "style", picture, False)
        identities = {}
        for adapter in CHARACTER_ADAPTERS:
            ref = CharacterReference(images=[picture], adapter=adapter)
            identity = characters(engines[adapter])
            cold, cached = analyses(adapter, adapter, lambda i=identity, r=ref: i.identity(r, [picture], None))
            if cold.fingerprint != cached.fingerprint:
                raise RuntimeError(f"{adapter}: the cached identity differs from the analysed one")
            identities[adapter] = cold
        encodes("faceid-crop", "faceid", identities["faceid"].face_crop, True)
        instantid = characters(engines["instantid"])
        scores = analyses("score", "instantid", lambda: instantid.score("instantid", identities["instantid"], [output]))
        if scores[0] != scores[1]:
            raise RuntimeError("the cached identity score differs")
        if index:
            log(f"  encoder round {index}/{profile.encoder_runs}: " + ", ".join(
                f"{g}/{s} {sides[(g, s)].times[-1] * 1e3:.2f} ms" for g, s in sides))

    cache_files = sorted((paths.cache_dir() / "references").glob("*.safetensors"))
    return {
        "reference_side": profile.reference_side, "output_side": profile.width, "rounds": profile.encoder_runs,
        "first_call": first_call,
        "groups": {g: {"what": what, "counter": counter, "steps": {
            s: {**_side_record(sides[(g, s)]), "runs": runs[(g, s)], "runs_total": sum(runs[(g, s)])} for s in steps}}
            for g, (what, counter, steps) in ENCODER_GROUPS.items()},
        "disk_cache_files": len(cache_files),
        "disk_cache_file_bytes": sorted({f.stat().st_size for f in cache_files}),
        "cached_results_identical": True,
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
    ip, ch = report["ip_adapter"], report["character_weights"]
    packs = ", ".join(f"{p} ({', '.join(a['files'].values())}; {', '.join(a['providers'])})"
                      for p, a in ch["face_analysis"].items())
    analyses = report["face_analyses_during_timed_generation"]
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
        f"- character weights: the tests' tiny ones in the published layouts: FaceID-Plus-v2 (tests/tiny_faceid.py, "
        f"{ch['faceid_parameters']:,} parameters incl. its LoRA), InstantID face adapter (tests/tiny_instantid.py, "
        f"{ch['instantid_parameters']:,}) and IdentityNet ({ch['identitynet_parameters']:,}); face packs: the tests' tiny "
        f"insightface packs (tests/tiny_faces.py: constant SCRFD-shaped detector, small random ArcFace): {packs}. "
        "Character photo: one random 512x512 picture (the tiny detector reports the same face in any photo)",
        f"- {report['runs']} timed rounds after 1 warm-up per variant; each round runs all {len(report['cases'])} "
        "variants, forward order on even rounds and reversed on odd ones; one process. Every case but the two "
        "`reloading` ones has its own engine (identical weights), so its adapters stay loaded; the two `reloading` "
        "variants share one engine and unload the IP-Adapter before each timed call, so each call pays unload + load",
        f"- encoder runs during the timed generations: {sum(report['encoder_runs_during_timed_generation'].values())}; "
        f"face analyses: {sum(analyses.values())} (embeddings, face detections and the outputs' identity scores are "
        "cached since the warm-up, same seed, same output: these times are the adapters' extra work in the "
        "denoising loop; a request with a new output also pays one face analysis per output image for its score, "
        "measured below)",
        "- peak memory: " + ("torch.cuda.max_memory_allocated during the call (weights included)" if dev == "cuda"
                             else "rise of the process's resident set (VmHWM − RSS before) during the call"),
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
    lines += [
        "",
        f"**Reference and character encoding** ({enc['rounds']} rounds after 1 warm-up round, a new "
        f"{enc['reference_side']}x{enc['reference_side']} image each round, used as style image and as character photo; "
        f"the score step analyses a new {enc['output_side']}x{enc['output_side']} image; REFGEN_HOME a new empty "
        "temporary folder; times include hashing the picture for the cache key; runs = CLIP encoder runs "
        "(`encoder_runs`) or face analyses run (face-cache misses)):",
        "",
        "| what | step | ms median (min–max) | × cold | runs per call (total over rounds) |",
        "|---|---|---|---:|---|",
    ]
    for group in enc["groups"].values():
        cold = group["steps"]["cold"]["median_s"]
        for name, s in group["steps"].items():
            per_call = sorted(set(s["runs"]))
            lines.append(f"| {group['what'] if name == 'cold' else ''} | {STEP_NAMES[name]} | "
                         f"{_range(s, unit=1e-3, fmt='.2f')} | {s['median_s'] / cold:.3f} | "
                         f"{', '.join(map(str, per_call))} {group['counter']} ({s['runs_total']}) |")
    firsts = "; ".join(f"{g} {f['s'] * 1e3:.1f} ms ({f['runs']} runs)" for g, f in enc["first_call"].items())
    sizes = ", ".join(map(str, enc["disk_cache_file_bytes"]))
    lines += ["", f"The very first cold call of each kind in the process (warm-up round, in no median): {firsts}. "
                  f"Disk cache after the run: {enc['disk_cache_files']} files ({sizes} bytes); cached embeddings, "
                  "identities and scores are identical to the computed ones (checked every round).",
              "", f"Raw timings: `{report['json']}`"]
    return "\n".join(lines)


# -- dry run: full-size character weights on the meta device -------------------------------------

# Real sizes (tests/tiny_faceid.py and tests/tiny_instantid.py docstrings): FaceID-Plus-v2 reads CLIP ViT-H's
# 1280-wide penultimate hidden states of the face crop and carries a rank-128 LoRA; InstantID's Resampler is
# 1280 wide (20 heads of 64). Both project the 512-d ArcFace embedding to SDXL's cross-attention width (2048).
FULL_FACEID = {"clip_hidden": 1280, "lora_rank": 128}
FULL_INSTANTID_DIM = 1280
FULL_SHAPES = {  # key -> the published shape, as the docstrings give them
    "faceid": {"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.2.weight": (8192, 1024),
               "image_proj.perceiver_resampler.layers.0.0.to_kv.weight": (4096, 2048),
               "image_proj.perceiver_resampler.layers.0.1.1.weight": (8192, 2048),
               "image_proj.perceiver_resampler.proj_in.weight": (2048, 1280)},
    "instantid": {"image_proj.latents": (1, 16, 1280), "image_proj.layers.0.0.to_kv.weight": (2560, 1280),
                  "image_proj.layers.0.1.1.weight": (5120, 1280), "image_proj.proj_in.weight": (1280, 512),
                  "image_proj.proj_out.weight": (2048, 1280)},
}


def full_size_character_state_dicts(unet, device="meta") -> dict:
    """FaceID-Plus-v2 and InstantID state dicts at the published sizes for a full-size SDXL UNet, random (the tests'
    builders, flat `image_proj.` / `ip_adapter.` keys as diffusers' load_ip_adapter reads them). On meta: no memory."""
    faceid, instantid = _tests_module("tiny_faceid"), _tests_module("tiny_instantid")
    with torch.device(device):
        return {"faceid": faceid.tiny_faceid_plusv2_state_dict(unet, **FULL_FACEID),
                "instantid": instantid.tiny_instantid_state_dict(unet, dim=FULL_INSTANTID_DIM)}


def dry_run() -> int:
    """Full-size SDXL UNet, FaceID-Plus-v2, InstantID and IdentityNet on meta: counts, shapes, one projection
    forward each through diffusers' own image-projection classes. No memory, no compute."""
    import bench_guidance
    from engine import sdxl_configs as cfg

    ok = True
    unet = cfg.build_sdxl_unet_on_meta()
    count = sum(p.numel() for p in unet.parameters())
    ok &= count == cfg.SDXL_UNET_PARAMETERS
    attn2 = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    print(f"unet {count:,} parameters ({'ok' if count == cfg.SDXL_UNET_PARAMETERS else 'MISMATCH'}), "
          f"{len(unet.attn_processors)} attention layers, {len(attn2)} cross-attention")
    states = full_size_character_state_dicts(unet)
    for name, state in states.items():
        total = sum(v.numel() for v in state.values())
        wrong = {k: tuple(state[k].shape) for k, shape in FULL_SHAPES[name].items() if tuple(state[k].shape) != shape}
        kv = sum(k.endswith("to_k_ip.weight") for k in state)
        lora = sum(k.endswith("_lora.down.weight") for k in state)
        ok &= not wrong and kv == len(attn2)
        nested = _tests_module("tiny_instantid").nested(state)
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(nested["image_proj"])
        rows = torch.empty(2, 1, 512, device="meta")  # CFG rows of one ArcFace embedding
        if name == "faceid":
            projection.clip_embeds = torch.empty(2, 1, 257, FULL_FACEID["clip_hidden"], device="meta")  # ViT-H, 224 px
            projection.shortcut = True
        with torch.no_grad():
            tokens = projection(rows)
        print(f"{name}: {total:,} parameters ({total * 2 / 2**30:.2f} GiB fp16), {kv} to_k_ip/to_v_ip pairs, "
              f"{lora} LoRA projections, shapes {'ok' if not wrong else 'WRONG ' + str(wrong)}; diffusers "
              f"{type(projection).__name__} ({sum(p.numel() for p in projection.parameters()):,}): (2, 1, 512) -> "
              f"{tuple(tokens.shape)}")
    identitynet = bench_guidance.full_size_controlnet(unet, "meta", torch.float16, 0)
    print(f"identitynet (ControlNetModel.from_unet): {sum(p.numel() for p in identitynet.parameters()):,} parameters, "
          f"cross_attention_dim {identitynet.config.cross_attention_dim}")
    print("ok" if ok else "MISMATCH")
    return 0 if ok else 1


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
    parser.add_argument("--dry-run", action="store_true",
                        help="full-size SDXL UNet + FaceID-Plus-v2 / InstantID / IdentityNet layouts on meta; no compute")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        update_results(args.results, report["label"], section(report))
        print(f"updated section {report['label']} of {args.results} from {args.from_json}")
        return 0
    from engine.devices import pick_device

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
