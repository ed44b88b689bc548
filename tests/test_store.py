"""AssetStore: uploads, the job queue, generated images, ids that must never become paths."""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from engine import paths
from engine.errors import InvalidImageError
from engine.hashing import cached_sha256
from engine.images import staging_path
from engine.presets import Preset, save_user_preset
from live_server import dead_worker
from engine.api.store import (
    DATABASE_NAME, SCHEMA_VERSION, AssetStore, Output, StoreError, UnknownAssetError,
)

BAD_IDS = ["../../etc/passwd", "..", "", "x" * 36, "/etc/passwd", None, 123,
           str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}", str(uuid.uuid4()).replace("-", ""),
           str(uuid.uuid4()) + "/../../x", "urn:uuid:" + str(uuid.uuid4())]


def png(width: int = 32, height: int = 24, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def output(seed: int = 1, score=None) -> Output:
    return Output(png=png(), seed=seed, metadata={"image": {"seed": seed}}, identity_score=score)


def files(store: AssetStore) -> list[str]:
    return sorted(path.name for path in store.files.iterdir())


@pytest.fixture
def store(tmp_path):
    with AssetStore(tmp_path / "api") as opened:
        yield opened


# ---------------------------------------------------------------------------------------- uploads

def test_upload_round_trip(store):
    upload = store.new_upload("PNG")
    assert upload.extension == "png" and not upload.uploaded
    assert store.resolve_image(upload.id, "UPLOADED") is None  # nothing to use yet
    data = png(40, 16)
    done = store.complete_upload(upload.id, upload.token, data)
    assert (done.uploaded, done.width, done.height) == (True, 40, 16)
    path = store.resolve_image(upload.id, "UPLOADED")
    assert path == store.files / f"{upload.id}.png" and path.read_bytes() == data
    assert store.upload(upload.id) == done
    assert store.resolve_image(upload.id, "GENERATED") is None  # kinds do not mix


def test_upload_token_is_checked_and_one_time(store):
    upload = store.new_upload("jpg")
    with pytest.raises(StoreError, match="token"):
        store.complete_upload(upload.id, "not-the-token", png())
    assert files(store) == [] and not store.upload(upload.id).uploaded
    first = png(colour=(1, 2, 3))
    store.complete_upload(upload.id, upload.token, first)
    with pytest.raises(StoreError, match="already"):
        store.complete_upload(upload.id, upload.token, png(colour=(9, 9, 9)))
    assert store.resolve_image(upload.id, "UPLOADED").read_bytes() == first  # the refused second never wrote


@pytest.mark.parametrize("data", [b"", b"not an image at all", png()[:60], b"\x89PNG\r\n\x1a\n" + b"\0" * 100])
def test_broken_upload_writes_nothing(store, data):
    upload = store.new_upload("png")
    with pytest.raises(InvalidImageError):
        store.complete_upload(upload.id, upload.token, data)
    assert files(store) == [] and not store.upload(upload.id).uploaded


def test_oversized_upload_is_refused(store):
    upload = store.new_upload("png")
    with pytest.raises(InvalidImageError, match="limit"):
        store.complete_upload(upload.id, upload.token, png(100, 100), max_pixels=5_000)
    assert files(store) == []


@pytest.mark.parametrize("extension", ["exe", "../png", "", "png/../x", None, "gif"])
def test_bad_extension(store, extension):
    with pytest.raises(StoreError):
        store.new_upload(extension)


def test_delete_upload_removes_file(store):
    upload = store.new_upload("png")
    store.complete_upload(upload.id, upload.token, png())
    store.delete_upload(upload.id)
    assert files(store) == []
    with pytest.raises(UnknownAssetError):
        store.upload(upload.id)
    with pytest.raises(UnknownAssetError):
        store.delete_upload(upload.id)


# -------------------------------------------------------------------------------------------- ids

@pytest.mark.parametrize("bad", BAD_IDS)
def test_non_uuid_ids_are_unknown(store, bad):
    for call in (store.upload, store.delete_upload, store.generation, store.delete_generation,
                 store.generated_image, lambda i: store.fail_generation(i, "x"),
                 lambda i: store.complete_generation(i, [output()]),
                 lambda i: store.complete_upload(i, "token", png())):
        with pytest.raises(UnknownAssetError):
            call(bad)
    assert store.resolve_image(bad, "UPLOADED") is None
    assert store.resolve_image(bad, "GENERATED") is None
    assert files(store) == []


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_other_text_is_unknown(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("ids")
    with AssetStore(root) as store:
        try:
            is_canonical = str(uuid.UUID(text)) == text
        except ValueError:
            is_canonical = False
        if not is_canonical:
            with pytest.raises(UnknownAssetError):
                store.generation(text)
            assert store.resolve_image(text, "UPLOADED") is None


def test_unknown_valid_uuid(store):
    with pytest.raises(UnknownAssetError):
        store.generation(str(uuid.uuid4()))
    assert store.resolve_image(str(uuid.uuid4()), "GENERATED") is None


# -------------------------------------------------------------------------------------- the queue

def test_generation_lifecycle(store):
    job = store.create_generation({"prompt": "a fox"})
    assert (job.status, job.user_id, job.kind, job.started_at) == ("PENDING", "local", "generation", None)
    assert store.pending_count() == 1
    claimed = store.claim_next()
    assert claimed.id == job.id and claimed.started_at is not None
    assert store.claim_next() is None and store.pending_count() == 1  # running still counts
    done = store.complete_generation(job.id, [output(7, 0.5), output(8, "no face")])
    assert done.status == "COMPLETE" and done.finished_at and store.pending_count() == 0
    assert [(i.index, i.seed, i.identity_score) for i in done.images] == [(0, 7, 0.5), (1, 8, None)]
    first = done.images[0]
    assert first.path.read_bytes() == png() and first.metadata == {"image": {"seed": 7}}
    assert store.generated_image(first.id) == first
    assert store.resolve_image(first.id, "GENERATED") == first.path
    assert store.generation(job.id) == done


def test_complete_twice_is_refused(store):
    job = store.create_generation({"prompt": "x"})
    store.complete_generation(job.id, [output()])
    with pytest.raises(StoreError, match="already COMPLETE"):
        store.complete_generation(job.id, [output()])
    assert len(store.generation(job.id).images) == 1 and len(files(store)) == 1


def test_fail_generation(store):
    job = store.create_generation({"prompt": "x"})
    failed = store.fail_generation(job.id, "init_image_id: unknown")
    assert (failed.status, failed.error) == ("FAILED", "init_image_id: unknown") and failed.finished_at
    with pytest.raises(StoreError):
        store.complete_generation(job.id, [output()])
    assert files(store) == [] and store.pending_count() == 0


def test_list_generations_newest_first(store):
    ids = [store.create_generation({"n": n}).id for n in range(5)]
    store.create_generation({"n": "other"}, user_id="someone-else")
    assert [g.id for g in store.list_generations("local")] == ids[::-1]
    assert [g.id for g in store.list_generations("local", offset=1, limit=2)] == ids[3:1:-1]
    assert store.list_generations("nobody") == []


def test_delete_generation_removes_rows_and_files(store):
    job = store.create_generation({"prompt": "x"})
    done = store.complete_generation(job.id, [output(1), output(2)])
    store.delete_generation(job.id)
    assert files(store) == []
    for call, target in ((store.generation, job.id), (store.generated_image, done.images[0].id),
                         (store.delete_generation, job.id)):
        with pytest.raises(UnknownAssetError):
            call(target)


def test_complete_after_delete_leaves_no_files(store):
    job = store.create_generation({"prompt": "x"})
    store.claim_next()
    store.delete_generation(job.id)
    with pytest.raises(UnknownAssetError):
        store.complete_generation(job.id, [output(1), output(2)])
    assert files(store) == []


def test_complete_deleted_between_write_and_commit(store, monkeypatch):
    """The race the pre-check cannot see: the job is deleted while its files are being written."""
    job = store.create_generation({"prompt": "x"})
    import engine.api.store as store_module

    real_write = store_module.write_atomic

    def write_then_delete(path, data):
        written = real_write(path, data)
        if store.pending_count():
            store.delete_generation(job.id)
        return written

    monkeypatch.setattr(store_module, "write_atomic", write_then_delete)
    with pytest.raises(UnknownAssetError):
        store.complete_generation(job.id, [output(1), output(2)])
    assert files(store) == []


def test_claim_is_atomic_across_threads_and_connections(tmp_path):
    stores = [AssetStore(tmp_path), AssetStore(tmp_path)]  # two connections: SQLite's lock, not ours, decides
    ids = {stores[0].create_generation({"n": n}).id for n in range(40)}
    claimed: list[str] = []
    barrier = threading.Barrier(8)

    def claim_all(store):
        barrier.wait()
        while (job := store.claim_next()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim_all, args=(stores[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    for store in stores:
        store.close()


def test_claim_order_is_oldest_first(store):
    ids = [store.create_generation({"n": n}).id for n in range(3)]
    assert [store.claim_next().id for _ in ids] == ids


def test_release_interrupted_after_restart(tmp_path):
    first = AssetStore(tmp_path)
    job = first.create_generation({"prompt": "x"})
    first.claim_next(dead_worker())
    del first  # the process died holding the claim
    second = AssetStore(tmp_path)
    assert second.claim_next() is None  # still claimed until released
    assert second.release_interrupted() == 1
    assert second.generation(job.id).started_at is None
    assert second.claim_next().id == job.id and second.generation(job.id).attempts == 2
    assert second.release_interrupted() == 0  # this process runs: its claim is a live worker's
    second.close()


def test_a_live_workers_claim_is_kept_until_its_heartbeat_is_older_than_the_lease(tmp_path):
    with AssetStore(tmp_path) as store:
        job = store.create_generation({"prompt": "x"})
        other_machine = "render-02:4242:gpu0"  # a process this machine cannot see: only its heartbeat tells
        store.claim_next(other_machine)
        assert store.release_interrupted(lease_seconds=60) == 0
        time.sleep(0.3)
        assert store.heartbeat(other_machine) == 1
        assert store.release_interrupted(lease_seconds=0.2) == 0  # it beat just now
        time.sleep(0.3)
        assert store.release_interrupted(lease_seconds=0.2) == 1  # silent past the lease: taken for dead
        assert store.claim_next("here:1:gpu1").id == job.id


def test_only_the_worker_holding_the_claim_records_the_job(tmp_path):
    """A worker taken for dead that comes back cannot record the job another worker now runs."""
    with AssetStore(tmp_path) as store:
        job = store.create_generation({"prompt": "x"})
        store.claim_next("render-02:4242:gpu0")
        time.sleep(0.3)
        assert store.release_interrupted(lease_seconds=0.2) == 1  # silent: taken for dead
        assert store.claim_next("render-01:77:gpu1").id == job.id
        made = output()
        with pytest.raises(StoreError, match="no longer claimed by render-02:4242:gpu0"):
            store.complete_generation(job.id, [made], "render-02:4242:gpu0")
        with pytest.raises(StoreError, match="no longer claimed"):
            store.fail_generation(job.id, "late", "render-02:4242:gpu0")
        assert store.complete_generation(job.id, [made], "render-01:77:gpu1").status == "COMPLETE"
        assert len(store.generation(job.id).images) == 1 and store.generation(job.id).attempts == 2


# ----------------------------------------------------------------------------------- the database

def test_reopen_keeps_everything_and_wal(tmp_path):
    with AssetStore(tmp_path) as store:
        job = store.create_generation({"prompt": "x"})
        store.complete_generation(job.id, [output()])
    with AssetStore(tmp_path) as store:
        assert store.generation(job.id).status == "COMPLETE"
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_version_1_database_is_migrated_and_keeps_its_jobs(tmp_path):
    """Version 1 had a characters table nothing used; opening it with this refgen drops it, keeps the rest."""
    from engine.api.store import MIGRATIONS

    job_id = "0c7bd0a2-0000-4000-8000-000000000003"
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:  # as refgen 0.1 left it
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in filter(str.strip, MIGRATIONS[0].split(";")):
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute("INSERT INTO generations (id, user_id, kind, status, body, created_at) VALUES "
                   "(?, 'local', 'generation', 'PENDING', '{\"prompt\": \"x\"}', 'now')", (job_id,))
    with AssetStore(tmp_path) as store:
        assert store.generation(job_id).status == "PENDING"
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'characters'").fetchall() == []


def test_a_version_2_database_gains_the_training_tables_and_keeps_its_uploads(tmp_path):
    """Version 3 adds datasets and trainings, and columns to uploads and generations: older rows read as before."""
    from engine.api.store import MIGRATIONS

    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:  # as a version 2 refgen left it
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for migration in MIGRATIONS[:2]:
            for statement in filter(str.strip, migration.split(";")):
                db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (2)")
        db.execute("INSERT INTO uploads (id, extension, token, created_at) VALUES "
                   "('0c7bd0a2-0000-4000-8000-000000000001', 'png', 't', 'now')")
        db.execute("INSERT INTO generations (id, user_id, kind, status, body, created_at) VALUES "
                   "('0c7bd0a2-0000-4000-8000-000000000002', 'local', 'generation', 'PENDING', '{}', 'now')")
    with AssetStore(tmp_path) as store:
        assert store.upload("0c7bd0a2-0000-4000-8000-000000000001").dataset_id is None
        job = store.generation("0c7bd0a2-0000-4000-8000-000000000002")
        assert (job.status, job.progress) == ("PENDING", None)
        dataset = store.create_dataset("set")
        assert store.dataset(dataset.id).images == ()


def test_datasets_and_trainings(tmp_path):
    with AssetStore(tmp_path) as store:
        dataset = store.create_dataset("faces", "five photos")
        images = [store.add_dataset_image(dataset.id, png(), "png") for _ in range(2)]
        assert [image.id for image in store.dataset(dataset.id).images] == [image.id for image in images]
        assert all(path.is_file() for path in store.dataset_paths(dataset.id))
        slot = store.new_upload("png", dataset.id)  # an empty slot is not a dataset image yet
        assert len(store.dataset(dataset.id).images) == 2 and slot.dataset_id == dataset.id
        with pytest.raises(UnknownAssetError):
            store.new_upload("png", "0c7bd0a2-0000-4000-8000-000000000009")

        element = store.create_training("element", "mine", None, dataset.id, {"name": "mine"}, {"epochs": 2})
        model = store.create_training("model", "model", "d", dataset.id, {"name": "model"}, {"epochs": 1})
        assert element.id.isdigit() and element.lora == f"element-{element.id}" and model.lora == f"model-{model.id}"
        assert element.job.kind == "training" and element.job.body == {"epochs": 2, "training": element.id,
                                                                        "kind": "element", "lora": element.lora}
        assert store.training("element", int(element.id)) == store.training("element", element.id)
        with pytest.raises(UnknownAssetError):
            store.training("model", element.id)
        with pytest.raises(UnknownAssetError):
            store.training("element", "1; DROP TABLE trainings")
        store.set_progress(element.job.id, {"step": 1, "total": 4})
        assert store.training("element", element.id).job.progress == {"step": 1, "total": 4}
        assert [t.id for t in store.list_trainings("element", "local")] == [element.id]

        store.delete_training("element", element.id)
        assert not store.job_exists(element.job.id) and store.list_trainings("element", "local") == []
        paths = store.dataset_paths(dataset.id)
        store.delete_dataset(dataset.id)
        assert not any(path.exists() for path in paths)
        with pytest.raises(UnknownAssetError):
            store.dataset(dataset.id)


def test_newer_schema_is_refused(tmp_path):
    AssetStore(tmp_path).close()
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="upgrade refgen"):
        AssetStore(tmp_path)


def test_a_bounded_queue_never_overshoots_under_simultaneous_callers(store):
    from concurrent.futures import ThreadPoolExecutor

    from engine.api.store import QueueFullError

    def attempt(_):
        try:
            return store.create_generation({"prompt": "x"}, max_pending=5).id
        except QueueFullError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = [job for job in pool.map(attempt, range(40)) if job]
    assert len(created) == 5 and store.pending_count() == 5


# ---------------------------------------------------------------------------- crash leftovers, modes

def test_sweep_removes_only_unreferenced_store_files_and_logs_them(store, caplog):
    store.complete_generation(store.create_generation({}).id, [output()])
    upload = store.new_upload("png")
    store.complete_upload(upload.id, upload.token, png())
    kept = files(store)
    never_committed = [f"{uuid.uuid4()}.png", f"{store.new_upload('jpg').id}.jpg"]  # killed before the commit
    temps = [staging_path(store.files / name).name for name in (never_committed[0], kept[0])]  # killed mid-write
    foreign = ["notes.txt", "holiday.png", staging_path(store.files / "holiday.png").name,
               f"{uuid.uuid4()}.txt", f"{str(uuid.uuid4()).upper()}.png"]
    for name in never_committed + temps + foreign:
        (store.files / name).write_bytes(b"x")
    folder = f"{uuid.uuid4()}.png"
    (store.files / folder).mkdir()  # a folder is never one of the store's files
    with caplog.at_level(logging.WARNING, logger="refgen.store"):
        removed = store.sweep_orphans()
    assert removed == sorted(never_committed + temps)
    assert files(store) == sorted(kept + foreign + [folder])
    assert all(name in caplog.text for name in removed)
    assert store.sweep_orphans() == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_a_plain_write_gets(tmp_path, refgen_home, umask, mode):
    """Generated PNGs, uploads, a cache file and a preset: 0666 less the umask, like open() (all write_atomic)."""
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        with AssetStore(tmp_path / "api") as store:
            upload = store.new_upload("png")
            store.complete_upload(upload.id, upload.token, png())
            done = store.complete_generation(store.create_generation({}).id, [output()])
        weights = tmp_path / "weights.bin"  # not hashed yet: the cache file is rewritten
        weights.write_bytes(b"w")
        cached_sha256(weights)
        written = [store.files / f"{upload.id}.png", done.images[0].path, paths.cache_dir() / "sha256.json",
                   save_user_preset(Preset(name="modes"), folder=tmp_path / "presets")]
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(path.stat().st_mode) for path in [plain, *written]} == {mode}


def test_progress_is_skipped_not_waited_for_while_another_writer_holds_the_database(store, tmp_path):
    """A running job's step must not wait out the busy timeout (seconds) because a second server or a long
    write holds the lock: that progress is dropped, the next one lands."""
    import time

    job = store.create_generation({"prompt": "x"})
    other = sqlite3.connect(store.root / DATABASE_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    assert store.set_progress(job.id, {"step": 1, "total": 4}) is False
    assert time.monotonic() - started < 1.0
    other.execute("ROLLBACK")
    other.close()
    assert store.set_progress(job.id, {"step": 2, "total": 4}) is True
    assert store.generation(job.id).progress == {"step": 2, "total": 4}
