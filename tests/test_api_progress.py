"""What a page (or a script) sees of a running generation through refgen's API extensions: `refgen.progress` with
the step it has reached, a text/event-stream of it, and DELETE of a running generation stopping it at its next
step. A real uvicorn server, the tiny model, CPU."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import pytest

from engine.api.server import PREFIX
from live_server import serving

KEY = "progress-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


class CountingLoader:
    """`refgen serve`'s loader (Engine.load on the CPU) whose engines note the last step each generation reached."""

    def __init__(self):
        self.reached: list[int] = []

    def __call__(self, name: str):
        from engine import Engine

        engine = Engine.load(name, device="cpu", dtype="fp32")
        generate, reached = engine.generate, self.reached

        def counted(request, on_step=None):
            reached.append(0)

            def step(info):
                reached[-1] = info.step + 1
                return on_step(info) if on_step is not None else None

            return generate(request, on_step=step)

        engine.generate = counted
        return engine


@pytest.fixture(scope="module")
def api(refgen_home, tmp_path_factory):
    loader = CountingLoader()
    with serving(tmp_path_factory.mktemp("progress_api"), api_key=KEY, model="tiny", load_engine=loader) as (base, _, _):
        with httpx.Client(base_url=f"{base}{PREFIX}", headers=HEADERS, timeout=120) as client:
            yield SimpleNamespace(client=client, loader=loader)


def create(api, **body) -> str:
    answer = api.client.post("/generations", json={"prompt": "a lighthouse", "width": 64, "height": 64, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["sdGenerationJob"]["generationId"]


def events(api, generation_id: str) -> list[tuple[str, dict]]:
    found = []
    with api.client.stream("GET", f"/generations/{generation_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                found.append((name, json.loads(line[len("data: "):])))
    return found


def test_the_event_stream_shows_the_steps_and_ends_with_the_finished_generation(api):
    """(That progress is visible while a job runs, not only at its end, the deletion test shows.)"""
    generation_id = create(api, num_inference_steps=40, num_images=2, width=128, height=128)
    seen = events(api, generation_id)
    names = [name for name, _ in seen]
    assert names[0] == "progress" and names[-1] == "done" and set(names[:-1]) == {"progress"}
    steps = [data["progress"]["step"] for name, data in seen if name == "progress" and data["progress"]]
    assert steps == sorted(steps) and all(1 <= step <= 40 for step in steps)
    final = seen[-1][1]["generations_by_pk"]
    assert final["status"] == "COMPLETE" and len(final["generated_images"]) == 2
    assert final["refgen"]["progress"] == {"step": 40, "total": 40, "phase": "base"}  # the last step is always written


def test_deleting_a_running_generation_stops_it_at_its_next_step(api):
    generation_id = create(api, num_inference_steps=60, num_images=4, width=512, height=512)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = api.client.get(f"/generations/{generation_id}").json()["generations_by_pk"]["refgen"]["progress"]
        if progress:
            break
        time.sleep(0.05)
    assert progress and progress["step"] < 60
    assert api.client.delete(f"/generations/{generation_id}").status_code == 200
    follow_up = create(api, num_inference_steps=10)  # the worker is free again once the deleted run has stopped
    seen = events(api, follow_up)
    assert seen[-1][1]["generations_by_pk"]["status"] == "COMPLETE"
    stopped_at = api.loader.reached[-2]
    assert stopped_at < 60, "the deleted generation ran to its end"
    assert api.client.get(f"/generations/{generation_id}").status_code == 404


def test_events_of_an_unknown_generation_are_a_404(api):
    answer = api.client.get("/generations/00000000-0000-4000-8000-000000000000/events")
    assert answer.status_code == 404
