"""The local API's asset store: uploaded init images, generations (the job queue itself), generated
images, upscale variations and characters, in one SQLite database under the data folder; image files
beside it, written atomically. Ids are UUID4 strings; no user-supplied string ever becomes a path
(files are named `<uuid>.<ext>` by the store, the extension from a fixed list).

    store = AssetStore()                         # <REFGEN_HOME>/api/refgen.sqlite3 + <REFGEN_HOME>/api/files/
    upload = store.new_upload("png")             # an id + a one-time token the upload must present
    store.complete_upload(upload.id, upload.token, data)    # validated as an image, written atomically
    generation = store.create_generation(body, user_id)     # status PENDING: queued
    job = store.claim_next()                     # the worker's atomic claim (PENDING, not yet claimed)
    store.complete_generation(job.id, outputs)   # images and status COMPLETE in one transaction
    store.fail_generation(job.id, "why")         # status FAILED with its error

Statuses are Leonardo's: PENDING (queued or running), COMPLETE, FAILED. A claimed job that never
finished (the process died) is released again by `release_interrupted()` at start-up, so no job is
lost; a job is COMPLETE only once its images are committed, so none is recorded twice.

THIS FILE IS THE AGREED INTERFACE (signatures, dataclasses, errors). Implementation: see below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import RefgenError

Status = Literal["PENDING", "COMPLETE", "FAILED"]
JobKind = Literal["generation", "upscale"]
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
DEFAULT_USER = "local"  # a single-user server: every generation belongs to this user id


class StoreError(RefgenError):
    """The store cannot do what was asked (bad extension, bad token, unusable upload)."""


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


@dataclass(frozen=True)
class Output:
    """One finished image handed to `complete_generation`: PNG bytes (with provenance) and its facts."""

    png: bytes
    seed: int
    metadata: dict[str, Any]
    identity_score: Optional[float] = None


# The AssetStore and its methods (implemented below this line by the store's author):
#
# class AssetStore:
#     def __init__(self, root: Optional[Path] = None)            # default: paths.data_dir() / "api"
#     def new_upload(self, extension: str) -> Upload              # StoreError for an extension not in IMAGE_EXTENSIONS
#     def complete_upload(self, upload_id: str, token: str, data: bytes, max_pixels: int = 40_000_000) -> Upload
#         # StoreError: wrong token / already uploaded; InvalidImageError: not an image, truncated, too many pixels
#     def upload(self, upload_id: str) -> Upload                  # UnknownAssetError
#     def delete_upload(self, upload_id: str) -> None             # UnknownAssetError
#     def resolve_image(self, image_id: str, kind: str) -> Optional[Path]
#         # engine.leonardo.ImageResolver: "UPLOADED" -> an uploaded init image's file, "GENERATED" -> a generated
#         # image's PNG; None when unknown (or not uploaded yet)
#     def create_generation(self, body: dict, user_id: str = DEFAULT_USER, kind: JobKind = "generation") -> Generation
#     def generation(self, generation_id: str) -> Generation      # with its images; UnknownAssetError
#     def list_generations(self, user_id: str, offset: int = 0, limit: int = 10) -> list[Generation]  # newest first
#     def delete_generation(self, generation_id: str) -> None     # rows and files; UnknownAssetError
#     def generated_image(self, image_id: str) -> GeneratedImage  # UnknownAssetError
#     def pending_count(self) -> int                              # queued + running jobs
#     def claim_next(self) -> Optional[Generation]                # oldest unclaimed PENDING job, claimed atomically
#     def complete_generation(self, generation_id: str, outputs: list[Output]) -> Generation
#         # files written atomically, then rows + COMPLETE in one transaction; a deleted generation: UnknownAssetError
#     def fail_generation(self, generation_id: str, error: str) -> Generation
#     def release_interrupted(self) -> int                        # claimed-but-unfinished jobs back to the queue
#     def register_character(self, name: str, folder: Path) -> str   # characters table (id, name, folder, created)
#     def characters(self) -> list[dict]
