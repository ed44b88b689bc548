"""Long-run behaviour of LoRA training: checkpoints, resume (bit-identical to an uninterrupted run), a process
killed mid-run, stop requests, gradient accumulation and epochs, aspect-ratio buckets, the face-aware crop,
sample images, and the library a trained LoRA lands in. CPU only, tiny SDXL, no network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_faces as tf
from conftest import COMMITTED_MANIFEST
from engine import Engine, GenerationRequest, LoraLibrary
from engine.training import TrainingError, TrainingInterrupted, TrainingRequest, bucket_sizes, load_dataset, train_lora
from engine.training.checkpoint import checkpoints, read_checkpoint
from engine.training.data import cover_crop, nearest_bucket
from engine.lora_library import read_metadata
from engine.training.loop import BatchPlan
from test_training import (  # noqa: F401  (one_thread: the module-wide fixture, reused)
    RESOLUTION, TRIGGER, one_thread, request_for, structured_image, train, write_dataset,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("photos"), 6)


def lora_tensors(path: Path) -> dict:
    return load_file(str(path))


def assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first), "the LoRAs differ"


# -- checkpoints and resume -----------------------------------------------------------------------


def test_a_stopped_run_resumed_gives_bit_identical_weights_and_losses(photos, tiny_model_dir, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=9, checkpoint_every=4, batch_size=2)
    uninterrupted = train(request, tmp_path / "whole")

    seen: list[int] = []
    with pytest.raises(TrainingInterrupted) as stopped:
        train(request, tmp_path / "split", on_step=lambda p: seen.append(p.step), stop=lambda: len(seen) >= 6)
    assert stopped.value.checkpoint.name == "step-000006.safetensors" and read_checkpoint(stopped.value.checkpoint).step == 6
    assert not (tmp_path / "split" / "out" / "zxq.safetensors").exists(), "a stopped run writes no LoRA"

    resumed = train(request, tmp_path / "split", resume=True)
    assert resumed.losses == uninterrupted.losses and len(resumed.losses) == 9
    assert_same_tensors(lora_tensors(resumed.path), lora_tensors(uninterrupted.path))


def test_checkpoints_are_written_every_n_steps_and_only_the_last_ones_kept(photos, tiny_model_dir, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=7, checkpoint_every=2, keep_checkpoints=2)
    result = train(request, tmp_path)
    assert [path.name for path in checkpoints(result.run_dir)] == ["step-000006.safetensors", "step-000007.safetensors"]
    final = read_checkpoint(checkpoints(result.run_dir)[-1])
    assert final.step == 7 and final.losses == result.losses


def test_resuming_with_more_steps_continues_the_same_run(photos, tiny_model_dir, tmp_path):
    """A finished run can be extended: 5 steps, then resumed to 8, equals 8 steps in one go."""
    short = request_for(photos, tiny_model_dir, steps=5)
    train(short, tmp_path / "extended")
    extended = train(short.model_copy(update={"steps": 8}), tmp_path / "extended", resume=True)
    whole = train(short.model_copy(update={"steps": 8}), tmp_path / "whole")
    assert extended.losses == whole.losses
    assert_same_tensors(lora_tensors(extended.path), lora_tensors(whole.path))


def test_resume_refuses_a_changed_recipe_or_dataset_by_name(photos, tiny_model_dir, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=3)
    train(request, tmp_path)
    with pytest.raises(TrainingError, match=r"learning_rate: 0.005 -> 0.001"):
        train(request.model_copy(update={"learning_rate": 1e-3}), tmp_path, resume=True)
    other = write_dataset(tmp_path / "other", 6, first_seed=50)
    with pytest.raises(TrainingError, match="images"):
        train(request.model_copy(update={"images": other}), tmp_path, resume=True)


def test_a_second_run_of_the_same_name_is_refused_before_any_work(photos, tiny_model_dir, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=2)
    train(request, tmp_path)
    with pytest.raises(TrainingError, match="already exists"):
        train(request, tmp_path)
    (tmp_path / "out" / "zxq.safetensors").unlink()
    with pytest.raises(TrainingError, match=r"has checkpoints .* resume it"):
        train(request, tmp_path)
    assert train(request, tmp_path, overwrite=True).steps == 2


def test_nothing_to_resume_is_a_clear_error(photos, tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(request_for(photos, tiny_model_dir, steps=2), tmp_path, resume=True)


TRAINING_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_training import request_for
    from engine.training import train_lora
    from safetensors.torch import load_file

    def slow_down(progress):
        print("step", progress.step, flush=True)
        time.sleep(0.05)

    def run(out, run_dir, steps, **options):
        request = request_for(Path({photos!r}), Path({model!r}), steps=steps, checkpoint_every=3)
        return train_lora(request, Path(out), run_dir=Path(run_dir), device="cpu", dtype="fp32", progress=False,
                          **options)

    if sys.argv[1] == "long":
        run({out!r}, {run!r}, 400, on_step=slow_down)
    else:  # resume the killed run to `steps`, then the same run uninterrupted, in one process
        steps = int(sys.argv[2])
        resumed = run({out!r}, {run!r}, steps, resume=True)
        whole = run({whole!r}, {whole!r} + "/run", steps)
        a, b = load_file(str(resumed.path)), load_file(str(whole.path))
        print(json.dumps({{"losses_equal": resumed.losses == whole.losses, "steps": len(resumed.losses),
                          "tensors_equal": a.keys() == b.keys() and all((a[k] == b[k]).all().item() for k in a)}}))
""")


def test_a_killed_process_leaves_valid_checkpoints_and_no_partial_files(photos, tiny_model_dir, tmp_path):
    """SIGKILL at a random moment after a few checkpoints: every file left is a complete checkpoint, and a new
    process resuming from the last one reproduces the uninterrupted run exactly. (Both runs of the comparison
    are in one fresh process: torch's CPU kernels may round differently after a thread-count change, which
    this test process makes.)"""
    run, out = tmp_path / "run", tmp_path / "out"
    script = TRAINING_SCRIPT.format(tests=str(ROOT / "tests"), photos=str(photos), model=str(tiny_model_dir),
                                    out=str(out), run=str(run), whole=str(tmp_path / "whole"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, "long"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in process.stdout:
            if line.strip() == "step 10":
                break
        time.sleep(0.08)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    found = checkpoints(run)
    assert found and all(read_checkpoint(path).step % 3 == 0 for path in found)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == [p.name for p in found]
    assert not out.exists() or not any(out.iterdir()), "no LoRA file from a killed run"

    steps = read_checkpoint(found[-1]).step + 2
    resumed = subprocess.run([sys.executable, "-c", script, "resume", str(steps)], cwd=ROOT, capture_output=True,
                             text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"losses_equal": True, "steps": steps, "tensors_equal": True}


# -- steps, epochs, accumulation ------------------------------------------------------------------


def test_epochs_count_passes_over_the_images(photos, tiny_model_dir):
    request = TrainingRequest(images=photos, name="zxq", trigger=TRIGGER, epochs=3, batch_size=4)
    assert request.total_steps(BatchPlan([(64, 64)] * 6, 4, 0).batches_per_epoch) == 6  # 2 batches (4 + 2) x 3


def test_steps_and_epochs_together_are_refused(photos, tiny_model_dir):
    with pytest.raises(ValueError, match="steps or epochs, not both"):
        request_for(photos, tiny_model_dir, epochs=2, steps=10)


def test_gradient_accumulation_takes_one_optimizer_step_per_k_micro_batches(photos, tiny_model_dir, tmp_path):
    result = train(request_for(photos, tiny_model_dir, steps=3, gradient_accumulation=2), tmp_path)
    state = load_file(str(checkpoints(result.run_dir)[-1]))
    adam_steps = {float(value) for key, value in state.items() if key.endswith("/step")}
    assert adam_steps == {3.0} and len(result.losses) == 3


def test_8bit_adamw_without_cuda_is_a_typed_error(photos, tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="adamw8bit.*CUDA"):
        train(request_for(photos, tiny_model_dir, steps=1, optimizer="adamw8bit"), tmp_path)


# -- buckets and crops ----------------------------------------------------------------------------


def test_buckets_are_multiples_of_64_near_the_resolution_area_and_at_most_two_to_one():
    buckets = bucket_sizes(1024)
    assert (1024, 1024) in buckets and (1216, 832) in buckets and (832, 1216) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and max(w, h) / min(w, h) <= 2 for w, h in buckets)
    assert bucket_sizes(1024, bucketing=False) == [(1024, 1024)]
    assert nearest_bucket((1920, 1080), buckets) == (1344, 768)  # 16:9 -> kohya's and SDXL's 1344x768
    assert nearest_bucket((1000, 1000), buckets) == (1024, 1024)


def test_every_batch_has_one_shape_and_every_image_comes_once_per_epoch():
    buckets = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)] * 2
    plan = BatchPlan(buckets, batch_size=2, seed=4)
    assert plan.batches_per_epoch == 3 + 2 + 1
    for epoch in range(3):
        batches = [plan.indices(epoch * plan.batches_per_epoch + i) for i in range(plan.batches_per_epoch)]
        assert sorted(i for batch in batches for i in batch) == list(range(10))
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert [plan.indices(i) for i in range(6)] != [plan.indices(i) for i in range(6, 12)], "each epoch reshuffles"


def test_wide_and_tall_photos_train_in_their_own_buckets(tiny_model_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, size in enumerate([(256, 256), (256, 256), (320, 192), (384, 224), (192, 320), (224, 384)]):
        structured_image(index, 400).resize(size).save(folder / f"photo_{index}.png")
    request = request_for(folder, tiny_model_dir, resolution=256, steps=4, batch_size=2)
    images, report = load_dataset(request)
    assert report.buckets == {"256x256": 2, "320x192": 2, "192x320": 2}
    assert {image.path.name: image.pixels.size for image in images}["photo_3.png"] == (320, 192)
    result = train(request, tmp_path)
    assert len(result.losses) == 4 and np.isfinite(result.losses).all()


def test_cover_crop_keeps_the_face_inside_with_the_least_shift():
    image = Image.new("RGB", (512, 256))
    centred, corner = cover_crop(image, (128, 128))
    assert centred.size == (128, 128) and corner == (0, 64)  # resized to 256x128, centre window
    _, corner = cover_crop(image, (128, 128), face=(20, 60, 100, 160))  # face at x 10..50 after resizing
    assert corner == (0, 10)
    _, corner = cover_crop(image, (128, 128), face=(200, 60, 300, 160))  # already inside: unchanged
    assert corner == (0, 64)


@pytest.fixture
def face_weights(private_home, tmp_path):
    """The tiny face pack, its detector finding one face at the left of a 512x256 picture."""
    face = tf.scaled_face((20.0, 60.0, 100.0, 160.0))
    tf.write_pack(os.environ["REFGEN_WEIGHTS"], [face], image_size=(512, 256), manifest_path=COMMITTED_MANIFEST)
    return face


def test_face_aware_crop_uses_the_face_models_when_installed(face_weights, tiny_model_dir, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for index in range(5):
        structured_image(index, 256).resize((512, 256)).save(folder / f"photo_{index}.png")
    request = request_for(folder, tiny_model_dir, resolution=128, bucketing=False, crop="auto")
    images, report = load_dataset(request, *_locator())
    assert report.crop == "face" and {image.crop_top_left for image in images} == {(0, 10)}


def _locator():
    from engine.compose import face_locator

    return face_locator("cpu"), ""


def test_without_face_models_auto_centre_crops_and_says_so_and_face_is_refused(private_home, photos, tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="crop='face' needs the face models: refgen weights fetch insightface-antelopev2"):
        train(request_for(photos, tiny_model_dir, steps=1, crop="face"), tmp_path / "face")
    result = train(request_for(photos, tiny_model_dir, steps=1, crop="auto"), tmp_path / "auto")
    assert result.report.crop.startswith("centre (face models not installed")


# -- samples and the library ----------------------------------------------------------------------


def test_sample_images_are_written_every_n_steps_with_fixed_seeds(photos, tiny_model_dir, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=4, sample_prompts=["a photo of zxq person", "zxq person smiling"],
                          sample_every=2)
    result = train(request, tmp_path)
    assert [path.name for path in result.samples] == ["step-000002-0.png", "step-000002-1.png",
                                                       "step-000004-0.png", "step-000004-1.png"]
    with Image.open(result.samples[0]) as image:
        assert image.size == (RESOLUTION, RESOLUTION)


def test_a_trained_lora_lands_in_the_library_and_a_request_names_it(photos, tiny_model_dir, private_home, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=30, name="mira")
    result = train_lora(request, run_dir=tmp_path / "run", device="cpu", dtype="fp32", progress=False)
    library = LoraLibrary()
    assert result.path == library.path("mira") == private_home / "loras" / "mira.safetensors"
    info = library.get("mira")
    assert info.trigger == [TRIGGER] and info.rank == 4 and info.steps == 30 and info.trained_by_refgen

    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    settings = dict(prompt=f"a photo of {TRIGGER}", width=RESOLUTION, height=RESOLUTION, seed=1, steps=3)
    by_name = engine.generate(GenerationRequest(**settings, loras=["mira:0.9"]))
    by_path = engine.generate(GenerationRequest(**settings, loras=[f"{result.path}:0.9"]))
    assert np.array_equal(by_name.pixels, by_path.pixels)
    assert by_name.metadata[0]["loras"][0]["path"] == str(result.path)


# -- prior preservation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("class"), 4, first_seed=40)


def test_prior_preservation_at_weight_zero_is_exactly_the_run_without_it(photos, class_folder, tiny_model_dir, tmp_path):
    """The class term is added to the loss, drawn from its own (seed, step) stream: at weight 0 nothing else
    moves; at weight 1 the loss and the weights change, and the file counts the class images."""
    plain = train(request_for(photos, tiny_model_dir, steps=4), tmp_path / "plain")
    prior = dict(class_images=class_folder, class_prompt="a photo of a person")
    zero = train(request_for(photos, tiny_model_dir, steps=4, prior_loss_weight=0, **prior), tmp_path / "zero")
    one = train(request_for(photos, tiny_model_dir, steps=4, **prior), tmp_path / "one")
    assert zero.losses == plain.losses
    assert_same_tensors(lora_tensors(zero.path), lora_tensors(plain.path))
    assert one.losses[0] > plain.losses[0], "the first step adds a class loss to the same instance loss"
    assert any(not torch.equal(a, b) for a, b in zip(lora_tensors(one.path).values(), lora_tensors(plain.path).values()))

    assert read_metadata(one.path)["ss_num_reg_images"] == "4"


def test_missing_class_images_are_drawn_by_the_base_model_once(photos, tiny_model_dir, tmp_path):
    folder = write_dataset(tmp_path / "class", 2, first_seed=60)
    request = request_for(photos, tiny_model_dir, steps=1, class_images=folder, class_prompt="a photo of a person",
                          num_class_images=4)
    first = train(request, tmp_path / "first")
    assert [Path(p).name for p in first.report.generated] == ["class-0000.png", "class-0001.png"]
    with Image.open(folder / "class-0000.png") as image:
        assert image.size == (RESOLUTION, RESOLUTION)
    assert train(request, tmp_path / "second").report.generated == []


def test_prior_preservation_needs_both_the_folder_and_the_prompt(photos, class_folder, tiny_model_dir):
    with pytest.raises(ValueError, match="class_images .* and class_prompt"):
        request_for(photos, tiny_model_dir, class_images=class_folder)


def test_overwrite_with_bad_photos_keeps_the_old_checkpoints(photos, tiny_model_dir, tmp_path):
    request = request_for(photos, tiny_model_dir, steps=2)
    first = train(request, tmp_path)
    kept = checkpoints(first.run_dir)
    broken = write_dataset(tmp_path / "broken", 3)  # too few photos: refused while loading the data
    with pytest.raises(TrainingError, match="at least 5"):
        train(request.model_copy(update={"images": broken}), tmp_path, overwrite=True)
    assert checkpoints(first.run_dir) == kept and all(path.is_file() for path in kept)
