"""Running a manifest: work units (engine/batch/plan.py) through Engine.generate, PNGs named by line id, a results
file, resume.

Outputs: `<out>/<line id>-<n>.png`, n = 0 .. images - 1 (best_of: n is the rank), each a PNG with refgen's
provenance as `refgen generate` writes it, written atomically (a temp file beside it, then a rename: a kill leaves
the file whole or absent). Temp files a killed run left behind are removed when the next run starts in that folder
(one run per folder at a time).

Results: `<out>/results.jsonl`, appended and flushed (and fsynced) record by record: one record per manifest line
and attempt, {line, id, status, model, outputs, seeds, identity_scores, error, seconds}. status is done (images
written now), skipped (every output was already there: a resumed run), or failed (error says why; a line that could
not be read has no id). seconds is the line's share of its unit's time. The last record of an id wins (read_results).

Resume: re-running the same manifest into the same folder skips every line whose outputs all exist and open as PNGs,
and reruns the units with an output missing, writing only the missing files (see plan.py for why a whole unit).
Killing the process loses only the unit in flight. Errors do not stop the run: a unit that raises fails its lines
(any exception: one broken request must not end an overnight batch), and a model that cannot load fails the lines
that need it, once.

Who runs the units: `run_batch(runner=...)`. By default this process, one unit after the other (in_process); on a
Ray cluster, engine/batch/distributed.py. A runner only makes units (make_unit: PNG bytes in memory); the process
that called run_batch writes every PNG (write_unit) and every record, so it is the single writer of the folder.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Optional, Union

from PIL import Image

from ..errors import OutputPathError, RefgenError
from ..images import STAGING_NAME, write_atomic
from ..provenance import png_bytes
from .manifest import BatchLine, Manifest
from .plan import MAX_MERGED_IMAGES, WorkUnit, plan_batch

RESULTS_FILE = "results.jsonl"
OUTPUT_NAME = re.compile(r"[0-9a-f]{16}-\d+\.png")


@dataclass(frozen=True)
class LineRecord:
    """One line's outcome in one run: a line of results.jsonl."""

    line: int
    id: Optional[str]
    status: str  # done | skipped | failed
    model: Optional[str] = None
    outputs: list[str] = field(default_factory=list)  # file names in the output folder
    seeds: list[int] = field(default_factory=list)
    identity_scores: list = field(default_factory=list)  # character requests: one per image (None: no face)
    error: Optional[str] = None
    seconds: float = 0.0


@dataclass
class BatchSummary:
    results: Path
    done: int = 0
    skipped: int = 0
    failed: int = 0
    images_written: int = 0

    def count(self, record: LineRecord, written: int) -> None:
        setattr(self, record.status, getattr(self, record.status) + 1)
        self.images_written += written


@dataclass(frozen=True)
class UnitOutput:
    """What one engine call made for a unit, not yet written: the PNG files its lines lacked (name -> bytes, with
    provenance), each line's seeds and identity scores (by line id); or the error that stopped it. Plain data, so it
    travels between processes (a Ray actor makes it, the driver writes it)."""

    files: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0


RecordCallback = Callable[[LineRecord, int], None]  # (record, images it wrote)
UnitRunner = Callable[[list, Path], Iterable[tuple[LineRecord, int]]]  # (pending units, out) -> (record, written)s


def run_batch(manifest: Manifest, out: Union[str, Path], load_engine: Optional[Callable[[str], object]] = None,
              on_record: Optional[RecordCallback] = None, max_images: int = MAX_MERGED_IMAGES,
              runner: Optional[UnitRunner] = None) -> BatchSummary:
    """Run every line of `manifest` into `out` (see the module docstring). `load_engine(model)` returns an Engine; it
    is called once per model that has work left, models one after the other. `on_record(record, images_written)` is
    called after each record is in the results file (progress). `runner(units, out)` runs the units that have work
    left and yields their records (default: in_process(load_engine); a Ray cluster: distributed.RayUnits)."""
    if runner is None:
        if load_engine is None:
            raise TypeError("run_batch needs load_engine (or a runner)")
        runner = in_process(load_engine)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file: batch outputs go into a folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_staging(out)
    summary = BatchSummary(out / RESULTS_FILE)
    units = plan_batch(manifest.valid, max_images)
    same_id: dict[str, list[BatchLine]] = {}
    for line in manifest.valid:
        same_id.setdefault(line.id, []).append(line)
    with _ResultsFile(summary.results) as results:
        def emit(record: LineRecord, written: int = 0) -> None:
            numbers = [line.number for line in same_id.get(record.id, [])] or [record.line]
            for number in numbers:  # a repeated line (same id) shares the first one's outputs and outcome
                shown = replace(record, line=number)
                results.append(shown)
                summary.count(shown, written if number == record.line else 0)
                if on_record is not None:
                    on_record(shown, written if number == record.line else 0)

        for line in manifest.lines:
            if not line.ok:
                emit(LineRecord(line.number, None, "failed", error=line.error))
        pending = []
        for unit in units:
            if all(complete(out, line) for line in unit.lines):
                for line in unit.lines:
                    emit(LineRecord(line.number, line.id, "skipped", unit.model, line.output_names(), line.seeds))
            else:
                pending.append(unit)
        for record, written in runner(pending, out):
            emit(record, written)
    return summary


def in_process(load_engine: Callable[[str], object]) -> UnitRunner:
    """The default runner: the units one after the other in this process, one loaded engine at a time."""
    def run(units: list[WorkUnit], out: Path) -> Iterator[tuple[LineRecord, int]]:
        engines = _Engines(load_engine)
        for unit in units:
            yield from run_unit(unit, engines.get, out)
    return run


def run_unit(unit: WorkUnit, engine_for: Callable[[str], object], out: Path) -> list[tuple[LineRecord, int]]:
    """Generate the unit's whole batch and write the outputs that are missing; (record, images written) per line."""
    return write_unit(unit, make_unit(unit, engine_for, missing_outputs(out, unit)), out)


def missing_outputs(out: Path, unit: WorkUnit) -> list[str]:
    """The unit's output names that are not in `out` as valid PNGs."""
    return [name for line in unit.lines for name in line.output_names() if not valid_png(out / name)]


def make_unit(unit: WorkUnit, engine_for: Callable[[str], object], missing: Collection[str]) -> UnitOutput:
    """Generate the unit's whole batch; the PNG bytes of the outputs named in `missing`. Never raises: any failure is
    the UnitOutput's error."""
    started = time.perf_counter()
    try:
        result = engine_for(unit.model).generate(unit.request)
        files, seeds, scores = {}, {}, {}
        for line, part in unit.slices():
            for n, name in enumerate(line.output_names()):
                if name in missing:
                    files[name] = png_bytes(result.images[part][n], result.metadata[part][n])
            seeds[line.id] = list(result.seeds[part])
            scores[line.id] = [meta.get("identity_score") for meta in result.metadata[part]]
    except Exception as exc:  # noqa: BLE001 - any failure of one unit is recorded; the run goes on
        return UnitOutput(error=error_text(exc), seconds=time.perf_counter() - started)
    return UnitOutput(files, seeds, scores, seconds=time.perf_counter() - started)


def write_unit(unit: WorkUnit, made: UnitOutput, out: Path) -> list[tuple[LineRecord, int]]:
    """Write a unit's new PNGs atomically into `out`; (record, images written) per line. A unit that failed, or whose
    files cannot be written, fails every line of it."""
    started = time.perf_counter()
    error = made.error
    if error is None:
        try:
            for name, data in made.files.items():
                write_atomic(out / name, data)
        except Exception as exc:  # noqa: BLE001 - a full disk fails this unit's lines, recorded; the run goes on
            error = error_text(exc)
    seconds = made.seconds + time.perf_counter() - started
    if error is not None:
        return [(LineRecord(line.number, line.id, "failed", unit.model, seeds=line.seeds, error=error,
                            seconds=seconds / len(unit.lines)), 0) for line in unit.lines]
    records = []
    for line in unit.lines:
        written = sum(name in made.files for name in line.output_names())
        scores = made.scores[line.id]
        records.append((LineRecord(line.number, line.id, "done" if written else "skipped", unit.model, line.output_names(),
                                   made.seeds[line.id], scores if any(score is not None for score in scores) else [],
                                   seconds=round(seconds * line.image_count / unit.image_count, 4)), written))
    return records


def error_text(exc: BaseException) -> str:
    """A failure as a results record shows it: refgen's own message, or the exception's type and message."""
    return str(exc) if isinstance(exc, RefgenError) else f"{type(exc).__name__}: {exc}"


class _Engines:
    """One loaded engine at a time (units come sorted by model); a model that failed to load is not retried."""

    def __init__(self, load: Callable[[str], object]):
        self._load, self._model, self._engine, self._failed = load, None, None, {}

    def get(self, model: str):
        if model in self._failed:
            raise self._failed[model]
        if model != self._model:
            self._engine = None  # free the previous model before loading the next
            try:
                self._engine, self._model = self._load(model), model
            except Exception as exc:  # noqa: BLE001 - remembered, and raised for each unit of this model
                self._failed[model] = exc
                raise
        return self._engine


class _ResultsFile:
    """results.jsonl opened for appending; each record is flushed and fsynced before the next is made."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_ResultsFile":
        self._handle = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def append(self, record: LineRecord) -> None:
        self._handle.write(json.dumps(asdict(record)) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())


def complete(out: Path, line: BatchLine) -> bool:
    return all(valid_png(out / name) for name in line.output_names())


def valid_png(path: Path) -> bool:
    """The file exists and is a PNG whose chunks check out (a truncated or foreign file is redone)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def remove_staging(out: Path) -> None:
    """Delete the temp files of outputs (`.<id>-<n>.png.<random>.partial`) a killed run left behind."""
    for path in out.iterdir():
        match = STAGING_NAME.fullmatch(path.name)
        if match and OUTPUT_NAME.fullmatch(match["target"]):
            path.unlink(missing_ok=True)


def read_results(path: Union[str, Path]) -> dict:
    """The last record of each line id (a line without an id, by `line <number>`); an unreadable line is skipped
    (a file written by a killed run ends with a whole record, but a hand-edited one may not)."""
    records = {}
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        records[record.get("id") or f"line {record.get('line')}"] = record
    return records
