"""The studio page in a real browser: a `refgen serve --model tiny` subprocess (its own REFGEN_HOME), headless
Chromium driven by Selenium through Debian's chromedriver, and the helpers tests/test_studio_browser.py uses.

Screenshots of the main screens (engine/studio/static/screenshots/*.png, shown in the README), made from the
real page against the tiny server:

    .venv/bin/python -m tests.studio_browser screenshots

Nothing here downloads anything: Selenium is pointed at /usr/bin/chromedriver (so Selenium Manager never runs),
and the tiny model builds its random stand-ins locally.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "engine" / "studio" / "static" / "screenshots"
MANIFEST = ROOT / "weights" / "manifest.toml"
WINDOW = (1280, 800)


def find(name: str, *candidates: str) -> Optional[str]:
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which(name)


CHROMIUM = find("chromium", os.environ.get("STUDIO_CHROMIUM", ""), "/usr/bin/chromium")
CHROMEDRIVER = find("chromedriver", os.environ.get("STUDIO_CHROMEDRIVER", ""), "/usr/bin/chromedriver")


# ------------------------------------------------------------------------------------------ server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refgen_command() -> list[str]:
    """The `refgen` console script of this interpreter's environment (the venv the tests run in)."""
    script = Path(sys.executable).parent / "refgen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]


class Server:
    """A running `refgen serve --model tiny`: its base URL and a small JSON client for checks and set-up."""

    def __init__(self, base: str, home: Path, api_key: Optional[str], process: subprocess.Popen, log: Path):
        self.base, self.home, self.api_key, self.process, self.log = base, home, api_key, process, log

    def api(self, method: str, path: str, body=None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}/api/rest/v1{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def file_bytes(self, url: str) -> bytes:
        """A /files/ URL as the page's <img> and download link get it (no key: capability URLs)."""
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def refgen_server(home: Path, *, weights: Optional[Path] = None, api_key: Optional[str] = None,
                  model: Optional[str] = "tiny", timeout: float = 60, train_max_steps: Optional[int] = None,
                  train_max_resolution: Optional[int] = None) -> Iterator[Server]:
    """`refgen serve --model tiny --port <free>` with REFGEN_HOME=home (and REFGEN_WEIGHTS, the committed manifest),
    offline; yields once it answers, stops it after. model None: the server's default (SDXL base, whose weights
    an empty weights folder lacks). train_max_*: the server's caps on LoRA trainings (a few small steps keep a
    training a second long on the CPU)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, REFGEN_HOME=str(home), REFGEN_WEIGHTS=str(weights or home / "weights"),
               REFGEN_MANIFEST=str(MANIFEST), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("REFGEN_API_KEY", None)
    command = refgen_command() + ["serve", "--port", str(port)] + (["--model", model] if model else [])
    if api_key:
        command += ["--api-key", api_key]
    if train_max_steps:
        command += ["--train-max-steps", str(train_max_steps)]
    if train_max_resolution:
        command += ["--train-max-resolution", str(train_max_resolution)]
    log = home / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(home))
    server = Server(f"http://127.0.0.1:{port}", home, api_key, process, log)
    try:
        wait_until_up(server, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def wait_until_up(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"refgen serve exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            with urllib.request.urlopen(f"{server.base}/", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"refgen serve did not answer within {timeout:.0f} s:\n{server.log_text()}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------- browser

def browser_available() -> Optional[str]:
    """None when the browser tests can run, else why not."""
    if not CHROMIUM or not CHROMEDRIVER:
        return "chromium and chromedriver are not installed (tests/install_browser.sh installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -c constraints.txt -e '.[dev]')"
    return None


@contextlib.contextmanager
def chrome(download_dir: Optional[Path] = None):
    """Headless Chromium at a 1280x800 viewport through Debian's chromedriver (Selenium Manager never runs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if download_dir:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        # The window size includes no browser chrome in headless mode, but be exact for the screenshots.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


class Page:
    """The studio in `driver`: find by data-testid, wait for things, read the message area."""

    def __init__(self, driver, base: str):
        self.driver, self.base = driver, base

    def open(self, view: str = "generate") -> "Page":
        """A fresh page load at `view` (a hash-only change would keep the page and its state)."""
        self.driver.get("about:blank")
        self.driver.get(f"{self.base}/#{view}")
        self.wait(lambda d: self.present(f"view-{view}") and self.one(f"view-{view}").is_displayed())
        return self

    def go(self, view: str) -> None:
        self.one(f"tab-{view}").click()
        self.wait(lambda d: self.one(f"view-{view}").is_displayed())

    def css(self, testid: str, extra: str = "") -> str:
        return f'[data-testid="{testid}"]{extra}'

    def one(self, testid: str, extra: str = "", within=None):
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_element(By.CSS_SELECTOR, self.css(testid, extra))

    def all(self, testid: str, extra: str = "", within=None) -> list:
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_elements(By.CSS_SELECTOR, self.css(testid, extra))

    def present(self, testid: str, extra: str = "") -> bool:
        return bool(self.all(testid, extra))

    def wait(self, condition, timeout: float = 30, message: str = ""):
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)
        except Exception as exc:
            raise AssertionError(f"{message or 'waited in vain'}; message area: {self.message()!r}; "
                                 f"console: {self.console()}") from exc

    def message(self) -> str:
        box = self.all("message")
        if not box or not box[0].is_displayed():
            return ""
        return self.one("message-text").text

    def console(self) -> list[str]:
        try:
            return [entry["message"][:300] for entry in self.driver.get_log("browser")]
        except Exception:  # noqa: BLE001 - diagnostics only
            return []

    def upload(self, testid: str, path: Path) -> None:
        """Give a file to a (visually hidden) file input: what choosing it in the dialog does."""
        self.one(testid).send_keys(str(path))

    def natural_size(self, element) -> tuple[int, int]:
        self.wait(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", element),
                  message="image did not load")
        return tuple(self.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", element))

    def screenshot(self, path: Path, max_bytes: int = 150_000) -> Path:
        """The viewport as an optimised PNG (palette-quantised until it is under max_bytes)."""
        raw = Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        for colours in (256, 128, 64, 32):
            raw.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                path, format="PNG", optimize=True)
            if path.stat().st_size < max_bytes:
                break
        return path


# ------------------------------------------------------------------------------------------ images

def photo(path: Path, seed: int = 0, size: int = 192, black: bool = False) -> Path:
    """A test picture: random colour blocks (the tiny face models see one face in any picture that is not
    black), or all black (they see none)."""
    if black:
        array = np.zeros((size, size, 3), np.uint8)
    else:
        rng = np.random.default_rng(seed)
        blocks = rng.integers(30, 255, (8, 8, 3), dtype=np.uint8)
        array = np.kron(blocks, np.ones((size // 8, size // 8, 1), np.uint8))
    Image.fromarray(array).save(path, format="PNG")
    return path


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------------ flows

def generate(page: Page, prompt: str, *, style: Optional[Path] = None, control: Optional[Path] = None, steps: int = 4,
             images: int = 1, character: Optional[str] = None, best_of: int = 0, timeout: float = 90, fresh: bool = True):
    """Fill the Generate form (style reference, Edge unit, a saved character with best-of, steps in Advanced) and
    press Generate; returns the finished job card. fresh False: the form as it is (what another view put in it),
    else a new page load."""
    from selenium.webdriver.support.ui import Select

    if fresh:
        page.open("generate")
    page.wait(lambda d: page.present("prompt"), message="the form did not build")
    if character:
        Select(page.one("character-mode")).select_by_value("saved")
        page.wait(lambda d: page.present("character-name", f' option[value="{character}"]'), message="no such character")
        Select(page.one("character-name")).select_by_value(character)
        if best_of:
            page.one("best-of").send_keys(str(best_of))
    if style:
        page.upload("add-style-file", style)
        page.wait(lambda d: page.present("style-chip"), message="the style chip did not appear")
    if control:
        page.upload("add-control-file", control)
        page.wait(lambda d: page.present("control-chip"), message="the control chip did not appear")
    if page.one("advanced").get_attribute("open") is None:
        page.one("advanced").find_element("css selector", "summary").click()
    steps_input = page.one("steps")
    steps_input.clear()
    steps_input.send_keys(str(steps))
    count = page.one("num-images")
    count.clear()
    count.send_keys(str(images))
    page.one("prompt").clear()
    page.one("prompt").send_keys(prompt)
    before = len(page.all("job"))
    page.one("generate").click()
    page.wait(lambda d: len(page.all("job")) > before, message="no job card appeared")
    job = page.all("job")[0]
    page.wait(lambda d: job.get_attribute("data-state") in ("done", "stopped"), timeout,
              message="the generation did not finish")
    assert job.get_attribute("data-state") == "done", page.one("job-status", within=job).text
    return job


def open_first_image(page: Page):
    """Gallery: open the newest generation's first image; returns the detail panel once its recipe is there."""
    page.go("gallery")
    page.wait(lambda d: page.present("gallery-image"), message="the gallery shows no image")
    page.all("gallery-image")[0].click()
    page.wait(lambda d: page.present("recipe") and page.one("recipe").text.strip().startswith("{"),
              message="the recipe did not load")
    return page.one("image-detail")


def create_character(page: Page, name: str, photos: list[Path]) -> None:
    page.go("characters")
    page.one("character-new-name").send_keys(name)
    page.one("character-new-anchor").send_keys("a person with a green scarf")
    page.one("character-new-photos").send_keys("\n".join(str(p) for p in photos))
    page.one("character-create").click()


def train(page: Page, epochs: int) -> None:
    """Characters view, a character shown: pick every offered gallery image, train, wait for COMPLETE."""
    page.wait(lambda d: page.present("train-pick"), message="no gallery pictures to pick")
    for box in page.all("train-pick"):
        box.click()
    page.one("train-epochs").clear()
    page.one("train-epochs").send_keys(str(epochs))
    page.one("train-start").click()
    page.wait(lambda d: page.present("training", '[data-status="COMPLETE"]'), 90, message="the training did not complete")


# ------------------------------------------------------------------------------------ screenshots

def screenshot_tour(page: Page, server: Server, tmp: Path, out: Path) -> list[Path]:
    """The four main screens, each in a state that shows what it does."""
    style, edges = photo(tmp / "style.png", 1), photo(tmp / "edges.png", 2)
    generate(page, "a red fox in the snow", steps=4, images=3)
    page.open("characters")
    create_character(page, "Ada", [photo(tmp / "ada1.png", 3), photo(tmp / "ada2.png", 4)])
    page.wait(lambda d: page.present("anchor-bbox"), 90, message="the character was not created")
    train(page, epochs=1)  # 2 anchors + the 3 gallery images
    characters = page.screenshot(out / "characters.png")
    generate(page, "portrait of Ada, best of three", character="Ada", best_of=3, steps=4)
    # The Generate screen with its references and Ada's LoRA filled in and the finished job's card (the chips stay).
    page.open("characters")
    page.wait(lambda d: page.present("character-open", '[data-name="Ada"]'))
    page.one("character-open", '[data-name="Ada"]').click()
    page.wait(lambda d: page.present("training-use"))
    page.one("training-use").click()
    page.wait(lambda d: page.present("element-chip"))
    generate(page, "a lighthouse on a cliff at dusk", style=style, control=edges, steps=4, images=2, fresh=False)
    page.driver.execute_script("window.scrollTo(0, 0)")
    written = [page.screenshot(out / "generate.png")]
    open_first_image(page)
    page.one("action-upscale-2").click()  # listed under its image once the gallery reloads
    page.wait(lambda d: page.present("upscale-image"), 60, message="the upscale did not finish")
    for dismiss in page.all("job-dismiss"):
        dismiss.click()
    open_first_image(page)
    page.wait(lambda d: page.present("upscale-size") and "×" in page.one("upscale-size").text)
    written += [page.screenshot(out / "gallery.png"), characters]
    page.open("weights")
    page.wait(lambda d: page.present("feature"))
    written.append(page.screenshot(out / "weights.png"))
    return written


def make_screenshots(out: Path = SCREENSHOTS) -> list[Path]:
    """Drive the real page against a tiny server and save the four main screens."""
    with tempfile.TemporaryDirectory(prefix="studio-shots-") as tmp, refgen_server(Path(tmp) / "home", train_max_steps=6, train_max_resolution=64) as server, \
            chrome() as driver:
        return screenshot_tour(Page(driver, server.base), server, Path(tmp), out)


if __name__ == "__main__":
    if sys.argv[1:] != ["screenshots"]:
        sys.exit("usage: python -m tests.studio_browser screenshots")
    for written in make_screenshots():
        print(f"{written.relative_to(ROOT)}  {written.stat().st_size // 1024} KB")
