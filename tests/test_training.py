"""LoRA training on the tiny SDXL: the objective is diffusers' DDPM objective, the loss falls, the file is a
kohya-layout LoRA that refgen and diffusers load to the same pixels, a seed reproduces the run, and bad
datasets are refused (or skipped and reported) by name. CPU only, no network."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import generators
from lora_layouts import KOHYA_PREFIXES, sgm_module_name
from engine import Engine, GenerationRequest, LoraSpec
from engine.training import (
    TrainingDataError, TrainingRequest, load_dataset, prepare_training, train_lora,
)

RESOLUTION = 64  # 8x8 latents: a training step of the tiny UNet takes milliseconds
TRIGGER = "zxq person"
PROMPT, STEPS, GUIDANCE = "a photo of zxq person", 4, 5.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_lora: the tiny model gains nothing from a second thread on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def structured_image(seed: int, size: int = RESOLUTION) -> Image.Image:
    """A colour gradient with a few random shapes: varied, but with structure a VAE can encode."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 80, 3)
    image = Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, 24, 2)
        draw.ellipse([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_dataset(folder, count: int, first_seed: int = 0, size: int = RESOLUTION):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        structured_image(first_seed + index, size).save(folder / f"photo_{index:02d}.png")
    return folder


def request_for(images, tiny_model_dir, **overrides) -> TrainingRequest:
    settings = dict(images=images, name="zxq", trigger=TRIGGER, base_model=str(tiny_model_dir), rank=4,
                    steps=80, learning_rate=5e-3, batch_size=2, resolution=RESOLUTION, seed=7, crop="centre")
    return TrainingRequest(**{**settings, **overrides})


def train(request: TrainingRequest, folder, **options):
    """train_lora on the CPU in fp32, its file and run folder inside `folder` (never the user's library)."""
    return train_lora(request, folder / "out", run_dir=folder / "run", device="cpu", dtype="fp32", progress=False, **options)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = write_dataset(tmp_path_factory.mktemp("dataset"), 8)
    (folder / "photo_00.txt").write_text("a close-up portrait, studio light")  # caption without the trigger
    return folder


@pytest.fixture(scope="module")
def trained(dataset, tiny_model_dir, tmp_path_factory):
    request = request_for(dataset, tiny_model_dir, steps=250, batch_size=4, rank=8, learning_rate=5e-3)
    return train(request, tmp_path_factory.mktemp("loras"))


# -- the objective --------------------------------------------------------------------------------


def test_loss_goes_down(trained):
    """The tiny random UNet's LoRA layers sit only at half the latent resolution, so little of the noise is
    learnable: the drop is ~7%. A batch of 4 8x8x4 latents gives a step loss std of ~0.045, so 10-step
    means differ by chance by ~0.02: a 0.04 drop is well outside chance (and the run is seeded anyway)."""
    first, last = np.mean(trained.losses[:10]), np.mean(trained.losses[-10:])
    assert len(trained.losses) == 250 and np.isfinite(trained.losses).all()
    assert last < first - 0.04, (first, last)


def test_first_step_loss_is_the_ddpm_epsilon_objective(dataset, tiny_model_dir, reference_pipe, tmp_path):
    """Recomputed from diffusers' documented objective with the base model's own parts: the batch's
    latents are the VAE mean of one of the images, its text conditioning is encode_prompt of the caption,
    and loss = mse(unet(add_noise(latents, noise, t), t, ...), noise) with a LoRA-free UNet (a fresh LoRA's
    up factors are zero, so step 0 sees exactly the base model)."""
    from diffusers import DDPMScheduler
    from diffusers.image_processor import VaeImageProcessor

    request = request_for(dataset, tiny_model_dir, steps=1, batch_size=1)
    batch = prepare_training(request, device="cpu", dtype="fp32").micro_batch(0)
    loss = train(request, tmp_path).losses[0]

    pipe = reference_pipe
    processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor)
    with torch.no_grad():
        latents = [pipe.vae.encode(processor.preprocess(Image.open(p).convert("RGB"))).latent_dist.mean
                   * pipe.vae.config.scaling_factor for p in sorted(dataset.glob("*.png"))]
        matches = [i for i, lat in enumerate(latents) if torch.allclose(lat, batch.latents, atol=1e-5)]
        assert len(matches) == 1
        caption = TRIGGER if matches[0] else f"{TRIGGER}, a close-up portrait, studio light"
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        noisy = scheduler.add_noise(latents[matches[0]], batch.noise, batch.timesteps)
        time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
        prediction = pipe.unet(noisy, batch.timesteps, encoder_hidden_states=embeds,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    expected = torch.mean((prediction - batch.noise) ** 2).item()
    assert torch.allclose(batch.prompt_embeds, embeds, atol=1e-6) and torch.allclose(batch.added_cond["time_ids"], time_ids)
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


# -- the file -------------------------------------------------------------------------------------


def test_saved_file_is_kohya_layout_with_training_metadata(trained):
    with safe_open(str(trained.path), framework="pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert downs and len(downs) == sum(k.endswith(".lora_up.weight") for k in keys) == sum(k.endswith(".alpha") for k in keys)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys  # sd-scripts' SGM names
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_max_train_steps"]) == ("8", "8.0", "250")
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["ss_seed"] == "7"
    assert json.loads(metadata["ss_tag_frequency"])["zxq"][TRIGGER] == 8
    refgen = json.loads(metadata["refgen_training"])
    assert len(refgen["dataset"]) == 8 and all(len(entry["sha256"]) == 64 for entry in refgen["dataset"])
    assert refgen["seed"] == 7 and refgen["request"]["rank"] == 8 and "diffusers" in refgen["packages"]


def assert_every_layer_lands_where_it_was_trained(result, tiny_model_dir) -> None:
    """The file's sd-scripts names are the published spelling of the trained layers (the tests' own SGM mapper,
    written from Stability's UNet definition; `lora_te1/2_text_model_...`), and diffusers' kohya loader puts
    each factor back on the layer it came from: equal to the factors in the run's last checkpoint."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    last = load_file(str(sorted((result.run_dir / "checkpoints").glob("step-*.safetensors"))[-1]))
    factors = {key[len("lora/"):].replace(".default", ""): value for key, value in last.items() if key.startswith("lora/")}
    expected = set()
    for key in factors:
        part, module = key.split(".", 1)
        module = module.rsplit(".lora_", 1)[0]
        if part == "unet":
            expected.add("lora_unet_" + sgm_module_name(module, pipe.unet.config).replace(".", "_"))
        else:
            spelled = module if module.startswith("text_model.") else f"text_model.{module}"
            expected.add(f"{KOHYA_PREFIXES[part]}_{spelled.replace('.', '_')}")
    with safe_open(str(result.path), framework="pt") as file:
        assert {key.rsplit(".", 2)[0] for key in file.keys()} == expected

    pipe.load_lora_weights(str(result.path), adapter_name="trained")
    loaded = {part: getattr(pipe, part).state_dict() for part in ("unet", "text_encoder", "text_encoder_2")}
    for key, value in factors.items():
        part, module = key.split(".", 1)
        name, factor = module.rsplit(".lora_", 1)
        assert torch.equal(loaded[part][f"{name}.lora_{factor.replace('weight', 'trained.weight')}"], value), key


def test_every_layer_lands_where_it_was_trained(trained, tiny_model_dir):
    assert_every_layer_lands_where_it_was_trained(trained, tiny_model_dir)


def test_text_encoder_training_adds_both_encoders_layers_that_land_where_trained(dataset, tiny_model_dir, tmp_path):
    request = request_for(dataset, tiny_model_dir, steps=6, train_text_encoder=True, text_encoder_learning_rate=5e-3)
    result = train(request, tmp_path)
    with safe_open(str(result.path), framework="pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in keys
    assert metadata["ss_network_train_unet_only"] == "False" and metadata["ss_text_encoder_lr"] == "0.005"
    assert_every_layer_lands_where_it_was_trained(result, tiny_model_dir)


def test_with_text_encoders_training_the_first_step_sees_the_cached_conditioning(dataset, tiny_model_dir, tmp_path):
    """Fresh LoRAs change nothing (their up factors are zero), so encoding the captions at the step gives the
    loss of the cached conditioning; after a few steps the trained encoders make a difference."""
    unet_only = train(request_for(dataset, tiny_model_dir, steps=4), tmp_path / "unet")
    with_text = train(request_for(dataset, tiny_model_dir, steps=4, train_text_encoder=True,
                                  text_encoder_learning_rate=5e-2), tmp_path / "text")
    assert with_text.losses[0] == pytest.approx(unet_only.losses[0], rel=1e-6)
    assert with_text.losses[-1] != pytest.approx(unet_only.losses[-1], rel=1e-6)


def test_trained_lora_loads_in_refgen_and_diffusers_to_the_same_pixels(trained, tiny_model_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")  # its own: the session engine stays clean

    def ours(loras):
        request = GenerationRequest(prompt=PROMPT, width=RESOLUTION, height=RESOLUTION, seed=3, steps=STEPS,
                                    guidance_scale=GUIDANCE, scheduler="euler", loras=loras)
        return engine.generate(request).pixels

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(trained.path))
    theirs = pipe(prompt=PROMPT, width=RESOLUTION, height=RESOLUTION, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=generators(3, 1), output_type="np").images
    with_lora = ours([LoraSpec(path=str(trained.path), weight=1.0)])
    assert np.abs(with_lora.astype(np.float64) - theirs).max() <= 1e-4
    assert np.abs(with_lora.astype(np.float64) - ours([])).max() > 1e-3, "a trained LoRA is not a zero LoRA"


def test_same_seed_gives_bit_identical_tensors_and_another_seed_does_not(dataset, tiny_model_dir, tmp_path):
    def tensors(seed: int, folder: str) -> dict:
        request = request_for(dataset, tiny_model_dir, steps=4, seed=seed)
        return load_file(str(train(request, tmp_path / folder).path))

    first, again, other = tensors(1, "a"), tensors(1, "b"), tensors(2, "c")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


# -- bad datasets ---------------------------------------------------------------------------------


def test_too_few_images_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(TrainingDataError, match="4 usable training images, at least 5"):
        load_dataset(request_for(write_dataset(tmp_path / "few", 4), tiny_model_dir))


def test_fewer_than_ten_images_warns_that_more_generalise_better(tmp_path, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="refgen"):
        _, report = load_dataset(request_for(write_dataset(tmp_path / "six", 6), tiny_model_dir))
    assert "10-15 or more different photos" in caplog.text and report.warnings


def test_corrupt_image_is_named_or_skipped_and_reported(tmp_path, tiny_model_dir):
    folder = write_dataset(tmp_path / "corrupt", 6)
    broken = folder / "photo_03.png"
    broken.write_bytes(broken.read_bytes()[:120])  # a truncated download
    with pytest.raises(TrainingDataError, match="photo_03.png"):
        load_dataset(request_for(folder, tiny_model_dir))
    images, report = load_dataset(request_for(folder, tiny_model_dir, skip_bad=True))
    assert len(images) == 5 and [entry["path"] for entry in report.skipped] == [str(broken)]


def test_image_smaller_than_the_resolution_is_named_or_skipped(tmp_path, tiny_model_dir):
    folder = write_dataset(tmp_path / "small", 6)
    structured_image(99, size=48).save(folder / "tiny_one.png")
    with pytest.raises(TrainingDataError, match=r"tiny_one.png is 48x48, smaller than its training size 64x64"):
        load_dataset(request_for(folder, tiny_model_dir))
    images, report = load_dataset(request_for(folder, tiny_model_dir, skip_bad=True))
    assert len(images) == 6 and "48x48" in report.skipped[0]["reason"]


def test_duplicates_are_removed_and_reported(tmp_path, tiny_model_dir):
    folder = write_dataset(tmp_path / "dupes", 6)
    shutil.copy(folder / "photo_02.png", folder / "photo_02_copy.png")
    images, report = load_dataset(request_for(folder, tiny_model_dir))
    assert len(images) == 6
    assert report.duplicates == [{"path": str(folder / "photo_02_copy.png"), "same_as": str(folder / "photo_02.png")}]


def test_folder_without_images_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(TrainingDataError, match="no images in"):
        load_dataset(request_for(tmp_path / "empty", tiny_model_dir))


def test_caption_file_is_used_and_the_trigger_prepended(dataset, tiny_model_dir):
    images, _ = load_dataset(request_for(dataset, tiny_model_dir))
    assert images[0].caption == f"{TRIGGER}, a close-up portrait, studio light"
    assert {image.caption for image in images[1:]} == {TRIGGER}


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_unsafe_names_are_refused(dataset, tiny_model_dir, name):
    with pytest.raises(ValueError, match="plain file name"):
        request_for(dataset, tiny_model_dir, name=name)
