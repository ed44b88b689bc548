"""The worker and the EngineRunner: queued Leonardo bodies -> images on the tiny engine, failures
recorded with the field they name, restarts (a real server killed mid-job too) that lose no job, record
none twice and leave no orphan files."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import httpx
import pytest
from PIL import Image

from engine.errors import RefgenError
from engine.api.jobs import EngineRunner, Worker
from engine.api.leonardo import ModelTable
from engine.provenance import read_metadata
from engine.api.server import PREFIX
from engine.api.store import DATABASE_NAME, AssetStore, Generation, Output
from live_server import dead_worker

KINO_XL = "aa77f04e-3eec-4034-9c07-d0f619684628"  # maps to sdxl-base in the built-in table
BODY = {"prompt": "a red fox", "width": 64, "height": 64, "num_images": 2, "num_inference_steps": 2,
        "seed": 5, "modelId": KINO_XL}


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until_done(store: AssetStore, generation_id: str, timeout: float = 8.0) -> Generation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        generation = store.generation(generation_id)
        if generation.status != "PENDING":
            return generation
        time.sleep(0.02)
    raise AssertionError(f"generation {generation_id} still PENDING after {timeout} s")


class Loads:
    """A load_engine that hands out the session's tiny engine and remembers what was asked for."""

    def __init__(self, engine):
        self.engine, self.names = engine, []

    def __call__(self, name: str):
        self.names.append(name)
        return self.engine


@pytest.fixture
def store(tmp_path, refgen_home):
    with AssetStore(tmp_path / "api") as opened:
        yield opened


@pytest.fixture
def worker_for(store):
    """Start a Worker on the test's store; stopped at the end of the test."""
    started = []

    def start(runner, poll_seconds: float = 0.05) -> Worker:
        worker = Worker(store, runner, poll_seconds=poll_seconds)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        assert worker.stop(10)


def test_worker_runs_a_leonardo_body_on_the_engine(store, worker_for, engine):
    loads = Loads(engine)
    worker = worker_for(EngineRunner(store, load_engine=loads, models=ModelTable()))
    job = store.create_generation(dict(BODY))
    worker.notify()
    done = wait_until_done(store, job.id)
    assert done.status == "COMPLETE", done.error
    assert loads.names == ["sdxl-base"]
    assert [image.seed for image in done.images] == [5, 6] and done.started_at and done.finished_at
    for image in done.images:
        with Image.open(image.path) as picture:
            assert picture.size == (64, 64)
        assert read_metadata(image.path)["image"]["seed"] == image.seed == image.metadata["image"]["seed"]
        assert image.identity_score is None  # not a character request


def test_failing_job_names_the_field_and_the_worker_goes_on(store, worker_for, engine):
    worker = worker_for(EngineRunner(store, load_engine=Loads(engine), models=ModelTable()))
    bad = store.create_generation({**BODY, "init_image_id": str(uuid.uuid4())})
    bad_path = store.create_generation({**BODY, "init_image_id": "../../etc/passwd"})
    good = store.create_generation({**BODY, "num_images": 1})
    worker.notify()
    for job in (bad, bad_path):
        failed = wait_until_done(store, job.id)
        assert failed.status == "FAILED" and failed.error.startswith("init_image_id:") and failed.images == ()
    assert wait_until_done(store, good.id).status == "COMPLETE"


def test_init_image_from_an_upload(store, worker_for, engine):
    upload = store.new_upload("png")
    store.complete_upload(upload.id, upload.token, png_of(Image.new("RGB", (64, 64), (10, 200, 10))))
    worker = worker_for(EngineRunner(store, load_engine=Loads(engine), models=ModelTable()))
    job = store.create_generation({**BODY, "num_images": 1, "init_image_id": upload.id, "init_strength": 0.5})
    worker.notify()
    done = wait_until_done(store, job.id)
    assert done.status == "COMPLETE", done.error
    assert done.images[0].metadata["init_image"] is not None


def test_unexpected_exception_is_recorded_with_its_type(store, worker_for):
    calls = []

    def runner(job: Generation) -> list[Output]:
        calls.append(job.id)
        if job.body.get("explode"):
            raise ZeroDivisionError("division by zero")
        if job.body.get("refuse"):
            raise RefgenError("a refgen reason")
        return []

    worker = worker_for(runner)
    jobs = [store.create_generation(body) for body in ({"explode": True}, {"refuse": True}, {})]
    worker.notify()
    results = [wait_until_done(store, job.id) for job in jobs]
    assert [r.status for r in results] == ["FAILED", "FAILED", "COMPLETE"]
    assert results[0].error == "ZeroDivisionError: division by zero"
    assert results[1].error == "a refgen reason"
    assert calls == [job.id for job in jobs]


def test_notify_wakes_the_worker_at_once(store, worker_for):
    worker = worker_for(lambda job: [], poll_seconds=60)
    time.sleep(0.1)  # the worker is now waiting out its (long) poll
    job = store.create_generation({})
    worker.notify()
    assert wait_until_done(store, job.id, timeout=3).status == "COMPLETE"


def test_stop_waits_for_the_current_job(store):
    entered, release = threading.Event(), threading.Event()

    def slow(job: Generation) -> list[Output]:
        entered.set()
        release.wait(5)
        return []

    worker = Worker(store, slow, poll_seconds=0.05)
    job = store.create_generation({})
    worker.start()
    assert entered.wait(5)
    assert not worker.stop(timeout=0.1)  # still inside the job
    release.set()
    assert worker.stop(timeout=5)
    assert store.generation(job.id).status == "COMPLETE"


def test_restart_resumes_a_claimed_job_once(tmp_path, engine):
    root = tmp_path / "api"
    first = AssetStore(root)
    job = first.create_generation(dict(BODY))
    assert first.claim_next(dead_worker()).id == job.id  # the old process took it, then died
    del first
    second = AssetStore(root)
    loads = Loads(engine)
    runner = EngineRunner(second, load_engine=loads, models=ModelTable())
    calls = []
    worker = Worker(second, lambda j: calls.append(j.id) or runner(j), poll_seconds=0.05)
    worker.start()  # releases the dead claim
    done = wait_until_done(second, job.id)
    assert worker.stop(10)
    assert done.status == "COMPLETE" and calls == [job.id]
    assert len(done.images) == 2 and len({i.id for i in done.images}) == 2
    assert sorted(p.name for p in second.files.iterdir()) == sorted(i.path.name for i in done.images)
    second.close()


@contextlib.contextmanager
def refgen_serve(home: Path, log: Path):
    """A real `refgen serve --model tiny` process with its data under `home`; yields (process, base URL)."""
    command = [sys.executable, "-m", "engine.cli", "serve", "--model", "tiny", "--device", "cpu", "--port", "0"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=sink,
                                   stderr=subprocess.STDOUT, env={**os.environ, "REFGEN_HOME": str(home)})
    try:
        yield process, _listening_on(process, log)
    finally:
        process.terminate()  # does nothing to a process already killed and reaped
        process.wait(30)


def _listening_on(process: subprocess.Popen, log: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not (found := re.search(r"Uvicorn running on (http://\S+)", log.read_text(errors="replace"))):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)
    return found[1]


@contextlib.contextmanager
def write_lock_once_claimed(database: Path, job_id: str, timeout: float = 60.0):
    """Take SQLite's write lock as soon as the server claims `job_id` (it then loads the model and generates for
    seconds): its PNGs still reach the disk, written before their rows, but their commit waits for us."""
    db = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        deadline = time.monotonic() + timeout
        while _state(db, job_id)[1] is None:
            assert time.monotonic() < deadline, "the server never claimed the job"
            time.sleep(0.005)
        db.execute("BEGIN IMMEDIATE")
        assert _state(db, job_id)[0] == "PENDING", "the job finished before the lock: the test missed its moment"
        yield
    finally:
        db.close()  # rolls back: the lock goes


def _state(db: sqlite3.Connection, job_id: str) -> tuple[str, Optional[str]]:
    """(status, claimed_at), read straight from the server's database."""
    return db.execute("SELECT status, claimed_at FROM generations WHERE id = ?", (job_id,)).fetchone()


def _wait_for_pngs(folder: Path, count: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(names := sorted(p.name for p in folder.glob("*.png"))) < count:
        assert time.monotonic() < deadline, f"only {names} in {folder}"
        time.sleep(0.005)
    return names


def _finished(database: Path, job_id: str, timeout: float = 60.0) -> tuple[str, list[str]]:
    """The job's final status and its image files, once it has one."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(database)) as db:
        while (status := _state(db, job_id)[0]) == "PENDING":
            assert time.monotonic() < deadline, "the restarted server never finished the job"
            time.sleep(0.05)
        images = db.execute("SELECT path FROM generated_images WHERE generation_id = ? ORDER BY idx", (job_id,))
        return status, [name for (name,) in images]


def test_a_server_killed_while_writing_its_pngs_runs_the_job_once_and_leaves_no_orphans(tmp_path):
    home = tmp_path / "home"
    files, database = home / "api" / "files", home / "api" / DATABASE_NAME
    body = {"prompt": "a red fox", "width": 64, "height": 64, "num_images": 2, "num_inference_steps": 2, "seed": 5}
    with refgen_serve(home, tmp_path / "first.log") as (server, base):
        job = httpx.post(f"{base}{PREFIX}/generations", json=body).json()["sdGenerationJob"]["generationId"]
        with write_lock_once_claimed(database, job):
            orphans = _wait_for_pngs(files, 2)  # on disk, their commit blocked: the moment a kill orphans them
            server.kill()  # SIGKILL: no cleanup runs
            server.wait()
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert _state(db, job)[0] == "PENDING"  # the kill came before the commit
    with refgen_serve(home, tmp_path / "second.log"):
        status, images = _finished(database, job)
    assert status == "COMPLETE" and len(images) == 2  # once: UNIQUE (generation_id, idx) allows no more
    assert sorted(p.name for p in files.iterdir()) == sorted(images)  # no .png or .partial beyond the job's
    assert set(orphans).isdisjoint(images)
    assert all(name in (tmp_path / "second.log").read_text() for name in orphans)  # the sweep said what it removed


def test_engine_is_reloaded_only_when_the_model_changes(store, engine):
    loads = Loads(engine)
    table = ModelTable(models={KINO_XL: "model-a", "b24e16ff-06e3-43eb-8d33-4416c2d75876": "model-b"})
    runner = EngineRunner(store, load_engine=loads, models=table)
    body = {**BODY, "num_images": 1}
    for model_id in (KINO_XL, KINO_XL, "b24e16ff-06e3-43eb-8d33-4416c2d75876"):
        assert len(runner(store.create_generation({**body, "modelId": model_id}))) == 1
    assert loads.names == ["model-a", "model-b"]


def test_upscale_job(store, worker_for, engine):
    worker = worker_for(EngineRunner(store, load_engine=Loads(engine), models=ModelTable(), upscaler="tiny-x4"))
    source = store.create_generation({**BODY, "num_images": 1})
    worker.notify()
    image = wait_until_done(store, source.id).images[0]
    job = store.create_generation({"id": image.id}, kind="upscale")
    worker.notify()
    done = wait_until_done(store, job.id)
    assert done.status == "COMPLETE", done.error
    (big,) = done.images
    with Image.open(big.path) as picture:
        assert picture.size == (256, 256)
    meta = read_metadata(big.path)
    assert meta["upscale"]["source_image_id"] == image.id and meta["upscale"]["size"] == [256, 256]
    assert meta["upscale"]["model"]["reference"] == "tiny-x4"
    assert meta["resolved"] == image.metadata["resolved"] and big.seed == image.seed  # provenance kept


def test_upscale_of_an_unknown_image_fails_on_id(store, worker_for):
    worker = worker_for(EngineRunner(store, upscaler="tiny-x4"))
    jobs = [store.create_generation({"id": image_id}, kind="upscale") for image_id in (str(uuid.uuid4()), "../x")]
    worker.notify()
    for job in jobs:
        failed = wait_until_done(store, job.id)
        assert failed.status == "FAILED" and failed.error.startswith("id:")


def test_job_deleted_while_running_leaves_nothing(store):
    def runner(job: Generation) -> list[Output]:
        store.delete_generation(job.id)  # the user deletes it mid-run
        return [Output(png=png_of(Image.new("RGB", (8, 8))), seed=1, metadata={})]

    worker = Worker(store, runner)
    store.create_generation({})
    assert worker.run_once() is True
    assert list(store.files.iterdir()) == [] and store.pending_count() == 0
    assert worker.run_once() is False
