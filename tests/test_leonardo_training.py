"""Leonardo's training endpoints through its official Python SDK against a real refgen server (`refgen serve
--model tiny`): a dataset of uploaded images, an Element (a LoRA) trained as a queued job with visible progress,
a generation with `userElements` that the LoRA changes, a custom model, and the refusals (unknown element,
non-SDXL versions, too small a dataset). Offline, CPU, 64x64, a few training steps."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from leonardo_ai_sdk import LeonardoAiSDK
from leonardo_ai_sdk.models import operations, shared
from PIL import Image

from engine.api.server import PREFIX
from engine.api.trainings import TrainingSettings
from live_server import serving
from test_leonardo_sdk import RecordingLoader, finished, generation, parsed, paused, refused
from test_training import one_thread, structured_image  # noqa: F401  (one_thread: the module-wide fixture, reused)

KEY = "training-test-key"
RESOLUTION = 64
TRIGGER = "zxq person"
FAST = {"width": 64, "height": 64, "num_images": 1, "num_inference_steps": 4, "alchemy": False, "seed": 5,
        "prompt": f"a photo of {TRIGGER}"}
# Elements carry their own learning rate; a high one, so 10 steps leave a visible mark on the tiny model.
ELEMENT = {"name": "zxq", "instance_prompt": TRIGGER, "lora_focus": "Character", "num_train_epochs": 2,
           "learning_rate": 0.01, "resolution": RESOLUTION, "sd_version": "SDXL_1_0", "train_text_encoder": False}


@pytest.fixture(scope="module")
def api(refgen_home, tmp_path_factory):
    settings = TrainingSettings(rank=4, batch_size=2, max_steps=12, learning_rate=0.01, seed=3)
    with serving(tmp_path_factory.mktemp("training_api"), api_key=KEY, model="tiny", load_engine=RecordingLoader(),
                 training=settings) as (base, worker, store):
        yield SimpleNamespace(url=f"{base}{PREFIX}", worker=worker, store=store)


@pytest.fixture(scope="module")
def sdk(api):
    return LeonardoAiSDK(bearer_auth=KEY, server_url=api.url)


def structured_png(seed: int, size: int = RESOLUTION) -> bytes:
    buffer = io.BytesIO()
    structured_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def new_dataset(sdk, images: int, first_seed: int = 0) -> str:
    dataset_id = parsed(sdk.dataset.create_dataset(request={"name": "faces", "description": "test set"})).insert_datasets_one.id
    for seed in range(first_seed, first_seed + images):
        slot = parsed(sdk.dataset.upload_dataset_image(dataset_id=dataset_id, request_body={"extension": "png"})).upload_dataset_image
        response = httpx.post(slot.url, data=json.loads(slot.fields), files={"file": ("x.png", structured_png(seed), "image/png")})
        assert response.status_code == 204, response.text
    return dataset_id


def element(sdk, element_id: int) -> operations.GetElementByIDUserLoras:
    record = parsed(sdk.elements.get_element_by_id(id=element_id)).user_loras_by_pk
    assert isinstance(record, operations.GetElementByIDUserLoras), record
    return record


def pixels(sdk, generation_id: str) -> np.ndarray:
    record = finished(lambda job: generation(sdk, job), generation_id)
    assert record.status == shared.JobStatus.COMPLETE, record
    return np.asarray(Image.open(io.BytesIO(httpx.get(record.generated_images[0].url).content)).convert("RGB"), dtype=float)


def create(sdk, **fields) -> str:
    body = operations.CreateGenerationRequestBody(**{**FAST, **fields})
    return parsed(sdk.image.create_generation(request=body)).sd_generation_job.generation_id


@pytest.fixture(scope="module")
def dataset(sdk):
    return new_dataset(sdk, 10)


@pytest.fixture(scope="module")
def trained(sdk, api, dataset):
    """One element trained through the SDK: (its id, the progress values seen while polling, the final record)."""
    job = parsed(sdk.elements.create_element(request={**ELEMENT, "dataset_id": dataset})).sd_training_job
    assert isinstance(job.user_lora_id, int) and job.api_credit_cost == 0
    seen = []

    def poll(element_id):
        answer = sdk.elements.get_element_by_id(id=element_id)
        progress = answer.raw_response.json()["user_loras_by_pk"].get("refgen", {}).get("progress")
        if progress:
            seen.append(progress)
        return element(sdk, element_id)

    record = finished(poll, job.user_lora_id, timeout=120)
    return SimpleNamespace(id=job.user_lora_id, seen=seen, record=record)


# ------------------------------------------------------------------------------------------ tests

def test_dataset_upload_and_listing(sdk, dataset):
    record = parsed(sdk.dataset.get_dataset_by_id(id=dataset)).datasets_by_pk
    assert (record.id, record.name, record.description) == (dataset, "faces", "test set")
    assert len(record.dataset_images) == 10
    assert httpx.get(record.dataset_images[0].url).content == structured_png(0)
    # the init-image upload path's checks: a file that is not an image is refused, and the slot stays empty
    slot = parsed(sdk.dataset.upload_dataset_image(dataset_id=dataset, request_body={"extension": "png"})).upload_dataset_image
    response = httpx.post(slot.url, data=json.loads(slot.fields), files={"file": ("x.png", b"not an image", "image/png")})
    assert (response.status_code, response.json()["field"]) == (422, "file")
    assert len(parsed(sdk.dataset.get_dataset_by_id(id=dataset)).datasets_by_pk.dataset_images) == 10
    status, _ = refused(lambda: sdk.dataset.upload_dataset_image(dataset_id="0c7bd0a2-0000-4000-8000-000000000000",
                                                                 request_body={"extension": "png"}))
    assert status == 404
    # a dataset image is not an init image
    status, _ = refused(lambda: sdk.init_images.get_init_image_by_id(id=record.dataset_images[0].id))
    assert status == 404


def test_element_trains_and_changes_the_generation(sdk, api, trained):
    record = trained.record
    assert record.status == shared.JobStatus.COMPLETE, sdk.elements.get_element_by_id(id=trained.id).raw_response.text
    assert (record.id, record.name, record.focus, record.instance_prompt) == (trained.id, "zxq", "Character", TRIGGER)
    assert (record.resolution, record.training_epoch, record.base_model) == (RESOLUTION, 2, "SDXL_1_0")
    assert trained.seen and trained.seen[-1]["step"] == trained.seen[-1]["total"] == 10  # 2 epochs x 10 images / batch 2
    assert (api.store.loras / f"element-{trained.id}.safetensors").is_file()

    plain = pixels(sdk, create(sdk))
    styled = pixels(sdk, create(sdk, user_elements=[shared.UserElementsInput(user_lora_id=trained.id, weight=1.0)]))
    assert np.abs(styled - plain).mean() > 1.0, np.abs(styled - plain).mean()
    again = pixels(sdk, create(sdk))
    assert np.array_equal(plain, again)  # the LoRA of the previous request is gone again

    listed = parsed(sdk.elements.get_custom_elements_by_user_id(user_id="local")).user_loras
    assert trained.id in [entry.id for entry in listed]
    loras = parsed(sdk.elements.list_elements()).loras
    assert "zxq" in [entry.name for entry in loras]


def test_unknown_element_and_non_sdxl_versions_are_422_naming_the_field(sdk, dataset):
    cases = [
        (lambda: create(sdk, user_elements=[shared.UserElementsInput(user_lora_id=987654, weight=0.5)]),
         "userElements[0].userLoraId"),
        (lambda: sdk.elements.create_element(request={**ELEMENT, "dataset_id": dataset, "sd_version": "FLUX_DEV"}), "sd_version"),
        (lambda: sdk.elements.create_element(request={**{k: v for k, v in ELEMENT.items() if k != "sd_version"},
                                                      "dataset_id": dataset}), "sd_version"),  # the SDK's default: FLUX_DEV
        (lambda: sdk.models.create_model(request={"name": "m", "dataset_id": dataset, "instance_prompt": TRIGGER,
                                                  "sd_version": "v1_5"}), "sd_version"),
        (lambda: sdk.elements.create_element(request={**ELEMENT, "dataset_id": dataset, "resolution": 100}), "resolution"),
        (lambda: sdk.elements.create_element(request={**ELEMENT, "dataset_id": "0c7bd0a2-0000-4000-8000-000000000000"}),
         "datasetId"),
        (lambda: create(sdk, model_id="0c7bd0a2-0000-4000-8000-000000000000"), "modelId"),
    ]
    for call, field in cases:
        status, body = refused(call)
        assert (status, body["field"]) == (422, field), body
    status, body = refused(lambda: create(sdk, user_elements=[shared.UserElementsInput(user_lora_id=987654)]))
    assert "987654" in body["error"]


def test_a_dataset_with_too_few_images_is_refused(sdk):
    small = new_dataset(sdk, 3, first_seed=50)
    status, body = refused(lambda: sdk.elements.create_element(request={**ELEMENT, "dataset_id": small}))
    assert (status, body["field"]) == (422, "datasetId") and "3 uploaded images" in body["error"], body


def test_a_failed_training_reports_its_reason(sdk, api):
    """Images smaller than the training resolution: the job is FAILED with the trainer's reason."""
    small_images = parsed(sdk.dataset.create_dataset(request={"name": "tiny images"})).insert_datasets_one.id
    for seed in range(5):
        api.store.add_dataset_image(small_images, structured_png(100 + seed, size=32))
    job = parsed(sdk.elements.create_element(request={**ELEMENT, "dataset_id": small_images})).sd_training_job
    record = finished(lambda element_id: element(sdk, element_id), job.user_lora_id, timeout=120)
    assert record.status == shared.JobStatus.FAILED
    answer = sdk.elements.get_element_by_id(id=job.user_lora_id).raw_response.json()
    assert "32x32, smaller than" in answer["error"], answer  # the trainer's own reason
    status, body = refused(lambda: create(sdk, user_elements=[shared.UserElementsInput(user_lora_id=job.user_lora_id)]))
    assert (status, body["field"]) == (422, "userElements[0].userLoraId") and "FAILED" in body["error"]


def test_custom_model_flow(sdk, api, dataset):
    job = parsed(sdk.models.create_model(request={"name": "my model", "dataset_id": dataset, "instance_prompt": TRIGGER,
                                                  "resolution": RESOLUTION, "strength": "LOW"})).sd_training_job
    model_id = job.custom_model_id

    def get(mid):
        record = parsed(sdk.models.get_model_by_id(id=mid)).custom_models_by_pk
        assert isinstance(record, operations.GetModelByIDCustomModels), record
        return record

    record = finished(get, model_id, timeout=120)
    assert record.status == shared.JobStatus.COMPLETE
    assert (record.id, record.name, record.sd_version, record.model_width) == (model_id, "my model", shared.SdVersions.SDXL_1_0, 64)
    listed = parsed(sdk.models.get_custom_models_by_user_id(user_id="local")).custom_models
    assert model_id in [entry.id for entry in listed]

    plain = pixels(sdk, create(sdk))
    custom = create(sdk, model_id=model_id)
    assert np.abs(pixels(sdk, custom) - plain).mean() > 1.0
    assert generation(sdk, custom).model_id == model_id

    assert parsed(sdk.models.delete_model_by_id(id=model_id)).delete_custom_models_by_pk.id == model_id
    assert not (api.store.loras / f"model-{model_id}.safetensors").exists()
    status, _ = refused(lambda: sdk.models.get_model_by_id(id=model_id))
    assert status == 404


def test_pending_training_shows_progress_and_can_be_deleted(sdk, api, dataset):
    """While a training runs its record is PENDING with refgen.progress (written by the job at each step, as
    here by hand); deleting the element drops its queued job."""
    with paused(api.worker):
        job = parsed(sdk.elements.create_element(request={**ELEMENT, "dataset_id": dataset})).sd_training_job
        training = api.store.training("element", job.user_lora_id)
        api.store.set_progress(training.job.id, {"step": 3, "total": 10, "loss": 0.5, "elapsed": 1.0})
        answer = sdk.elements.get_element_by_id(id=job.user_lora_id)
        assert element(sdk, job.user_lora_id).status == shared.JobStatus.PENDING
        assert answer.raw_response.json()["user_loras_by_pk"]["refgen"]["progress"] == {"step": 3, "total": 10, "loss": 0.5,
                                                                                        "elapsed": 1.0}
        listed = sdk.elements.get_custom_elements_by_user_id(user_id="local").raw_response.json()["user_loras"]
        assert [entry["refgen"].get("progress") for entry in listed if entry["id"] == job.user_lora_id] == [answer.raw_response.json()["user_loras_by_pk"]["refgen"]["progress"]]
        assert parsed(sdk.elements.delete_element_by_id(id=job.user_lora_id)).delete_user_loras_by_pk.id == job.user_lora_id
        assert not api.store.job_exists(training.job.id)
    other = parsed(sdk.elements.create_element(request={**ELEMENT, "dataset_id": dataset, "num_train_epochs": 1})).sd_training_job
    job_id = api.store.training("element", other.user_lora_id).job.id  # a training job is not a generation
    assert refused(lambda: sdk.image.get_generation_by_id(id=job_id))[0] == 404
    assert refused(lambda: sdk.image.delete_generation_by_id(id=job_id))[0] == 404
    assert finished(lambda element_id: element(sdk, element_id), other.user_lora_id).status == shared.JobStatus.COMPLETE
    status, _ = refused(lambda: sdk.elements.get_element_by_id(id=job.user_lora_id))
    assert status == 404


def test_dataset_image_from_a_generation_then_deleting_everything(sdk, api, trained, dataset):
    record = finished(lambda job: generation(sdk, job), create(sdk))
    copied = parsed(sdk.dataset.upload_dataset_image_from_gen(
        dataset_id=dataset, request_body={"generated_image_id": record.generated_images[0].id})).upload_dataset_image_from_gen
    images = parsed(sdk.dataset.get_dataset_by_id(id=dataset)).datasets_by_pk.dataset_images
    assert copied.id in [image.id for image in images]
    assert httpx.get([i for i in images if i.id == copied.id][0].url).content == httpx.get(record.generated_images[0].url).content
    status, body = refused(lambda: sdk.dataset.upload_dataset_image_from_gen(
        dataset_id=dataset, request_body={"generated_image_id": "0c7bd0a2-0000-4000-8000-000000000000"}))
    assert (status, body["field"]) == (422, "generatedImageId")

    assert parsed(sdk.elements.delete_element_by_id(id=trained.id)).delete_user_loras_by_pk.id == trained.id
    assert not (api.store.loras / f"element-{trained.id}.safetensors").exists()
    status, _ = refused(lambda: sdk.elements.get_element_by_id(id=trained.id))
    assert status == 404
    status, body = refused(lambda: create(sdk, user_elements=[shared.UserElementsInput(user_lora_id=trained.id)]))
    assert (status, body["field"]) == (422, "userElements[0].userLoraId")

    assert parsed(sdk.dataset.delete_dataset_by_id(id=dataset)).delete_datasets_by_pk.id == dataset
    status, _ = refused(lambda: sdk.dataset.get_dataset_by_id(id=dataset))
    assert status == 404
    assert not any((api.store.files / f"{image.id}.png").exists() for image in images)


# ------------------------------------------------------------------------- parse_generation, no server

class FakeLoras:
    def __init__(self, tmp_path):
        self.file = tmp_path / "element-1.safetensors"

    def element(self, lora_id):
        return self.file if lora_id == 1 else None

    def model(self, model_id):
        return ("tiny", self.file) if model_id == "custom" else None


@pytest.mark.parametrize("elements, field", [
    ([{"userLoraId": 1, "weight": 9}], "userElements[0].weight"),
    ([{"userLoraId": 1, "akUUID": "x"}], "userElements[0].akUUID"),
    ([{"weight": 0.5}], "userElements[0].userLoraId"),
    ([{"userLoraId": 1.5}], "userElements[0].userLoraId"),
    ([{"userLoraId": 1}, {"userLoraId": 2}], "userElements[1].userLoraId"),
    ({"userLoraId": 1}, "userElements"),
    (["x"], "userElements[0]"),
])
def test_user_elements_are_checked_by_field(tmp_path, elements, field):
    from engine.api.leonardo import LeonardoRequestError, parse_generation

    with pytest.raises(LeonardoRequestError) as caught:
        parse_generation({"prompt": "x", "userElements": elements}, images=lambda *a: None, trained=FakeLoras(tmp_path))
    assert caught.value.field == field


def test_user_elements_and_a_custom_model_become_loras(tmp_path):
    from engine.api.leonardo import ModelTable, local_model, parse_generation
    from engine.request import LoraSpec

    trained = FakeLoras(tmp_path)
    body = {"prompt": "x", "modelId": "custom", "userElements": [{"userLoraId": 1.0, "weight": 0.7}, {"userLoraId": 1}]}
    request = parse_generation(body, images=lambda *a: None, trained=trained)
    path = str(trained.file)
    assert request.loras == [LoraSpec(path=path, weight=1.0), LoraSpec(path=path, weight=0.7), LoraSpec(path=path, weight=1.0)]
    assert local_model(body, ModelTable(), trained) == "tiny"
