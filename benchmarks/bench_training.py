"""LoRA training: refgen's train_lora against diffusers' own DreamBooth LoRA SDXL script, same data and settings.

The reference is diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py`, which is not in the pip
package and is not copied into this repository (licence / copy policy): fetch it once at the tag of the
installed diffusers, or the newest tag at or below it, and pass its path with `--diffusers-script`:

    mkdir -p /tmp/diffusers_scripts && curl -L -o /tmp/diffusers_scripts/train_dreambooth_lora_sdxl.py \\
      https://raw.githubusercontent.com/huggingface/diffusers/v0.40.0/examples/dreambooth/train_dreambooth_lora_sdxl.py

(the results record which tag and the file's sha256). It needs accelerate, peft, torchvision and
transformers (all refgen dependencies); `datasets` only for hub datasets and `tensorboard` only for its
default logger, neither used here (`--report_to` is left at its default: accelerate skips a tracker whose
package is missing, with a warning).

Method. Each side runs in its own child process, one after the other (so that its peak memory is its own),
on the same saved model folder (random weights: `engine.tiny` for cpu-tiny; full-size SDXL built from
engine/sdxl_configs.py for gpu-sdxl), the same synthetic images, one caption (the trigger / instance prompt),
the same rank (alpha = rank), learning rate (constant, no warm-up), steps, batch size, square resolution with
a centre crop, seed, AdamW (0.9/0.999, wd 1e-4), gradient clipping 1.0, no validation, no intermediate
checkpoints. Pairs of runs alternate the order (refgen first, then diffusers first, ...).

  refgen     train_lora(TrainingRequest(..., bucketing=False, crop="centre", checkpoint_every=0), device, dtype)
  diffusers  the script, run in the child by runpy with its own command line (flags in the results). It has no
             --cache_latents (only the "advanced" and Flux scripts do): it VAE-encodes every batch. The child
             therefore memoises AutoencoderKL.encode per image (key: the pixels' sum and a fixed random
             projection, computed on the device) so that each image is encoded once, like refgen's cached
             latents; the posterior is still sampled every step as the script does. `--sides diffusers-encode`
             adds a run of the script exactly as published (encoding every step).

Timing: both the script and train_lora drive a tqdm bar of `total=steps` for the optimizer steps; the child
replaces tqdm.auto.tqdm with a subclass that takes a clock reading (after a CUDA synchronize) at the bar's
creation (everything before it, model loading and encoding, is "setup") and at every update(). s/step is the
mean over the steps after `warmup` (last reading minus the warm-up's last, divided by the timed steps); the
median step is recorded too. refgen/diffusers ratios are per pair (same position in the machine's drift),
then the median over pairs.

Memory: CUDA: torch.cuda.max_memory_allocated up to the last step (whole run: loading, encoding and the loop),
and the loop's own peak (reset at the bar's creation). CPU: the process's resident high-water mark (VmHWM)
up to the last step, and the loop's (VmHWM reset through /proc/self/clear_refs at the bar's creation).
Post-loop work (saving, the script's final pipeline load for its model card) is outside both figures.

    python benchmarks/bench_training.py --diffusers-script /tmp/diffusers_scripts/train_dreambooth_lora_sdxl.py
    python benchmarks/bench_training.py --profile gpu-sdxl --dry-run --diffusers-script ...   # the plan, no run
    python benchmarks/bench_training.py --device cuda --full-size ...     # = --profile gpu-sdxl
    BENCH=training bash benchmarks/run_on_gpu_machine.sh    # device tool, carry [".whl", ".diffusers_scripts"]

On the GPU machine the script is looked for in .diffusers_scripts/ (run_on_gpu_machine.sh; DIFFUSERS_SCRIPT
names another path). One pair at gpu-sdxl builds and saves the model (~7 GB), then loads it in each child:
about 5 minutes; run it with timeout_s ~540 so that a second try fits the session's device time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import CpuPeak, environment, save_report  # noqa: E402  (sets HF_HUB_OFFLINE, root on path)

import torch  # noqa: E402

TRIGGER = "zxq person"
SIDES = ("refgen", "diffusers", "diffusers-encode")


@dataclass(frozen=True)
class TrainProfile:
    name: str
    model: str  # tiny | sdxl-random
    device: str
    dtype: str  # fp32 (mixed precision off) | bf16
    resolution: int
    image_size: int  # the synthetic images' side (>= resolution)
    images: int
    steps: int  # optimizer steps per run, warm-up included
    warmup: int  # steps left out of s/step
    batch: int
    rank: int
    learning_rate: float = 1e-4
    gradient_checkpointing: bool = False
    repeats: int = 3  # pairs of runs (refgen, diffusers), order alternating
    threads: Optional[int] = None
    seed: int = 0


PROFILES = {
    "cpu-tiny": TrainProfile("cpu-tiny", "tiny", "cpu", "fp32", 64, 64, 10, steps=200, warmup=10, batch=2, rank=4,
                             repeats=5, threads=1),
    # The issue's GPU setting: full-size SDXL (random weights), rank 16, 1024², batch 1, checkpointing, bf16.
    "gpu-sdxl": TrainProfile("gpu-sdxl", "sdxl-random", "cuda", "bf16", 1024, 1024, 10, steps=25, warmup=5, batch=1,
                             rank=16, gradient_checkpointing=True, repeats=1),
}
TARGET = "no slower than diffusers' script, and <= 16 GiB peak VRAM with gradient checkpointing (gpu-sdxl)"


# -- the inputs on disk ----------------------------------------------------------------------------


def save_model(profile: TrainProfile, folder: Path) -> Path:
    if (folder / "model_index.json").exists():
        return folder
    if profile.model == "tiny":
        from engine.tiny import save_tiny_model

        return save_tiny_model(folder, seed=0)
    from engine.sdxl_configs import build_random_sdxl_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init on the GPU is minutes faster
    pipe = build_random_sdxl_pipeline(device, torch.bfloat16, 0)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def save_images(profile: TrainProfile, folder: Path) -> Path:
    """`images` smooth random colour fields with a little noise (PNG), the same files for both sides."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    size = profile.image_size
    for index in range(profile.images):
        path = folder / f"img{index:02d}.png"
        if path.exists():
            continue
        rng = np.random.default_rng(1000 + index)
        coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse, np.float32) + rng.normal(0, 8, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return folder


# -- the sides, each in a child process ------------------------------------------------------------


def diffusers_arguments(spec: dict) -> list[str]:
    """The script's command line for the profile (no validation, no intermediate checkpoints)."""
    args = ["--pretrained_model_name_or_path", spec["model"], "--instance_data_dir", spec["images"],
            "--instance_prompt", TRIGGER, "--output_dir", spec["out"], "--resolution", str(spec["resolution"]),
            "--center_crop", "--train_batch_size", str(spec["batch"]), "--max_train_steps", str(spec["steps"]),
            "--learning_rate", str(spec["learning_rate"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--rank", str(spec["rank"]), "--seed", str(spec["seed"]), "--checkpointing_steps", "100000000",
            "--dataloader_num_workers", "0", "--mixed_precision", "no" if spec["dtype"] == "fp32" else spec["dtype"]]
    if spec["gradient_checkpointing"]:
        args.append("--gradient_checkpointing")
    return args


class StepClock:
    """Clock readings at the training bar's creation and at each of its updates, with memory peaks."""

    def __init__(self, device: torch.device, total: int):
        self.device, self.total = device, total
        self.process_start = time.perf_counter()
        self.bar_start: Optional[float] = None
        self.ticks: list[float] = []
        self.cpu_ticks: list[float] = []  # process CPU time (user + sys, all threads) at the same readings
        self.memory: dict = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    _status = staticmethod(CpuPeak._status)  # /proc/self/status fields in bytes (VmHWM, VmRSS)

    def start(self, total) -> bool:
        if self.bar_start is not None or total != self.total:
            return False
        self._sync()
        self.bar_start = time.perf_counter()
        self.cpu_start = time.process_time()
        if self.device.type == "cuda":
            self.memory["setup_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.memory["loop_start_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.memory["setup_hwm_bytes"] = self._status("VmHWM")
        self.memory["loop_start_rss_bytes"] = self._status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.memory["hwm_reset"] = True
        except OSError:
            self.memory["hwm_reset"] = False
        return True

    def tick(self, count: int = 1):
        self._sync()
        now, cpu = time.perf_counter(), time.process_time()
        self.ticks.extend([now] * count)
        self.cpu_ticks.extend([cpu] * count)
        if len(self.ticks) == self.total:
            if self.device.type == "cuda":
                self.memory["loop_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
                self.memory["peak_bytes"] = max(self.memory["loop_peak_bytes"], self.memory["setup_peak_bytes"])
            hwm = self._status("VmHWM")
            self.memory["loop_hwm_bytes"] = hwm
            self.memory["rss_peak_bytes"] = max(hwm or 0, self.memory.get("setup_hwm_bytes") or 0)

    def install(self):
        import tqdm.auto

        clock, base = self, tqdm.auto.tqdm

        class ClockedBar(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._clocked = clock.start(getattr(self, "total", None))

            def update(self, n=1):
                if getattr(self, "_clocked", False):
                    clock.tick(int(n))
                return super().update(n)

        tqdm.auto.tqdm = ClockedBar

    def summary(self, warmup: int) -> dict:
        if len(self.ticks) < self.total or self.bar_start is None:
            raise RuntimeError(f"the training bar was updated {len(self.ticks)} times of {self.total}")
        readings = [self.bar_start] + self.ticks
        steps = [b - a for a, b in zip(readings, readings[1:])]
        timed = self.total - warmup
        cpu_readings = [self.cpu_start] + self.cpu_ticks
        return {"setup_s": self.bar_start - self.process_start, "loop_s": self.ticks[-1] - self.bar_start,
                "s_per_step": (self.ticks[-1] - readings[warmup]) / timed, "median_step_s": statistics.median(steps[warmup:]),
                "cpu_s_per_step": (cpu_readings[-1] - cpu_readings[warmup]) / timed,
                "warmup_s": readings[warmup] - self.bar_start, "timed_steps": timed, "step_s": steps, **self.memory}


def memoise_vae_encode(counter: dict) -> None:
    """AutoencoderKL.encode computed once per distinct image (the script's --center_crop without --random_flip
    gives each image the same pixels every epoch): the posterior's parameters are cached per sample and the
    script samples from them as before. The key is computed on the device (one small transfer per batch)."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    original, cache, projections = AutoencoderKL.encode, {}, {}

    def keys(x: torch.Tensor) -> list[tuple]:
        shape = tuple(x.shape[1:])
        if (shape, x.device) not in projections:
            generator = torch.Generator("cpu").manual_seed(0)
            projections[(shape, x.device)] = torch.rand(shape, generator=generator, dtype=torch.float64).to(x.device)
        flat = x.double()
        sums = torch.stack([flat.flatten(1).sum(1), (flat * projections[(shape, x.device)]).flatten(1).sum(1)], 1)
        return [(shape, str(x.dtype), a, b) for a, b in sums.cpu().tolist()]

    def encode(self, x, return_dict: bool = True):
        found = keys(x)
        missing = [index for index, key in enumerate(found) if key not in cache]
        if missing:
            parameters = original(self, x[missing], return_dict=True).latent_dist.parameters
            for row, index in enumerate(missing):
                cache[found[index]] = parameters[row:row + 1]
        counter["encoded"] = counter.get("encoded", 0) + len(missing)
        counter["from_cache"] = counter.get("from_cache", 0) + len(found) - len(missing)
        dist = DiagonalGaussianDistribution(torch.cat([cache[key] for key in found]))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    AutoencoderKL.encode = encode


def run_child(side: str, spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    clock = StepClock(device, spec["steps"])
    clock.install()
    extra: dict = {}
    if side == "refgen":
        from engine.training import TrainingRequest, train_lora

        request = TrainingRequest(images=Path(spec["images"]), name="bench", trigger=TRIGGER, base_model=spec["model"],
                                  rank=spec["rank"], steps=spec["steps"], learning_rate=spec["learning_rate"],
                                  batch_size=spec["batch"], resolution=spec["resolution"], bucketing=False, crop="centre",
                                  seed=spec["seed"], precision=spec["dtype"],
                                  gradient_checkpointing=spec["gradient_checkpointing"], optimizer="adamw",
                                  checkpoint_every=0)
        result = train_lora(request, spec["out"], run_dir=Path(spec["out"]) / "run", device=spec["device"],
                            dtype=spec["dtype"], progress=False, overwrite=True)
        extra["final_loss"] = result.losses[-1]
    else:
        import runpy

        if side == "diffusers":
            memoise_vae_encode(extra)
        sys.argv = [spec["script"], *diffusers_arguments(spec)]
        runpy.run_path(spec["script"], run_name="__main__")
    summary = clock.summary(spec["warmup"])
    summary.update(extra, side=side, threads=torch.get_num_threads(), process_wall_s=time.perf_counter() - clock.process_start)
    return summary


def launch(side: str, spec: dict, workdir: Path, tag: str) -> dict:
    spec = dict(spec, out=str(workdir / f"out-{tag}"))
    spec_path, result_path = workdir / f"spec-{tag}.json", workdir / f"result-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, REFGEN_HOME=str(workdir / "home"), REFGEN_WEIGHTS=str(workdir / "home" / "weights"),
               HF_HUB_OFFLINE="1", TQDM_DISABLE="0")
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--spec", str(spec_path),
               "--result", str(result_path)]
    log_path = workdir / f"log-{tag}.txt"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{side} run {tag} failed (exit {code}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["child_wall_s"] = time.perf_counter() - started
    return result


# -- the comparison ------------------------------------------------------------------------------


def script_record(path: Path) -> dict:
    text = path.read_text()
    minimum = re.search(r'check_min_version\("([^"]+)"\)', text)
    return {"path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "check_min_version": minimum.group(1) if minimum else None,
            "has_cache_latents_flag": "--cache_latents" in text}


def run(profile: TrainProfile, script: Path, sides: list[str], workdir: Path, log) -> dict:
    started = time.perf_counter()
    model = save_model(profile, workdir / "model")
    images = save_images(profile, workdir / "images")
    log(f"model {model} and images {images} ready in {time.perf_counter() - started:.1f} s")
    spec = {**asdict(profile), "model": str(model), "images": str(images), "script": str(script),
            "learning_rate": profile.learning_rate}
    runs = []
    for pair in range(profile.repeats):
        order = sides if pair % 2 == 0 else list(reversed(sides))
        for side in order:
            result = launch(side, spec, workdir, f"{side}-{pair}")
            result["pair"] = pair
            runs.append(result)
            log(f"pair {pair} {side}: {result['s_per_step']:.4f} s/step (median step {result['median_step_s']:.4f}), "
                f"setup {result['setup_s']:.1f} s, peak {peak_text(result, profile)}")
    return summarise(profile, sides, runs)


def peak_of(result: dict, profile: TrainProfile) -> int:
    return result["peak_bytes"] if profile.device == "cuda" else result["rss_peak_bytes"]


def loop_peak_of(result: dict, profile: TrainProfile) -> int:
    return result["loop_peak_bytes"] if profile.device == "cuda" else result["loop_hwm_bytes"]


def loop_growth_of(result: dict, profile: TrainProfile) -> int:
    """The loop's peak above what was in memory when it started (activations, gradients, optimizer state)."""
    start = result["loop_start_allocated_bytes"] if profile.device == "cuda" else result["loop_start_rss_bytes"]
    return loop_peak_of(result, profile) - start


def peak_text(result: dict, profile: TrainProfile) -> str:
    return f"{peak_of(result, profile) / 2**30:.2f} GiB (loop {loop_peak_of(result, profile) / 2**30:.2f} GiB)"


def summarise(profile: TrainProfile, sides: list[str], runs: list[dict]) -> dict:
    per_side = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        per_side[side] = {
            "s_per_step_median": statistics.median(r["s_per_step"] for r in mine),
            "s_per_step_runs": [r["s_per_step"] for r in mine],
            "cpu_s_per_step_median": statistics.median(r["cpu_s_per_step"] for r in mine),
            "steps_per_s": 1 / statistics.median(r["s_per_step"] for r in mine),
            "setup_s_median": statistics.median(r["setup_s"] for r in mine),
            "peak_bytes_median": statistics.median(peak_of(r, profile) for r in mine),
            "loop_peak_bytes_median": statistics.median(loop_peak_of(r, profile) for r in mine),
            "loop_growth_bytes_median": statistics.median(loop_growth_of(r, profile) for r in mine),
            "vae_encodes": [(r.get("encoded"), r.get("from_cache")) for r in mine],
        }
    ratios = {}
    for side in sides:
        if side == "refgen":
            continue
        pairs = [(a, b) for a in runs if a["side"] == "refgen" for b in runs if b["side"] == side and b["pair"] == a["pair"]]
        ratios[f"refgen/{side}"] = {
            "s_per_step_paired": [a["s_per_step"] / b["s_per_step"] for a, b in pairs],
            "s_per_step_median": statistics.median(a["s_per_step"] / b["s_per_step"] for a, b in pairs),
            "cpu_s_per_step_median": statistics.median(a["cpu_s_per_step"] / b["cpu_s_per_step"] for a, b in pairs),
            "peak_median": statistics.median(peak_of(a, profile) / peak_of(b, profile) for a, b in pairs),
            "loop_peak_median": statistics.median(loop_peak_of(a, profile) / loop_peak_of(b, profile) for a, b in pairs),
            "loop_growth_median": statistics.median(loop_growth_of(a, profile) / max(1, loop_growth_of(b, profile))
                                                    for a, b in pairs),
        }
    return {"per_side": per_side, "ratios": ratios, "runs": runs}


def markdown(report: dict) -> str:
    profile, env, summary = report["profile"], report["environment"], report["summary"]
    memory = "peak VRAM (max_memory_allocated)" if profile["device"] == "cuda" else "peak RSS (VmHWM)"
    lines = [f"### training-{profile['name']}: LoRA training, refgen vs diffusers' train_dreambooth_lora_sdxl.py, "
             f"{env['device_name']}, {env['dtype']}, {report['date']}", "",
             f"`{report['command']}` (torch {env['torch']}, diffusers {env['diffusers']}, peft {env.get('peft')}, "
             f"accelerate {env.get('accelerate')}; script {report['script']['tag']}, sha256 {report['script']['sha256'][:12]}…)", "",
             f"Settings: model {profile['model']}, {profile['images']} images {profile['image_size']}², resolution "
             f"{profile['resolution']}² centre crop, batch {profile['batch']}, rank {profile['rank']} (alpha = rank), "
             f"lr {profile['learning_rate']} constant, AdamW, {profile['steps']} steps of which the first "
             f"{profile['warmup']} are warm-up, seed {profile['seed']}, gradient checkpointing "
             f"{'on' if profile['gradient_checkpointing'] else 'off'}, torch threads {profile['threads'] or 'default'}, "
             f"{profile['repeats']} pair(s) of runs alternating order.", "",
             f"diffusers flags: `{' '.join(report['diffusers_flags'])}`", "",
             f"| side | s/step (median of runs) | steps/s | runs s/step | CPU s/step | setup s (load + encode) | {memory}, whole run | in the loop | loop growth |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for side, row in summary["per_side"].items():
        lines.append(f"| {side} | {row['s_per_step_median']:.4f} | {row['steps_per_s']:.2f} | "
                     f"{', '.join(f'{v:.4f}' for v in row['s_per_step_runs'])} | {row['cpu_s_per_step_median']:.4f} | "
                     f"{row['setup_s_median']:.1f} | "
                     f"{row['peak_bytes_median'] / 2**30:.3f} GiB | {row['loop_peak_bytes_median'] / 2**30:.3f} GiB | {row['loop_growth_bytes_median'] / 2**20:.0f} MiB |")
    lines += ["", "| ratio | s/step (median of paired) | paired | CPU-time s/step | peak memory, whole run | in the loop | loop growth |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for name, row in summary["ratios"].items():
        lines.append(f"| {name} | **{row['s_per_step_median']:.3f}** | {', '.join(f'{v:.3f}' for v in row['s_per_step_paired'])} | "
                     f"{row['cpu_s_per_step_median']:.3f} | "
                     f"**{row['peak_median']:.3f}** | {row['loop_peak_median']:.3f} | {row['loop_growth_median']:.3f} |")
    memo = summary["per_side"].get("diffusers", {}).get("vae_encodes")
    lines += ["", "`diffusers`: the script with AutoencoderKL.encode memoised per image (latents cached, as refgen); "
              "`diffusers-encode`: the script as published (VAE encode every step). < 1: refgen faster / smaller. "
              f"Target: {TARGET}."
              + (f" Memoised side, per run (images VAE-encoded, taken from the memo): {memo}." if memo else ""), "", f"Raw figures: `benchmarks/results/training-{profile['name']}.json`"]
    return "\n".join(lines)


def dry_run(profile: TrainProfile, script: Optional[Path], sides: list[str]) -> int:
    """Print the plan; check the script's flags; at full size count the UNet on meta and the LoRA's factors."""
    print(f"profile {profile.name}: {json.dumps(asdict(profile))}")
    print(f"sides {sides}, {profile.repeats} pair(s), order alternating; target: {TARGET}")
    spec = {**asdict(profile), "model": "<workdir>/model", "images": "<workdir>/images", "out": "<workdir>/out-<run>"}
    print("refgen: train_lora(TrainingRequest(bucketing=False, crop='centre', checkpoint_every=0, precision="
          f"{profile.dtype!r}, gradient_checkpointing={profile.gradient_checkpointing}), device={profile.device!r})")
    print("diffusers: python <script> " + " ".join(diffusers_arguments(spec)))
    ok = True
    if script is None or not script.is_file():
        print(f"MISSING diffusers script: {script} (see this file's docstring)")
        ok = False
    else:
        record = script_record(script)
        text = script.read_text()
        flags = [flag for flag in diffusers_arguments(spec) if flag.startswith("--")]
        absent = [flag for flag in flags if f'"{flag}"' not in text]
        print(f"script {record}; flags the script lacks: {absent or 'none'}")
        ok = ok and not absent
    if profile.model == "sdxl-random":
        from engine.sdxl_configs import build_sdxl_unet_on_meta

        unet = build_sdxl_unet_on_meta()
        total = sum(p.numel() for p in unet.parameters())
        lora = 0
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
                lora += profile.rank * (module.in_features + module.out_features)
        print(f"full-size UNet on meta: {total:,} parameters; LoRA rank {profile.rank}: {lora:,} trainable parameters "
              f"({lora * 4 / 2**20:.1f} MiB fp32)")
    print("ok" if ok else "NOT READY")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES),
                        help="cpu-tiny (default), or gpu-sdxl (the default with --device cuda or --full-size)")
    parser.add_argument("--device", help="override the profile's device (cpu, cuda)")
    parser.add_argument("--full-size", action="store_true", help="full-size SDXL (random weights) instead of the tiny model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="override the profile's precision")
    parser.add_argument("--resolution", type=int, help="override the profile's resolution (and image size)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--diffusers-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py")
    parser.add_argument("--script-tag", default="v0.40.0", help="the diffusers tag the script was taken from (recorded)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["refgen", "diffusers"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workdir", type=Path, help="model, images and run folders (default: a temp folder)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where the .json and .md go")
    parser.add_argument("--no-write", action="store_true", help="print only; RESULTS.md and results/ untouched")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the script; run nothing")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.spec.read_text())
        args.result.write_text(json.dumps(run_child(args.child, spec)))
        return 0
    name = args.profile or ("gpu-sdxl" if args.full_size or args.device == "cuda" else "cpu-tiny")
    profile = PROFILES[name]
    overrides = {key: value for key, value in (("steps", args.steps), ("warmup", args.warmup), ("repeats", args.repeats),
                                               ("threads", args.threads), ("device", args.device), ("dtype", args.dtype),
                                               ("resolution", args.resolution), ("batch", args.batch), ("rank", args.rank))
                 if value is not None}
    if args.full_size:
        overrides["model"] = "sdxl-random"
    if args.resolution:
        overrides["image_size"] = args.resolution
    if any(getattr(profile, key) != value for key, value in overrides.items()
           if key in ("device", "dtype", "resolution", "image_size", "batch", "rank", "model")):
        overrides["name"] = f"{name}-custom"  # its own result files: the profile's committed ones stay
    profile = replace(profile, **overrides)
    if "refgen" not in args.sides:
        args.sides.insert(0, "refgen")
    if args.dry_run:
        return dry_run(profile, args.diffusers_script, args.sides)
    if args.diffusers_script is None or not args.diffusers_script.is_file():
        parser.error("--diffusers-script PATH is required (see the docstring for where to get it)")
    if profile.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the gpu-sdxl profile runs on the GPU machine (run_on_gpu_machine.sh, BENCH=training)")
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-training-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = run(profile, args.diffusers_script.resolve(), args.sides, workdir, lambda text: print(text, flush=True))
    device = torch.device(profile.device)
    env = environment(device, torch.bfloat16 if profile.dtype == "bf16" else torch.float32, ("peft", "accelerate"))
    env["torch_threads"] = profile.threads or env["torch_threads"]
    env["loadavg_1_5_15_end"] = list(os.getloadavg())
    spec = {**asdict(profile), "model": "<workdir>/model", "images": "<workdir>/images", "out": "<workdir>/out-<run>"}
    command = "python benchmarks/bench_training.py " + " ".join(
        arg if not str(arg).startswith("/") else f"<{Path(arg).name}>" for arg in (argv if argv is not None else sys.argv[1:]))
    report = {"profile": asdict(profile), "environment": env, "date": env["date_utc"], "command": command.strip(),
              "script": {**script_record(args.diffusers_script), "tag": args.script_tag}, "sides": args.sides,
              "diffusers_flags": diffusers_arguments(spec), "summary": summary, "target": TARGET}
    text = markdown(report)
    print(text)
    if not args.no_write:
        save_report(report, args.results / f"training-{profile.name}.json", HERE / "RESULTS.md", f"training-{profile.name}",
                    text, markdown=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
