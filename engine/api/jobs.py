"""The local API's job runner: a worker thread takes queued generations from the AssetStore, runs
them on its one loaded Engine and records the images (or the error).

    store = AssetStore()
    worker = Worker(store, EngineRunner(store))
    worker.start()            # releases jobs dead workers left half-done, sweeps their files, serves the queue
    store.create_generation(body); worker.notify()   # the server after each POST: no polling delay
    worker.stop()             # after the current job
    pool = WorkerPool([Worker(store, runner_0, name="gpu0"), Worker(store, runner_1, name="gpu1")])  # one per GPU

Several workers share one queue: each claim names its worker and a heartbeat thread keeps it fresh, so a worker
that dies (its process gone, or silent past the lease) has its job put back and run by another, and only the
worker holding a claim can record the job (engine/api/store.py). They may be threads of one server
(`refgen serve --workers N`) or processes on the same machine (`refgen worker`, beside a server).

A job that fails is recorded FAILED with its error and the worker goes on with the next one: refgen's
own errors (a bad request, a missing weight file) keep their message, which names the Leonardo field
where there is one; anything else is recorded as "<ExceptionType>: message" and logged with its traceback.

One worker, one thread, one Engine: an Engine is not thread-safe, and one GPU runs one SDXL batch at a time.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional, Protocol

from PIL import Image

from ..errors import RefgenError
from ..images import load_rgb
from .leonardo import LeonardoRequestError, ModelTable, local_model, parse_generation
from ..provenance import png_bytes
from ..request import default_upscaler
from .store import AssetStore, Generation, Output, StoreError, UnknownAssetError, worker_id
from .progress import JobProgress
from .trainings import StoreLoras, TrainingSettings, train_job

log = logging.getLogger("refgen.jobs")

DEFAULT_UPSCALER = default_upscaler(4)  # Leonardo's upscale variation is x4
HEARTBEAT_SECONDS = 10.0  # a running job's claim is refreshed this often (the store's lease is 120 s)
RELEASE_EVERY_SECONDS = 5.0  # how often an idle-or-between-jobs worker puts dead workers' claims back


class Runner(Protocol):
    """Runs one claimed job and returns its images; raises to fail it."""

    def __call__(self, job: Generation) -> list[Output]: ...


class JobError(RefgenError):
    """A job the runner cannot run (an unknown kind)."""


def _number(value: Any) -> Optional[float]:
    """The identity score when it is one ("no face" and absent are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _default_load_engine(name: str):
    from ..engine import Engine  # torch and diffusers only when a real engine is wanted

    return Engine.load(name)


class EngineRunner:
    """Generation jobs on an Engine (kept loaded; reloaded only when a job names another model) and
    upscale jobs on an ESRGAN upscaler (loaded on the first upscale job)."""

    def __init__(self, store: AssetStore, load_engine: Optional[Callable[[str], Any]] = None,
                 models: Optional[ModelTable] = None, upscaler: str = DEFAULT_UPSCALER,
                 training: Optional[TrainingSettings] = None, device: Optional[str] = None, dtype: Optional[str] = None,
                 loading: Optional[threading.Lock] = None):
        self.store = store
        # Model loading (diffusers/transformers build models under process-wide init contexts) and training are not
        # safe to run twice at once in one process: the runners of one server's workers share this lock.
        self.loading = loading or threading.Lock()
        self.training = training or TrainingSettings()
        self.device, self.dtype = device, dtype  # training's (engines come from load_engine)
        self.trained = StoreLoras(store)
        self.load_engine = load_engine or _default_load_engine
        self.models = models  # None: the built-in table + the user's file, read per job (edits apply at once)
        self.upscaler_reference = upscaler
        self._engine: Any = None
        self._engine_name: Optional[str] = None
        self._upscalers: dict[str, Any] = {}

    def __call__(self, job: Generation) -> list[Output]:
        if job.kind == "generation":
            return self.generate(job.body, JobProgress(self.store, job.id))
        if job.kind == "upscale":
            return self.upscale(job.body)
        if job.kind == "training":
            return self.train(job)
        if job.kind == "ideogram":
            return self.generate_ideogram(job.body, JobProgress(self.store, job.id))
        raise JobError(f"unknown job kind {job.kind!r}")

    def generate(self, body: Mapping[str, Any], progress: Optional[JobProgress] = None) -> list[Output]:
        """A Leonardo generation body; `progress` records each step and cancels the run once the job is deleted."""
        models = self.models or ModelTable.load()
        request = parse_generation(body, images=self.store.resolve_image, models=models, trained=self.trained)
        engine = self.engine(local_model(body, models, self.trained))
        return self._outputs(engine.generate(request, on_step=progress and progress.on_generation_step))

    def generate_ideogram(self, body: Mapping[str, Any], progress: Optional[JobProgress] = None) -> list[Output]:
        """A generation from the Ideogram routes (engine/api/ideogram.py): on the server's default model."""
        from .ideogram import generation_request

        request = generation_request(body, self.store.resolve_image)
        engine = self.engine((self.models or ModelTable.load()).default)
        return self._outputs(engine.generate(request, on_step=progress and progress.on_generation_step))

    @staticmethod
    def _outputs(result) -> list[Output]:
        return [Output(png=png_bytes(image, meta), seed=seed, metadata=meta, identity_score=_number(meta.get("identity_score")))
                for image, seed, meta in zip(result.images, result.seeds, result.metadata)]

    def engine(self, name: str):
        """The engine for local model `name`: the loaded one, or a fresh load that replaces it."""
        if self._engine is None or self._engine_name != name:
            self._engine, self._engine_name = None, None  # drop the old model before loading the next (GPU memory)
            log.info("loading model %s", name)
            started = time.monotonic()
            with self.loading:
                self._engine = self.load_engine(name)
            self._engine_name = name
            log.info("model %s loaded in %.1f s", name, time.monotonic() - started)
        return self._engine

    def train(self, job: Generation) -> list[Output]:
        """A LoRA training job (engine/api/trainings.py). The loaded engine is dropped first: training loads
        its own copy of the base model, and two SDXL copies may not fit one GPU."""
        self._engine, self._engine_name = None, None
        with self.loading:
            return train_job(self.store, job, self.training, device=self.device, dtype=self.dtype)

    def upscale(self, body: Mapping[str, Any]) -> list[Output]:
        """{"id": generated image id, "refgen": {"scale": 2 or 4}?} -> that image upscaled (Leonardo's upscale: the
        server's upscaler, x4), its provenance kept plus an "upscale" record."""
        image_id = body.get("id") if isinstance(body, Mapping) else None
        try:
            source = self.store.generated_image(image_id)
        except UnknownAssetError:
            raise LeonardoRequestError("id", f"unknown generated image id {image_id!r}") from None
        scale = (body.get("refgen") or {}).get("scale")
        picture = load_rgb(source.path, "generated image")
        upscaler = self.upscaler(scaled_upscaler(self.upscaler_reference, scale))
        result = upscaler.upscale(picture, progress=False)
        if scale is not None and result.size != (picture.width * scale, picture.height * scale):  # a model of another factor
            result = result.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)
        meta = copy.deepcopy(source.metadata)
        meta["upscale"] = _upscale_record(source.id, picture.size, result.size, upscaler, meta.get("upscale"))
        return [Output(png=png_bytes(result, meta), seed=source.seed, metadata=meta, identity_score=source.identity_score)]

    def upscaler(self, reference: Optional[str] = None):
        """An ESRGAN model by reference (default: the server's), loaded on first use and kept."""
        reference = reference or self.upscaler_reference
        if reference not in self._upscalers:
            from adapters.upscale import Upscaler  # torch and spandrel only when an upscale job comes

            with self.loading:
                self._upscalers[reference] = Upscaler.load(reference)
            if self._upscalers[reference].notice:
                log.warning(self._upscalers[reference].notice)
        return self._upscalers[reference]


def scaled_upscaler(reference: str, scale: Optional[int]) -> str:
    """The server's upscaler for an asked factor: Real-ESRGAN's (and the tiny model's stand-in's) own x2 or x4 file;
    a model the user named stays itself (its output is then resized to the factor). No factor: the server's."""
    if scale is None:
        return reference
    if reference in (default_upscaler(2), default_upscaler(4)):
        return default_upscaler(scale)
    if reference in ("tiny", f"tiny-{default_upscaler(2)}", f"tiny-{default_upscaler(4)}"):
        return f"tiny-{default_upscaler(scale)}"
    return reference


def _upscale_record(source_id: str, source_size, size, upscaler, previous: Optional[dict]) -> dict:
    """What the upscale did; `meta["image"]` keeps describing the generated (replayable) image."""
    record = {"source_image_id": source_id, "source_size": list(source_size), "size": list(size),
              "scale": upscaler.scale, "model": upscaler.identity()}
    if previous is not None:  # an upscale of an upscale keeps the whole chain
        record["previous"] = previous
    return record


class Worker:
    """One daemon thread: claim the oldest queued job, run it, record the result; repeat. Never dies on a job.
    A second thread beats the claim's heartbeat while a job runs (a long training keeps its claim)."""

    def __init__(self, store: AssetStore, runner: Runner, poll_seconds: float = 0.5, name: str = "worker",
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.store = store
        self.runner = runner
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.id = worker_id(name)  # what its claims are recorded under
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._beats: Optional[threading.Thread] = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, recover: bool = True) -> None:
        """Serve the queue. First (recover) the claims of dead workers go back to it and the files they left are
        removed; a pool recovers once for all its workers."""
        if self.running:
            return
        if recover:
            self.store.release_interrupted()
            self.store.sweep_orphans()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=f"refgen-{self.id}", daemon=True)
        self._beats = threading.Thread(target=self._beat, name=f"refgen-{self.id}-heartbeat", daemon=True)
        self._thread.start()
        self._beats.start()

    def notify(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def request_stop(self) -> None:
        """Take no further job (the current one finishes); stop() also waits for that."""
        self._stopping.set()
        self._wake.set()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop after the current job; True once the thread has ended."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _beat(self) -> None:
        while not self._stopping.wait(self.heartbeat_seconds):
            try:
                self.store.heartbeat(self.id)
            except Exception:  # a busy or failing disk: the next beat tries again, well within the lease
                log.warning("worker %s: heartbeat not recorded", self.id, exc_info=True)

    def _loop(self) -> None:
        released_at = time.monotonic()
        while not self._stopping.is_set():
            self._wake.clear()  # before looking: a notify() during the job makes the wait return at once
            try:
                if time.monotonic() - released_at > RELEASE_EVERY_SECONDS:  # a sibling process may have died
                    self.store.release_interrupted()
                    released_at = time.monotonic()
                worked = self.run_once()
            except Exception:  # the store itself failed (disk, locked database): retry after a pause
                log.exception("worker: cannot reach the job queue")
                worked = False
            if not worked:
                self._wake.wait(self.poll_seconds)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = self.store.claim_next(self.id)
        if job is None:
            return False
        self._run(job)
        return True

    def _run(self, job: Generation) -> None:
        started = time.monotonic()
        log.info("job %s (%s) started", job.id, job.kind)
        try:
            outputs = self.runner(job)
        except Exception as exc:
            self._fail(job, exc, time.monotonic() - started)
            return
        try:
            self.store.complete_generation(job.id, outputs, self.id)
        except UnknownAssetError:
            log.info("job %s was deleted while it ran; its %d image(s) were discarded", job.id, len(outputs))
            return
        except Exception as exc:  # e.g. a full disk: the job fails rather than staying claimed forever
            self._fail(job, exc, time.monotonic() - started)
            return
        log.info("job %s complete: %d image(s) in %.1f s", job.id, len(outputs), time.monotonic() - started)

    def _fail(self, job: Generation, exc: Exception, seconds: float) -> None:
        if isinstance(exc, RefgenError):
            error = str(exc)
            log.warning("job %s failed after %.1f s: %s", job.id, seconds, error)
        else:
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %s failed after %.1f s", job.id, seconds, exc_info=exc)
        try:
            self.store.fail_generation(job.id, error, self.id)
        except (UnknownAssetError, StoreError) as store_exc:  # deleted meanwhile, or already finished
            log.info("job %s: failure not recorded (%s)", job.id, store_exc)


class WorkerPool:
    """Several workers on one store, used like one Worker (the server notifies and stops it as a whole)."""

    def __init__(self, workers: list[Worker]):
        self.workers = list(workers)

    @property
    def running(self) -> bool:
        return any(worker.running for worker in self.workers)

    def start(self) -> None:
        self.workers[0].store.release_interrupted()
        self.workers[0].store.sweep_orphans()  # once, before any of them writes
        for worker in self.workers:
            worker.start(recover=False)

    def notify(self) -> None:
        for worker in self.workers:
            worker.notify()

    def stop(self, timeout: Optional[float] = None) -> bool:
        for worker in self.workers:
            worker.request_stop()  # all of them stop taking jobs at once, then each finishes its own
        return all([worker.stop(timeout) for worker in self.workers])
