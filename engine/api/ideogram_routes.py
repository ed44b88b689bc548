"""The Ideogram 3.0 routes of refgen's API (the mapping and its reference: engine/api/ideogram.py), on the Leonardo
API's app, store, queue and worker:

| method + path                    | Ideogram                | refgen                                          |
|----------------------------------|-------------------------|-------------------------------------------------|
| POST /v1/ideogram-v3/generate    | Generate with 3.0       | a job of kind "ideogram"; the answer once done  |
| POST /v1/ideogram-v3/edit        | Edit with 3.0 (Magic    | inpainting (Ideogram's black = edit, inverted)  |
|                                  | Fill, character swap)   |                                                 |
| POST /v1/ideogram-v3/remix       | Remix with 3.0          | img2img, init_strength = image_weight / 100     |

Each request is checked whole (fields, file formats, pixel limits) before anything is written; its files are then
stored as uploads (the store's atomic writes) and one job is queued. The route waits for that job (sync, as
Ideogram's 3.0 endpoints are) up to `wait_seconds`; a client that goes away or a wait that ends leaves the job to
finish once, visible at GET /api/rest/v1/generations/{id}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from .ideogram import ENDPOINTS, PREFIX, IdeogramRequestError, generation_request, ideogram_answer, parse_form
from .limits import UploadTooLarge, limited
from .store import DEFAULT_USER, QueueFullError, StoreError, UnknownAssetError

log = logging.getLogger("refgen.ideogram")

MAX_FILES = 16
MAX_FIELDS = 32
POLL_SECONDS = 0.1
DEFAULT_WAIT_SECONDS = 600.0
MULTIPART_OVERHEAD = 64 * 2**10  # form fields and boundaries around the files




def install(app: FastAPI, ctx: Any, api_key: Optional[str], wait_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
    """Mount the routes on `app` (ctx: server.py's _Context) and their error answers."""
    router = APIRouter()
    for endpoint in ENDPOINTS:
        router.add_api_route(f"/{endpoint}", _route(ctx, endpoint, api_key, wait_seconds), methods=["POST"],
                             tags=["ideogram"], name=f"ideogram_{endpoint}",
                             summary=f"Ideogram 3.0 {endpoint} (multipart form; see engine/api/ideogram.py)")
    app.include_router(router, prefix=PREFIX)
    app.add_exception_handler(IdeogramRequestError, _error_answer)


def _route(ctx, endpoint: str, api_key: Optional[str], wait_seconds: float):
    async def handle(request: Request) -> JSONResponse:
        _authorise(request, api_key)
        fields, files = await _read_form(request, ctx.max_upload_bytes)
        body, checked, warnings = await run_in_threadpool(parse_form, endpoint, fields, files, ctx.max_pixels)
        for warning in warnings:
            log.warning("ideogram %s: %s", endpoint, warning)
        job_id = await run_in_threadpool(_queue, ctx, body, checked)
        job = await _wait(ctx, job_id, wait_seconds)
        if job.status == "PENDING":
            return JSONResponse({"error": f"the generation is still running after {wait_seconds:g} s; it will finish "
                                          f"(GET /api/rest/v1/generations/{job_id})", "field": None,
                                 "refgen": {"generation_id": job_id, "warnings": warnings}}, status_code=504)
        if job.status == "FAILED":
            return JSONResponse({"error": f"generation failed: {job.error}", "field": None,
                                 "refgen": {"generation_id": job_id, "warnings": warnings}}, status_code=500)
        return JSONResponse(ideogram_answer(job.images, job.body, job.created_at,
                                            lambda image_id: str(request.url_for("file", name=f"{image_id}.png")),
                                            warnings, job.id))

    handle.__name__ = f"ideogram_{endpoint}"
    return handle


def _authorise(request: Request, api_key: Optional[str]) -> None:
    """Ideogram's `Api-Key: <key>`, or the Leonardo routes' `Authorization: Bearer <key>`."""
    if api_key is None:
        return
    given = request.headers.get("api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given is None or not hmac.compare_digest(given.strip().encode("utf-8"), api_key.encode("utf-8")):
        raise IdeogramRequestError("Api-Key", f"{'missing' if given is None else 'wrong'} API key: send 'Api-Key: <key>'",
                                   401)


async def _read_form(request: Request, max_bytes: int) -> tuple[dict[str, list[str]], dict[str, list[bytes]]]:
    """The multipart form, reading at most max_bytes per file and 4 x max_bytes in all: 413 beyond."""
    limit = max_bytes * 4 + MULTIPART_OVERHEAD  # a whole request: e.g. edit's image, mask, character photo and its mask
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise IdeogramRequestError(None, f"request larger than the {limit} byte limit", 413)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):  # text fields only (Ideogram's docs show JSON for generate)
        return await _read_json(request, limit), {}
    if content_type.startswith("application/x-www-form-urlencoded"):
        parser = FormParser(request.headers, limited(request.stream(), limit), max_fields=MAX_FIELDS)
    elif content_type.startswith("multipart/form-data"):
        parser = MultiPartParser(request.headers, limited(request.stream(), limit), max_files=MAX_FILES,
                                 max_fields=MAX_FIELDS)
    else:
        raise IdeogramRequestError(None, "the request must be multipart/form-data (Ideogram's form)")
    try:
        form = await parser.parse()
    except UploadTooLarge:
        raise IdeogramRequestError(None, f"request larger than the {limit} byte limit", 413) from None
    except MultiPartException as exc:
        raise IdeogramRequestError(None, f"malformed multipart form: {exc.message}") from None
    fields: dict[str, list[str]] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise IdeogramRequestError(name, f"file larger than the {max_bytes} byte limit", 413)
                files.setdefault(name, []).append(data)
            else:
                fields.setdefault(name, []).append(value)
    finally:
        await form.close()
    return fields, files


async def _read_json(request: Request, limit: int) -> dict[str, list[str]]:
    data = b""
    try:
        async for chunk in limited(request.stream(), limit):
            data += chunk
    except UploadTooLarge:
        raise IdeogramRequestError(None, f"request larger than the {limit} byte limit", 413) from None
    try:
        body = json.loads(data)
    except ValueError:
        raise IdeogramRequestError(None, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise IdeogramRequestError(None, "the JSON body must be an object of Ideogram's fields")
    fields = {}
    for name, value in body.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise IdeogramRequestError(str(name), "must be a string or a whole number (files need multipart/form-data)")
        fields[str(name)] = [str(value)]
    return fields


def _queue(ctx, body: dict, checked) -> str:
    """Store the files as uploads (atomic writes), check the whole request once more, queue one job. Anything that
    fails on the way removes the uploads it made."""
    stored: list[str] = []
    try:
        files: dict[str, list[str]] = {}
        for item in checked:
            upload = ctx.store.new_upload(item.extension)
            ctx.store.complete_upload(upload.id, upload.token, item.data, ctx.max_pixels)
            stored.append(upload.id)
            files.setdefault(item.field, []).append(upload.id)
        body = {**body, "files": files}
        generation_request(body, ctx.store.resolve_image)  # refused now rather than failed in the queue
        try:
            job = ctx.store.create_generation(body, DEFAULT_USER, kind="ideogram", max_pending=ctx.max_queue)
        except QueueFullError as exc:
            raise IdeogramRequestError(None, str(exc), 429) from None
    except BaseException:
        for upload_id in stored:
            try:
                ctx.store.delete_upload(upload_id)
            except (UnknownAssetError, StoreError):
                pass
        raise
    ctx.notify()
    return job.id


async def _wait(ctx, job_id: str, wait_seconds: float):
    deadline = time.monotonic() + wait_seconds
    while True:
        job = await run_in_threadpool(ctx.store.generation, job_id)
        if job.status != "PENDING" or time.monotonic() >= deadline:
            return job
        await asyncio.sleep(POLL_SECONDS)


async def _error_answer(request: Request, exc: IdeogramRequestError) -> JSONResponse:
    message = str(exc)
    headers = {"Retry-After": "10"} if exc.status == 429 else None
    return JSONResponse({"error": message, "field": exc.field}, status_code=exc.status, headers=headers)

