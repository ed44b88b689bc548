"""`refgen train` and `refgen loras`: a LoRA trained from the command line lands in the library, a request
names it, a character profile points to it, Ctrl-C saves a checkpoint that `--resume` continues, and bad
input is one readable line. Tiny model, CPU, no network."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny_faces as tf
from conftest import COMMITTED_MANIFEST
from engine.cli import app
from engine.lora_library import LoraLibrary
from engine.training.checkpoint import checkpoints, read_checkpoint
from test_training import TRIGGER, write_dataset

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "tiny", "--resolution", "64", "--crop", "centre", "--lr", "5e-3", "--rank", "4"]

pytestmark = pytest.mark.usefixtures("private_home")  # a fresh library and run folder per test


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("photos"), 6)


def invoke(args: list[str], expect: int = 0):
    result = runner.invoke(app, args)
    assert result.exit_code == expect, result.output
    return result


def test_train_puts_the_lora_in_the_library_and_loras_lists_shows_and_deletes_it(photos, tmp_path):
    trained = invoke(["train", "mira", str(photos), "--trigger", TRIGGER, "--steps", "3", *FAST])
    library = LoraLibrary()
    assert library.exists("mira") and "trained:" in trained.output and "--lora mira" in trained.output

    listed = invoke(["loras", "list"])
    assert "mira" in listed.output and TRIGGER in listed.output
    shown = json.loads(invoke(["loras", "show", "mira"]).output)
    assert shown["trigger"] == [TRIGGER] and shown["steps"] == 3 and shown["training"]["request"]["rank"] == 4

    generated = invoke(["generate", "a photo of zxq person", "--model", "tiny", "--steps", "2", "--width", "64",
                        "--height", "64", "--lora", "mira:0.8", "--out", str(tmp_path / "out")])
    assert list((tmp_path / "out").glob("*.png")), generated.output

    invoke(["loras", "delete", "mira", "--yes"])
    assert not library.exists("mira") and "no LoRAs" in invoke(["loras", "list"]).output


def test_an_unknown_lora_is_one_line_naming_the_library(tmp_path):
    result = invoke(["loras", "show", "nobody"], expect=1)
    assert "LoRA not found: 'nobody'" in result.output and "Traceback" not in result.output
    result = invoke(["generate", "x", "--model", "tiny", "--lora", "nobody", "--out", str(tmp_path)], expect=1)
    assert "(--lora) LoRA not found" in result.output


def test_bad_options_name_the_flag(photos):
    result = invoke(["train", "mira", str(photos), "--trigger", "t", "--resolution", "100", *FAST[:2]], expect=1)
    assert "--resolution" in result.output and "multiple of 64" in result.output
    assert "--trigger" in invoke(["train", "mira", str(photos), *FAST], expect=1).output
    result = invoke(["train", "mira", str(photos / "nothing-here"), "--trigger", "t", *FAST], expect=1)
    assert "not found" in result.output or "cannot be read" in result.output


@pytest.fixture
def mira(private_home, astronaut, tmp_path):
    """A saved character made with the tiny face pack."""
    from adapters.characters import CharacterStore
    from adapters.faces import FaceAnalyzer

    tf.write_pack(os.environ["REFGEN_WEIGHTS"], [tf.ASTRONAUT_FACE], manifest_path=COMMITTED_MANIFEST)
    store = CharacterStore()
    return store.create("Mira", [astronaut], FaceAnalyzer.load("antelopev2", device="cpu"), anchor="mira, red bob")


def test_training_for_a_character_uses_its_anchor_and_links_the_profile(mira, photos):
    invoke(["train", "mira-lora", str(photos), "--character", "Mira", "--steps", "2", *FAST])
    assert LoraLibrary().get("mira-lora").trigger == ["mira, red bob"]
    shown = invoke(["character", "show", "Mira"])
    assert "mira-lora; use it with --lora mira-lora" in shown.output


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(photos, private_home):
    """A real `refgen train` process gets SIGINT mid-run: it saves a checkpoint and exits 130; `--resume`
    (no photos given: the request is read back from the checkpoint) completes it."""
    command = [sys.executable, "-m", "engine.cli", "train", "mira", str(photos), "--trigger", TRIGGER, "--steps",
               "100000", "--checkpoint-every", "0", *FAST]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(iter(lambda: process.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "step/s" not in "".join(errors) and "s/step" not in "".join(errors) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    reader.join(timeout=5)
    assert process.returncode == 130, "".join(errors)[-2000:]
    assert "stopped:" in output and "refgen train mira --resume" in output

    run_dir = private_home / "training" / "mira"
    stopped_at = read_checkpoint(checkpoints(run_dir)[-1]).step
    assert stopped_at > 0 and not LoraLibrary().exists("mira")
    invoke(["train", "mira", "--resume", "--steps", str(stopped_at + 2)])
    assert LoraLibrary().get("mira").steps == stopped_at + 2


def test_several_processes_train_one_lora_through_torch_distributed(photos, private_home):
    """`torchrun` (what `accelerate launch --multi_gpu` runs) with 2 CPU processes: accelerate wraps the UNet in
    DDP, each process draws its own micro-batches, the losses are averaged over both, and one file is written."""
    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port,
               "-m", "engine.cli", "train", "duo", str(photos), "--trigger", TRIGGER, "--steps", "3", "--device", "cpu",
               *FAST]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained: duo") == 1, done.stdout
    info = LoraLibrary().get("duo")
    assert info.steps == 3 and info.trained_by_refgen


def test_the_library_fills_the_trigger_from_a_character_and_links_it(mira, photos, tmp_path):
    from adapters.characters import CharacterStore, UnknownCharacterError
    from engine.training import TrainingRequest, train_lora

    request = TrainingRequest(images=photos, name="mira-lib", character="mira", base_model="tiny", steps=2,
                              resolution=64, crop="centre", rank=4)
    result = train_lora(request, run_dir=tmp_path / "run", device="cpu", progress=False)
    assert (result.request.character, result.request.trigger) == ("Mira", "mira, red bob")
    assert CharacterStore().get("Mira").lora == "mira-lib"
    with pytest.raises(UnknownCharacterError, match="unknown character 'Nobody'; known: Mira"):
        train_lora(request.model_copy(update={"name": "other", "character": "Nobody"}), progress=False)
