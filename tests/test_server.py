"""The Leonardo-compatible local API (engine/api/server.py): a real uvicorn server end to end, restart-resume,
auth, limits, unknown ids, path traversal, error shapes, the queue limit, and a fuzz test that no body
or id makes a 500. Offline, CPU, the tiny model at 64x64 and 2 steps."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.api.jobs import EngineRunner, Worker
from engine.provenance import read_metadata
from engine.api.server import PREFIX, ServeError, check_bind, create_app
from engine.api.store import AssetStore
from live_server import png_bytes as _png
from live_server import dead_worker, running_server

API = PREFIX
KEY = "test-key-0123"


# ---------------------------------------------------------------------------------------- helpers

def _body(**fields) -> dict:
    base = {"prompt": "a robot in a field", "width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1,
            "seed": 7, "alchemy": False, "scheduler": "EULER_DISCRETE"}
    return {**base, **fields}


def _upload(client, data: bytes, extension: str = "png", headers=None) -> str:
    """Leonardo's flow: POST /init-image, then a multipart POST of the fields + file to the returned url."""
    answer = client.post(f"{API}/init-image", json={"extension": extension}, headers=headers).json()["uploadInitImage"]
    fields = json.loads(answer["fields"])
    poster = client.post if isinstance(client, TestClient) else httpx.post  # a real server: no bearer key, the token authorises
    response = poster(answer["url"], data=fields, files={"file": ("x." + extension, data)})
    assert response.status_code == 204, response.text
    return answer["id"]


def _poll(client, generation_id: str, path: str = "generations", timeout: float = 120.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"{API}/{path}/{generation_id}", headers=headers).json()
        record = answer["generations_by_pk"] if path == "generations" else answer["generated_image_variation_generic"][0]
        if record["status"] != "PENDING":
            return record
        time.sleep(0.2)
    raise AssertionError(f"{generation_id} still PENDING after {timeout} s")


class CountingRunner:
    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, job):
        self.calls.append(job.id)
        return self.runner(job)


# --------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def store(tmp_path):
    with AssetStore(tmp_path / "api") as opened:
        yield opened


@pytest.fixture
def client(store):
    return TestClient(create_app(store, max_queue=10_000))


# ------------------------------------------------------------------------------------- end to end

def test_end_to_end_over_real_http_with_controlnet_upload_and_provenance(tmp_path, control_engine):
    store = AssetStore(tmp_path / "api")
    worker = Worker(store, EngineRunner(store, load_engine=lambda name: control_engine), poll_seconds=0.1)
    worker.start()
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with running_server(create_app(store, worker, api_key=KEY)) as base, httpx.Client(base_url=base, headers=headers) as http:
            init_id = _upload(http, _png(seed=1))
            init = http.get(f"{API}/init-image/{init_id}").json()["init_images_by_pk"]
            assert init["id"] == init_id and init["url"].startswith(base) and httpx.get(init["url"]).content == _png(seed=1)
            body = _body(num_images=2, controlnets=[{"initImageId": init_id, "initImageType": "UPLOADED",
                                                     "preprocessorId": 19, "weight": "0.5"}])
            job = http.post(f"{API}/generations", json=body).json()["sdGenerationJob"]
            assert job["apiCreditCost"] == 0
            record = _poll(http, job["generationId"])
            assert record["status"] == "COMPLETE", record["refgen"]["error"]
            _check_generation_record(record, base, tmp_path)
            listed = http.get(f"{API}/generations/user/local", params={"limit": 5}).json()["generations"]
            assert [g["id"] for g in listed] == [job["generationId"]]
            assert http.get(f"{API}/me").json()["user_details"][0]["user"]["id"] == "local"
    finally:
        worker.stop(10)
        store.close()


def _check_generation_record(record: dict, base: str, tmp_path) -> None:
    assert (record["imageWidth"], record["imageHeight"], record["public"], record["seed"]) == (64, 64, False, 7)
    assert record["prompt"] == "a robot in a field" and len(record["generated_images"]) == 2
    assert (record["inferenceSteps"], record["scheduler"]) == (2, "EULER_DISCRETE")  # what ran, from the provenance
    assert record["refgen"]["scheduler"] == "euler"
    for index, image in enumerate(record["generated_images"]):
        assert image["url"].startswith(f"{base}{API}/files/") and image["nsfw"] is False
        assert image["generated_image_variation_generics"] == []
        response = httpx.get(image["url"])  # no key: the URL is the capability, like Leonardo's CDN links
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        saved = tmp_path / f"downloaded-{index}.png"
        saved.write_bytes(response.content)
        meta = read_metadata(saved)
        assert meta["image"]["seed"] == 7 + index and meta["resolved"]["steps"] == 2
        assert meta["request"]["controlnets"][0]["type"] == "canny"
        assert record["refgen"]["images"][index]["seed"] == 7 + index


def test_restart_resumes_queued_and_interrupted_jobs_exactly_once(tmp_path, engine):
    root = tmp_path / "api"
    first = AssetStore(root)
    with running_server(create_app(first)) as base:  # no worker: the jobs only queue
        queued = httpx.post(f"{base}{API}/generations", json=_body()).json()["sdGenerationJob"]["generationId"]
        interrupted = httpx.post(f"{base}{API}/generations", json=_body(seed=8)).json()["sdGenerationJob"]["generationId"]
    assert first.claim_next(dead_worker()).id == queued  # claimed by a process that then died
    first.close()

    second = AssetStore(root)
    runner = CountingRunner(EngineRunner(second, load_engine=lambda name: engine))
    worker = Worker(second, runner, poll_seconds=0.1)
    worker.start()
    try:
        with running_server(create_app(second, worker)) as base, httpx.Client(base_url=base) as http:
            records = [_poll(http, generation_id) for generation_id in (queued, interrupted)]
    finally:
        worker.stop(10)
    assert [r["status"] for r in records] == ["COMPLETE", "COMPLETE"]
    assert sorted(runner.calls) == sorted([queued, interrupted])  # each ran once
    assert all(len(r["generated_images"]) == 1 for r in records)
    second.close()


def test_upscale_variation_flow(store, engine, tmp_path):
    class FakeUpscaler:  # ESRGAN weights are not available offline; the server's part is the flow
        def __call__(self, job):
            from engine.api.store import Output

            source = store.generated_image(job.body["id"])
            return [Output(png=source.path.read_bytes(), seed=source.seed, metadata=source.metadata)]

    runner = EngineRunner(store, load_engine=lambda name: engine)
    worker = Worker(store, lambda job: runner(job) if job.kind == "generation" else FakeUpscaler()(job), poll_seconds=0.1)
    worker.start()
    try:
        http = TestClient(create_app(store, worker))
        generation_id = http.post(f"{API}/generations", json=_body()).json()["sdGenerationJob"]["generationId"]
        image_id = _poll(http, generation_id)["generated_images"][0]["id"]
        job = http.post(f"{API}/variations/upscale", json={"id": image_id}).json()["sdUpscaleJob"]
        variation = _poll(http, job["id"], path="variations")
        assert variation["status"] == "COMPLETE" and variation["transformType"] == "UPSCALE"
        assert http.get(variation["url"]).status_code == 200
        assert http.get(f"{API}/generations/{job['id']}").status_code == 404  # an upscale is a variation
        assert [g["id"] for g in http.get(f"{API}/generations/user/local").json()["generations"]] == [generation_id]
        assert http.delete(f"{API}/generations/{generation_id}").json() == {"delete_generations_by_pk": {"id": generation_id}}
        assert http.get(f"{API}/generations/{generation_id}").status_code == 404
    finally:
        worker.stop(10)


# -------------------------------------------------------------------------------------------- auth

def test_api_key_is_required_when_set(store):
    http = TestClient(create_app(store, api_key=KEY))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        response = http.get(f"{API}/me", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        assert http.post(f"{API}/generations", json=_body(), headers=headers).status_code == 401
    assert http.get(f"{API}/me", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert http.get("/openapi.json").status_code == 200 and http.get("/docs").status_code == 200
    assert store.pending_count() == 0


def test_serve_refuses_a_public_address_without_a_key():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ServeError, match="--api-key"):
            check_bind(host, None)
        check_bind(host, KEY)


# ---------------------------------------------------------------------------------- upload limits

def test_oversized_upload_is_refused_while_reading(store):
    http = TestClient(create_app(store, max_upload_bytes=2000))
    answer = http.post(f"{API}/init-image", json={"extension": "png"}).json()["uploadInitImage"]
    fields = json.loads(answer["fields"])
    big = _png((256, 256))
    assert http.post(answer["url"], data=fields, files={"file": ("x.png", big)}).status_code == 413

    def chunked():  # no Content-Length: the limit must hold while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\n" + fields["token"].encode() + b"\r\n"
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(10_000):
            yield b"\0" * 1024
    response = http.post(answer["url"], content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert store.upload(answer["id"]).uploaded is False


def test_upload_errors(store, client):
    answer = client.post(f"{API}/init-image", json={"extension": "png"}).json()["uploadInitImage"]
    fields = json.loads(answer["fields"])
    assert client.post(answer["url"], data=fields, files={"file": ("x.png", b"not an image")}).status_code == 422
    wrong = {**fields, "token": "nope"}
    assert client.post(answer["url"], data=wrong, files={"file": ("x.png", _png())}).status_code == 403
    assert client.post(answer["url"], data=fields).status_code == 422  # no file part
    assert client.post(answer["url"], json=fields).status_code == 422  # not multipart
    assert client.post(answer["url"], data=fields, files={"file": ("x.png", _png())}).status_code == 204
    assert client.post(answer["url"], data=fields, files={"file": ("x.png", _png())}).status_code == 409
    response = client.post(f"{API}/init-image", json={"extension": "exe"})
    assert response.status_code == 422 and response.json()["field"] == "extension"
    assert client.delete(f"{API}/init-image/{answer['id']}").json() == {"delete_init_images_by_pk": {"id": answer["id"]}}
    assert client.get(f"{API}/init-image/{answer['id']}").status_code == 404


# ------------------------------------------------------------------------------ ids and traversal

def test_unknown_ids_are_404(client):
    unknown = str(uuid.uuid4())
    for method, path in (("get", f"generations/{unknown}"), ("delete", f"generations/{unknown}"),
                         ("get", f"init-image/{unknown}"), ("delete", f"init-image/{unknown}"),
                         ("get", f"variations/{unknown}"), ("get", f"files/{unknown}.png"),
                         ("get", "generations/not-a-uuid"), ("post", f"uploads/{unknown}")):
        response = getattr(client, method)(f"{API}/{path}")
        assert response.status_code == 404, (method, path, response.text)
        assert "error" in response.json()


def test_path_traversal_reads_nothing_outside(store, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET-CONTENT")
    (store.root / "files" / "x.png").write_bytes(b"SECRET-CONTENT")  # even a stray file in the folder is not served
    attempts = ["..%2F..%2Fetc%2Fpasswd", "..%2Fsecret.png", "..%2F..%2Fsecret.png", "%2Fetc%2Fpasswd",
                "x.png", "..", "%2e%2e%2fsecret.png", "....%2F%2Fsecret.png", f"{uuid.uuid4()}.png%00.txt",
                f"..%2F{uuid.uuid4()}.png", f"{uuid.uuid4()}%2F..%2F..%2Fsecret.png"]
    with running_server(create_app(store)) as base:
        host, port = base.removeprefix("http://").split(":")
        for attempt in attempts:
            for kind in ("files", "generations", "init-image", "variations"):
                status, body = _raw_get(host, int(port), f"{API}/{kind}/{attempt}")
                assert status == 404 and b"SECRET" not in body and b"root:" not in body, (kind, attempt, status)
        status, body = _raw_get(host, int(port), f"{API}/files/../../../../etc/passwd")
        assert status == 404 and b"root:" not in body


def _raw_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A GET with the path exactly as written (httpx would normalise '..')."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ---------------------------------------------------------------------------------- error shapes

def test_bad_bodies_are_422_naming_the_field(client):
    cases = [
        (b"{not json", "body"),
        (json.dumps([1, 2]).encode(), "body"),
        (json.dumps(_body(prompt=5)).encode(), "prompt"),
        (json.dumps({"width": 64}).encode(), "prompt"),
        (json.dumps(_body(nonsense=1)).encode(), "nonsense"),
        (json.dumps(_body(modelId="no-such-model")).encode(), "modelId"),
        (json.dumps(_body(controlnets=[{"initImageId": str(uuid.uuid4()), "initImageType": "UPLOADED",
                                        "preprocessorId": 19}])).encode(), "controlnets[0].initImageId"),
        (json.dumps(_body(controlnets=[{"initImageId": "x", "initImageType": "UPLOADED",
                                        "preprocessorId": 99}])).encode(), "controlnets[0].preprocessorId"),
    ]
    for raw, field in cases:
        response = client.post(f"{API}/generations", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["field"] == field, (raw, response.json())
    response = client.get(f"{API}/generations/user/local", params={"limit": 0})
    assert response.status_code == 422 and response.json()["field"] == "limit"
    response = client.post(f"{API}/variations/upscale", json={"id": str(uuid.uuid4())})
    assert response.status_code == 422 and response.json()["field"] == "id"
    assert client.get(f"{API}/generations/user/local").json() == {"generations": []}


def test_full_queue_is_429_with_retry_after(store):
    http = TestClient(create_app(store, max_queue=2))
    assert [http.post(f"{API}/generations", json=_body()).status_code for _ in range(2)] == [200, 200]
    response = http.post(f"{API}/generations", json=_body())
    assert response.status_code == 429 and int(response.headers["retry-after"]) > 0
    assert store.pending_count() == 2


# ---------------------------------------------------------------------------------------- fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(sorted(_body(controlnets=[], init_image_id="", init_strength=0.5, presetStyle="", modelId="",
                                    photoReal=False, ultra=False, negative_prompt="", guidance_scale=7, controlNet=False,
                                    controlNetType="", weighting=1, init_generation_image_id="", public=False)))


@st.composite
def mutated_bodies(draw):
    body = _body(controlnets=[{"initImageId": draw(st.sampled_from(["", str(uuid.uuid4())])), "initImageType": "UPLOADED",
                               "preprocessorId": 19}]) if draw(st.booleans()) else _body()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(KEYS | st.text(max_size=8))
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(JSON)
    return body


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(JSON, mutated_bodies()))
@example(body=float("inf")).via("a body FastAPI rejects, whose value JSON cannot echo")
@example(body={"prompt": "x", "contrast": float("nan")}).via("NaN in an ignored field")
def test_no_generation_body_makes_a_500(client, body):
    content = json.dumps(body)
    for path in ("generations", "variations/upscale", "init-image"):
        response = client.post(f"{API}/{path}", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code in (200, 422), (path, body, response.status_code, response.text)
        if response.status_code == 422:
            assert isinstance(response.json()["field"], str)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(identifier=st.text(max_size=40) | st.uuids().map(str), kind=st.sampled_from(
    ["generations", "init-image", "variations", "files", "generations/user"]))
def test_no_path_id_makes_a_500(client, identifier, kind):
    path = f"{API}/{kind}/{quote(identifier, safe='')}"
    for method in ("get", "delete"):
        response = getattr(client, method)(path)
        assert response.status_code in (200, 307, 404, 405, 422), (method, path, response.status_code, response.text)


# ------------------------------------------------------------------------------------------ serve

def test_refgen_serve_refuses_a_public_host_without_a_key(monkeypatch):
    from typer.testing import CliRunner

    from engine.cli import app

    monkeypatch.delenv("REFGEN_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "without an API key" in result.output


def test_serve_starts_the_worker_and_stops_it_on_shutdown(tmp_path, monkeypatch):
    import uvicorn

    import engine.api.jobs
    from engine.api.server import serve

    events = []

    class FakeWorker:
        def __init__(self, store, runner, poll_seconds=0.5, name="worker"):
            pass

        def start(self):
            events.append("worker started")

        def notify(self):
            pass

        def stop(self, timeout=None):
            events.append("worker stopped")

    def fake_run(self):
        events.append(f"uvicorn on {self.config.host}:{self.config.port}")
        raise KeyboardInterrupt  # as if Ctrl-C ended the server abruptly

    monkeypatch.setattr(engine.api.jobs, "Worker", FakeWorker)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    with AssetStore(tmp_path / "api") as store, pytest.raises(KeyboardInterrupt):
        serve(port=9999, store=store)
    assert events == ["worker started", "uvicorn on 127.0.0.1:9999", "worker stopped"]
