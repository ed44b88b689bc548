"""Several workers on one API queue (issue 15): worker threads of one server (`refgen serve --workers N`) and
`refgen worker` processes beside it share the store; every job runs exactly once, and the job of a worker that
dies is run again by another. The tiny model on the CPU, real processes where processes are the point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.api.server import PREFIX, ServeError, worker_devices
from engine.api.store import AssetStore
from live_server import serving

ROOT = Path(__file__).resolve().parents[1]
JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 2}


def wait_for(store: AssetStore, job_ids: list[str], seconds: float = 240) -> list:
    deadline = time.monotonic() + seconds
    while True:
        jobs = [store.generation(job_id) for job_id in job_ids]
        if all(job.status != "PENDING" for job in jobs):
            return jobs
        assert time.monotonic() < deadline, f"{sum(job.status == 'PENDING' for job in jobs)} jobs still pending"
        time.sleep(0.2)


def test_two_worker_threads_share_one_queue_and_run_each_job_once(refgen_home, tmp_path):
    with serving(tmp_path / "api", model="tiny", workers=2) as (base, pool, store):
        assert len(pool.workers) == 2
        ids = [httpx.post(f"{base}{PREFIX}/generations", json={**JOB, "seed": n % 20}).json()["sdGenerationJob"]["generationId"]
               for n in range(40)]
        jobs = wait_for(store, ids)
    assert [job.status for job in jobs] == ["COMPLETE"] * 40
    assert [job.attempts for job in jobs] == [1] * 40 and all(len(job.images) == 1 for job in jobs)
    assert {job.worker for job in jobs} == {worker.id for worker in pool.workers}  # both took jobs
    # each seed twice: the same pixels whichever worker made them, while the other ran beside it
    for first, second in zip(jobs[:20], jobs[20:]):
        assert np.array_equal(np.asarray(Image.open(first.images[0].path)), np.asarray(Image.open(second.images[0].path)))


def start_worker(store_root: Path) -> subprocess.Popen:
    """`refgen worker --model tiny` on the store, in its own process (the suite's REFGEN_HOME: the tiny model is built)."""
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "worker", "--model", "tiny", "--store", str(store_root)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_worker_processes_run_each_job_once_and_redo_a_killed_workers_job(refgen_home, tmp_path):
    root = tmp_path / "api"
    with AssetStore(root) as store:
        processes = [start_worker(root), start_worker(root)]
        try:
            ids = [store.create_generation({**JOB, "seed": n}).id for n in range(40)]
            jobs = wait_for(store, ids)
            assert [job.status for job in jobs] == ["COMPLETE"] * 40, [job.error for job in jobs if job.error]
            assert [job.attempts for job in jobs] == [1] * 40
            pids = {job.worker.split(":")[1] for job in jobs}
            assert pids <= {str(process.pid) for process in processes} and len(pids) == 2  # two processes, one queue

            long_job = store.create_generation({**JOB, "width": 256, "height": 256, "num_inference_steps": 150}).id
            deadline = time.monotonic() + 60
            while (holder := store.generation(long_job).worker) is None:
                assert time.monotonic() < deadline, "nobody claimed the job"
                time.sleep(0.05)
            victim = next(process for process in processes if str(process.pid) == holder.split(":")[1])
            victim.send_signal(signal.SIGKILL)  # mid-job: no cleanup, the claim is left behind
            victim.wait(10)
            (redone,) = wait_for(store, [long_job])
            assert redone.status == "COMPLETE" and redone.attempts == 2 and len(redone.images) == 1
            assert redone.worker != holder  # the survivor ran it
        finally:
            for process in processes:
                process.kill()
                process.wait(10)


@pytest.mark.parametrize("device, workers, expected", [
    (None, 2, [None, None]), ("cpu", 3, ["cpu"] * 3), ("cuda:0,cuda:1", 2, ["cuda:0", "cuda:1"]),
])
def test_each_worker_gets_its_device(device, workers, expected):
    assert worker_devices(device, workers) == expected


def test_a_device_list_must_name_one_device_per_worker():
    with pytest.raises(ServeError, match="lists 2 devices for 3 workers"):
        worker_devices("cuda:0,cuda:1", 3)
