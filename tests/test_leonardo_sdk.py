"""Leonardo's official clients against a real refgen server: leonardo-ai-sdk (Python) drives the whole flow
and every check reads the SDK's parsed models; @leonardo-ai/sdk (TypeScript, through node) does a
create -> poll round trip. One uvicorn server for the module, assembled as `refgen serve --model tiny`
assembles it (its ControlNets and upscaler are the tiny model's stand-ins). Offline, CPU, 64x64, 2 steps."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from leonardo_ai_sdk import LeonardoAiSDK
from leonardo_ai_sdk.models import errors, operations, shared
from leonardo_ai_sdk.types import BaseModel, Nullable, OptionalNullable

from engine.api.server import PREFIX
from live_server import png_bytes, serving

KEY = "sdk-test-key"
JS_CLIENT = Path(__file__).parent / "js"
SDK_DEFAULT_MODEL_ID = operations.CreateGenerationRequestBody.model_fields["model_id"].default
FAST = {"width": 64, "height": 64, "num_images": 1, "num_inference_steps": 2, "alchemy": False}


# --------------------------------------------------------------------------------------- fixtures

class RecordingLoader:
    """The server's engine loader, as `refgen serve` has it (Engine.load on the CPU), recording the names it
    was asked for."""

    def __init__(self):
        self.names = []

    def __call__(self, name: str):
        from engine import Engine

        self.names.append(name)
        return Engine.load(name, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def api(refgen_home, tmp_path_factory):
    loader = RecordingLoader()
    with serving(tmp_path_factory.mktemp("sdk_api"), 30, api_key=KEY, model="tiny", load_engine=loader) as (base, worker, _):
        yield SimpleNamespace(url=f"{base}{PREFIX}", worker=worker, loader=loader)


@pytest.fixture(scope="module")
def sdk(api):
    return LeonardoAiSDK(bearer_auth=KEY, server_url=api.url)


# ---------------------------------------------------------------------------------------- helpers

def schema_violations(model: BaseModel, path: str = "") -> list[str]:
    """Keys the server sent as null although the SDK types them as "absent or a value" (plain Optional, not
    Nullable): pydantic lets such a null through, Leonardo's TypeScript SDK (zod) throws on it."""
    found = []
    for name in model.model_fields_set:
        value, annotation = getattr(model, name), type(model).model_fields[name].annotation
        if value is None and typing.get_origin(annotation) not in (Nullable, OptionalNullable):
            found.append(f"{path}{name}")
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                found += schema_violations(item, f"{path}{name}[{index}].")
    return found


def parsed(answer: BaseModel) -> BaseModel:
    """The SDK's parsed answer body, after checking it kept every value the schema allows as it was sent."""
    assert answer.object is not None, answer.raw_response.text
    assert schema_violations(answer.object) == [], answer.raw_response.text
    return answer.object


def generation(sdk, generation_id: str) -> operations.GetGenerationByIDGenerations:
    record = parsed(sdk.image.get_generation_by_id(id=generation_id)).generations_by_pk
    assert isinstance(record, operations.GetGenerationByIDGenerations), record  # the SDK's Unset() if it could not parse it
    return record


def finished(get, job_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while (record := get(job_id)).status == shared.JobStatus.PENDING:
        assert time.monotonic() < deadline, f"{job_id} still PENDING after {timeout} s"
        time.sleep(0.1)
    return record


def variation(sdk, variation_id: str) -> operations.GeneratedImageVariationGeneric:
    (record,) = parsed(sdk.variation.get_variation_by_id(id=variation_id)).generated_image_variation_generic
    return record


@contextlib.contextmanager
def paused(worker):
    """Inside the block jobs only queue, so their answers are PENDING for certain."""
    assert worker.stop(60), "the worker did not stop"
    try:
        yield
    finally:
        worker.start()


def create(sdk, **fields) -> str:
    body = operations.CreateGenerationRequestBody(**{"prompt": "a lighthouse at dusk", **FAST, **fields})
    job = parsed(sdk.image.create_generation(request=body)).sd_generation_job
    assert job.api_credit_cost == 0
    return job.generation_id


def upload_init_image(sdk, data: bytes) -> str:
    """Leonardo's presigned upload: the SDK asks for a slot, the file goes to its url with its fields."""
    slot = parsed(sdk.init_images.upload_init_image(request={"extension": "png"})).upload_init_image
    before = parsed(sdk.init_images.get_init_image_by_id(id=slot.id)).init_images_by_pk
    assert (before.id, before.url) == (slot.id, None)  # no file yet: no url (the TS SDK rejects null)
    response = httpx.post(slot.url, data=json.loads(slot.fields), files={"file": ("init.png", data, "image/png")})
    assert response.status_code == 204, response.text
    return slot.id


def refused(call) -> tuple[int, dict]:
    """(status, refgen's error body) of a call the SDK raised SDKError for; the SDK has no model for errors."""
    with pytest.raises(errors.SDKError) as caught:
        call()
    return caught.value.status_code, json.loads(caught.value.body)


# ------------------------------------------------------------------------------------------ tests

def test_me_and_the_api_key(sdk, api):
    (me,) = parsed(sdk.user.get_user_self()).user_details
    assert me.user.id == "local" and me.api_concurrency_slots == 1
    stranger = LeonardoAiSDK(bearer_auth="wrong-key", server_url=api.url)
    status, body = refused(stranger.user.get_user_self)
    assert status == 401 and "API key" in body["error"]
    status, _ = refused(lambda: stranger.image.create_generation(request={"prompt": "x", **FAST}))
    assert status == 401


def test_whole_flow_through_the_python_sdk(sdk, api):
    init_id = upload_init_image(sdk, png_bytes(seed=3))
    init = parsed(sdk.init_images.get_init_image_by_id(id=init_id)).init_images_by_pk
    assert httpx.get(init.url).content == png_bytes(seed=3)

    edges = shared.ControlnetInput(init_image_id=init_id, init_image_type=shared.InitImageType.UPLOADED,
                                   preprocessor_id=19, weight=0.5)  # the SDK types preprocessorId as float: 19.0
    assert '"preprocessorId":19.0' in edges.model_dump_json(by_alias=True).replace(" ", "")
    with paused(api.worker):
        generation_id = create(sdk, num_images=2, seed=11, init_image_id=init_id, init_strength=0.4, controlnets=[edges],
                               scheduler=shared.SdGenerationSchedulers.EULER_DISCRETE, preset_style=shared.SdGenerationStyle.CINEMATIC)
        pending = generation(sdk, generation_id)
    assert pending.status == shared.JobStatus.PENDING and pending.generated_images == []
    assert (pending.scheduler, pending.preset_style) == (shared.SdGenerationSchedulers.EULER_DISCRETE, shared.SdGenerationStyle.CINEMATIC)

    record = finished(lambda job: generation(sdk, job), generation_id)
    assert record.status == shared.JobStatus.COMPLETE
    assert (record.image_width, record.image_height, record.seed, record.inference_steps) == (64, 64, 11, 2)
    assert (record.scheduler, record.init_strength, record.model_id) == (shared.SdGenerationSchedulers.EULER_DISCRETE, 0.4, SDK_DEFAULT_MODEL_ID)
    assert len(record.generated_images) == 2 and all(httpx.get(image.url).status_code == 200 for image in record.generated_images)

    (me,) = parsed(sdk.user.get_user_self()).user_details
    listed = parsed(sdk.image.get_generations_by_user_id(user_id=me.user.id, limit=50)).generations
    assert generation_id in [g.id for g in listed] and all(g.status in shared.JobStatus for g in listed)

    _upscale_then_delete(sdk, api, record)
    assert parsed(sdk.init_images.delete_init_image_by_id(id=init_id)).delete_init_images_by_pk.id == init_id
    status, _ = refused(lambda: sdk.init_images.get_init_image_by_id(id=init_id))
    assert status == 404


def _upscale_then_delete(sdk, api, record) -> None:
    """An upscale that completes; then one whose source is deleted before it runs: FAILED, with the reason."""
    source = record.generated_images[0]
    job = parsed(sdk.variation.create_variation_upscale(request={"id": source.id})).sd_upscale_job
    done = finished(lambda job_id: variation(sdk, job_id), job.id)
    assert (done.status, done.transform_type) == (shared.JobStatus.COMPLETE, shared.VariationType.UPSCALE)
    assert httpx.get(done.url).status_code == 200
    listed = generation(sdk, record.id).generated_images[0].generated_image_variation_generics  # listed under its image
    assert [(v.id, v.status, v.transform_type, v.url) for v in listed] == [(job.id, done.status, done.transform_type, done.url)]

    with paused(api.worker):
        doomed = parsed(sdk.variation.create_variation_upscale(request={"id": source.id})).sd_upscale_job
        deleted = parsed(sdk.image.delete_generation_by_id(id=record.id)).delete_generations_by_pk
        assert deleted.id == record.id
    failed = finished(lambda job_id: variation(sdk, job_id), doomed.id)
    assert failed.status == shared.JobStatus.FAILED and not failed.url
    answer = sdk.variation.get_variation_by_id(id=doomed.id).raw_response.json()  # Leonardo's schema has no field for it
    assert source.id in answer["error"] and answer["error"] == answer["generated_image_variation_generic"][0]["refgen"]["error"]
    status, _ = refused(lambda: sdk.image.get_generation_by_id(id=record.id))
    assert status == 404


def test_the_sdk_default_body_runs_on_the_servers_model(sdk, api):
    """The SDK fills in Leonardo Lightning XL and DYNAMIC; a server started with --model tiny runs it on tiny."""
    generation_id = create(sdk)  # modelId and presetStyle: the SDK's defaults
    record = finished(lambda job: generation(sdk, job), generation_id)
    assert record.status == shared.JobStatus.COMPLETE, record
    assert record.model_id == SDK_DEFAULT_MODEL_ID and record.preset_style == shared.SdGenerationStyle.DYNAMIC
    assert isinstance(record.scheduler, shared.SdGenerationSchedulers)
    assert set(api.loader.names) == {"tiny"}


@pytest.mark.parametrize("scheduler", list(shared.SdGenerationSchedulers), ids=lambda s: s.value)
def test_every_leonardo_scheduler_is_answered_as_itself(sdk, scheduler):
    record = finished(lambda job: generation(sdk, job), create(sdk, scheduler=scheduler))
    assert (record.status, record.scheduler) == (shared.JobStatus.COMPLETE, scheduler)


def test_bad_requests_are_422_naming_the_field(sdk):
    init_id = upload_init_image(sdk, png_bytes(seed=4))

    def with_preprocessor(preprocessor_id):
        unit = shared.ControlnetInput(init_image_id=init_id, init_image_type=shared.InitImageType.UPLOADED,
                                      preprocessor_id=preprocessor_id)
        return lambda: create(sdk, controlnets=[unit])

    cases = [
        (with_preprocessor(19.5), "controlnets[0].preprocessorId"),
        (with_preprocessor(8), "controlnets[0].preprocessorId"),  # Pattern to Image: no refgen model
        (lambda: create(sdk, model_id="6b645e3a-d64f-4341-a6d8-7a3690fbf042"), "modelId"),  # Leonardo Phoenix
        (lambda: create(sdk, init_image_id="2a6d8c1e-0000-4000-8000-000000000000"), "init_image_id"),
        (lambda: create(sdk, tiling=True), "tiling"),
        (lambda: sdk.variation.create_variation_upscale(request={"id": init_id}), "id"),
    ]
    for call, field in cases:
        status, body = refused(call)
        assert (status, body["field"]) == (422, field), body


# ------------------------------------------------------------------------------------- TypeScript

def test_typescript_sdk_round_trip(api, tmp_path):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for Leonardo's TypeScript SDK")
    _install_js_client()
    image = tmp_path / "init.png"
    image.write_bytes(png_bytes(seed=5))
    with paused(api.worker):  # the script's first read of the generation is a PENDING answer
        created = _node("create", api.url, str(image))
    assert created["initImageBeforeUpload"] == {"id": created["initImageId"]}
    assert (created["pending"]["status"], created["pending"]["scheduler"]) == ("PENDING", shared.SdGenerationSchedulers.KLMS.value)
    done = _node("poll", api.url, created["generationId"])
    record = done["record"]
    assert (record["status"], record["scheduler"], record["seed"]) == ("COMPLETE", shared.SdGenerationSchedulers.KLMS.value, 21)
    assert (record["imageWidth"], record["imageHeight"], record["modelId"]) == (64, 64, SDK_DEFAULT_MODEL_ID)
    assert len(record["generatedImages"]) == 1 and created["generationId"] in done["listed"]
    upscaled = _node("upscale", api.url, created["generationId"])  # the upscale, listed under its image
    assert upscaled["variation"]["status"] == "COMPLETE" and upscaled["variation"]["url"]
    assert upscaled["listed"] == [{**upscaled["variation"], "transformType": "UPSCALE"}]


def _install_js_client() -> None:
    """`npm ci` unless node_modules already holds exactly what package-lock.json pins."""
    lock = json.loads((JS_CLIENT / "package-lock.json").read_text())
    for folder, entry in lock["packages"].items():
        installed = JS_CLIENT / folder / "package.json"
        if folder and (not installed.is_file() or json.loads(installed.read_text())["version"] != entry["version"]):
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_CLIENT, check=True, capture_output=True, timeout=300)
            return


def _node(*args: str) -> dict:
    done = subprocess.run(["node", "roundtrip.mjs", KEY, *args], cwd=JS_CLIENT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
