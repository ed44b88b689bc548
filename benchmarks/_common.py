"""Shared pieces of the benchmark scripts (bench_generate.py, bench_guidance.py): timing one call
(wall + process CPU time + peak memory), per-side statistics, the environment record, and
replacing a marked section of RESULTS.md.

Importing this module puts the repository root on sys.path (so `engine` and `adapters` import
from a checkout), sets HF_HUB_OFFLINE=1 and silences deprecation noise, as the scripts always did.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class BenchProfile:
    """What every benchmark profile names: the model, where it runs, the image, and how often."""

    name: str
    model: str  # tiny | sdxl-random (bench_generate.build)
    device: str
    dtype: str
    width: int
    height: int
    steps: int
    batch: int = 1
    guidance: float = 7.0
    scheduler: str = "euler"
    runs: int = 5
    threads: Optional[int] = None  # torch intra-op threads; None = torch's default (all cores)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402


# -- memory ------------------------------------------------------------------------------------


class CpuPeak:
    """Peak resident memory of this process during a block, as a delta over the RSS before it.

    Linux: freed heap is first returned to the OS (malloc_trim) so that one side cannot reuse the
    other's pages unseen, then the kernel's high-water mark is reset (/proc/self/clear_refs = 5)
    and VmHWM read afterwards. Elsewhere, or where clear_refs is refused, a 1 ms sampler thread.
    """

    def __init__(self):
        self._trim = None
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            pass
        self._hwm_ok = self._reset_hwm()

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def _rss(self) -> int:
        value = self._status("VmRSS")
        if value is not None:
            return value
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort (monotonic)

    def measure(self, fn: Callable[[], object]) -> tuple[object, int]:
        if self._trim is not None:
            self._trim(0)
        before = self._rss()
        if self._hwm_ok and self._reset_hwm():
            result = fn()
            peak = self._status("VmHWM") or before
            return result, max(0, peak - before)
        samples, stop = [before], threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(self._rss())
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            stop.set()
            thread.join()
        return result, max(0, max(samples) - before)


# -- one case ----------------------------------------------------------------------------------


@dataclass
class Side:
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (user+sys, all threads)
    peaks: list[int] = field(default_factory=list)  # bytes: GPU max allocated (absolute) or CPU RSS delta
    warmup_s: float = 0.0

    def summary(self) -> dict:
        return {
            "median_s": statistics.median(self.times),
            "min_s": min(self.times),
            "max_s": max(self.times),
            "mean_s": statistics.fmean(self.times),
            "cpu_median_s": statistics.median(self.cpu_times),
            "cpu_min_s": min(self.cpu_times),
            "cpu_max_s": max(self.cpu_times),
            "stdev_s": statistics.stdev(self.times) if len(self.times) > 1 else 0.0,
            "peak_bytes": max(self.peaks),
            "warmup_s": self.warmup_s,
        }


def compare(a: Side, b: Side) -> dict:
    """a against b: ratio of medians, per-round (paired) ratios, ratio of CPU-time medians."""
    paired = [x / y for x, y in zip(a.times, b.times)]
    return {
        "ratio": statistics.median(a.times) / statistics.median(b.times),
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "cpu_time_ratio": statistics.median(a.cpu_times) / statistics.median(b.cpu_times),
    }


def gpu_missing(device: torch.device) -> bool:
    """True (after saying so) when a profile wants CUDA on a machine without it."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print("this profile needs a CUDA GPU (torch.cuda.is_available() is False); see benchmarks/README.md, "
              "or --dry-run to check the full-size build on meta", file=sys.stderr)
        return True
    return False


def save_report(report: dict, json_path: Path, results: Path, label: str, text: str, markdown: bool = False) -> None:
    """Write the raw JSON (and with `markdown`, the section as a .md beside it) and replace section `label` of the
    results table."""
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown:
        json_path.with_suffix(".md").write_text(text + "\n")
    update_results(results, label, text)
    print(f"wrote {json_path}{' (+ .md)' if markdown else ''} and updated section {label} of {results}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, cpu_peak: CpuPeak) -> tuple[object, float, float, int]:
    """(result, wall seconds, process CPU seconds, peak memory bytes) of one call."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        cpu_start, start = time.process_time(), time.perf_counter()
        result = fn()
        sync(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return result, elapsed, cpu, torch.cuda.max_memory_allocated(device)
    box = {}

    def run():
        cpu_start, start = time.process_time(), time.perf_counter()
        box["result"] = fn()
        box["elapsed"], box["cpu"] = time.perf_counter() - start, time.process_time() - cpu_start

    _, peak = cpu_peak.measure(run)
    return box["result"], box["elapsed"], box["cpu"], peak



def gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def environment(device: torch.device, dtype: torch.dtype, extra_packages: tuple[str, ...] = ()) -> dict:
    """Device name, date (UTC), versions, threads and load: recorded with every result.

    extra_packages: more distributions whose version is recorded under their own name (e.g. spandrel).
    """
    import diffusers
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
            name = model or name
        except OSError:
            pass
    record = {
        "device": device.type,
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }
    for package in extra_packages:
        try:
            from importlib.metadata import version

            record[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed: recorded as such
            record[package] = None
    return record


def update_results(results_md: Path, profile_name: str, body: str) -> None:
    begin, end = f"<!-- BEGIN {profile_name} -->", f"<!-- END {profile_name} -->"
    block = f"{begin}\n{body}\n{end}"
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results_md.write_text(text)


