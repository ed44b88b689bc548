"""The fast path (engine/speed.py): speed modes, graph-clean compiled models, and what compiling must not change.

Graph-cleanliness is checked with dynamo's own CompileCounter as the compile backend: it counts every graph
dynamo hands a backend (each graph break or recompile is one more), and fullgraph=True turns any graph break
into an error. The real inductor backend is run once, for the numbers (compiled output == eager output).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.testing import CompileCounter

from adapters.controlnet import ControlNetLibrary
from adapters.ip_adapter import IPAdapters
from adapters.t2i_adapter import T2IAdapterLibrary
from engine import Engine, GenerationRequest
from engine.compose import default_adapters
from engine.request import LoraSpec
from engine.request_types import CharacterReference, ControlUnit, Reference, T2IAdapterUnit
from engine.speed import CPU_OPTIONS, CUDA_OPTIONS, SPEEDS, Speed, SpeedError, speed_for, use_persistent_cache
from test_character_reference import analyzers, store, weights  # noqa: F401 (fixtures)
from test_lora import loras, model_pipe  # noqa: F401 (fixtures)
from test_references import ip_root  # noqa: F401 (a fixture)
from test_t2i_adapter import t2i_dirs  # noqa: F401 (a fixture)

CPU, FP32 = torch.device("cpu"), torch.float32
EAGER_TOLERANCE = 1e-4  # max abs pixel difference, compiled (inductor, fp32) vs eager; measured 2e-6


def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a lighthouse at night", width=64, height=64, steps=3, guidance_scale=5.0, scheduler="euler", seed=3)
    return GenerationRequest(**{**base, **fields})


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8))


@pytest.fixture
def counter():
    """A fresh dynamo (no graphs from other tests) and a backend that counts the graphs it is given."""
    torch._dynamo.reset()
    yield CompileCounter()
    torch._dynamo.reset()


def counted(backend: CompileCounter, **fields) -> Speed:
    return Speed("counted", compile=True, channels_last=True, backend=backend, **fields)


def new_graphs(engine: Engine, counter: CompileCounter, request: GenerationRequest) -> int:
    before = counter.frame_count
    engine.generate(request)
    return counter.frame_count - before


def _equipped(tiny_model_dir, speed: Speed, controlnet_dirs=None, t2i_dirs=None, ip_root=None, **faces) -> Engine:  # noqa: F811
    """The tiny model at `speed`, with whichever tiny adapters are given."""
    def adapters(setup):
        parts = {"controlnets": ControlNetLibrary(CPU, FP32, controlnet_dirs or {}, speed=speed)}
        if t2i_dirs:
            parts["t2i_adapters"] = T2IAdapterLibrary(CPU, FP32, t2i_dirs)
        if ip_root:
            parts["ip_adapters"] = IPAdapters(setup.pipe, CPU, FP32, reference=ip_root)
        return default_adapters(setup, **parts, **faces)
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", speed=speed, adapters=adapters)


# -- speed modes ------------------------------------------------------------------------------------


def test_speed_modes_mean_what_the_docs_say():
    cuda = torch.device("cuda")
    assert speed_for("eager", CPU) == Speed()
    compiled = speed_for("compiled", cuda)
    assert (compiled.compile, compiled.channels_last, compiled.fuse_qkv) == (True, True, False)
    assert compiled.options == CUDA_OPTIONS and compiled.options["triton.cudagraphs"] and compiled.options["max_autotune"]
    assert speed_for("compiled", CPU).options == CPU_OPTIONS
    assert speed_for("max", cuda).fuse_qkv
    assert speed_for("auto", CPU).name == "eager"
    assert speed_for("auto", cuda).name == "compiled"
    assert speed_for("auto", cuda, offload=True).name == "eager"


@pytest.mark.parametrize("speed, offload", [("fast", False), ("compiled", True), ("max", True)])
def test_an_impossible_speed_is_refused_before_anything_loads(speed, offload):
    with pytest.raises(SpeedError):
        speed_for(speed, torch.device("cuda"), offload=offload)


def test_compiled_kernels_are_cached_in_refgens_cache_folder_unless_the_user_chose_one(private_home, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = use_persistent_cache()
    assert folder.is_relative_to(private_home)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert str(use_persistent_cache()) == "/somewhere/else"


# -- graph-clean: no breaks, no recompiles for what does not change the shapes ---------------------------


def test_one_graph_per_model_and_none_again_for_new_prompts_seeds_schedulers_and_step_counts(tiny_model_dir, counter):
    engine = _equipped(tiny_model_dir, counted(counter))
    assert new_graphs(engine, counter, _request()) == 2  # the UNet and the VAE decoder, each one whole graph
    for request in (_request(prompt="a red fox", seed=9), _request(steps=5, scheduler="ddim"),
                    _request(scheduler="dpmpp_2m_sde_karras", negative_prompt="blurry"), _request(guidance_scale=9.0)):
        assert new_graphs(engine, counter, request) == 0, request
    assert new_graphs(engine, counter, _request(num_images=2)) == 2  # another batch is another shape
    assert new_graphs(engine, counter, _request(num_images=2, seed=40)) == 0


def test_a_server_keeps_every_shape_it_has_seen(tiny_model_dir, counter):
    """More shapes than dynamo keeps by default (8): none is dropped to eager, none compiled twice."""
    engine = _equipped(tiny_model_dir, counted(counter))
    sizes = [(64 + 8 * index, 64) for index in range(9)]
    for width, height in sizes:
        assert new_graphs(engine, counter, _request(width=width, height=height, steps=1)) == 2
    for width, height in sizes:
        assert new_graphs(engine, counter, _request(width=width, height=height, steps=1, seed=8)) == 0


def test_controlnet_and_t2i_adapter_residuals_stay_in_one_graph(tiny_model_dir, controlnet_dirs, t2i_dirs, counter):  # noqa: F811
    engine = _equipped(tiny_model_dir, counted(counter), controlnet_dirs, t2i_dirs)
    unit = dict(type="canny", image=_picture(1), preprocess=False)
    assert new_graphs(engine, counter, _request(controlnets=[ControlUnit(**unit)])) == 3  # + the ControlNet
    again = [ControlUnit(**{**unit, "image": _picture(2), "weight": 0.55}), ControlUnit(type="depth", image=_picture(3), preprocess=False, weight=1.3)]
    assert new_graphs(engine, counter, _request(controlnets=again, seed=5)) == 0  # other images, weights, a second unit
    adapter = T2IAdapterUnit(type="depth", image=_picture(4), preprocess=False)
    first = new_graphs(engine, counter, _request(controlnets=again, t2i_adapters=[adapter]))
    assert first == 1  # the UNet with intrablock residuals too
    assert new_graphs(engine, counter, _request(controlnets=again, t2i_adapters=[adapter.model_copy(update={"image": _picture(5)})])) == 0


def test_a_new_style_or_content_image_does_not_recompile(tiny_model_dir, ip_root, counter):  # noqa: F811
    engine = _equipped(tiny_model_dir, counted(counter), ip_root=ip_root)
    engine.generate(_request())
    assert new_graphs(engine, counter, _request(references=[Reference(kind="style", image=_picture(1))])) == 1
    assert new_graphs(engine, counter, _request(references=[Reference(kind="style", image=_picture(2))], seed=4)) == 0
    both = [Reference(kind="style", image=_picture(3)), Reference(kind="content", image=_picture(4))]
    assert new_graphs(engine, counter, _request(references=both)) == 1
    swapped = [Reference(kind="style", image=_picture(4)), Reference(kind="content", image=_picture(3))]
    assert new_graphs(engine, counter, _request(references=swapped)) == 0
    assert new_graphs(engine, counter, _request()) == 0  # back to the plain UNet: its graph is still there


@pytest.mark.parametrize("adapter", ["instantid", "faceid"])
def test_character_reference_adapters_stay_in_one_graph(tiny_model_dir, weights, analyzers, store, astronaut, adapter, counter):  # noqa: F811
    faces = {"ip_root": weights["ip"], "analyzers": analyzers, "store": store,
             "instantid": weights["instantid"], "faceid": weights["faceid"]}
    engine = _equipped(tiny_model_dir, counted(counter), **faces)
    character = CharacterReference(images=[astronaut], adapter=adapter)
    assert new_graphs(engine, counter, _request(character=character)) >= 1  # fullgraph: a break would raise
    assert new_graphs(engine, counter, _request(character=character, seed=12, prompt="a portrait in the rain")) == 0


def test_loras_stay_in_one_graph(tiny_model_dir, loras, counter):  # noqa: F811
    engine = _equipped(tiny_model_dir, counted(counter))
    request = _request(loras=[LoraSpec(path=str(loras["kohya"]), weight=0.8)])
    assert new_graphs(engine, counter, request) >= 1
    assert new_graphs(engine, counter, request.model_copy(update={"seed": 77, "prompt": "a ship"})) == 0


def test_the_esrgan_upscaler_compiles_with_the_engine(tiny_model_dir, counter):
    engine = _equipped(tiny_model_dir, counted(counter))
    engine.generate(_request())
    assert new_graphs(engine, counter, _request(upscale=4, upscaler="tiny")) == 1  # one tile: the whole 64 px image
    assert new_graphs(engine, counter, _request(upscale=4, upscaler="tiny", seed=9, prompt="a barn")) == 0


# -- what compiling must not change ------------------------------------------------------------------------


def test_compiled_inductor_output_matches_eager(tiny_model_dir, engine):
    torch._dynamo.reset()
    compiled = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", speed="compiled")
    request = _request(num_images=2, seed=21)
    difference = np.abs(compiled.generate(request).pixels - engine.generate(request).pixels).max()
    assert difference <= EAGER_TOLERANCE


def test_fused_qkv_gives_the_same_images_with_and_without_loras(tiny_model_dir, engine, loras):  # noqa: F811
    """max fuses the q/k/v projections; LoRA layers wrap the unfused ones, so the engine unfuses them while a
    LoRA is on (without that, the LoRA would silently do nothing to attention)."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    fused = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", speed=Speed("fused", fuse_qkv=True))
    is_fused = lambda: all(isinstance(p, FusedAttnProcessor2_0) for p in fused.pipe.unet.attn_processors.values())  # noqa: E731
    assert is_fused()
    plain, with_lora = _request(), _request(loras=[LoraSpec(path=str(loras["kohya_attention"]), weight=1.0)])
    assert np.abs(fused.generate(plain).pixels - engine.generate(plain).pixels).max() <= 1e-5
    assert np.abs(fused.generate(with_lora).pixels - engine.generate(with_lora).pixels).max() <= 1e-5
    assert is_fused()  # fused again after the LoRA request


def test_the_vae_is_kept_in_its_working_dtype_not_cast_per_decode():
    from diffusers import AutoencoderKL

    from engine.vae import decode, keep_in_work_dtype

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=16,
                        force_upcast=True).to(torch.float16)
    keep_in_work_dtype(vae)  # SDXL's VAE overflows in fp16: kept in fp32 once
    assert vae.dtype == torch.float32
    weight = vae.decoder.conv_in.weight
    pointer = weight.data_ptr()
    decode(vae, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert vae.decoder.conv_in.weight is weight and weight.data_ptr() == pointer and weight.dtype == torch.float32
    bf16 = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, force_upcast=True).to(torch.bfloat16)
    keep_in_work_dtype(bf16)
    assert bf16.dtype == torch.bfloat16  # bf16 does not overflow: it decodes in bf16


def test_non_finite_latents_are_still_reported_after_the_decode():
    from diffusers import AutoencoderKL

    from engine.errors import NonFiniteOutputError
    from engine.vae import decode

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="sampler"):
        decode(vae, latents)



def test_the_command_line_offers_exactly_the_engines_speed_modes():
    from engine.cli.serve import SpeedChoice

    assert {choice.value for choice in SpeedChoice} == {"auto", *SPEEDS}


def test_int8_quantization_is_part_of_the_speed_plan_recorded_and_replayed(tiny_model_dir, engine, tmp_path):
    quantized = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", quantize="int8")
    result = quantized.generate(_request())
    assert result.metadata[0]["device"]["quantize"] == "int8"
    assert 0 < np.abs(result.pixels - engine.generate(_request()).pixels).max() < 0.05  # int8 weights: close, not equal
    assert np.array_equal(quantized.replay(result.save(tmp_path)[0]).pixels, result.pixels)
    assert engine.generate(_request()).metadata[0]["device"]["quantize"] is None


def test_fp8_is_refused_before_the_model_loads_where_the_hardware_has_no_fp8_matmuls(tiny_model_dir):
    from engine.quantize import QuantizeError

    with pytest.raises(QuantizeError, match="8.9"):
        speed_for("compiled", CPU, quantize="fp8")
