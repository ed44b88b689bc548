"""refgen studio in a real browser: headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against a real `refgen serve --model tiny` subprocess. Each test drives the page the way a user does and checks
the outcome through the API or the pixels, so a page that only looks right fails.

Without chromium/chromedriver these tests fail, saying so: the README's test command runs tests/install_browser.sh,
which installs them, and a skipped browser test would pass a page nobody drove.
"""

from __future__ import annotations

import pytest

from studio_browser import Page, browser_available, chrome, create_character, generate, open_first_image, photo, \
    pixels, refgen_server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A LoRA training capped at 6 steps at 64 px: about a second on the CPU with the tiny model.
    with refgen_server(tmp_path_factory.mktemp("studio") / "home", train_max_steps=6, train_max_resolution=64) as running:
        yield running


@pytest.fixture(scope="module")
def driver():
    missing = browser_available()
    if missing is not None:
        pytest.fail(missing)
    with chrome() as running:
        yield running


@pytest.fixture
def page(driver, server):
    page = Page(driver, server.base)
    page.console()  # drain what earlier tests left
    yield page
    # No script error and nothing the Content-Security-Policy refused (e.g. an inline script or an outside asset).
    broken = [line for line in page.console() if "Uncaught" in line or "Content Security Policy" in line or "Refused to" in line]
    assert not broken, broken


def test_generate_with_references_then_replay_and_upscale(page, server, tmp_path):
    style, edges = photo(tmp_path / "style.png", 1), photo(tmp_path / "edges.png", 2)
    # One image: a replay of image i of a batch can differ by 1/255 on CPU (batch-size dependent float maths, reported).
    job = generate(page, "a lighthouse on a cliff at dusk", style=style, control=edges, steps=12, images=1)

    # Progress came from the event stream (the log is written only by the SSE reader), with real step counts.
    steps = [(int(li.get_attribute("data-step")), int(li.get_attribute("data-total")))
             for li in page.all("progress-log", " li", within=job)]
    assert steps and all(0 < step <= total == 12 for step, total in steps), steps
    shown = page.all("job-image", within=job)
    assert len(shown) == 1 and page.natural_size(shown[0]) == (256, 256)

    # What the server ran is what the form said: a style reference and an Edge unit (the image's recipe).
    detail = open_first_image(page)
    recipe = page.one("recipe", within=detail).text
    assert '"kind": "style"' in recipe and '"type": "canny"' in recipe
    original_url = page.one("detail-image", within=detail).get_attribute("src")
    original = server.file_bytes(original_url)

    # Replay makes the same pixels again (a new generation from the image's replay body).
    page.one("action-replay", within=detail).click()
    page.wait(lambda d: any(j.get_attribute("data-state") == "done" and "replay" in j.text for j in page.all("job")), 60,
              message="the replay did not finish")
    replay_job = next(j for j in page.all("job") if "replay" in j.text)
    replayed = page.all("job-image", within=replay_job)
    assert len(replayed) == 1
    again = server.file_bytes(replayed[0].get_attribute("src"))
    assert replayed[0].get_attribute("src") != original_url
    assert (pixels(again) == pixels(original)).all()

    # Upscale x2 with the tiny upscaler: a new image twice the size.
    page.one("action-upscale-2", within=detail).click()
    page.wait(lambda d: page.present("upscale-image"), 60, message="the upscale did not finish")
    assert page.natural_size(page.one("upscale-image")) == (512, 512)

    # "Reuse this seed" puts that image's seed in the (fixed) seed field.
    page.one("action-reuse-seed").click()
    page.wait(lambda d: page.one("view-generate").is_displayed() and page.one("seed").get_attribute("value"))
    info = server.api("GET", f"/refgen/images/{original_url.rsplit('/', 1)[1].split('.')[0]}")
    assert page.one("seed").get_attribute("value") == str(info["seed"])
    assert page.one("seed-mode").get_attribute("value") == "fixed"

    # "Use as style reference" / "Use as init": the Generate form then holds this (GENERATED) image.
    page.go("gallery")
    page.one("action-use-style").click()
    page.wait(lambda d: page.one("view-generate").is_displayed() and len(page.all("style-chip")) == 2)
    assert page.all("style-chip")[1].find_element("css selector", "img").get_attribute("src") == original_url
    page.go("gallery")
    page.one("action-use-init").click()
    page.wait(lambda d: page.one("view-generate").is_displayed() and page.present("init-chip"))
    assert page.one("init-chip").find_element("css selector", "img").get_attribute("src") == original_url
    assert page.one("init-strength").get_attribute("value") == "0.5"

    # Remix prefills the form with refgen's remix recipe: the image as init at 0.35 and an Edge unit of it at 0.6.
    page.go("gallery")
    page.one("action-remix").click()
    page.wait(lambda d: page.one("view-generate").is_displayed() and page.present("init-chip"))
    assert page.one("init-strength").get_attribute("value") == "0.35"
    weights = [w.get_attribute("value") for w in page.all("control-weight")]
    assert weights == ["0.8", "0.6"]  # the Edge unit the form had, then the remix's
    assert page.one("prompt").get_attribute("value") == "a lighthouse on a cliff at dusk"
    assert not page.message(), page.message()

    # After a reload the gallery lists the image's upscale (from the API's generated_image_variation_generics).
    page.open("gallery")
    page.wait(lambda d: page.present("generation", f'[data-id="{info["generationId"]}"] [data-testid="image-upscale"]'),
              message="the upscale is not listed under its image")
    link = page.one("image-upscale", within=page.one("generation", f'[data-id="{info["generationId"]}"]'))
    listed = server.api("GET", f"/generations/{info['generationId']}")["generations_by_pk"]["generated_images"]
    upscales = [v for image in listed if image["id"] == info["id"] for v in image["generated_image_variation_generics"]]
    assert [v["url"] for v in upscales] == [link.get_attribute("href")]
    page.wait(lambda d: page.one("upscale-size", within=link).text == "512×512", message="the upscale's size is not shown")


def test_character_from_a_photo_shows_the_face_then_deletes(page, server, tmp_path):
    page.open("characters")
    create_character(page, "Test Person", [photo(tmp_path / "face.png", 5)])
    page.wait(lambda d: page.present("anchor-bbox"), 90, message="the character was not created")
    assert server.api("GET", "/refgen/characters/Test%20Person")["character"]["anchors"][0]["bbox"]
    anchor_image = page.one("anchor").find_element("css selector", "img")
    assert page.natural_size(anchor_image) == (192, 192)  # fetched with the key path, shown through a blob: URL
    assert page.one("character-anchor-text").text == "a person with a green scarf"

    # Best of 3 with the saved character: the gallery shows them ranked, with the identity scores the API gives.
    generate(page, "portrait, best of three", character="Test Person", best_of=3, steps=4)
    page.go("gallery")
    page.wait(lambda d: page.present("generation"))
    newest = page.all("generation")[0]
    captions = [c.text for c in newest.find_elements("css selector", "figcaption")]
    images = server.api("GET", f"/generations/{newest.get_attribute('data-id')}")["generations_by_pk"]["refgen"]["images"]
    scores = sorted((image["identityScore"] for image in images), reverse=True)
    assert len(captions) == 3 and all(isinstance(score, float) for score in scores)
    assert captions == [f"#{rank} · seed {image['seed']} · identity {image['identityScore']:.3f}" for rank, image in
                        enumerate(sorted(images, key=lambda image: -image["identityScore"]), start=1)]
    assert "ranked" in newest.text

    # "Add to character": the best image becomes the character's second anchor.
    from selenium.webdriver.support.ui import Select
    detail = open_first_image(page)
    page.wait(lambda d: page.all("add-to-character-name", within=detail), message="no add-to-character action")
    Select(page.one("add-to-character-name", within=detail)).select_by_value("Test Person")
    page.one("action-add-to-character", within=detail).click()
    page.wait(lambda d: "added to Test Person" in page.message(), 60, message="not added to the character")
    assert len(server.api("GET", "/refgen/characters/Test%20Person")["character"]["anchors"]) == 2
    page.go("characters")
    page.wait(lambda d: page.present("character-delete", '[data-name="Test Person"]'))

    page.one("character-delete", '[data-name="Test Person"]').click()
    page.driver.switch_to.alert.accept()
    page.wait(lambda d: not page.present("character-item", '[data-name="Test Person"]'), message="not deleted")
    assert server.api("GET", "/refgen/characters")["characters"] == []


def test_errors_are_readable(page, server, tmp_path):
    # A photo with no face: the server's message, naming the photo, in the message area.
    page.open("characters")
    create_character(page, "Nobody", [photo(tmp_path / "black.png", black=True)])
    page.wait(lambda d: page.message(), 60, message="no error shown for a photo without a face")
    assert "no face" in page.message().lower()
    assert page.one("character-create").is_enabled()  # not stuck

    # A file that is not an image: the upload's 422 names the file field.
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    page.open("generate")
    page.wait(lambda d: page.present("prompt"))
    page.upload("add-style-file", bad)
    page.wait(lambda d: page.message(), message="no error shown for a bad upload")
    assert "notes.png" in page.message() and "file" in page.message()
    assert not page.present("style-chip")

    # Missing weights: this server's weights folder is empty, so the Weights view gives the fetch commands.
    page.go("weights")
    page.wait(lambda d: page.present("feature"))
    missing = page.all("feature", '[data-ready="false"]')
    assert missing
    commands = [c.text for c in page.all("fetch-command")]
    assert commands and all(c.startswith("refgen weights fetch ") for c in commands)
    assert "sdxl-base" in " ".join(commands)


def test_api_key_is_asked_for_and_missing_weights_fail_readably(driver, tmp_path):
    # A server with a key and its default model (SDXL base), whose weights this machine does not have.
    with refgen_server(tmp_path / "home", api_key="s3cret", model=None) as keyed:
        page = Page(driver, keyed.base)
        page.open("weights")
        page.wait(lambda d: page.one("key-dialog").is_displayed(), message="no key dialog on a 401")
        page.one("key-input").send_keys("s3cret")
        page.one("key-save").click()
        page.wait(lambda d: page.present("feature"), message="the weights did not load with the key")
        assert driver.execute_script("return sessionStorage.getItem('refgen.apiKey')") == "s3cret"

        page.go("generate")
        page.wait(lambda d: page.present("prompt"))
        page.one("prompt").send_keys("a lighthouse")
        page.one("generate").click()
        page.wait(lambda d: page.present("job") and page.one("job").get_attribute("data-state") == "stopped", 60,
                  message="the generation did not fail")
        assert "refgen weights fetch sdxl-base" in page.message()
        assert "failed" in page.one("job-status").text


def test_enter_generates_and_cancel_stops_the_job(page, server):
    from selenium.webdriver.common.keys import Keys

    page.open("generate")
    page.wait(lambda d: page.present("prompt"))
    page.one("advanced").find_element("css selector", "summary").click()
    page.one("steps").send_keys("150")  # the most the API takes: long enough to be caught running
    page.one("prompt").send_keys("a slow one", Keys.ENTER)  # Enter in the prompt generates
    page.wait(lambda d: page.present("job") and "step" in page.one("job-step").text, 60, message="never seen running")
    job = page.one("job")
    generation_id = job.get_attribute("data-id")
    page.one("job-cancel", within=job).click()
    page.wait(lambda d: job.get_attribute("data-state") == "stopped", 30, message="cancel did not stop the job")
    assert page.one("job-status", within=job).text == "cancelled"
    step = int(page.all("progress-log", " li", within=job)[-1].get_attribute("data-step"))
    assert 0 < step < 150
    with pytest.raises(Exception, match="404"):
        server.api("GET", f"/generations/{generation_id}")
    assert page.one("generate").is_enabled()


def test_contact_sheet_shows_every_image(page, server):
    generate(page, "a contact sheet", steps=2, images=2)  # whatever else this server made, at least these
    listed = server.api("GET", "/generations/user/" + server.api("GET", "/me")["user_details"][0]["user"]["id"] + "?limit=50")
    expected = {image["id"] for generation in listed["generations"] for image in generation["generated_images"]}
    page.open("gallery")
    page.wait(lambda d: page.present("gallery-image"))
    page.one("contact-sheet-toggle").click()
    page.wait(lambda d: page.present("contact-sheet"))
    shown = {button.get_attribute("data-image-id") for button in page.all("sheet-image")}
    assert expected and shown == expected


def test_the_form_is_keyboard_usable(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.open("generate")
    page.wait(lambda d: page.present("prompt"))
    page.one("prompt").click()
    seen, outlines = [], []
    for _ in range(14):
        focused = page.driver.switch_to.active_element
        seen.append(focused.get_attribute("data-testid") or focused.tag_name)
        outlines.append(page.driver.execute_script(  # a hidden file input shows its focus on its label
            "const e = document.activeElement; return getComputedStyle(e.type === 'file' ? e.nextElementSibling : e).outlineStyle"))
        ActionChains(page.driver).send_keys(Keys.TAB).perform()  # a real key press, wherever the focus is
    assert seen[:3] == ["prompt", "negative-prompt", "generate"], seen
    assert "aspect-ratio" in seen and "add-style-file" in seen, seen  # the upload buttons take focus too
    # The focus is visible: every control reached by Tab has an outline (:focus-visible).
    assert all(style not in ("", "none") for style in outlines[1:]), list(zip(seen, outlines))


def test_train_a_lora_of_a_character_then_use_it(page, server, tmp_path):
    from selenium.webdriver.support.ui import Select

    generate(page, "pictures to train on", steps=2, images=4)
    listed = server.api("GET", "/generations/user/local?limit=1")["generations"][0]
    picked = [image["id"] for image in listed["generated_images"]]
    page.open("characters")
    create_character(page, "Trainee", [photo(tmp_path / "trainee.png", 7)])
    page.wait(lambda d: page.present("train-pick", f'[data-image-id="{picked[0]}"]'), 90, message="no train form with picks")

    # Fewer than 5 pictures: the server's 422, readable, and nothing queued.
    page.one("train-pick", f'[data-image-id="{picked[0]}"]').click()
    page.one("train-start").click()
    page.wait(lambda d: "5 pictures" in page.message(), 30, message="no error for too few pictures")
    assert page.message().startswith("train a LoRA: images: a LoRA trains on 5 pictures at least"), page.message()
    assert server.api("GET", "/refgen/characters/Trainee")["character"]["trainings"] == []

    # 1 anchor + 4 picked, 1 epoch (5 steps: under the server's cap of 6, so the form's epochs were sent).
    for image_id in picked[1:]:
        page.one("train-pick", f'[data-image-id="{image_id}"]').click()
    assert page.one("train-count").text.startswith("1 anchor + 4 picked = 5")
    for testid, value in (("train-epochs", "1"), ("train-lr", "0.0002")):
        page.one(testid).clear()
        page.one(testid).send_keys(value)
    page.one("train-start").click()
    page.wait(lambda d: page.present("training", '[data-status="COMPLETE"]'), 60,
              message="the training did not complete")
    training = page.one("training", '[data-status="COMPLETE"]')
    lora_id = int(training.get_attribute("data-id"))
    assert page.one("training-step", within=training).text.startswith("step 5/5 · loss ")
    bar = page.one("training-progress", within=training)
    assert bar.get_attribute("value") == bar.get_attribute("max") == "5"
    element = server.api("GET", f"/elements/{lora_id}")["user_loras_by_pk"]
    assert (element["status"], element["trainingEpoch"], element["learningRate"]) == ("COMPLETE", 1, 0.0002)
    trainings = server.api("GET", "/refgen/characters/Trainee")["character"]["trainings"]
    assert [(t["userLoraId"], t["status"]) for t in trainings] == [(lora_id, "COMPLETE")]

    # "Use in Generate" adds it to the LoRA elements (weight 1); the generation made with it has the LoRA.
    page.one("training-use", within=training).click()
    page.wait(lambda d: page.one("view-generate").is_displayed() and page.present("element-chip", f'[data-id="{lora_id}"]'),
              message="the LoRA is not in the Generate form")
    assert page.one("element-weight").get_attribute("value") == "1"
    # GET /elements lists it too: removed, then added again from the picker.
    page.one("element-chip").find_element("css selector", "button").click()
    assert not page.present("element-chip")
    Select(page.one("element-choice")).select_by_value(str(lora_id))
    page.one("element-add").click()
    page.wait(lambda d: page.present("element-chip", f'[data-id="{lora_id}"]'), message="the picker did not add it")
    assert page.one("element-chip").find_element("css selector", "strong").text == f"Trainee (element {lora_id})"
    job = generate(page, "Trainee in a garden", steps=2, fresh=False)
    image_id = page.one("job-image", within=job).get_attribute("data-image-id")
    loras = server.api("GET", f"/refgen/images/{image_id}")["recipe"]["resolved"]["loras"]
    assert [lora["weight"] for lora in loras] == [1.0] and f"element-{lora_id}" in loras[0]["path"]
