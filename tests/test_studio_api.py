"""The API the studio page is a client of, as a script uses it: refgen's routes beside Leonardo's (the catalog, an
image's recipe and replay, characters) and the generation body's `refgen` object (a saved character, a preset of
the user's, an aspect ratio, best-of-N), upscales at x2 or x4. A real uvicorn server, the tiny model, CPU."""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.api.server import PREFIX
from engine.api.trainings import TrainingSettings
from live_server import png_bytes, serving

KEY = "studio-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def api(refgen_home, tmp_path_factory):
    training = TrainingSettings(rank=4, max_steps=3, max_resolution=64)  # a LoRA in seconds on the tiny model
    with serving(tmp_path_factory.mktemp("studio_api"), api_key=KEY, model="tiny", training=training) as (base, _, store):
        with httpx.Client(base_url=f"{base}{PREFIX}", headers=HEADERS, timeout=120) as client:
            yield SimpleNamespace(client=client, base=base, store=store)
            for character in client.get("/refgen/characters").json()["characters"]:  # the session's REFGEN_HOME is shared
                client.delete(f"/refgen/characters/{character['slug']}")


def upload(api, data: bytes, extension: str = "png") -> str:
    slot = api.client.post("/init-image", json={"extension": extension}).json()["uploadInitImage"]
    answer = httpx.post(slot["url"], data=json.loads(slot["fields"]), files={"file": (f"x.{extension}", data)})
    assert answer.status_code == 204, answer.text
    return slot["id"]


def generate(api, **body) -> dict:
    answer = api.client.post("/generations", json={"prompt": "a lighthouse", **body})
    assert answer.status_code == 200, answer.text
    return wait(api, f"/generations/{answer.json()['sdGenerationJob']['generationId']}")["generations_by_pk"]


def wait(api, path: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        answer = api.client.get(path).json()
        record = answer.get("generations_by_pk") or answer.get("generated_image_variation_generic", [{}])[0]
        if record.get("status") != "PENDING":
            assert record.get("status") == "COMPLETE", answer
            return answer
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)


def pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)))


def refused(answer: httpx.Response) -> str:
    assert answer.status_code == 422, answer.text
    return answer.json()["field"]


@pytest.fixture(scope="module")
def mira(api):
    """A saved character made through the API from one uploaded photo (the tiny face pack sees a face in it)."""
    answer = api.client.post("/refgen/characters", json={
        "name": "Studio Mira", "anchor": "mira, short red hair", "images": [{"id": upload(api, png_bytes((128, 128)))}]})
    assert answer.status_code == 201, answer.text
    return answer.json()["character"]


# ------------------------------------------------------------------------------------------- catalog

def test_the_catalog_shows_each_aspect_ratio_at_the_size_the_server_then_makes(api):
    catalog = api.client.get("/refgen/catalog").json()
    sizes = {entry["ratio"]: (entry["width"], entry["height"]) for entry in catalog["aspectRatios"]}
    # the tiny model's native side is 256: SDXL's 1344x768 bucket for 16:9, scaled by 1/4 to multiples of 64
    assert catalog["nativeSize"] == 256 and sizes["1:1"] == (256, 256) and sizes["16:9"] == (320, 192)
    made = generate(api, num_inference_steps=2, refgen={"aspectRatio": "16:9"})
    assert (made["imageWidth"], made["imageHeight"]) == (320, 192)
    assert {"name": "cinematic", "source": "builtin"}.items() <= next(
        p for p in catalog["presets"] if p["name"] == "cinematic").items()
    assert [c["preprocessorId"] for c in catalog["controls"]] == [19, 20, 21]
    assert catalog["characterStrengths"] == ["Low", "Mid", "High"]


def test_a_users_own_preset_is_listed_and_runs_by_name(api, refgen_home):
    from engine.presets import Preset, save_user_preset, user_presets

    path = save_user_preset(Preset(name="studio_noir", description="mine", prompt_template="{prompt}, film noir"))
    try:
        listed = {p["name"]: p["source"] for p in api.client.get("/refgen/catalog").json()["presets"]}
        assert listed["studio_noir"] == "user" and listed["cinematic"] == "builtin"
        made = generate(api, **SMALL, refgen={"preset": "studio_noir"})
        recipe = api.client.get(f"/refgen/images/{made['generated_images'][0]['id']}").json()["recipe"]
        assert recipe["resolved"]["preset"] == "studio_noir"
        assert recipe["resolved"]["prompt"] == "a lighthouse, film noir"
    finally:
        path.unlink()
    assert "studio_noir" not in user_presets()


# ------------------------------------------------------------------------------------ recipe, replay

def test_an_images_recipe_is_its_provenance_and_its_replay_body_makes_the_same_pixels(api):
    made = generate(api, **SMALL, seed=77, num_images=2)
    second = made["generated_images"][1]
    info = api.client.get(f"/refgen/images/{second['id']}").json()
    assert info["seed"] == 78 and info["generationId"] == made["id"] and info["rank"] is None
    assert [image["rank"] for image in made["refgen"]["images"]] == [None, None]
    assert info["recipe"]["resolved"]["seeds"] == [77, 78] and info["recipe"]["resolved"]["steps"] == 2
    assert info["replay"]["seed"] == 78 and "num_images" not in info["replay"]

    again = generate(api, **info["replay"])
    assert len(again["generated_images"]) == 1
    np.testing.assert_allclose(pixels(again["generated_images"][0]["url"]), pixels(second["url"]), atol=1)  # batch of 2 vs 1

    alone = api.client.get(f"/refgen/images/{again['generated_images'][0]['id']}").json()
    replayed = generate(api, **alone["replay"])  # the same request, alone both times: the very same pixels
    assert np.array_equal(pixels(replayed["generated_images"][0]["url"]), pixels(again["generated_images"][0]["url"]))


def test_deleting_one_image_keeps_the_rest_of_its_generation(api):
    made = generate(api, **SMALL, num_images=2)
    gone, kept = made["generated_images"]
    assert api.client.delete(f"/refgen/images/{gone['id']}").json() == {"id": gone["id"]}
    after = api.client.get(f"/generations/{made['id']}").json()["generations_by_pk"]
    assert [image["id"] for image in after["generated_images"]] == [kept["id"]]
    assert httpx.get(gone["url"]).status_code == 404 and httpx.get(kept["url"]).status_code == 200
    assert api.client.get(f"/refgen/images/{gone['id']}").status_code == 404


@pytest.mark.parametrize("scale", [2, 4])
def test_upscale_at_two_or_four_times(api, scale):
    image = generate(api, **SMALL)["generated_images"][0]
    job = api.client.post("/variations/upscale", json={"id": image["id"], "refgen": {"scale": scale}}).json()
    variation = wait(api, f"/variations/{job['sdUpscaleJob']['id']}")["generated_image_variation_generic"][0]
    assert pixels(variation["url"]).shape[:2] == (64 * scale, 64 * scale)
    upscaled = api.client.get(f"/refgen/images/{variation['refgen']['imageId']}").json()
    assert upscaled["kind"] == "upscale" and upscaled["replay"] is None and upscaled["recipe"]["upscale"]["scale"] == scale


def test_an_upscale_factor_other_than_two_or_four_is_refused(api):
    image = generate(api, **SMALL)["generated_images"][0]
    assert refused(api.client.post("/variations/upscale", json={"id": image["id"], "refgen": {"scale": 3}})) == "refgen.scale"


# ---------------------------------------------------------------------------------------- characters

def test_a_character_made_from_a_photo_shows_its_face_and_anchor_text(api, mira):
    assert (mira["name"], mira["anchor"], mira["keep"]) == ("Studio Mira", "mira, short red hair", "face")
    (anchor,) = mira["anchors"]
    x1, y1, x2, y2 = anchor["bbox"]
    assert (anchor["width"], anchor["height"]) == (128, 128) and 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
    assert "Studio Mira" in [c["name"] for c in api.client.get("/refgen/characters").json()["characters"]]
    assert httpx.get(anchor["url"]).status_code == 401  # the user's photos need the key, unlike /files/
    picture = api.client.get(anchor["url"])
    assert picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (128, 128)
    assert Image.open(io.BytesIO(api.client.get(mira["faceUrl"]).content)).size == (224, 224)


def test_a_saved_character_by_name_with_best_of_gives_ranked_scored_images(api, mira):
    made = generate(api, **SMALL, seed=5, refgen={"character": {"name": mira["name"], "strengthType": "High"}, "bestOf": 2})
    infos = [api.client.get(f"/refgen/images/{image['id']}").json() for image in made["generated_images"]]
    scores = [info["identityScore"] for info in infos]
    assert [info["rank"] for info in infos] == [1, 2] and scores == sorted(scores, reverse=True)
    assert [image["rank"] for image in made["refgen"]["images"]] == [1, 2]  # the gallery's list shows the ranking too
    assert sorted(info["seed"] for info in infos) == [5, 6]
    character = infos[0]["recipe"]["resolved"]["character"]
    assert character["name"] == "Studio Mira" and character["strength_type"] == "High"
    assert "bestOf" not in infos[0]["replay"]["refgen"] and infos[0]["replay"]["seed"] == infos[0]["seed"]


def test_the_character_mask_applies_to_photos_given_as_character_references(api):
    photo = upload(api, png_bytes((128, 128), seed=3))
    made = generate(api, **SMALL, controlnets=[{"initImageId": photo, "initImageType": "UPLOADED", "preprocessorId": 133,
                                                "strengthType": "Mid"}], refgen={"character": {"keep": "face+hair"}})
    recipe = api.client.get(f"/refgen/images/{made['generated_images'][0]['id']}").json()["recipe"]["resolved"]
    assert recipe["character"]["keep"] == "face+hair"
    assert recipe["character_appearance"]["keep"] == "face+hair" and recipe["character_appearance"]["picture_sha256"]


@pytest.mark.parametrize("mask, words", [
    (Image.new("L", (100, 128), 255), "it must be the size of the reference photo, 128x128"),
    (Image.new("RGB", (128, 128), (255, 0, 0)), "must be greyscale"),
    (Image.new("L", (128, 128), 0), "is empty"),
])
def test_a_character_mask_that_cannot_cover_the_picture_is_refused_before_queueing(api, mira, mask, words):
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    mask_id = upload(api, buffer.getvalue())
    for character in ({"name": mira["name"]}, {}):  # a saved character's first anchor, or the first photo
        photos = [] if character else [{"initImageId": upload(api, png_bytes((128, 128))), "initImageType": "UPLOADED",
                                        "preprocessorId": 133}]
        answer = api.client.post("/generations", json={"prompt": "x", **SMALL, "controlnets": photos, "refgen": {
            "character": {**character, "keep": "face+hair", "maskImageId": mask_id}}})
        assert refused(answer) == "refgen.character.maskImageId" and words in answer.json()["error"]


def test_add_to_character_takes_a_generated_image_as_another_anchor(api):
    photo = upload(api, png_bytes((128, 128), seed=4))
    created = api.client.post("/refgen/characters", json={"name": "Studio Tom", "images": [{"id": photo}]}).json()
    image = generate(api, **{**SMALL, "width": 128, "height": 128})["generated_images"][0]  # a face big enough
    grown = api.client.post(f"/refgen/characters/{created['character']['slug']}/anchors",
                            json={"id": image["id"], "type": "GENERATED"})
    assert grown.status_code == 200, grown.text
    assert len(grown.json()["character"]["anchors"]) == 2
    assert api.client.delete("/refgen/characters/Studio Tom").json() == {"name": "Studio Tom"}
    assert api.client.get("/refgen/characters/Studio Tom").status_code == 404


def test_a_lora_trained_from_a_character_is_listed_with_it_watched_and_used(api):
    photos = [upload(api, png_bytes((128, 128), seed=10 + n)) for n in range(3)]
    character = api.client.post("/refgen/characters", json={"name": "Studio Ann", "anchor": "ann, silver braid",
                                                             "images": [{"id": photos[0]}]}).json()["character"]
    too_few = api.client.post(f"/refgen/characters/{character['slug']}/train", json={"images": [{"id": photos[1]}]})
    assert refused(too_few) == "images" and "add 3 or more" in too_few.json()["error"]

    extra = [{"id": photo} for photo in photos[1:]] + [{"id": image["id"], "type": "GENERATED"}
                                                        for image in generate(api, **SMALL, num_images=2)["generated_images"]]
    started = api.client.post(f"/refgen/characters/{character['slug']}/train", json={"images": extra, "epochs": 1})
    assert started.status_code == 201, started.text
    element_id = started.json()["sdTrainingJob"]["userLoraId"]
    listed = api.client.get(f"/refgen/characters/{character['slug']}").json()["character"]["trainings"]
    assert [training["userLoraId"] for training in listed] == [element_id]

    deadline = time.monotonic() + 120
    while (element := api.client.get(f"/elements/{element_id}").json()["user_loras_by_pk"])["status"] == "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert element["status"] == "COMPLETE" and element["instancePrompt"] == "ann, silver braid"
    assert len(api.client.get(f"/datasets/{element['refgen']['datasetId']}").json()["datasets_by_pk"]["dataset_images"]) == 5
    used = generate(api, **SMALL, userElements=[{"userLoraId": element_id, "weight": 1}])
    assert len(used["generated_images"]) == 1


@pytest.mark.parametrize("body, field, words", [
    ({"name": "Nobody", "images": [{"id": "black"}]}, "images", "no face found in anchor image 1"),
    ({"name": "Studio Mira", "images": [{"id": "photo"}]}, "name", "already exists"),
    ({"name": "../etc", "images": [{"id": "photo"}]}, "name", "invalid character name"),
    ({"name": "Nobody", "images": [{"id": "00000000-0000-4000-8000-000000000000"}]}, "images[0].id", "unknown UPLOADED"),
    ({"name": "Nobody", "images": []}, "images", "at least 1"),
])
def test_character_errors_are_readable_and_name_the_field(api, mira, body, field, words):
    ids = {"black": upload(api, _black_png()), "photo": upload(api, png_bytes((128, 128)))}
    body = {**body, "images": [{"id": ids.get(ref["id"], ref["id"])} for ref in body["images"]]}
    answer = api.client.post("/refgen/characters", json=body)
    assert refused(answer) == field and words in answer.json()["error"]
    assert api.client.get("/refgen/characters/Nobody").status_code == 404  # nothing was saved


def _black_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128)).save(buffer, format="PNG")  # the tiny face pack sees no face in black
    return buffer.getvalue()


# ------------------------------------------------------------------------------- the refgen object

@pytest.mark.parametrize("extra, field", [
    ({"presetStyle": "CINEMATIC", "refgen": {"preset": "anime"}}, "refgen.preset"),
    ({"refgen": {"preset": "no-such-preset"}}, "refgen.preset"),
    ({"width": 64, "height": 64, "refgen": {"aspectRatio": "16:9"}}, "refgen.aspectRatio"),
    ({"refgen": {"sharpness": 2}}, "refgen.sharpness"),
    ({"refgen": {"character": {"keep": "face+hair"}}}, "refgen.character.name"),
    ({"refgen": {"character": {"name": "Nobody Known"}}}, "refgen.character.name"),
    ({"refgen": {"character": {"name": "Studio Mira", "keep": "elbows"}}}, "refgen.character.keep"),
    ({"refgen": {"bestOf": 3}}, "refgen.bestOf"),
    ({"refgen": "cinematic"}, "refgen"),
])
def test_the_refgen_object_is_checked_before_queueing_naming_the_field(api, mira, extra, field):
    pending = api.store.pending_count()
    assert refused(api.client.post("/generations", json={"prompt": "x", **extra})) == field
    assert api.store.pending_count() == pending

# ------------------------------------------------------------------------------------------ the page

def test_the_page_is_served_at_the_root_without_a_key_under_a_self_only_policy(api):
    page = httpx.get(f"{api.base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert httpx.get(f"{api.base}{PREFIX}/me").status_code == 401  # the API behind it still needs the key
    assert api.client.get("/me").headers["content-type"] == "application/json"
    assert httpx.get(f"{api.base}/openapi.json").json()["info"]["title"] == "refgen local API"
