"""refgen's local HTTP API: Leonardo.ai's REST v1 paths and JSON shapes, served from this machine.

    app = create_app(AssetStore(), worker, api_key="...")     # a FastAPI app; OpenAPI UI at /docs
    serve(host="127.0.0.1", port=8377)                        # what `refgen serve` runs
    app, worker = service(AssetStore(), model="tiny")         # the same, not started (tests run it in uvicorn)

Every path is under /api/rest/v1, so a Leonardo client works after changing its base URL:

| method + path                       | Leonardo answer key                   | notes                                   |
|-------------------------------------|---------------------------------------|-----------------------------------------|
| POST   /generations                 | sdGenerationJob {generationId}        | validated before queueing; 429 if full  |
| GET    /generations/{id}            | generations_by_pk                     | refgen facts under "refgen"; "error"    |
| GET    /generations/user/{userId}   | generations (offset, limit)           | newest first; upscales are variations   |
| DELETE /generations/{id}            | delete_generations_by_pk {id}         |                                         |
| POST   /init-image                  | uploadInitImage {id, url, fields, key}| then POST multipart fields + file to url|
| POST   /uploads/{id}                | 204 (like S3's presigned POST)        | authorised by the one-time token        |
| GET    /init-image/{id}             | init_images_by_pk                     |                                         |
| DELETE /init-image/{id}             | delete_init_images_by_pk {id}         |                                         |
| POST   /variations/upscale          | sdUpscaleJob {id}                     | body {"id": generated image id}; refgen:|
|                                     |                                       | {"scale": 2 or 4} (default: x4)         |
| GET    /variations/{id}             | generated_image_variation_generic     | transformType UPSCALE; "error"          |
| GET    /me                          | user_details                          | a single local user                     |
| GET    /files/{uuid}.{ext}          | the image bytes                       | the URLs the answers above hand out     |
| GET    /refgen/weights              | refgen extension                      | installed / missing per feature, fetch  |
| GET    /generations/{id}/events     | text/event-stream (refgen extension)  | progress {step, total, phase}; done     |
| *      /refgen/catalog, /refgen/images/{id}, /refgen/characters/... | refgen extensions (engine/api/refgen_routes.py) |
| GET    /                            | refgen studio, the web page           | engine/studio (static files, no key)    |
| POST   /datasets                    | insert_datasets_one {id}              | body {name, description}                |
| GET    /datasets/{id}               | datasets_by_pk (+ dataset_images)     | uploaded images only                    |
| DELETE /datasets/{id}               | delete_datasets_by_pk {id}            | its images too                          |
| POST   /datasets/{id}/upload        | uploadDatasetImage {id, url, fields}  | the init-image upload flow and checks   |
| POST   /datasets/{id}/upload/gen    | uploadDatasetImageFromGen {id}        | body {generatedImageId}: a copy         |
| POST   /elements                    | sdTrainingJob {userLoraId}            | trains an SDXL LoRA (a queued job)      |
| GET    /elements/{id}               | user_loras_by_pk                      | progress under "refgen"; "error"        |
| GET    /elements/user/{userId}      | user_loras                            | newest first                            |
| GET    /elements                    | loras                                 | this server's trained elements          |
| DELETE /elements/{id}               | delete_user_loras_by_pk {id}          | stops a running training; LoRA removed  |
| POST   /models                      | sdTrainingJob {customModelId}         | the same LoRA training, as a model id   |
| GET    /models/{id}                 | custom_models_by_pk                   | progress under "refgen"; "error"        |
| GET    /models/user/{userId}        | custom_models                         | newest first                            |
| DELETE /models/{id}                 | delete_custom_models_by_pk {id}       |                                         |

A generation body may carry refgen's extension object `"refgen": {preset, aspectRatio, bestOf, character}` (a
saved character, a user preset, best-of-N; engine/api/leonardo.py's docstring); Leonardo's SDKs never send it.

Ideogram 3.0's generate, edit and remix endpoints are served on the same app, store, queue and API key, at
Ideogram's own paths (POST /v1/ideogram-v3/generate, /edit, /remix; multipart forms, `Api-Key` header, synchronous
answers in Ideogram's shape): engine/api/ideogram.py (the mapping) and engine/api/ideogram_routes.py (the routes).
Their jobs (kind "ideogram") are also shown by GET /generations/{id}.

Training (engine/api/trainings.py): element and model trainings are jobs of the one queue (kind
"training"), PENDING -> COMPLETE or FAILED with the reason. While one runs, its record's "refgen.progress" is
{step, total, loss, elapsed} (a refgen extension). A generation's `userElements` [{userLoraId, weight}] applies
trained elements' LoRAs; a modelId that is a trained custom model runs on its base model with its LoRA.

Answers are checked against the official SDKs' models (leonardo-ai-sdk, @leonardo-ai/sdk;
tests/test_leonardo_sdk.py): enum fields carry Leonardo's values (scheduler, presetStyle: see
engine/api/leonardo.py), and a Leonardo key without a value is left out rather than sent as null (the SDKs
allow every key to be absent, but null only in some). refgen-only facts sit under "refgen", which the
SDKs ignore. A FAILED job's reason is also the answer's top-level "error", next to the record:
Leonardo's schemas have no field for it, and "error" is where Leonardo's (and refgen's) error answers
put the message.

Errors: {"error": message, "field": Leonardo path or null}. A body refgen cannot run (including an
image id in the body that the store does not know) is 422 naming the field; an id in the URL that
is unknown (or not a UUID at all) is 404; a full queue is 429 with Retry-After.

Security: with an API key every path needs `Authorization: Bearer <key>` (compared in constant
time), except /docs and /openapi.json, the upload URL (its one-time token authorises it, as a
presigned S3 POST does) and /files/ (the image URLs are capabilities: random UUID4 names, handed out
only to authorised callers, like Leonardo's CDN links), and the studio page's own files at / (code, no data; the
page asks for the key and sends it; its Content-Security-Policy lets it load nothing from elsewhere). `serve()`
refuses a non-loopback address without a key. No user-supplied string ever becomes a file path: /files/ looks ids up in the store.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Optional, Sequence

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from ..errors import InvalidImageError, RefgenError
from . import ideogram_routes, refgen_routes
from .leonardo import LeonardoRequestError, ModelTable, leonardo_scheduler, leonardo_style, parse_generation
from .limits import UploadTooLarge, limited
from .store import (DEFAULT_USER, IMAGE_EXTENSIONS, AssetStore, Generation, GeneratedImage, QueueFullError, StoreError,
                    Training, UnknownAssetError)
from .trainings import StoreLoras, TrainingSettings, element_job, model_job, training_run_dir

EVENT_POLL_SECONDS = 0.2  # how often GET /generations/{id}/events looks at the job

log = logging.getLogger("refgen.server")

PREFIX = "/api/rest/v1"
DEFAULT_PORT = 8377
MAX_UPLOAD_BYTES = 20 * 2**20
MULTIPART_OVERHEAD = 64 * 2**10  # form fields and boundaries around the file
RETRY_AFTER_SECONDS = 10
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
FILE_NAME = re.compile(r"^(?P<id>[0-9a-fA-F-]{32,36})\.(?P<ext>png|jpg|jpeg|webp)$")


class ServeError(RefgenError):
    """The server cannot start as configured (e.g. a public address without an API key)."""


# ------------------------------------------------------------------------------------------- app

class UpscaleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: Literal[2, 4] = 4


class UpscaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    isVariation: Optional[bool] = None  # Leonardo's variation flag; refgen upscales generated images only
    refgen: Optional[UpscaleOptions] = None  # refgen extension: x2 or x4 (Leonardo's upscale is the server's x4)


class InitImageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    extension: str


class DatasetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: Optional[str] = None


class DatasetFromGenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generatedImageId: str


def create_app(store: AssetStore, worker=None, *, api_key: Optional[str] = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = 40_000_000, max_queue: int = 64, models: Optional[ModelTable] = None,
               training: Optional[TrainingSettings] = None, ideogram_wait_seconds: float = 600.0) -> FastAPI:
    """The API over `store`; `worker.notify()` is called whenever a job is queued (worker None: jobs only queue).
    `ideogram_wait_seconds`: how long an Ideogram route (synchronous) waits for its job before answering 504."""
    app = FastAPI(title="refgen local API", version="1",
                  description="Leonardo.ai-compatible REST v1 API over a local SDXL engine. See engine/api/server.py.")
    context = _Context(store, worker, models or ModelTable.load(), max_upload_bytes, max_pixels, max_queue)
    context.training = training or TrainingSettings()
    app.include_router(_api_router(context), prefix=PREFIX, dependencies=[Depends(_authoriser(api_key))])
    app.include_router(_public_router(context), prefix=PREFIX)
    _install_error_handlers(app)
    ideogram_routes.install(app, context, api_key, ideogram_wait_seconds)  # Ideogram 3.0's paths, same store and queue
    _install_studio(app)  # last: the page's files answer every path no route above claims
    return app


STUDIO_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                 "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def _install_studio(app: FastAPI) -> None:
    """refgen studio (engine/studio) at `/`: static files under a policy that lets the page load nothing from
    elsewhere. The page itself needs no key; everything it shows comes from the API, which does."""
    from fastapi.staticfiles import StaticFiles

    from ..studio import STATIC_DIR

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True, check_dir=False), name="studio")

    @app.middleware("http")
    async def studio_policy(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith((PREFIX, "/v1/", "/docs", "/redoc", "/openapi.json")):
            response.headers.setdefault("Content-Security-Policy", STUDIO_POLICY)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response


class _Context:
    """What the route functions share (created per app, never module state)."""

    def __init__(self, store, worker, models, max_upload_bytes, max_pixels, max_queue):
        self.store, self.worker, self.models = store, worker, models
        self.max_upload_bytes, self.max_pixels, self.max_queue = max_upload_bytes, max_pixels, max_queue
        self.trained = StoreLoras(store)
        self.training = TrainingSettings()
        self.faces = refgen_routes.Faces(models.default)  # the character routes' face pack, loaded on first use

    def queue(self, body: dict, kind: str = "generation") -> Generation:
        try:
            generation = self.store.create_generation(body, DEFAULT_USER, kind=kind, max_pending=self.max_queue)
        except QueueFullError as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        self.notify()
        return generation

    def notify(self) -> None:
        if self.worker is not None:
            self.worker.notify()

    def queue_training(self, kind: str, body: dict, job_body: dict) -> Training:
        try:
            training = self.store.create_training(kind, body.get("name", "placeholder"), body.get("description"),
                                                  body["datasetId"], body, job_body, DEFAULT_USER, max_pending=self.max_queue)
        except QueueFullError as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        self.notify()
        return training


def _authoriser(api_key: Optional[str]):
    bearer = HTTPBearer(auto_error=False, description="The server's API key (refgen serve --api-key / REFGEN_API_KEY).")

    def authorise(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8")):
            what = "missing" if credentials is None else "wrong"
            raise HTTPException(401, f"{what} API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": 'Bearer realm="refgen"'})

    return authorise


# -------------------------------------------------------------------------------------- API routes

def _api_router(ctx: _Context) -> APIRouter:
    router = APIRouter()
    _generation_routes(router, ctx)
    _init_image_routes(router, ctx)
    _variation_routes(router, ctx)
    _dataset_routes(router, ctx)
    _element_routes(router, ctx)
    _model_routes(router, ctx)
    refgen_routes.install(router, ctx)

    @router.get("/refgen/weights", tags=["refgen"])
    def weights_status() -> dict:
        """refgen extension: every weight component (present, or its missing files) and every feature's missing
        components with the `refgen weights fetch` command that gets them. Nothing is downloaded here."""
        from .. import weights

        return weights.weights_status()

    @router.get("/me", tags=["user"])
    def me() -> dict:
        return {"user_details": [{
            "user": {"id": DEFAULT_USER, "username": "local"}, "paidTokens": 0,
            "subscriptionTokens": 0, "subscriptionGptTokens": 0, "subscriptionModelTokens": 0, "apiConcurrencySlots": 1,
            "apiPaidTokens": 0, "apiSubscriptionTokens": 0,
            "refgen": {"pendingJobs": ctx.store.pending_count(), "maxQueue": ctx.max_queue},
        }]}

    return router


def _generation_routes(router: APIRouter, ctx: _Context) -> None:
    @router.post("/generations", tags=["generations"])
    def create_generation(body: dict[str, Any] = Body(..., examples=[{"prompt": "a red fox", "width": 1024, "height": 1024}])) -> dict:
        """Leonardo's generation body; checked completely (fields, model, image ids) before it is queued."""
        parse_generation(body, images=ctx.store.resolve_image, models=ctx.models, trained=ctx.trained)
        generation = ctx.queue(body)
        return {"sdGenerationJob": {"generationId": generation.id, "apiCreditCost": 0}}

    @router.get("/generations/{generation_id}", tags=["generations"])
    def get_generation(generation_id: str, request: Request) -> dict:
        generation = _job(ctx.store, generation_id, "generation")
        return _with_error({"generations_by_pk": _generation_json(generation, request, ctx.store)}, generation)

    @router.get("/generations/{generation_id}/events", tags=["generations"])
    async def generation_events(generation_id: str, request: Request) -> StreamingResponse:
        """refgen extension: the job as a text/event-stream. `progress` events carry {"status", "progress"}
        ({"step", "total", "phase"} while it runs) when they change; the last event is `done` with the same
        answer as GET /generations/{id}, or `deleted`."""
        job_id = (await run_in_threadpool(_job, ctx.store, generation_id, "generation")).id  # 404 before streaming
        return StreamingResponse(_events(ctx.store, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/generations/user/{user_id}", tags=["generations"])
    def user_generations(user_id: str, request: Request, offset: int = Query(0, ge=0),
                         limit: int = Query(10, ge=1, le=100)) -> dict:
        return {"generations": [_generation_json(g, request, ctx.store) for g in _generations_only(ctx.store, user_id, offset, limit)]}

    @router.delete("/generations/{generation_id}", tags=["generations"])
    def delete_generation(generation_id: str) -> dict:
        generation_id = _uuid(generation_id)
        if ctx.store.generation(generation_id).kind == "training":  # its element or model owns it (and a LoRA file)
            raise UnknownAssetError(f"no generation {generation_id} (a training job: DELETE its element or model)")
        ctx.store.delete_generation(generation_id)
        return {"delete_generations_by_pk": {"id": generation_id}}


async def _events(store: AssetStore, job_id: str, request: Request) -> AsyncIterator[str]:
    last = None
    while not await request.is_disconnected():
        try:
            job = await run_in_threadpool(store.generation, job_id)
        except UnknownAssetError:
            yield _event("deleted", {"id": job_id})
            return
        state = {"status": job.status, "progress": job.progress}
        if state != last:
            yield _event("progress", state)
            last = state
        if job.status != "PENDING":
            yield _event("done", _with_error({"generations_by_pk": _generation_json(job, request, store)}, job))
            return
        await asyncio.sleep(EVENT_POLL_SECONDS)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _job(store: AssetStore, job_id: str, kind: str) -> Generation:
    """A generation or an upscale variation by id; the other kind is "not found" under this path."""
    job = store.generation(_uuid(job_id))
    if job.kind == "ideogram" and kind == "generation":  # a job of the Ideogram routes: shown as a generation
        return job
    if job.kind == "training":
        raise UnknownAssetError(f"no {'generation' if kind == 'generation' else 'variation'} {job_id} (a training job: "
                                "see its element or model)")
    if job.kind != kind:
        where = "/variations/" if job.kind == "upscale" else "/generations/"
        raise UnknownAssetError(f"no {'generation' if kind == 'generation' else 'variation'} {job_id} (see GET {where}{job_id})")
    return job


def _generations_only(store: AssetStore, user_id: str, offset: int, limit: int) -> list[Generation]:
    """One page of the user's generations, newest first, skipping upscale jobs (Leonardo lists those as variations)."""
    found: list[Generation] = []
    start, chunk = 0, max(limit + offset, 50)
    while len(found) < offset + limit:
        rows = store.list_generations(user_id, start, chunk)
        found.extend(row for row in rows if row.kind == "generation")
        if len(rows) < chunk:
            break
        start += chunk
    return found[offset:offset + limit]


def _init_image_routes(router: APIRouter, ctx: _Context) -> None:
    @router.post("/init-image", tags=["init images"])
    def create_init_image(body: InitImageBody, request: Request) -> dict:
        """A slot for one init image: POST the returned `fields` plus `file` as multipart/form-data to `url`."""
        return {"uploadInitImage": _upload_slot(ctx, request, body.extension)}

    @router.get("/init-image/{image_id}", tags=["init images"])
    def get_init_image(image_id: str, request: Request) -> dict:
        upload = _init_upload(ctx.store, image_id)
        url = _file_url(request, upload.id, upload.extension) if upload.uploaded else None  # no file yet: no url
        return {"init_images_by_pk": _leonardo(id=upload.id, createdAt=upload.created_at, url=url, refgen={
            "uploaded": upload.uploaded, "width": upload.width, "height": upload.height})}

    @router.delete("/init-image/{image_id}", tags=["init images"])
    def delete_init_image(image_id: str) -> dict:
        image_id = _init_upload(ctx.store, image_id).id
        ctx.store.delete_upload(image_id)
        return {"delete_init_images_by_pk": {"id": image_id}}


def _upload_slot(ctx: _Context, request: Request, extension: str, dataset_id: Optional[str] = None) -> dict:
    """An empty upload (an init image, or a dataset image): its presigned-POST target and fields."""
    extension = extension.lower().lstrip(".")
    if extension not in IMAGE_EXTENSIONS:
        raise LeonardoRequestError("extension", f"has to be one of {', '.join(IMAGE_EXTENSIONS)}, got {extension!r}")
    upload = ctx.store.new_upload(extension, dataset_id)
    folder = "initImages" if dataset_id is None else f"datasets/{dataset_id}"
    key = f"users/{DEFAULT_USER}/{folder}/{upload.id}.{upload.extension}"
    fields = {"key": key, "token": upload.token, "Content-Type": MEDIA_TYPES[upload.extension]}
    url = str(request.url_for("upload_init_image_file", upload_id=upload.id))
    return {"id": upload.id, "url": url, "fields": json.dumps(fields), "key": key}


def _init_upload(store: AssetStore, image_id: str):
    """An init image by id; a dataset image is not one (GET /datasets/{id} lists those)."""
    upload = store.upload(_uuid(image_id))
    if upload.dataset_id is not None:
        raise UnknownAssetError(f"no init image {image_id} (it is an image of dataset {upload.dataset_id})")
    return upload


def _variation_routes(router: APIRouter, ctx: _Context) -> None:
    @router.post("/variations/upscale", tags=["variations"])
    def create_upscale(body: UpscaleBody) -> dict:
        """An upscale of a generated image (refgen's ESRGAN): poll GET /variations/{id}."""
        try:
            ctx.store.generated_image(_uuid(body.id))
        except UnknownAssetError:
            raise LeonardoRequestError("id", f"unknown generated image id {body.id!r}") from None
        job = ctx.queue(body.model_dump(exclude_none=True, exclude={"isVariation"}), kind="upscale")
        return {"sdUpscaleJob": {"id": job.id, "apiCreditCost": 0}}

    @router.get("/variations/{variation_id}", tags=["variations"])
    def get_variation(variation_id: str, request: Request) -> dict:
        job = _job(ctx.store, variation_id, "upscale")
        return _with_error({"generated_image_variation_generic": [_variation_json(job, request)]}, job)


def _dataset_routes(router: APIRouter, ctx: _Context) -> None:
    @router.post("/datasets", tags=["datasets"])
    def create_dataset(body: DatasetBody) -> dict:
        if not body.name.strip():
            raise LeonardoRequestError("name", "must not be empty")
        return {"insert_datasets_one": {"id": ctx.store.create_dataset(body.name, body.description, DEFAULT_USER).id}}

    @router.get("/datasets/{dataset_id}", tags=["datasets"])
    def get_dataset(dataset_id: str, request: Request) -> dict:
        dataset = ctx.store.dataset(_uuid(dataset_id))
        images = [{"id": image.id, "createdAt": image.created_at, "url": _file_url(request, image.id, image.extension)}
                  for image in dataset.images]
        return {"datasets_by_pk": _leonardo(id=dataset.id, name=dataset.name, description=dataset.description,
                                            createdAt=dataset.created_at, updatedAt=dataset.updated_at, dataset_images=images)}

    @router.delete("/datasets/{dataset_id}", tags=["datasets"])
    def delete_dataset(dataset_id: str) -> dict:
        dataset_id = _uuid(dataset_id)
        ctx.store.delete_dataset(dataset_id)
        return {"delete_datasets_by_pk": {"id": dataset_id}}

    @router.post("/datasets/{dataset_id}/upload", tags=["datasets"])
    def upload_dataset_image(dataset_id: str, body: InitImageBody, request: Request) -> dict:
        """A slot for one dataset image: POST the returned `fields` plus `file` to `url` (as for init images)."""
        return {"uploadDatasetImage": _upload_slot(ctx, request, body.extension, _uuid(dataset_id))}

    @router.post("/datasets/{dataset_id}/upload/gen", tags=["datasets"])
    def upload_dataset_image_from_gen(dataset_id: str, body: DatasetFromGenBody) -> dict:
        """A copy of a generated image, added to the dataset."""
        dataset_id = ctx.store.dataset(_uuid(dataset_id)).id
        try:
            source = ctx.store.generated_image(_uuid(body.generatedImageId))
        except UnknownAssetError:
            raise LeonardoRequestError("generatedImageId", f"unknown generated image id {body.generatedImageId!r}") from None
        upload = ctx.store.add_dataset_image(dataset_id, source.path.read_bytes(), "png", ctx.max_pixels)
        return {"uploadDatasetImageFromGen": {"id": upload.id}}


def _element_routes(router: APIRouter, ctx: _Context) -> None:
    @router.post("/elements", tags=["elements"])
    def create_element(body: dict[str, Any] = Body(..., examples=[{
            "name": "my-style", "datasetId": "<dataset id>", "instance_prompt": "zxq style", "lora_focus": "Style",
            "num_train_epochs": 10, "learning_rate": 0.0001, "resolution": 1024, "sd_version": "SDXL_1_0"}])) -> dict:
        """Train an SDXL LoRA on a dataset (a queued job): poll GET /elements/{userLoraId}."""
        job_body = element_job(body, ctx.store, ctx.training, ctx.models.default)
        training = ctx.queue_training("element", body, job_body)
        return {"sdTrainingJob": {"userLoraId": int(training.id), "apiCreditCost": 0}}

    @router.get("/elements", tags=["elements"])
    def list_elements() -> dict:
        """This server's trained elements (Leonardo lists its platform elements here; refgen has none)."""
        done = [t for t in ctx.store.list_trainings("element", DEFAULT_USER, 0, 1000) if t.job.status == "COMPLETE"]
        return {"loras": [_leonardo(name=t.name, description=t.description, baseModel=_sd_version(t), weightDefault=1,
                                    weightMin=-4, weightMax=4, refgen={"userLoraId": int(t.id)}) for t in done]}

    @router.get("/elements/user/{user_id}", tags=["elements"])
    def user_elements(user_id: str, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> dict:
        return {"user_loras": [_element_json(t) for t in ctx.store.list_trainings("element", user_id, offset, limit)]}

    @router.get("/elements/{element_id}", tags=["elements"])
    def get_element(element_id: str) -> dict:
        training = ctx.store.training("element", element_id)
        return _with_error({"user_loras_by_pk": _element_json(training)}, training.job)

    @router.delete("/elements/{element_id}", tags=["elements"])
    def delete_element(element_id: str) -> dict:
        training = _delete_training(ctx, "element", element_id)
        return {"delete_user_loras_by_pk": {"id": int(training.id)}}


def _model_routes(router: APIRouter, ctx: _Context) -> None:
    @router.post("/models", tags=["models"])
    def create_model(body: dict[str, Any] = Body(..., examples=[{
            "name": "my-model", "datasetId": "<dataset id>", "instance_prompt": "zxq person"}])) -> dict:
        """Train a custom model (an SDXL LoRA over the server's model; a queued job): poll GET /models/{customModelId}."""
        job_body = model_job(body, ctx.store, ctx.training, ctx.models.default)
        training = ctx.queue_training("model", body, job_body)
        return {"sdTrainingJob": {"customModelId": training.id, "apiCreditCost": 0}}

    @router.get("/models/user/{user_id}", tags=["models"])
    def user_models(user_id: str, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> dict:
        return {"custom_models": [_model_json(t) for t in ctx.store.list_trainings("model", user_id, offset, limit)]}

    @router.get("/models/{model_id}", tags=["models"])
    def get_model(model_id: str) -> dict:
        training = ctx.store.training("model", _uuid(model_id))
        return _with_error({"custom_models_by_pk": _model_json(training)}, training.job)

    @router.delete("/models/{model_id}", tags=["models"])
    def delete_model(model_id: str) -> dict:
        training = _delete_training(ctx, "model", _uuid(model_id))
        return {"delete_custom_models_by_pk": {"id": training.id}}


def _delete_training(ctx: _Context, kind: str, training_id: str) -> Training:
    """The record and its job (a running training stops at its next step), then its LoRA file."""
    from ..lora_library import LoraLibrary, UnknownLoraError

    training = ctx.store.delete_training(kind, training_id)
    try:
        LoraLibrary(ctx.store.loras).delete(training.lora)
    except UnknownLoraError:
        pass  # never trained, or still training (a stopped run writes nothing)
    shutil.rmtree(training_run_dir(ctx.store, training.lora), ignore_errors=True)  # its checkpoints
    return training


def _sd_version(training: Training) -> str:
    version = training.body.get("sd_version")
    return version if isinstance(version, str) and version in SDXL_ANSWER_VERSIONS else "SDXL_1_0"


SDXL_ANSWER_VERSIONS = ("SDXL_0_8", "SDXL_0_9", "SDXL_1_0")  # Leonardo's SdVersions enum (answers); other SDXL names -> 1.0


def _training_refgen(training: Training) -> dict:
    job = training.job
    return _leonardo(progress=job.progress, error=job.error, datasetId=training.dataset_id, startedAt=job.started_at,
                     finishedAt=job.finished_at, lora=f"{training.lora}.safetensors", baseModel=job.body.get("base_model"),
                     trigger=job.body.get("trigger"))


def _element_json(training: Training) -> dict:
    body, job = training.body, training.job
    return _leonardo(
        id=int(training.id), name=training.name, description=training.description or "", status=job.status,
        createdAt=training.created_at, updatedAt=job.finished_at or job.started_at or training.created_at,
        baseModel=body.get("sd_version") if isinstance(body.get("sd_version"), str) else None,
        focus=_text(body.get("lora_focus")), instancePrompt=job.body.get("trigger"),
        learningRate=_real(body.get("learning_rate")), resolution=job.body.get("resolution"), trainTextEncoder=bool(job.body.get("train_text_encoder")),
        trainingEpoch=_whole(body.get("num_train_epochs")), refgen=_training_refgen(training))


def _model_json(training: Training) -> dict:
    body, job = training.body, training.job
    resolution = job.body.get("resolution")
    return _leonardo(
        id=training.id, name=training.name, description=training.description or "", status=job.status,
        createdAt=training.created_at, updatedAt=job.finished_at or job.started_at or training.created_at,
        instancePrompt=job.body.get("trigger"), modelWidth=resolution, modelHeight=resolution, public=False,
        sdVersion="SDXL_1_0", type=_text(body.get("modelType")) or "GENERAL", refgen=_training_refgen(training))


# ---------------------------------------------------------------------------------- public routes

def _public_router(ctx: _Context) -> APIRouter:
    router = APIRouter()

    @router.post("/uploads/{upload_id}", status_code=204, tags=["init images"], name="upload_init_image_file")
    async def upload_file(upload_id: str, request: Request) -> Response:
        """The presigned-POST target: multipart/form-data with the `fields` from POST /init-image and `file`."""
        upload = await run_in_threadpool(ctx.store.upload, _uuid(upload_id))
        form = await _read_form(request, ctx.max_upload_bytes)
        _check_token(upload, form.get("token"))
        data = await _file_bytes(form.get("file"), ctx.max_upload_bytes)
        await run_in_threadpool(ctx.store.complete_upload, upload.id, form["token"], data, ctx.max_pixels)
        return Response(status_code=204)

    @router.get("/files/{name}", tags=["files"], name="file")
    def get_file(name: str) -> FileResponse:
        """An uploaded or generated image, by the `<uuid>.<ext>` name the API handed out."""
        match = FILE_NAME.match(name)
        if match is None:
            raise UnknownAssetError(f"no file {name!r}")
        image_id, extension = _uuid(match["id"]), match["ext"].lower()
        path = ctx.store.resolve_image(image_id, "GENERATED") or ctx.store.resolve_image(image_id, "UPLOADED")
        if path is None or path.suffix.lower().lstrip(".") != extension or not _inside(path, ctx.store.root):
            raise UnknownAssetError(f"no file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[extension])

    return router


def _inside(path, root) -> bool:
    """Defence in depth: only regular files under the store's folder are ever served."""
    resolved = path.resolve()
    return resolved.is_file() and resolved.is_relative_to(root.resolve())


async def _read_form(request: Request, max_bytes: int):
    """The multipart form, reading at most max_bytes (+ form overhead) from the socket: 413 beyond that."""
    limit = max_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload larger than the {max_bytes} byte limit")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise LeonardoRequestError("body", "must be multipart/form-data with the upload's fields and a 'file' part")
    parser = MultiPartParser(request.headers, limited(request.stream(), limit), max_files=1, max_fields=16)
    try:
        return await parser.parse()
    except UploadTooLarge:
        raise HTTPException(413, f"upload larger than the {max_bytes} byte limit") from None
    except MultiPartException as exc:
        raise LeonardoRequestError("body", f"malformed multipart form: {exc.message}") from None



def _check_token(upload, token: Any) -> None:
    if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"), upload.token.encode("utf-8")):
        raise HTTPException(403, "missing or wrong upload token: send the 'fields' from POST /init-image")
    if upload.uploaded:
        raise HTTPException(409, "this init image was already uploaded; create a new one with POST /init-image")


async def _file_bytes(part: Any, max_bytes: int) -> bytes:
    if part is None or isinstance(part, str):
        raise LeonardoRequestError("file", "the form needs a 'file' part with the image bytes")
    data = await part.read(max_bytes + 1)
    await part.close()
    if len(data) > max_bytes:
        raise HTTPException(413, f"upload larger than the {max_bytes} byte limit")
    return data


# ------------------------------------------------------------------------------------ JSON shapes

def _leonardo(**fields: Any) -> dict:
    """One Leonardo object: keys without a value are left out (the SDKs allow absent keys, null only in some)."""
    return {key: value for key, value in fields.items() if value is not None}


def _with_error(answer: dict, job: Generation) -> dict:
    """A FAILED job's reason at the top level: Leonardo's record has no field for it (see the module docstring)."""
    return {**answer, "error": job.error} if job.status == "FAILED" and job.error else answer


def _generation_json(generation: Generation, request: Request, store: AssetStore) -> dict:
    body, first = generation.body, (generation.images[0] if generation.images else None)
    upscales = store.upscales_of([image.id for image in generation.images])
    width, height = _image_size(first, body)
    resolved = first.metadata.get("resolved") if first is not None else None
    resolved = resolved if isinstance(resolved, dict) else {}  # what actually ran (preset and mode defaults filled in)
    return _leonardo(
        id=generation.id, status=generation.status, createdAt=generation.created_at,
        prompt=_text(body.get("prompt")), negativePrompt=_text(body.get("negative_prompt")),
        imageWidth=_whole(width), imageHeight=_whole(height), modelId=_text(body.get("modelId")),
        seed=_whole(first.seed if first is not None else body.get("seed")),
        inferenceSteps=_whole(resolved.get("steps", body.get("num_inference_steps"))),
        guidanceScale=_real(resolved.get("guidance_scale", body.get("guidance_scale"))),
        scheduler=leonardo_scheduler(resolved.get("scheduler", body.get("scheduler"))),
        presetStyle=leonardo_style(body.get("presetStyle")),
        initStrength=_real(resolved.get("init_strength", body.get("init_strength"))),
        photoReal=bool(body.get("photoReal")), public=False, generation_elements=[],
        generated_images=[_image_json(image, request, upscales.get(image.id, ())) for image in generation.images],
        refgen={
            "error": generation.error, "startedAt": generation.started_at, "finishedAt": generation.finished_at,
            "scheduler": resolved.get("scheduler"),  # the exact sampler that ran: Leonardo's enum is coarser
            "images": [{"id": image.id, "seed": image.seed, "identityScore": image.identity_score,
                        "rank": image.index + 1 if resolved.get("ranked") else None} for image in generation.images],
            "progress": generation.progress,  # while it runs: {"step", "total", "phase"} (a refgen extension)
        },
    )


def _image_size(image: Optional[GeneratedImage], body: dict) -> tuple[Any, Any]:
    recorded = image.metadata.get("image") if image is not None else None
    if isinstance(recorded, dict) and "width" in recorded:
        return recorded.get("width"), recorded.get("height")
    return body.get("width"), body.get("height")


def _image_json(image: GeneratedImage, request: Request, upscales: Sequence[Generation] = ()) -> dict:
    variations = [_leonardo(id=job.id, status=job.status, transformType="UPSCALE",
                            url=_file_url(request, job.images[0].id, "png") if job.images else None) for job in upscales]
    return {"id": image.id, "url": _file_url(request, image.id, "png"), "nsfw": False, "likeCount": 0,
            "generated_image_variation_generics": variations}


def _variation_json(job: Generation, request: Request) -> dict:
    image = job.images[0] if job.images else None
    return _leonardo(id=job.id, status=job.status, createdAt=job.created_at, transformType="UPSCALE",
                     url=_file_url(request, image.id, "png") if image is not None else None,
                     refgen={"error": job.error, "sourceImageId": job.body.get("id"), "imageId": image.id if image else None})


# A stored body passed parse_generation, which also takes numeric strings ("0.5") and whole floats (64.0);
# Leonardo's answers carry JSON numbers of the schema's type, and the TypeScript SDK checks that strictly.

def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _real(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _whole(value: Any) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact: float() would round seeds above 2**53
    number = _real(value)
    return int(number) if number is not None and number.is_integer() else None


def _file_url(request: Request, image_id: str, extension: str) -> str:
    return str(request.url_for("file", name=f"{image_id}.{extension}"))


def _uuid(value: str) -> str:
    """The canonical form of an id from a URL or body; anything that is not a UUID is simply unknown."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise UnknownAssetError(f"unknown id {value!r}") from None


# ---------------------------------------------------------------------------------------- errors

def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UnknownAssetError, _not_found)
    app.add_exception_handler(LeonardoRequestError, _bad_request)
    app.add_exception_handler(InvalidImageError, _bad_image)
    app.add_exception_handler(StoreError, _bad_request)
    app.add_exception_handler(RefgenError, _bad_request)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)


def _error(status: int, message: str, field: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


async def _not_found(request: Request, exc: UnknownAssetError) -> JSONResponse:
    return _error(404, str(exc))


async def _bad_request(request: Request, exc: RefgenError) -> JSONResponse:
    return _error(422, str(exc), getattr(exc, "field", "body"))


async def _bad_image(request: Request, exc: InvalidImageError) -> JSONResponse:
    return _error(422, str(exc), "file")


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # loc, msg and type only: echoing `input` back could fail to encode (a body of Infinity) or be huge
    errors = [{key: jsonable_encoder(error.get(key)) for key in ("loc", "msg", "type")} for error in exc.errors()]
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    field = "body" if first.get("type") == "json_invalid" else _field_path(first.get("loc") or ["body"])
    return JSONResponse({"error": f"{field}: {first.get('msg')}", "field": field, "detail": errors}, status_code=422)


def _field_path(loc: list) -> str:
    """FastAPI's loc ('body', 'controlnets', 0, 'weight') -> Leonardo's path 'controlnets[0].weight'."""
    parts = list(loc[1:])
    if not parts:
        return str(loc[0])
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail, "field": None}, status_code=exc.status_code, headers=exc.headers)


# ----------------------------------------------------------------------------------------- serve

def check_bind(host: str, api_key: Optional[str]) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if api_key:
        return
    if host == "localhost" or _is_loopback(host):
        return
    raise ServeError(f"refusing to listen on {host} without an API key: anyone who can reach it could run jobs and "
                     "read every image. Give --api-key (or set REFGEN_API_KEY), or listen on 127.0.0.1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: Optional[str] = None, model: Optional[str] = None,
          device: Optional[str] = None, dtype: Optional[str] = None, *, upscaler: Optional[str] = None,
          max_queue: int = 64, store: Optional[AssetStore] = None, log_level: str = "info", speed: str = "auto",
          warm_up: Sequence[tuple[int, int]] = (), training: Optional[TrainingSettings] = None, workers: int = 1) -> None:
    """Run the API until interrupted: store + engine runner(s) + worker thread(s) + uvicorn; Ctrl-C stops all."""
    import uvicorn

    check_bind(host, api_key)
    devices = worker_devices(device, workers)
    if device or dtype:  # refused before listening, not at the first job
        from ..devices import pick_device

        for each in devices:
            pick_device(each, dtype)
    app, worker = service(store or AssetStore(), api_key=api_key, model=model, device=device, dtype=dtype,
                          upscaler=upscaler, max_queue=max_queue, speed=speed, warm_up=warm_up, training=training,
                          workers=workers)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    worker.start()
    log.info("refgen API on http://%s:%d%s (docs: /docs)", host, port, PREFIX)
    try:
        server.run()
    finally:
        worker.stop(timeout=30)


def service(store: AssetStore, *, api_key: Optional[str] = None, model: Optional[str] = None, device: Optional[str] = None,
            dtype: Optional[str] = None, upscaler: Optional[str] = None, max_queue: int = 64,
            load_engine: Optional[Callable[[str], Any]] = None, speed: str = "auto",
            warm_up: Sequence[tuple[int, int]] = (), training: Optional[TrainingSettings] = None,
            workers: int = 1) -> tuple[FastAPI, Any]:
    """What `refgen serve` runs, not yet started: (app, worker) over `store`. `model` is the server's model:
    requests without a modelId and Leonardo's platform model ids (e.g. the SDKs' default) run on it.
    `upscaler`: the ESRGAN model of upscale variations; default realesrgan-x4plus, or the tiny model's random
    Real-ESRGAN when `model` is tiny (an offline server stays offline).
    `speed`: Engine.load's (auto: compiled on a GPU); `warm_up`: (width, height) sizes each engine generates once
    when it loads, so that a compiled engine has their graphs before the first job.
    `load_engine(name)` replaces Engine.load(name, device, dtype) (tests add models that are not on disk).
    `training`: the LoRA training recipe and limits of POST /elements and /models (engine/api/trainings.py).
    `workers`: that many worker threads on the queue, each with its own engine, on the devices of `device`
    ("cuda:0,cuda:1": one each; one device: all on it); the worker returned is then a WorkerPool."""
    import threading

    from .jobs import Worker, WorkerPool

    models = _server_models(model)
    devices = worker_devices(device, workers)
    loading = threading.Lock()  # one model load (or training) at a time in this process
    made = [Worker(store, engine_runner(store, models, model=model, device=each, dtype=dtype, upscaler=upscaler,
                                        speed=speed, warm_up=warm_up, training=training, load_engine=load_engine,
                                        loading=loading),
                   name=f"worker{index}" if workers > 1 else "worker")
            for index, each in enumerate(devices)]
    worker = made[0] if workers == 1 else WorkerPool(made)
    return create_app(store, worker, api_key=api_key, max_queue=max_queue, models=models, training=training), worker


def run_worker(store: AssetStore, *, model: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
               upscaler: Optional[str] = None, speed: str = "auto", warm_up: Sequence[tuple[int, int]] = (),
               training: Optional[TrainingSettings] = None, stop: Optional[Any] = None) -> None:
    """What `refgen worker` runs: one more worker on a server's queue, in this process (e.g. one per GPU beside
    `refgen serve`, on the same store folder), until `stop` (a threading.Event) is set or Ctrl-C."""
    import threading

    from .jobs import Worker

    if device or dtype:
        from ..devices import pick_device

        pick_device(device, dtype)
    runner = engine_runner(store, _server_models(model), model=model, device=device, dtype=dtype, upscaler=upscaler,
                           speed=speed, warm_up=warm_up, training=training)
    worker = Worker(store, runner, name=(device or "worker").replace(":", ""))
    stop = stop or threading.Event()
    worker.start()
    log.info("refgen worker %s on %s", worker.id, store.root)
    try:
        stop.wait()
    except KeyboardInterrupt:
        log.info("stopping after the current job")
    finally:
        worker.stop(timeout=None)


def worker_devices(device: Optional[str], workers: int) -> list[Optional[str]]:
    """One device per worker: "cuda:0,cuda:1" gives each its own; a single device (or none: auto) is shared."""
    if workers < 1:
        raise ServeError(f"--workers must be 1 or more, got {workers}")
    listed = [part.strip() for part in device.split(",")] if device else [None]
    if len(listed) == 1:
        return listed * workers
    if len(listed) != workers:
        raise ServeError(f"--device lists {len(listed)} devices for {workers} workers: give one per worker, or one for all")
    return listed


def _server_models(model: Optional[str]) -> ModelTable:
    import dataclasses

    models = ModelTable.load()
    return dataclasses.replace(models, default=model) if model else models


def engine_runner(store: AssetStore, models: ModelTable, *, model: Optional[str] = None, device: Optional[str] = None,
                  dtype: Optional[str] = None, upscaler: Optional[str] = None, speed: str = "auto",
                  warm_up: Sequence[tuple[int, int]] = (), training: Optional[TrainingSettings] = None,
                  load_engine: Optional[Callable[[str], Any]] = None, loading: Optional[Any] = None):
    """One worker's EngineRunner: its engines on `device`; the upscaler defaults as in `service`. `loading`: the lock
    the runners of one process share around model loads and trainings."""
    from .jobs import DEFAULT_UPSCALER, EngineRunner

    upscaler = upscaler or ("tiny" if model == "tiny" else DEFAULT_UPSCALER)
    return EngineRunner(store, load_engine=load_engine or _engine_loader(device, dtype, speed, warm_up), models=models,
                        upscaler=upscaler, training=training, device=device, dtype=dtype, loading=loading)


def _engine_loader(device: Optional[str], dtype: Optional[str], speed: str = "auto", warm_up: Sequence[tuple[int, int]] = ()):
    def load_engine(name: str):
        from ..engine import Engine
        from ..request import GenerationRequest

        engine = Engine.load(name, device, dtype, speed=speed)
        if warm_up:
            seconds = engine.warm_up(*(GenerationRequest(prompt="warm-up", width=width, height=height, steps=2)
                                       for width, height in warm_up))
            log.info("%s warmed up for %s in %.1f s", name, ", ".join(f"{w}x{h}" for w, h in warm_up), seconds)
        return engine

    return load_engine
