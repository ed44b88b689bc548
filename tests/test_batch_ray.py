"""engine/batch/distributed.py: a manifest run on a real local Ray cluster (2 CPU actors, the tiny model at 64x64,
2 steps) gives the pictures, ids and results records of the single-process run; an actor killed while it holds
units is restarted and its units are made and recorded exactly once; a driver killed mid-run resumes as the local
run does; ray stays unimported unless asked for.

Bit-identity depends on torch's thread count (reductions split differently), so the actors (threads=1) and the
single-process reference run (torch.set_num_threads(1) for its duration) both use one thread."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # the dev extra installs it: without it these tests fail, they are not skipped
import torch
from PIL import Image

from killed_runs import kill_after_pngs
from engine import Engine
from engine.batch import plan_batch, read_manifest, read_results, run_batch
from engine.batch.plan import group_key
from engine.batch.distributed import Groups, RayUnits, run_batch_on_ray


ROOT = Path(__file__).resolve().parents[1]
SMALL = {"width": 64, "height": 64, "steps": 2}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def raw_records(out: Path) -> list[dict]:
    return [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]


def comparable(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "seconds"}


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> Path:
    """4 NPCs x 3 following seeds (4 merged units of 3), 8 props with derived seeds (a unit each), one bad line."""
    folder = tmp_path_factory.mktemp("ray-manifest")
    lines = [json.dumps({"prompt": f"npc {n}", **SMALL, "seed": 100 + 10 * n + k}) for n in range(4) for k in range(3)]
    lines += [json.dumps({"prompt": f"prop {n}", **SMALL}) for n in range(8)]
    lines.insert(5, "{not json")
    (folder / "pack.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pack.jsonl"


@pytest.fixture(scope="module")
def cluster(refgen_home):
    """One local Ray cluster for the module: 2 CPU slots; workers inherit REFGEN_HOME (the tiny model's cache)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(refgen_home, manifest_path, tmp_path_factory) -> Path:
    """The single-process run of the manifest, one torch thread."""
    out = tmp_path_factory.mktemp("ray-reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.load("tiny", device="cpu", dtype="fp32")
        summary = run_batch(read_manifest(manifest_path, model="tiny"), out, lambda model: engine)
    finally:
        torch.set_num_threads(threads)
    assert (summary.done, summary.failed, summary.images_written) == (20, 1, 20)
    return out


def assert_same_pictures(out: Path, reference: Path) -> None:
    names = {path.name for path in reference.glob("*.png")}
    assert {path.name for path in out.glob("*.png")} == names
    for name in names:
        assert np.array_equal(pixels(out / name), pixels(reference / name)), name


def test_two_actors_make_the_single_process_pictures_ids_and_records(cluster, manifest_path, reference, tmp_path):
    manifest = read_manifest(manifest_path, model="tiny")
    seen = []
    summary = run_batch_on_ray(manifest, tmp_path / "out", actors=2, on_record=lambda record, written: seen.append(record.line))
    assert (summary.done, summary.skipped, summary.failed, summary.images_written) == (20, 0, 1, 20)
    assert sorted(seen) == list(range(1, 22))
    assert_same_pictures(tmp_path / "out", reference)
    ours, theirs = raw_records(tmp_path / "out"), raw_records(reference)
    assert sorted(map(json.dumps, map(comparable, ours))) == sorted(map(json.dumps, map(comparable, theirs)))
    assert not list((tmp_path / "out").glob(".*.partial"))


def test_an_actor_killed_mid_run_is_restarted_and_its_units_are_made_and_recorded_once(cluster, manifest_path, reference, tmp_path):
    out = tmp_path / "out"
    runner = RayUnits(actors=2)
    failures = []

    def drive() -> None:
        try:
            run_batch(read_manifest(manifest_path, model="tiny"), out, runner=runner)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.monotonic() + 120
    while not any(record["status"] == "done" for record in _records_so_far(out)) and time.monotonic() < deadline:
        time.sleep(0.02)
    lines_done = sum(record["status"] == "done" for record in _records_so_far(out))
    ray.kill(runner.actors_started[0], no_restart=False)  # its process ends at once; Ray restarts the actor
    # 12 units, 2 actors with 2 units submitted each: with at most 7 units finished, 1+ waits, so the victim held 2.
    assert lines_done <= 7, "the run was nearly over before the kill"
    thread.join(timeout=180)
    assert not thread.is_alive() and not failures, failures

    records = raw_records(out)
    done = [record["id"] for record in records if record["status"] == "done"]
    assert len(done) == len(set(done)) == 20  # every line done, none twice
    assert {record["status"] for record in records} == {"done", "failed"}  # the bad line only
    assert_same_pictures(out, reference)


def _records_so_far(out: Path) -> list[dict]:
    try:
        return raw_records(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_a_driver_killed_with_sigkill_resumes_to_the_single_process_pictures(cluster, manifest_path, reference, tmp_path):
    """`refgen batch --ray --ray-address <this module's cluster>` in a real process, SIGKILLed mid-run (its actors
    die with it), then run again: exactly the missing pictures are made, nothing that existed is rewritten."""
    out = tmp_path / "killed"
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "engine.cli", "batch", str(manifest_path), "--out", str(out), "--model", "tiny",
               "--ray", "--ray-address", address, "--ray-actors", "2"]
    before = kill_after_pngs(command, out)
    assert 3 <= len(before) < 20

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # the bad line
    assert f"{20 - len(before)} images written" in resumed.stdout, resumed.stdout
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing that existed was rewritten
    assert_same_pictures(out, reference)
    assert not list(out.glob(".*.partial"))
    statuses = [record["status"] for record in read_results(out / "results.jsonl").values()]
    assert sorted(statuses) == ["done"] * (20 - len(before)) + ["failed"] + ["skipped"] * len(before)  # a line, an image


def test_an_actor_keeps_its_group_then_starts_a_fresh_one_of_its_model_then_takes_the_fullest_groups_last(tmp_path):
    manifest = tmp_path / "groups.jsonl"
    wide = {**SMALL, "width": 128}
    manifest.write_text("".join(json.dumps(line) + "\n" for line in [
        *({"prompt": f"a {n}", **SMALL} for n in range(3)), *({"prompt": f"b {n}", **wide} for n in range(2)),
        {"prompt": "c", **SMALL, "model": "other"}]))
    a1, a2, a3, b1, b2, c1 = plan_batch(read_manifest(manifest, model="tiny").valid)
    key_a, key_b, key_c = (group_key(unit.lines[0]) for unit in (a1, b1, c1))
    waiting = Groups([a1, a2, a3, b1, b2, c1])
    assert waiting.take(None) is a1 and waiting.take(None) is b1  # two actors: a group each
    assert waiting.take(key_a) is a2 and waiting.take(key_b) is b2
    assert waiting.take(key_b) is c1  # its group is empty: the one group nobody started
    assert waiting.take(key_c) is a3 and not waiting  # then the end of the group with the most left
    assert waiting.take(key_a) is None
    same_model_first = Groups([c1, b1])
    assert same_model_first.take(key_a) is b1


def test_ray_is_imported_only_when_asked_for_and_its_absence_is_one_clear_error(refgen_home, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a fox", **SMALL, "seed": 1}) + "\n")
    script = f"""
import sys
from engine.batch import read_manifest, run_batch
import engine.batch.distributed, engine.cli.batch
from engine import Engine
engine = Engine.load("tiny", device="cpu", dtype="fp32")
run_batch(read_manifest({str(manifest)!r}, model="tiny"), {str(tmp_path / 'local')!r}, lambda model: engine)
assert "ray" not in sys.modules, "the local batch imported ray"
sys.modules["ray"] = None  # what `import ray` meets where the extra is not installed
from typer.testing import CliRunner
from engine.cli import app
result = CliRunner().invoke(app, ["batch", {str(manifest)!r}, "--out", {str(tmp_path / 'ray')!r}, "--model", "tiny", "--ray"])
print(result.exit_code, result.output)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("1 ") and "pip install 'refgen[ray]'" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout
    assert len(list((tmp_path / "local").glob("*.png"))) == 1 and not (tmp_path / "ray").exists()


@pytest.mark.parametrize("address, words", [("127.0.0.1:1", "cannot reach the Ray head at 127.0.0.1:1"),
                                            ("headnode", "give auto, HOST:PORT")])
def test_an_address_nobody_answers_is_one_clear_error_at_once(address, words):
    """ray.init would retry an address nobody answers for minutes; the check answers within seconds."""
    from engine.batch.distributed import RayClusterError, check_reachable

    started = time.monotonic()
    with pytest.raises(RayClusterError, match=words):
        check_reachable(address, seconds=2)
    assert time.monotonic() - started < 5
