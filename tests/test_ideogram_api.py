"""Ideogram 3.0's character endpoints (engine/api/ideogram.py) against a real uvicorn server: multipart requests
with the field names of Ideogram's API reference (generate, edit, remix), `Api-Key` authentication, Ideogram's
answer shape and image URLs served by the same server, Ideogram's edit-mask convention (black = edit), and errors in
Ideogram's shape naming the field. The server is `refgen serve --model tiny` (random weights, every component a tiny
stand-in, the face packs included), offline, on the CPU."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.api.ideogram import PREFIX as IDEOGRAM
from engine.api.server import PREFIX as LEONARDO, create_app
from engine.api.store import AssetStore
from engine.tiny import tiny_unet_config
from live_server import running_server, serving

KEY = "ideogram-test-key"
HEADERS = {"Api-Key": KEY}
SMALL = 128
NATIVE = tiny_unet_config()["sample_size"] * 8  # the tiny model's native side: what 1x1 gives it


@pytest.fixture(scope="module")
def api(refgen_home, tmp_path_factory):
    def load(name: str):
        from engine import Engine

        return Engine.load(name, device="cpu", dtype="fp32")

    with serving(tmp_path_factory.mktemp("ideogram_api"), 30, api_key=KEY, model="tiny", load_engine=load) as (base, _, store):
        with httpx.Client(base_url=base, timeout=120) as client:
            yield SimpleNamespace(client=client, store=store)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo(astronaut) -> bytes:
    return png(astronaut)


def post(api, endpoint: str, data: dict, files: list, headers=HEADERS) -> httpx.Response:
    """A multipart/form-data request, as Ideogram's reference defines them: text fields are parts without a filename."""
    parts = [(name, (None, value)) for name, value in data.items()] + list(files)
    return api.client.post(f"{IDEOGRAM}/{endpoint}", files=parts, headers=headers)


def fetch_png(api, url: str) -> Image.Image:
    answer = api.client.get(url)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    image.load()
    return image


def check_answer(api, answer: httpx.Response, count: int, prompt: str, style_type: str = "GENERAL") -> list[Image.Image]:
    """Ideogram's ImageGenerationResponseV3, each url fetchable and a PNG of the answered resolution."""
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body["created"], str) and len(body["data"]) == count
    images = []
    for item in body["data"]:
        assert {"url", "prompt", "resolution", "seed", "is_image_safe", "style_type"} <= set(item)
        assert prompt in item["prompt"] and item["is_image_safe"] is True and item["style_type"] == style_type
        assert isinstance(item["seed"], int)
        image = fetch_png(api, item["url"])
        assert f"{image.width}x{image.height}" == item["resolution"]
        images.append(image)
    return images


# ----------------------------------------------------------------------------------------- generate

def test_generate_with_character_reference(api, photo):
    data = {"prompt": "the astronaut as a knight", "resolution": "96x64", "rendering_speed": "TURBO",
            "num_images": "1", "seed": "7", "style_type": "REALISTIC", "negative_prompt": "blurry"}
    answer = post(api, "generate", data, [("character_reference_images", ("astronaut.png", photo, "image/png"))])
    (image,) = check_answer(api, answer, 1, "the astronaut as a knight", style_type="REALISTIC")
    assert image.size == (96, 64)
    item = answer.json()["data"][0]
    assert item["seed"] == 7 and item["resolution"] == "96x64"
    # the same job, as the Leonardo API shows it (the poll route for a sync wait that ran out)
    job = api.client.get(f"{LEONARDO}/generations/{answer.json()['refgen']['generation_id']}",
                         headers={"Authorization": f"Bearer {KEY}"}).json()["generations_by_pk"]
    assert job["status"] == "COMPLETE" and len(job["generated_images"]) == 1


def test_a_character_mask_carries_the_masked_parts(api, photo, astronaut):
    """The mask (white = carried besides the face) reaches the character's appearance: same seed, another image,
    and the image's provenance records the mask."""
    mask = Image.new("L", astronaut.size, 0)
    mask.paste(255, (128, 0, 384, 320))  # head and shoulders carried
    fields = {"prompt": "a portrait", "resolution": "64x64", "rendering_speed": "TURBO", "seed": "5"}
    character = [("character_reference_images", ("a.png", photo, "image/png"))]
    masked = post(api, "generate", fields, character + [("character_reference_images_mask", ("m.png", png(mask), "image/png"))])
    (image,) = check_answer(api, masked, 1, "a portrait")
    (face_only,) = check_answer(api, post(api, "generate", fields, character), 1, "a portrait")
    assert image.size == (64, 64)
    assert np.abs(np.asarray(image, np.float32) - np.asarray(face_only, np.float32)).max() > 0
    recorded = json.loads(image.text["refgen"])["resolved"]["character_appearance"]
    assert recorded["keep"] == "all" and recorded["mask"]["sha256"]


def test_magic_prompt_on_is_accepted_with_a_warning_and_bearer_works_too(api):
    answer = post(api, "generate", {"prompt": "a lighthouse", "magic_prompt": "ON", "rendering_speed": "FLASH",
                                    "num_images": "2", "resolution": "64x64"}, [], headers={"Authorization": f"Bearer {KEY}"})
    images = check_answer(api, answer, 2, "a lighthouse")
    assert images[0].size == (64, 64)
    assert any("magic_prompt" in warning for warning in answer.json()["refgen"]["warnings"])
    assert answer.json()["data"][0]["prompt"] == "a lighthouse"  # not rewritten


# --------------------------------------------------------------------------------------------- edit

def test_edit_repaints_only_the_black_region(api, astronaut):
    scene = astronaut.resize((SMALL, SMALL))
    mask = Image.new("RGB", scene.size, "white")
    mask.paste((0, 0, 0), (32, 32, 96, 96))  # Ideogram: black = the region to edit
    answer = post(api, "edit", {"prompt": "a golden helmet", "rendering_speed": "FLASH", "seed": "3"},
                  [("image", ("scene.png", png(scene), "image/png")), ("mask", ("mask.png", png(mask), "image/png"))])
    (result,) = check_answer(api, answer, 1, "a golden helmet")
    assert result.size == scene.size
    before, after = np.asarray(scene, np.float32), np.asarray(result.convert("RGB"), np.float32)
    outside = np.ones(scene.size[::-1], bool)
    outside[24:104, 24:104] = False  # the edit region and a margin for the seam
    assert np.abs(after - before)[outside].mean() < 3.0  # white: kept
    assert np.abs(after - before)[40:88, 40:88].mean() > 10.0  # black: repainted (the tiny model draws noise)


def test_edit_with_a_character_is_a_face_swap_into_the_scene(api, photo, astronaut):
    scene = astronaut.resize((SMALL, SMALL))
    mask = Image.new("L", scene.size, 255)
    mask.paste(0, (40, 8, 88, 64))
    answer = post(api, "edit", {"prompt": "the same astronaut", "rendering_speed": "TURBO"},
                  [("image", ("s.png", png(scene), "image/png")), ("mask", ("m.png", png(mask), "image/png")),
                   ("character_reference_images", ("c.png", photo, "image/png"))])
    check_answer(api, answer, 1, "the same astronaut")


# -------------------------------------------------------------------------------------------- remix

def test_remix_with_image_weight(api, astronaut):
    answer = post(api, "remix", {"prompt": "a bronze statue", "image_weight": "80", "aspect_ratio": "1x1",
                                 "rendering_speed": "FLASH"},
                  [("image", ("in.png", png(astronaut.resize((SMALL, SMALL))), "image/png"))])
    (image,) = check_answer(api, answer, 1, "a bronze statue")
    assert image.size == (NATIVE, NATIVE)  # 1x1 at the model's native size


# ------------------------------------------------------------------------------------------- errors

def pixel_bomb() -> bytes:
    """A few kB of PNG that decodes to 8000 x 8000 pixels (64 MP, over the 40 MP limit)."""
    return png(Image.new("1", (8000, 8000), 0))


@pytest.mark.parametrize("endpoint, data, files, status, field", [
    ("generate", {"num_images": "1"}, [], 400, "prompt"),
    ("generate", {"prompt": "x", "num_images": "9"}, [], 400, "num_images"),
    ("generate", {"prompt": "x", "rendering_speed": "WARP"}, [], 400, "rendering_speed"),
    ("generate", {"prompt": "x", "aspect_ratio": "1x1", "resolution": "1024x1024"}, [], 400, "aspect_ratio"),
    ("generate", {"prompt": "x", "color_palette": '{"name": "EMBER"}'}, [], 400, "color_palette"),
    ("generate", {"prompt": "x"}, [("character_reference_images", ("a.txt", b"not an image at all", "text/plain"))],
     400, "character_reference_images"),
    ("remix", {"prompt": "x"}, "bomb", 400, "image"),
    ("edit", {"prompt": "x"}, "no-mask", 400, "mask"),
])
def test_errors_name_the_field(api, endpoint, data, files, status, field):
    if files == "bomb":
        files = [("image", ("bomb.png", pixel_bomb(), "image/png"))]
    elif files == "no-mask":
        files = [("image", ("i.png", png(Image.new("RGB", (64, 64))), "image/png"))]
    answer = post(api, endpoint, data, files)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and field in answer.json()["error"]


def test_wrong_or_missing_api_key_is_401(api):
    for headers in ({"Api-Key": "nope"}, {}):
        answer = post(api, "generate", {"prompt": "x"}, [], headers=headers)
        assert answer.status_code == 401 and answer.json()["field"] == "Api-Key"


def test_refused_requests_leave_no_uploads_and_no_jobs(api, photo):
    before = api.store.pending_count(), len(list(api.store.root.glob("files/*")))
    answer = post(api, "generate", {"prompt": "x", "rendering_speed": "FLASH"},
                  [("character_reference_images", ("a.png", photo, "image/png"))])
    assert answer.status_code == 400 and answer.json()["field"] == "rendering_speed"
    assert (api.store.pending_count(), len(list(api.store.root.glob("files/*")))) == before


def test_a_wait_that_runs_out_answers_504_and_the_job_stays_queued_once(tmp_path):
    """Sync by default: with no worker the job never finishes; the answer names it, the queue holds it once."""
    with AssetStore(tmp_path / "store") as store:
        app = create_app(store, None, api_key=KEY, ideogram_wait_seconds=0.3)
        with running_server(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            answer = client.post(f"{IDEOGRAM}/generate", files=[("prompt", (None, "a harbour"))], headers=HEADERS)
            assert answer.status_code == 504, answer.text
            job_id = answer.json()["refgen"]["generation_id"]
            shown = client.get(f"{LEONARDO}/generations/{job_id}", headers=HEADERS)
            assert shown.status_code == 401  # the Leonardo routes keep their Bearer header
            shown = client.get(f"{LEONARDO}/generations/{job_id}", headers={"Authorization": f"Bearer {KEY}"})
            assert shown.json()["generations_by_pk"]["status"] == "PENDING"
        assert store.pending_count() == 1
