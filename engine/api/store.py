"""The local API's asset store: uploaded init images, generations (the job queue itself), generated
images and upscale variations, in one SQLite database under the data folder; image files
beside it, written atomically. Ids are UUID4 strings; no user-supplied string ever becomes a path
(files are named `<uuid>.<ext>` by the store, the extension from a fixed list).

    store = AssetStore()                         # <REFGEN_HOME>/api/refgen.sqlite3 + <REFGEN_HOME>/api/files/
    upload = store.new_upload("png")             # an id + a one-time token the upload must present
    store.complete_upload(upload.id, upload.token, data)    # validated as an image, written atomically
    generation = store.create_generation(body, user_id)     # status PENDING: queued
    job = store.claim_next(worker)               # the worker's atomic claim (PENDING, not yet claimed)
    store.heartbeat(worker)                      # "still running it" (the Worker's heartbeat thread)
    store.complete_generation(job.id, outputs, worker)   # images and status COMPLETE in one transaction
    store.fail_generation(job.id, "why", worker) # status FAILED with its error
    store.release_interrupted(); store.sweep_orphans()      # what a dead worker left (at start, then periodically)
    dataset = store.create_dataset("faces")      # training: dataset images are uploads with a dataset_id
    element = store.create_training("element", "mine", None, dataset.id, body, job_body)  # record + "training" job

Statuses are Leonardo's: PENDING (queued or running), COMPLETE, FAILED. Several workers (threads of one server,
`refgen worker` processes on the same machine) share one queue: a claim names its worker (`host:pid:name`, see
`worker_id`) and is refreshed by the worker's heartbeat. `release_interrupted()` puts back the claims of dead
workers only (a process of this machine that no longer runs, or a heartbeat older than the lease), so no job is lost
and a live worker's job is never taken from it; a job is COMPLETE only once its images are committed by the worker
that holds its claim, so none is recorded twice.

One machine: SQLite's locks are only reliable on a local disk (not NFS/SMB), and the image files sit beside the
database. Workers on several machines would need a server database (PostgreSQL: claims with SELECT ... FOR UPDATE
SKIP LOCKED, leases as here), an object store for the files (S3/MinIO) and the store's methods over both; SQLite
stays the embedded default. Files are
written before the rows that name them and removed after the rows are gone, so a row never names a
missing file; a kill in between leaves store-named files no row references (and write_atomic's temp
files), which `sweep_orphans()` removes at start-up.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from .. import paths
from ..errors import RefgenError
from ..images import STAGING_NAME, load_rgb, write_atomic

Status = Literal["PENDING", "COMPLETE", "FAILED"]
JobKind = Literal["generation", "upscale", "training", "ideogram"]  # ideogram: a generation from the Ideogram routes
TrainingKind = Literal["element", "model"]
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
DEFAULT_USER = "local"  # a single-user server: every generation belongs to this user id


class StoreError(RefgenError):
    """The store cannot do what was asked (bad extension, bad token, unusable upload)."""


class QueueFullError(StoreError):
    """create_generation with max_pending: that many jobs are already waiting or running."""


class UnknownAssetError(StoreError, KeyError):
    """No asset with that id (or an id that is not a UUID at all): the server answers 404."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown id"


@dataclass(frozen=True)
class Upload:
    """An init image slot: created empty, filled once by `complete_upload` with the token."""

    id: str
    extension: str
    token: str  # one-time secret the upload must present (Leonardo's presigned-POST `fields`)
    created_at: str  # ISO 8601 UTC
    uploaded: bool = False
    width: Optional[int] = None
    height: Optional[int] = None
    dataset_id: Optional[str] = None  # a dataset image (POST /datasets/{id}/upload), not an init image


@dataclass(frozen=True)
class Dataset:
    """A training dataset: a name and its images (completed uploads, oldest first)."""

    id: str
    user_id: str
    name: str
    description: Optional[str]
    created_at: str
    updated_at: str
    images: tuple[Upload, ...] = ()


@dataclass(frozen=True)
class Training:
    """A trained LoRA: a Leonardo element (integer id) or custom model (UUID id), and the job that trains it.
    `lora` is its file name in the store's LoRA folder (`AssetStore.loras`); status and progress are the job's."""

    id: str  # the element's integer id as text, or the custom model's UUID
    kind: TrainingKind
    user_id: str
    name: str
    description: Optional[str]
    dataset_id: str
    lora: str
    body: dict[str, Any]  # the Leonardo request body as received
    created_at: str
    job: "Generation"


@dataclass(frozen=True)
class GeneratedImage:
    id: str
    generation_id: str
    index: int  # position in the returned (possibly ranked) order
    seed: int
    path: Path  # the PNG, with refgen provenance
    identity_score: Optional[float] = None  # character requests; None: not a character request or no face
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    id: str
    user_id: str
    kind: JobKind  # "generation" or "upscale" (an upscale variation of a generated image)
    status: Status
    body: dict[str, Any]  # the Leonardo request body as received (upscale: {"id": generated image id})
    created_at: str
    started_at: Optional[str] = None  # set by claim_next
    finished_at: Optional[str] = None
    error: Optional[str] = None
    images: tuple[GeneratedImage, ...] = ()
    progress: Optional[dict[str, Any]] = None  # a running training job's {"step", "total", "loss", "elapsed"}
    worker: Optional[str] = None  # the worker that claimed it last (worker_id's form); None: never claimed
    attempts: int = 0  # how many times it was claimed (more than 1: a worker died running it)


@dataclass(frozen=True)
class Output:
    """One finished image handed to `complete_generation`: PNG bytes (with provenance) and its facts."""

    png: bytes
    seed: int
    metadata: dict[str, Any]
    identity_score: Optional[float] = None


# ------------------------------------------------------------------------------------ implementation



log = logging.getLogger("refgen.store")

DATABASE_NAME = "refgen.sqlite3"
FILES_DIR = "files"
LORAS_DIR = "loras"
BUSY_TIMEOUT_MS = 10_000  # another process (a second server on the same folder) holding the write lock
LEASE_SECONDS = 120.0  # a claim whose worker has not beaten for this long is released (a hung or vanished worker)


def worker_id(name: str = "worker") -> str:
    """A claim's owner: this machine, this process, and a name for the worker within it."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}"


def _claim_is_dead(claimed_by: Optional[str], beat: Optional[str], lease_seconds: float) -> bool:
    """A claim nobody will finish: unnamed (made before claims had owners), a process of this machine that no longer
    runs, or no heartbeat for `lease_seconds` (a hung worker, or one on a machine whose processes we cannot see)."""
    if not claimed_by or beat is None:
        return True
    host, _, rest = claimed_by.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and not _process_runs(int(pid)):
        return True
    return (datetime.now(timezone.utc) - datetime.fromisoformat(beat)).total_seconds() > lease_seconds


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True

# Version 1. Later versions append their migration to MIGRATIONS; `_migrate` runs the missing ones in order.
# `seq` orders jobs (oldest first, newest first): created_at may tie, and VACUUM may renumber a plain rowid.
_SCHEMA_V1 = """
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    extension TEXT NOT NULL,
    token TEXT NOT NULL,
    created_at TEXT NOT NULL,
    uploaded INTEGER NOT NULL DEFAULT 0,
    width INTEGER,
    height INTEGER
);
CREATE TABLE generations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error TEXT,
    claimed_at TEXT
);
CREATE INDEX generations_queue ON generations (status, claimed_at, seq);
CREATE INDEX generations_user ON generations (user_id, seq);
CREATE TABLE generated_images (
    id TEXT PRIMARY KEY,
    generation_id TEXT NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    path TEXT NOT NULL,
    identity_score REAL,
    metadata TEXT NOT NULL,
    UNIQUE (generation_id, idx)
);
CREATE TABLE characters (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    folder TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
# v2: characters live in their own folders (adapters/characters.py); the store never used its table.
_SCHEMA_V2 = "DROP TABLE characters;"
# v3: training (Leonardo datasets, elements, custom models). Dataset images are uploads with a dataset_id (the
# init-image upload path, its checks and its files); a training is a job of kind "training" plus its record.
_SCHEMA_V3 = """
ALTER TABLE generations ADD COLUMN progress TEXT;
CREATE TABLE datasets (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
ALTER TABLE uploads ADD COLUMN dataset_id TEXT REFERENCES datasets (id) ON DELETE CASCADE;
CREATE INDEX uploads_dataset ON uploads (dataset_id);
CREATE TABLE trainings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    model_id TEXT UNIQUE,
    job_id TEXT NOT NULL UNIQUE REFERENCES generations (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    dataset_id TEXT NOT NULL,
    lora TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX trainings_user ON trainings (user_id, kind, seq);
"""
# v4: several workers on one queue: who holds a claim, its last heartbeat, how many times the job was claimed.
_SCHEMA_V4 = """
ALTER TABLE generations ADD COLUMN claimed_by TEXT;
ALTER TABLE generations ADD COLUMN heartbeat_at TEXT;
ALTER TABLE generations ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0
"""
MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4)  # MIGRATIONS[n] takes the schema from version n to n + 1
SCHEMA_VERSION = len(MIGRATIONS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _checked_id(value: Any) -> str:
    """`value` if it is a canonical UUID string; anything else is unknown (and never reaches a path)."""
    if isinstance(value, str) and len(value) == 36:
        try:
            if str(uuid.UUID(value)) == value:
                return value
        except ValueError:
            pass
    raise UnknownAssetError(f"unknown id {str(value)[:80]!r}")


def _is_id(value: Any) -> bool:
    try:
        _checked_id(value)
        return True
    except UnknownAssetError:
        return False


def _is_own_name(name: str) -> bool:
    """`<uuid>.<image extension>`: the only names the store gives its files."""
    stem, _, extension = name.partition(".")
    return extension in IMAGE_EXTENSIONS and _is_id(stem)


def _is_orphan(name: str, referenced: set[str]) -> bool:
    """A temp file of a store-named file (never referenced), or a store-named file no row references."""
    staged = STAGING_NAME.fullmatch(name)
    if staged:
        return _is_own_name(staged["target"])
    return _is_own_name(name) and name not in referenced


def _upload(row: sqlite3.Row) -> Upload:
    return Upload(id=row["id"], extension=row["extension"], token=row["token"], created_at=row["created_at"],
                  uploaded=bool(row["uploaded"]), width=row["width"], height=row["height"], dataset_id=row["dataset_id"])


def _score(value: Any) -> Optional[float]:
    """A finite number, or None ("no face", absent): what the identity_score column holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


class AssetStore:
    """See the module docstring. Thread-safe: one connection, every use under one lock (the server's
    request threads and the worker share a store); other processes are kept out by SQLite's own locks."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else paths.data_dir() / "api"
        self.files = self.root / FILES_DIR
        self.files.mkdir(parents=True, exist_ok=True)
        self.loras = self.root / LORAS_DIR  # trained elements' and custom models' LoRA files (a LoraLibrary root)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / DATABASE_NAME, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a finished job or an accepted upload survives a power cut too
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "AssetStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- plumbing

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: the write lock up front, so read-then-write steps cannot interleave."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row["version"] if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.root / DATABASE_NAME} has schema version {version}; this refgen knows "
                                 f"up to {SCHEMA_VERSION}: upgrade refgen")
            for migration in MIGRATIONS[version:]:
                for statement in filter(str.strip, migration.split(";")):
                    db.execute(statement)  # executescript would commit the open transaction (so: no ";" in a statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _file(self, name: str) -> Path:
        return self.files / name

    def _remove_files(self, names: list[str]) -> list[str]:
        """The names removed (or already gone); a failure is logged, not raised."""
        removed = []
        for name in names:
            try:
                self._file(name).unlink(missing_ok=True)
                removed.append(name)
            except OSError as exc:  # a leftover file is harmless; a failed delete must not undo the rows
                log.warning("could not remove %s: %s", self._file(name), exc)
        return removed

    def sweep_orphans(self) -> list[str]:
        """Remove what a killed process left in the files folder: temp files of atomic writes, and store-named
        files no row references. Any other name there is not the store's and stays. Returns the names removed.

        Call at start-up, before this process's workers run: a running job's images exist before their rows. While
        another live worker holds a claim (a `refgen worker` process on this folder), nothing is swept: its files
        may be half-way to their rows.
        """
        with self._transaction() as db:  # no upload of this process can commit its file meanwhile
            claims = db.execute("SELECT claimed_by, heartbeat_at FROM generations "
                                "WHERE status = 'PENDING' AND claimed_at IS NOT NULL").fetchall()
            if any(not _claim_is_dead(row["claimed_by"], row["heartbeat_at"], LEASE_SECONDS) for row in claims):
                log.info("not sweeping %s: another worker is running a job", self.files)
                return []
            referenced = {row[0] for row in db.execute(
                "SELECT path FROM generated_images UNION SELECT id || '.' || extension FROM uploads WHERE uploaded = 1")}
            with os.scandir(self.files) as entries:
                orphans = sorted(entry.name for entry in entries
                                 if entry.is_file(follow_symlinks=False) and _is_orphan(entry.name, referenced))
            removed = self._remove_files(orphans)
        if removed:
            log.warning("removed %d file(s) an interrupted run left in %s: %s", len(removed), self.files,
                        ", ".join(removed))
        return removed

    # -- uploads

    def new_upload(self, extension: str, dataset_id: Optional[str] = None) -> Upload:
        """An empty upload slot; with `dataset_id`, an image of that dataset (UnknownAssetError if it is unknown)."""
        extension = extension.lower().lstrip(".") if isinstance(extension, str) else extension
        if extension not in IMAGE_EXTENSIONS:
            raise StoreError(f"extension {extension!r} is not accepted; use one of {', '.join(IMAGE_EXTENSIONS)}")
        upload = Upload(id=str(uuid.uuid4()), extension=extension, token=secrets.token_urlsafe(32), created_at=_now(),
                        dataset_id=None if dataset_id is None else _checked_id(dataset_id))
        with self._transaction() as db:
            if upload.dataset_id is not None:
                self._require_dataset(db, upload.dataset_id)
            db.execute("INSERT INTO uploads (id, extension, token, created_at, dataset_id) VALUES (?, ?, ?, ?, ?)",
                       (upload.id, upload.extension, upload.token, upload.created_at, upload.dataset_id))
        return upload

    def complete_upload(self, upload_id: str, token: str, data: bytes, max_pixels: int = 40_000_000) -> Upload:
        upload_id = _checked_id(upload_id)
        self.upload(upload_id)  # unknown id: 404 before the (slow) decode
        image = load_rgb(bytes(data), "uploaded image", max_pixels=max_pixels)  # InvalidImageError: nothing written
        written: Optional[Path] = None
        try:
            with self._transaction() as db:  # the write lock is held from the token check to the commit
                row = db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
                if row is None:
                    raise UnknownAssetError(f"unknown upload {upload_id}")
                if not isinstance(token, str) or not hmac.compare_digest(row["token"].encode(), token.encode()):
                    raise StoreError("wrong upload token")
                if row["uploaded"]:
                    raise StoreError(f"upload {upload_id} was already completed; request a new one")
                written = write_atomic(self._file(f"{upload_id}.{row['extension']}"), bytes(data))
                db.execute("UPDATE uploads SET uploaded = 1, width = ?, height = ? WHERE id = ?",
                           (image.width, image.height, upload_id))
        except BaseException:
            if written is not None:  # only our own file: a refused second upload never touches the first
                written.unlink(missing_ok=True)
            raise
        return self.upload(upload_id)

    def upload(self, upload_id: str) -> Upload:
        rows = self._query("SELECT * FROM uploads WHERE id = ?", (_checked_id(upload_id),))
        if not rows:
            raise UnknownAssetError(f"unknown upload {upload_id}")
        return _upload(rows[0])

    def delete_upload(self, upload_id: str) -> None:
        upload = self.upload(upload_id)
        with self._transaction() as db:
            db.execute("DELETE FROM uploads WHERE id = ?", (upload.id,))
        self._remove_files([f"{upload.id}.{upload.extension}"])

    def upload_path(self, upload_id: str) -> Optional[Path]:
        """The uploaded file, or None while the upload is still empty. UnknownAssetError for an unknown id."""
        upload = self.upload(upload_id)
        return self._file(f"{upload.id}.{upload.extension}") if upload.uploaded else None

    def resolve_image(self, image_id: str, kind: str) -> Optional[Path]:
        if not _is_id(image_id):
            return None
        try:
            if kind == "UPLOADED":
                return self.upload_path(image_id)
            if kind == "GENERATED":
                return self.generated_image(image_id).path
        except UnknownAssetError:
            return None
        return None

    # -- generations

    def create_generation(self, body: dict, user_id: str = DEFAULT_USER, kind: JobKind = "generation",
                          max_pending: Optional[int] = None) -> Generation:
        """Queue a job (status PENDING). With `max_pending`, QueueFullError when that many are already
        pending: counted and inserted in one write transaction, so simultaneous callers cannot overshoot."""
        if kind not in ("generation", "upscale", "training", "ideogram"):
            raise StoreError(f"unknown job kind {kind!r}")
        with self._transaction() as db:
            generation_id = self._insert_job(db, body, user_id, kind, max_pending)
        return self.generation(generation_id)

    def _insert_job(self, db: sqlite3.Connection, body: dict, user_id: str, kind: str, max_pending: Optional[int]) -> str:
        if max_pending is not None:
            pending = db.execute("SELECT COUNT(*) FROM generations WHERE status = 'PENDING'").fetchone()[0]
            if pending >= max_pending:
                raise QueueFullError(f"the queue is full ({max_pending} jobs); retry later")
        generation_id = str(uuid.uuid4())
        db.execute("INSERT INTO generations (id, user_id, kind, status, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (generation_id, user_id, kind, "PENDING", json.dumps(body), _now()))
        return generation_id

    def generation(self, generation_id: str) -> Generation:
        with self._lock:  # the row and its images from one consistent moment
            rows = self._query("SELECT * FROM generations WHERE id = ?", (_checked_id(generation_id),))
            if not rows:
                raise UnknownAssetError(f"unknown generation {generation_id}")
            return self._generation(rows[0])

    def _generation(self, row: sqlite3.Row) -> Generation:
        images = self._query("SELECT * FROM generated_images WHERE generation_id = ? ORDER BY idx", (row["id"],))
        return Generation(
            id=row["id"], user_id=row["user_id"], kind=row["kind"], status=row["status"], body=json.loads(row["body"]),
            created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            error=row["error"], images=tuple(self._image(image) for image in images),
            progress=json.loads(row["progress"]) if row["progress"] else None,
            worker=row["claimed_by"], attempts=row["attempts"],
        )

    def _image(self, row: sqlite3.Row) -> GeneratedImage:
        return GeneratedImage(id=row["id"], generation_id=row["generation_id"], index=row["idx"], seed=row["seed"],
                              path=self._file(row["path"]), identity_score=row["identity_score"],
                              metadata=json.loads(row["metadata"]))

    def upscales_of(self, image_ids: list[str]) -> dict[str, list[Generation]]:
        """The upscale jobs of each generated image (oldest first): Leonardo lists them under the image."""
        if not image_ids:
            return {}
        marks = ", ".join("?" * len(image_ids))
        with self._lock:
            rows = self._query(f"SELECT * FROM generations WHERE kind = 'upscale' AND json_extract(body, '$.id') IN ({marks}) "
                               "ORDER BY seq", tuple(image_ids))
            jobs = [self._generation(row) for row in rows]
        found: dict[str, list[Generation]] = {}
        for job in jobs:
            found.setdefault(job.body["id"], []).append(job)
        return found

    def list_generations(self, user_id: str, offset: int = 0, limit: int = 10) -> list[Generation]:
        if offset < 0 or limit < 0:
            raise StoreError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
        with self._lock:
            rows = self._query("SELECT * FROM generations WHERE user_id = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                               (user_id, limit, offset))
            return [self._generation(row) for row in rows]

    def delete_generation(self, generation_id: str) -> None:
        generation_id = _checked_id(generation_id)
        with self._transaction() as db:
            names = [row["path"] for row in db.execute(
                "SELECT path FROM generated_images WHERE generation_id = ?", (generation_id,))]
            db.execute("DELETE FROM generated_images WHERE generation_id = ?", (generation_id,))
            if db.execute("DELETE FROM generations WHERE id = ?", (generation_id,)).rowcount == 0:
                raise UnknownAssetError(f"unknown generation {generation_id}")
        self._remove_files(names)  # after the commit: a crash in between leaves files, never rows without files

    def delete_image(self, image_id: str) -> GeneratedImage:
        """One image of a generation (its generation and other images stay); returns what was deleted."""
        image = self.generated_image(image_id)
        with self._transaction() as db:
            if db.execute("DELETE FROM generated_images WHERE id = ?", (image.id,)).rowcount == 0:
                raise UnknownAssetError(f"unknown generated image {image_id}")
        self._remove_files([image.path.name])  # after the commit, as delete_generation
        return image

    def generated_image(self, image_id: str) -> GeneratedImage:
        rows = self._query("SELECT * FROM generated_images WHERE id = ?", (_checked_id(image_id),))
        if not rows:
            raise UnknownAssetError(f"unknown generated image {image_id}")
        return self._image(rows[0])

    # -- the queue

    def pending_count(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM generations WHERE status = 'PENDING'")[0]["n"]

    def claim_next(self, worker: Optional[str] = None) -> Optional[Generation]:
        """The oldest queued job nobody holds, claimed for `worker` (default: this process's worker_id())."""
        worker = worker or worker_id()
        with self._transaction() as db:
            row = db.execute("SELECT id FROM generations WHERE status = 'PENDING' AND claimed_at IS NULL "
                             "ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = _now()
            claimed = db.execute("UPDATE generations SET claimed_at = ?, started_at = ?, claimed_by = ?, heartbeat_at = ?, "
                                 "attempts = attempts + 1 WHERE id = ? AND status = 'PENDING' AND claimed_at IS NULL",
                                 (now, now, worker, now, row["id"]))
            if claimed.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; checked so it never double-runs
                return None
        return self.generation(row["id"])

    def heartbeat(self, worker: str) -> int:
        """`worker` is alive and still on its jobs: their claims are not released. The number of claims it holds."""
        with self._transaction() as db:
            return db.execute("UPDATE generations SET heartbeat_at = ? WHERE claimed_by = ? AND status = 'PENDING'",
                              (_now(), worker)).rowcount

    def complete_generation(self, generation_id: str, outputs: list[Output], worker: Optional[str] = None) -> Generation:
        """The job's images and COMPLETE, in one transaction; with `worker`, only while that worker holds its claim."""
        generation_id = _checked_id(generation_id)
        self._require_pending(generation_id, worker=worker)  # fail before writing files when we already know
        written = [(str(uuid.uuid4()), output) for output in outputs]
        try:
            for image_id, output in written:  # files first: a row never points at a missing file
                write_atomic(self._file(f"{image_id}.png"), output.png)
            with self._transaction() as db:
                self._require_pending(generation_id, db, worker)
                db.executemany(
                    "INSERT INTO generated_images (id, generation_id, idx, seed, path, identity_score, metadata) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(image_id, generation_id, index, int(output.seed), f"{image_id}.png",
                      _score(output.identity_score), json.dumps(output.metadata))
                     for index, (image_id, output) in enumerate(written)])
                db.execute("UPDATE generations SET status = 'COMPLETE', finished_at = ?, error = NULL WHERE id = ?",
                           (_now(), generation_id))
        except BaseException:
            self._remove_files([f"{image_id}.png" for image_id, _ in written])
            raise
        return self.generation(generation_id)

    def _require_pending(self, generation_id: str, db: Optional[sqlite3.Connection] = None,
                         worker: Optional[str] = None) -> None:
        """UnknownAssetError if deleted meanwhile; StoreError if already finished (never recorded twice) or, with
        `worker`, if its claim was released (it was taken for dead, and another worker runs the job now)."""
        with self._lock:
            row = (db or self._db).execute("SELECT status, claimed_by FROM generations WHERE id = ?", (generation_id,)).fetchone()
        if row is None:
            raise UnknownAssetError(f"unknown generation {generation_id} (deleted while it ran?)")
        if row["status"] != "PENDING":
            raise StoreError(f"generation {generation_id} is already {row['status']}")
        if worker is not None and row["claimed_by"] != worker:
            raise StoreError(f"generation {generation_id} is no longer claimed by {worker} (released as dead)")

    def fail_generation(self, generation_id: str, error: str, worker: Optional[str] = None) -> Generation:
        generation_id = _checked_id(generation_id)
        with self._transaction() as db:
            self._require_pending(generation_id, db, worker)
            db.execute("UPDATE generations SET status = 'FAILED', finished_at = ?, error = ? WHERE id = ?",
                       (_now(), str(error), generation_id))
        return self.generation(generation_id)

    def release_interrupted(self, lease_seconds: float = LEASE_SECONDS) -> int:
        """Put the claims of dead workers back in the queue (see the module docstring); safe while other workers run."""
        with self._transaction() as db:
            rows = db.execute("SELECT id, claimed_by, heartbeat_at FROM generations "
                              "WHERE status = 'PENDING' AND claimed_at IS NOT NULL").fetchall()
            dead = [row["id"] for row in rows if _claim_is_dead(row["claimed_by"], row["heartbeat_at"], lease_seconds)]
            for job_id in dead:
                db.execute("UPDATE generations SET claimed_at = NULL, started_at = NULL, claimed_by = NULL, "
                           "heartbeat_at = NULL WHERE id = ?", (job_id,))
        if dead:
            log.info("released %d interrupted job(s) back to the queue", len(dead))
        return len(dead)

    # -- progress (training jobs)

    def set_progress(self, generation_id: str, progress: dict[str, Any]) -> bool:
        """Record a running job's progress (shown while it is PENDING); a deleted job is ignored. Best effort:
        when another writer holds the database this progress is skipped (False), never waited for, so a busy
        store slows no generation."""
        with self._lock:
            self._db.execute("PRAGMA busy_timeout = 0")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return False
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            try:
                self._db.execute("UPDATE generations SET progress = ? WHERE id = ? AND status = 'PENDING'",
                                 (json.dumps(progress), _checked_id(generation_id)))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return True

    def job_exists(self, generation_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM generations WHERE id = ?", (_checked_id(generation_id),)))

    # -- datasets

    def create_dataset(self, name: str, description: Optional[str] = None, user_id: str = DEFAULT_USER) -> Dataset:
        if not isinstance(name, str) or not name.strip():
            raise StoreError("a dataset needs a name")
        dataset_id, now = str(uuid.uuid4()), _now()
        with self._transaction() as db:
            db.execute("INSERT INTO datasets (id, user_id, name, description, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (dataset_id, user_id, name, description, now, now))
        return self.dataset(dataset_id)

    def _require_dataset(self, db: sqlite3.Connection, dataset_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        if row is None:
            raise UnknownAssetError(f"unknown dataset {dataset_id}")
        return row

    def dataset(self, dataset_id: str) -> Dataset:
        """The dataset and its uploaded images (slots not yet filled are left out)."""
        dataset_id = _checked_id(dataset_id)
        with self._lock:
            row = self._require_dataset(self._db, dataset_id)
            images = self._query("SELECT * FROM uploads WHERE dataset_id = ? AND uploaded = 1 ORDER BY rowid", (dataset_id,))
        return Dataset(id=row["id"], user_id=row["user_id"], name=row["name"], description=row["description"],
                       created_at=row["created_at"], updated_at=row["updated_at"], images=tuple(_upload(image) for image in images))

    def dataset_paths(self, dataset_id: str) -> list[Path]:
        return [self._file(f"{image.id}.{image.extension}") for image in self.dataset(dataset_id).images]

    def add_dataset_image(self, dataset_id: str, data: bytes, extension: str = "png", max_pixels: int = 40_000_000) -> Upload:
        """An image put straight into a dataset (e.g. a copy of a generated image): the upload path's checks."""
        upload = self.new_upload(extension, dataset_id)
        try:
            return self.complete_upload(upload.id, upload.token, data, max_pixels)
        except BaseException:
            with self._transaction() as db:
                db.execute("DELETE FROM uploads WHERE id = ? AND uploaded = 0", (upload.id,))
            raise

    def delete_dataset(self, dataset_id: str) -> None:
        dataset_id = _checked_id(dataset_id)
        with self._transaction() as db:
            self._require_dataset(db, dataset_id)
            names = [f"{row['id']}.{row['extension']}" for row in db.execute(
                "SELECT id, extension FROM uploads WHERE dataset_id = ? AND uploaded = 1", (dataset_id,))]
            db.execute("DELETE FROM uploads WHERE dataset_id = ?", (dataset_id,))
            db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
        self._remove_files(names)

    # -- trainings (elements and custom models)

    def create_training(self, kind: TrainingKind, name: str, description: Optional[str], dataset_id: str,
                        body: dict, job_body: dict, user_id: str = DEFAULT_USER,
                        max_pending: Optional[int] = None) -> Training:
        """The record and its queued job (kind "training"), in one transaction. The job body gets "training"
        (the record's id) and "lora" (its file name: element-<id> or model-<uuid>, never reused)."""
        if kind not in ("element", "model"):
            raise StoreError(f"unknown training kind {kind!r}")
        dataset_id = _checked_id(dataset_id)
        with self._transaction() as db:
            self._require_dataset(db, dataset_id)
            model_id = str(uuid.uuid4()) if kind == "model" else None
            job_id = self._insert_job(db, job_body, user_id, "training", max_pending)
            seq = db.execute("INSERT INTO trainings (kind, model_id, job_id, user_id, name, description, dataset_id, lora, "
                             "body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                             (kind, model_id, job_id, user_id, name, description, dataset_id, json.dumps(body), _now())).lastrowid
            training_id = model_id or str(seq)
            lora = f"{kind}-{training_id}"
            db.execute("UPDATE trainings SET lora = ? WHERE seq = ?", (lora, seq))
            db.execute("UPDATE generations SET body = ? WHERE id = ?",
                       (json.dumps({**job_body, "training": training_id, "kind": kind, "lora": lora}), job_id))
        return self.training(kind, training_id)

    def training(self, kind: TrainingKind, training_id: Any) -> Training:
        """An element (by its integer id, given as int or text) or a custom model (by UUID)."""
        rows = self._query(*self._training_query(kind, training_id))
        if not rows:
            raise UnknownAssetError(f"unknown {'element' if kind == 'element' else 'custom model'} {str(training_id)[:80]}")
        return self._training(rows[0])

    @staticmethod
    def _training_query(kind: TrainingKind, training_id: Any) -> tuple[str, tuple]:
        if kind == "element":
            text = str(training_id)
            if isinstance(training_id, bool) or not text.isascii() or not text.isdigit() or len(text) > 18:
                raise UnknownAssetError(f"unknown element {text[:80]!r}")
            return "SELECT * FROM trainings WHERE kind = 'element' AND seq = ?", (int(text),)
        return "SELECT * FROM trainings WHERE kind = 'model' AND model_id = ?", (_checked_id(training_id),)

    def _training(self, row: sqlite3.Row) -> Training:
        return Training(id=row["model_id"] or str(row["seq"]), kind=row["kind"], user_id=row["user_id"], name=row["name"],
                        description=row["description"], dataset_id=row["dataset_id"], lora=row["lora"],
                        body=json.loads(row["body"]), created_at=row["created_at"], job=self.generation(row["job_id"]))

    def list_trainings(self, kind: TrainingKind, user_id: str, offset: int = 0, limit: int = 100) -> list[Training]:
        with self._lock:
            rows = self._query("SELECT * FROM trainings WHERE kind = ? AND user_id = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                               (kind, user_id, limit, offset))
            return [self._training(row) for row in rows]

    def delete_training(self, kind: TrainingKind, training_id: Any) -> Training:
        """The record and its job (a running job stops at its next step); the caller removes the LoRA file."""
        training = self.training(kind, training_id)
        with self._transaction() as db:
            db.execute("DELETE FROM trainings WHERE job_id = ?", (training.job.id,))
            db.execute("DELETE FROM generations WHERE id = ?", (training.job.id,))
        return training
