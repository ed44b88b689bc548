"""LoRAs per request: both published layouts, checked against diffusers' own pipeline.

The LoRA files are tiny random LoRAs for the tiny SDXL with random, non-zero up AND down factors,
written in the two layouts LoRAs are published in (see tests/lora_layouts.py for where each
layout comes from):

* diffusers/peft, as ``StableDiffusionXLPipeline.save_lora_weights`` writes it
  (``unet.….to_q.lora_A.weight``, ``text_encoder.….q_proj.lora_B.weight``);
* kohya-ss sd-scripts, as model sites publish it (``lora_unet_input_blocks_4_1_…_to_q.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``, ``lora_te1_…``, ``lora_te2_…``; fp16).

The reference is diffusers' StableDiffusionXLPipeline with the same file loaded through
``load_lora_weights`` and switched on with ``set_adapters`` -- in a pipeline and an Engine of this
module's own, so no LoRA state reaches the session fixtures other tests use.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import generators
from engine import Engine, GenerationRequest, LoraSpec, UnsafeWeightsError
from engine.lora import LoraError
from lora_layouts import ATTENTION_TARGETS, random_lora, sgm_module_name, write_diffusers_lora, write_kohya_lora

TOLERANCE = 1e-4  # our engine vs diffusers, as in test_parity
PROMPT, STEPS, GUIDANCE, SIZE = "a watercolor fox", 4, 5.0, 64


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a shared 2-core machine two OpenMP threads
    next to other work turn a 0.1 s image into seconds. Restored for the modules after this one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir):
    """An Engine of this module's own: the session `engine` stays LoRA-free."""
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")


class Reference:
    """diffusers' own SDXL pipeline, LoRAs loaded by its own loader and selected with set_adapters."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.adapters: dict[str, str] = {}  # path -> adapter name

    def __call__(self, loras: list[tuple[object, float]], seed: int, batch: int = 1) -> np.ndarray:
        from diffusers import EulerDiscreteScheduler

        for path, _ in loras:
            if str(path) not in self.adapters:
                self.adapters[str(path)] = name = f"ref_{len(self.adapters)}"
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([self.adapters[str(p)] for p, _ in loras], adapter_weights=[w for _, w in loras])
        elif self.adapters:
            self.pipe.disable_lora()
        self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        return self.pipe(
            prompt=PROMPT, width=SIZE, height=SIZE, num_images_per_prompt=batch, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, generator=generators(seed, batch), output_type="np",
        ).images


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A fresh diffusers pipeline (not the session `reference_pipe`): LoRAs loaded here stay here."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return Reference(pipe)


@pytest.fixture(scope="module")
def model_pipe(tiny_model_dir):
    """The tiny model's components, only read to shape the LoRAs (never given an adapter)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, model_pipe):
    """LoRA files by role. `style` (and `attention`) is one set of factors written in each layout."""
    folder = tmp_path_factory.mktemp("loras")
    style = random_lora(model_pipe, seed=1, rank=4, alpha=2.0)
    attention = random_lora(model_pipe, seed=3, rank=4, alpha=8.0, only=ATTENTION_TARGETS)
    detail = random_lora(model_pipe, seed=2, rank=2, alpha=1.0, components=("unet",))  # UNet only
    return {
        "diffusers": write_diffusers_lora(model_pipe, style, folder / "style_diffusers.safetensors"),
        "kohya": write_kohya_lora(model_pipe, style, folder / "style_kohya.safetensors"),
        "diffusers_training": write_diffusers_lora(model_pipe, attention, folder / "attn_diffusers.safetensors", training_script=True),
        "kohya_attention": write_kohya_lora(model_pipe, attention, folder / "attn_kohya.safetensors"),
        "detail_diffusers": write_diffusers_lora(model_pipe, detail, folder / "detail_diffusers.safetensors"),
        "detail_kohya": write_kohya_lora(model_pipe, detail, folder / "detail_kohya.safetensors"),
    }


def generate(engine: Engine, loras: list, seed: int, batch: int = 1):
    request = GenerationRequest(
        prompt=PROMPT, width=SIZE, height=SIZE, num_images=batch, seed=seed, steps=STEPS,
        guidance_scale=GUIDANCE, scheduler="euler", loras=loras,
    )
    return engine.generate(request)


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())


# -- the layouts load, and mean what diffusers makes of them ---------------------------------


@pytest.mark.parametrize(
    "layout, weight, seed",
    [("diffusers", 0.8, 0), ("kohya", 0.8, 1), ("kohya", -1.5, 2), ("diffusers_training", 1.0, 3)],
)
def test_lora_matches_diffusers(lora_engine, reference, loras, layout, weight, seed):
    path = loras[layout]
    ours = generate(lora_engine, [LoraSpec(path=str(path), weight=weight)], seed, batch=2).pixels
    theirs = reference([(path, weight)], seed, batch=2)
    assert max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("kohya, diffusers", [("kohya", "diffusers"), ("kohya_attention", "diffusers_training")])
def test_kohya_and_diffusers_files_of_the_same_factors_give_the_same_image(lora_engine, loras, kohya, diffusers):
    """Proves the kohya file's SGM block names and alpha/rank scaling land on the layers the
    diffusers file names directly (a wrong block index would move factors to a same-shaped layer)."""
    from_diffusers = generate(lora_engine, [LoraSpec(path=str(loras[diffusers]), weight=1.0)], seed=3).pixels
    from_kohya = generate(lora_engine, [LoraSpec(path=str(loras[kohya]), weight=1.0)], seed=3).pixels
    assert max_diff(from_kohya, from_diffusers) <= 1e-5
    assert max_diff(from_kohya, generate(lora_engine, [], seed=3).pixels) > 1e-3


def test_sgm_block_names_of_the_tiny_unet(model_pipe):
    config = model_pipe.unet.config
    assert sgm_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", config) == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_module_name("down_blocks.1.attentions.1.proj_in", config) == "input_blocks.5.1.proj_in"
    assert sgm_module_name("mid_block.attentions.0.proj_out", config) == "middle_block.1.proj_out"
    assert [sgm_module_name(f"up_blocks.0.attentions.{i}.proj_in", config) for i in range(3)] == [
        "output_blocks.0.1.proj_in", "output_blocks.1.1.proj_in", "output_blocks.2.1.proj_in",
    ]


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_is_live_and_weight_zero_is_no_lora(lora_engine, loras, layout):
    path = str(loras[layout])
    plain = generate(lora_engine, [], seed=4).pixels
    full = generate(lora_engine, [LoraSpec(path=path, weight=1.0)], seed=4).pixels
    zero = generate(lora_engine, [LoraSpec(path=path, weight=0.0)], seed=4).pixels
    assert max_diff(full, plain) > 1e-3
    assert max_diff(zero, plain) <= 1e-5


def test_two_loras_with_their_own_weights_match_diffusers(lora_engine, reference, loras):
    """One full LoRA (UNet + both text encoders, kohya) and one UNet-only LoRA (diffusers layout)."""
    pair = [(loras["kohya"], 0.6), (loras["detail_diffusers"], 1.3)]
    ours = generate(lora_engine, [LoraSpec(path=str(p), weight=w) for p, w in pair], seed=5).pixels
    theirs = reference(pair, seed=5)
    assert max_diff(ours, theirs) <= TOLERANCE
    alone = generate(lora_engine, [LoraSpec(path=str(loras["kohya"]), weight=0.6)], seed=5).pixels
    assert max_diff(ours, alone) > 1e-3  # the second LoRA takes part


def test_the_same_lora_twice_applies_both_weights(lora_engine, reference, loras, tmp_path):
    """Listed twice (here once under a second name), a LoRA counts twice, as two diffusers adapters do."""
    first = loras["kohya"]
    second = tmp_path / "same_content.safetensors"
    second.write_bytes(first.read_bytes())
    ours = generate(lora_engine, [LoraSpec(path=str(first), weight=0.5), LoraSpec(path=str(second), weight=0.3)], seed=11).pixels
    theirs = reference([(first, 0.5), (second, 0.3)], seed=11)
    assert max_diff(ours, theirs) <= TOLERANCE


def test_a_request_without_loras_after_one_with_loras_is_the_plain_image(lora_engine, loras):
    plain = generate(lora_engine, [], seed=6).pixels
    generate(lora_engine, [LoraSpec(path=str(loras["kohya"]), weight=1.0), LoraSpec(path=str(loras["detail_kohya"]), weight=0.5)], seed=6)
    again = generate(lora_engine, [], seed=6).pixels
    assert np.array_equal(again, plain)
    # and a LoRA dropped from the next request is off: only the one still asked for applies
    only_detail = generate(lora_engine, [LoraSpec(path=str(loras["detail_kohya"]), weight=0.5)], seed=6).pixels
    generate(lora_engine, [LoraSpec(path=str(loras["diffusers"]), weight=1.0)], seed=6)
    assert np.array_equal(generate(lora_engine, [LoraSpec(path=str(loras["detail_kohya"]), weight=0.5)], seed=6).pixels, only_detail)


# -- provenance ------------------------------------------------------------------------------


def test_metadata_records_each_lora_path_weight_and_sha256(lora_engine, loras):
    first, second = loras["kohya"], loras["detail_diffusers"]
    result = generate(lora_engine, [f"{first}:0.75", LoraSpec(path=str(second), weight=-0.5)], seed=7)
    recorded = result.metadata[0]["loras"]
    assert recorded == [
        {"path": str(first), "weight": 0.75, "sha256": hashlib.sha256(first.read_bytes()).hexdigest()},
        {"path": str(second), "weight": -0.5, "sha256": hashlib.sha256(second.read_bytes()).hexdigest()},
    ]
    assert [(l["path"], l["weight"]) for l in result.metadata[0]["resolved"]["loras"]] == [(str(first), 0.75), (str(second), -0.5)]


# -- errors ----------------------------------------------------------------------------------


def test_missing_lora_file_is_a_lora_error_naming_the_path(lora_engine, tmp_path):
    missing = tmp_path / "nowhere" / "style.safetensors"
    with pytest.raises(LoraError, match="nowhere/style.safetensors"):
        generate(lora_engine, [LoraSpec(path=str(missing))], seed=0)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickle_lora_needs_allow_pickle(lora_engine, tmp_path, suffix):
    path = tmp_path / f"style{suffix}"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        generate(lora_engine, [LoraSpec(path=str(path))], seed=0)


def _kohya_pair(name: str, rank: int, in_features: int, out_features: int) -> dict:
    return {
        f"{name}.lora_down.weight": torch.randn(rank, in_features),
        f"{name}.lora_up.weight": torch.randn(out_features, rank),
        f"{name}.alpha": torch.tensor(float(rank)),
    }


def _foreign_loras() -> dict[str, dict]:
    """State dicts of LoRAs made for other models, in their own published layouts."""
    torch.manual_seed(0)
    return {
        # Flux LoRA (diffusers layout): no key belongs to an SDXL component at all
        "flux": {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4),
        },
        # SD 1.5 LoRA (kohya; SD 1.5 is trained on diffusers' UNet): SDXL has no attention in down_blocks.0
        "sd15": _kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 4, 320, 320),
        # a full-size SDXL LoRA on the tiny model: right names, wrong shapes
        "sdxl_full_size": _kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 4, 640, 640),
        # the UNet part fits, text encoder 1's part has another width
        "text_encoder_mismatch": {
            **_kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 4, 64, 64),
            **_kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768),
        },
        # half the layers exist (a deeper model's transformer_blocks.7 does not)
        "partial": {
            **_kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 4, 64, 64),
            **_kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q", 4, 64, 64),
        },
        # not a LoRA at all (a model checkpoint given as --lora)
        "not_a_lora": {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3)},
    }


@pytest.mark.parametrize("index, kind", list(enumerate(_foreign_loras())))
def test_lora_for_another_model_is_a_lora_error_and_leaves_the_engine_clean(lora_engine, model_pipe, tmp_path, index, kind):
    path = tmp_path / f"{kind}.safetensors"
    save_file(_foreign_loras()[kind], str(path))
    plain = generate(lora_engine, [], seed=8).pixels
    with pytest.raises(LoraError, match=kind):
        generate(lora_engine, [LoraSpec(path=str(path))], seed=8)
    assert np.array_equal(generate(lora_engine, [], seed=8).pixels, plain), "a refused LoRA must leave nothing behind"
    # a good LoRA loaded (for the first time) in the same request as the bad one is not left on either
    good = write_kohya_lora(model_pipe, random_lora(model_pipe, seed=100 + index, components=("unet",)), tmp_path / "good.safetensors")
    with pytest.raises(LoraError, match=kind):
        generate(lora_engine, [LoraSpec(path=str(good)), LoraSpec(path=str(path))], seed=8)
    assert np.array_equal(generate(lora_engine, [], seed=8).pixels, plain)


def test_pickle_lora_loads_with_allow_pickle(tiny_model_dir, lora_engine, loras, tmp_path):
    """Opted in, a .pt LoRA (torch.save of the same kohya state dict) gives the safetensors image."""
    from safetensors.torch import load_file

    pickled = tmp_path / "style_kohya.pt"
    torch.save(load_file(str(loras["kohya"])), pickled)
    trusting = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", allow_pickle=True)
    ours = generate(trusting, [LoraSpec(path=str(pickled), weight=0.8)], seed=9).pixels
    safe = generate(lora_engine, [LoraSpec(path=str(loras["kohya"]), weight=0.8)], seed=9).pixels
    assert max_diff(ours, safe) <= 1e-6


def test_refused_lora_on_a_fresh_engine(tiny_model_dir, tmp_path):
    """The first LoRA an engine ever sees is refused cleanly too (no adapter was ever installed)."""
    path = tmp_path / "flux.safetensors"
    save_file(_foreign_loras()["flux"], str(path))
    fresh = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    plain = generate(fresh, [], seed=10).pixels
    with pytest.raises(LoraError, match="matches no layer"):
        generate(fresh, [LoraSpec(path=str(path))], seed=10)
    assert np.array_equal(generate(fresh, [], seed=10).pixels, plain)


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_a_peft_too_old_for_the_installed_libraries_is_an_install_error_not_the_files_fault(library):
    """transformers 5.24 with peft 0.21 (a fresh unpinned install on 2026-11-28) refuses LoRAs with
    its own version check; the user must hear that the install is wrong, and how to fix it."""
    import importlib
    import importlib.metadata

    from engine.lora import PeftVersionError, is_peft_version_refusal, peft_version_message

    check = importlib.import_module(f"{library}.utils.peft_utils").check_peft_version
    with pytest.raises(ValueError) as refusal:
        check(min_version="999.0")  # the libraries' own refusal, as a too-old peft meets it
    assert is_peft_version_refusal(refusal.value)
    message = peft_version_message(refusal.value)
    assert issubclass(PeftVersionError, LoraError)
    assert f"peft {importlib.metadata.version('peft')}" in message and "constraints.txt" in message
    assert not is_peft_version_refusal(ValueError("size mismatch for lora_A.weight"))
