"""deep_cache (less work, opt-in; adapters/deep_cache.py): the whole UNet on every k-th call, its outer blocks on
cached deep features in between.

The oracle for a full step is the plain diffusers UNet on the same inputs; for the schedule, which UNet blocks run
on which call (observed with forward hooks on the UNet's own blocks, nothing mocked).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch._dynamo.testing import CompileCounter

from adapters.controlnet import ControlNetLibrary
from adapters.deep_cache import DeepCache, DeepCacheError, check_decomposable
from adapters.ip_adapter import IPAdapters
from engine import Engine, GenerationRequest
from engine.adapter import Context
from engine.compose import default_adapters
from engine.request_types import ControlUnit, Reference, T2IAdapterUnit
from engine.speed import Speed
from engine.tiny import build_tiny_unet, tiny_unet_config
from test_inpaint import inpaint_engine, inpaint_unet_dir  # noqa: F401 (fixtures)
from test_references import ip_root  # noqa: F401 (a fixture)
from test_t2i_adapter import t2i_dirs, t2i_engine  # noqa: F401 (fixtures)

CPU, FP32 = torch.device("cpu"), torch.float32
# Max abs pixel difference (0..1) of a deep_cache=3, 7-step image from the full computation on the tiny model;
# measured 0.0184 (mean 0.0026) for seed 3. Random weights: a real model's figures are in benchmarks/results/less_work.md.
CACHED_TOLERANCE = 0.05


def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a lighthouse at night", width=64, height=64, steps=7, guidance_scale=5.0, scheduler="euler", seed=3)
    return GenerationRequest(**{**base, **fields})


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8))


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def calls_seen(unet, run) -> list[str]:
    """'full' or 'shallow' for every UNet call while `run()` runs: every call passes conv_in, a full one mid_block."""
    calls: list[str] = []
    hooks = [unet.conv_in.register_forward_hook(lambda *_: calls.append("shallow")),
             unet.mid_block.register_forward_hook(lambda *_: calls.__setitem__(-1, "full"))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def wrapper(unet, interval: int = 3):
    """A generation's DeepCache UNet, prepared as the engine prepares it."""
    ctx = Context(SimpleNamespace(unet=unet), CPU, FP32, loras=None)
    return DeepCache().prepare(_request(deep_cache=interval), ctx).unet(unet)


def unet_inputs(unet, rows: int = 2, seed: int = 0, size=(8, 8)) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latents, timestep, keywords) of a guided SDXL call on a latent of `size`, random."""
    generator = torch.Generator().manual_seed(seed)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    kwargs = {"encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator),
              "added_cond_kwargs": {"text_embeds": torch.randn(rows, pooled, generator=generator),
                                    "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * rows)}}
    latents = torch.randn(rows, unet.config.in_channels, *size, generator=generator)
    return latents, torch.tensor(500.0), kwargs


def residuals_like(unet, latents, timestep, kwargs) -> dict:
    """Random ControlNet residuals (every skip, the mid block) and T2I-Adapter features (every down block's output),
    shaped from one observed plain UNet call."""
    skips, outputs, mid = [], [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, out: skips.append(out.shape)),
             unet.mid_block.register_forward_hook(lambda m, i, out: mid.append(out.shape))]
    def observe(module, args, out) -> None:  # returns nothing: the block's output stays as it is
        outputs.append(out[0].shape)
        skips.extend(r.shape for r in out[1])

    hooks += [block.register_forward_hook(observe) for block in unet.down_blocks]
    with torch.inference_mode():
        unet(latents, timestep, **kwargs)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(7)
    noise = lambda shape: 0.3 * torch.randn(shape, generator=generator)  # noqa: E731
    return {"control": {"down_block_additional_residuals": [noise(s) for s in skips], "mid_block_additional_residual": noise(mid[0])},
            "t2i": {"down_intrablock_additional_residuals": [noise(s) for s in outputs]}}


# -- (a) the schedule -----------------------------------------------------------------------------------


def test_the_whole_unet_runs_on_every_kth_call_and_the_outer_blocks_between(engine):
    calls = calls_seen(engine.pipe.unet, lambda: engine.generate(_request(deep_cache=3)))
    assert calls == ["full", "shallow", "shallow", "full", "shallow", "shallow", "full"]
    assert calls_seen(engine.pipe.unet, lambda: engine.generate(_request(deep_cache=2, steps=4))) == ["full", "shallow"] * 2
    assert calls_seen(engine.pipe.unet, lambda: engine.generate(_request(steps=3))) == ["full"] * 3  # off: the plain UNet


def test_each_generation_starts_with_a_fresh_cache(engine):
    twice = calls_seen(engine.pipe.unet, lambda: [engine.generate(_request(deep_cache=3, steps=2)) for _ in range(2)])
    assert twice == ["full", "shallow"] * 2


def test_the_wrapper_counts_its_calls(engine):
    unet = engine.pipe.unet
    cached = wrapper(unet, 2)
    latents, timestep, kwargs = unet_inputs(unet)
    with torch.inference_mode():
        for _ in range(3):
            cached(latents, timestep, return_dict=False, **kwargs)
    assert cached.calls == 3 and cached.config is unet.config


# -- (b) a full step is the plain UNet, a shallow step on its own features too -------------------------------


@pytest.mark.parametrize("extra, size", [(None, (8, 8)), (None, (9, 8)), ("control", (8, 8)), ("t2i", (8, 8))])
def test_a_full_step_equals_the_plain_unet_and_a_shallow_step_on_the_same_inputs_too(engine, extra, size):
    """(9, 8): an odd latent side, where the UNet forwards its upsample sizes."""
    unet = engine.pipe.unet
    latents, timestep, kwargs = unet_inputs(unet, size=size)
    if extra:
        kwargs.update(residuals_like(unet, latents, timestep, kwargs)[extra])
    cached = wrapper(unet)
    with torch.inference_mode():
        full = cached(latents, timestep, return_dict=False, **kwargs)[0]
        shallow = cached(latents, timestep, return_dict=False, **kwargs)[0]  # the deep features of these very inputs
        if extra == "t2i":  # the wrapper leaves the features list as it was; the plain UNet pops it (last here)
            assert len(kwargs["down_intrablock_additional_residuals"]) == 2
        plain = unet(latents, timestep, return_dict=False, **kwargs)[0]
    assert torch.equal(full, plain)
    assert (shallow - plain).abs().max() <= 1e-6


def test_a_shallow_step_uses_the_fresh_outer_skips_and_control_residuals(engine):
    """On other inputs a shallow step differs from the plain UNet (its deep features are stale), and a ControlNet's
    outer residuals change it: they are not dropped."""
    unet = engine.pipe.unet
    latents, timestep, kwargs = unet_inputs(unet)
    control = residuals_like(unet, latents, timestep, kwargs)["control"]
    other, _, _ = unet_inputs(unet, seed=1)
    with torch.inference_mode():
        cached, controlled = wrapper(unet), wrapper(unet)
        cached(latents, timestep, **kwargs), controlled(latents, timestep, **kwargs, **control)
        plain_step = cached(other, timestep, **kwargs)[0]
        control_step = controlled(other, timestep, **kwargs, **control)[0]
        plain = unet(other, timestep, **kwargs).sample
    assert (plain_step - plain).abs().max() > 1e-4
    assert (control_step - plain_step).abs().max() > 1e-3


def test_the_9_channel_inpainting_unet_full_step_equals_the_plain_unet():
    unet = build_tiny_unet(seed=5, in_channels=9).eval()
    latents, timestep, kwargs = unet_inputs(unet)
    with torch.inference_mode():
        assert torch.equal(wrapper(unet)(latents, timestep, **kwargs)[0], unet(latents, timestep, **kwargs)[0])


def test_an_inpainting_unet_request_is_cached_on_that_unet(inpaint_engine):  # noqa: F811
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16), mode="L")
    request = _request(init_image=_picture(1), mask_image=mask, deep_cache=2, steps=4)
    assert calls_seen(inpaint_engine.inpaint_unet, lambda: inpaint_engine.generate(request)) == ["full", "shallow"] * 2


# -- (c) the image: close to the full computation, recorded, replayed -----------------------------------------


def test_changes_the_image_a_little_and_is_recorded_and_replayed(engine, tmp_path):
    full = engine.generate(_request())
    cached = engine.generate(_request(deep_cache=3))
    assert 0 < _max_diff(cached.pixels, full.pixels) <= CACHED_TOLERANCE
    assert cached.metadata[0]["resolved"]["deep_cache"] == 3
    assert full.metadata[0]["resolved"]["deep_cache"] is None
    path = cached.save(tmp_path)[0]
    replayed = engine.replay(path)
    assert _max_diff(replayed.pixels, cached.pixels) == 0.0
    assert replayed.metadata[0]["resolved"]["deep_cache"] == 3


def test_works_with_a_guidance_cutoff_on_the_conditional_half_of_the_cached_features(engine):
    full = engine.generate(_request(guidance_cutoff=0.4))
    both = engine.generate(_request(guidance_cutoff=0.4, deep_cache=3, num_images=2))
    assert np.isfinite(both.pixels).all()
    assert 0 < _max_diff(both.pixels[:1], full.pixels) <= CACHED_TOLERANCE


# -- (d) with the other adapters -------------------------------------------------------------------------------


def _equipped(tiny_model_dir, speed: Speed = Speed(), controlnet_dirs=None, ip_root=None) -> Engine:  # noqa: F811
    def adapters(setup):
        parts = {"controlnets": ControlNetLibrary(CPU, FP32, controlnet_dirs or {}, speed=speed)}
        if ip_root:
            parts["ip_adapters"] = IPAdapters(setup.pipe, CPU, FP32, reference=ip_root)
        return default_adapters(setup, **parts)
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", speed=speed, adapters=adapters)


def test_works_with_a_controlnet_unit_and_a_style_reference_together(tiny_model_dir, controlnet_dirs, ip_root):  # noqa: F811
    engine = _equipped(tiny_model_dir, controlnet_dirs=controlnet_dirs, ip_root=ip_root)
    units = dict(controlnets=[ControlUnit(type="canny", image=_picture(2), preprocess=False)],
                 references=[Reference(kind="style", image=_picture(4))])
    full = engine.generate(_request(**units))
    calls = calls_seen(engine.pipe.unet, lambda: engine.generate(_request(deep_cache=3, **units)))
    cached = engine.generate(_request(deep_cache=3, **units))
    assert calls == ["full", "shallow", "shallow"] * 2 + ["full"]
    assert 0 < _max_diff(cached.pixels, full.pixels) <= CACHED_TOLERANCE
    assert _max_diff(cached.pixels, engine.generate(_request(deep_cache=3)).pixels) > 1e-3  # the units still count


def test_works_with_a_t2i_adapter_unit(t2i_engine):  # noqa: F811
    unit = T2IAdapterUnit(type="depth", image=_picture(3), preprocess=False)
    full = t2i_engine.generate(_request(t2i_adapters=[unit]))
    cached = t2i_engine.generate(_request(t2i_adapters=[unit], deep_cache=3))
    assert 0 < _max_diff(cached.pixels, full.pixels) <= CACHED_TOLERANCE


# -- (e) graph-clean when compiled -------------------------------------------------------------------------------


@pytest.fixture
def counter():
    torch._dynamo.reset()
    yield CompileCounter()
    torch._dynamo.reset()


def new_graphs(engine: Engine, counter: CompileCounter, request: GenerationRequest) -> int:
    before = counter.frame_count
    engine.generate(request)
    return counter.frame_count - before


def test_compiles_without_graph_breaks_and_not_again_for_the_same_shape(tiny_model_dir, controlnet_dirs, counter):
    speed = Speed("counted", compile=True, channels_last=True, backend=counter)
    engine = _equipped(tiny_model_dir, speed, controlnet_dirs=controlnet_dirs)
    # fullgraph=True: a graph break would raise. The full path, the shallow path and the VAE decoder: one graph each.
    assert new_graphs(engine, counter, _request(deep_cache=3, steps=4)) == 3
    assert new_graphs(engine, counter, _request(deep_cache=2, steps=5, seed=9, prompt="a red fox")) == 0
    unit = ControlUnit(type="canny", image=_picture(2), preprocess=False)
    assert new_graphs(engine, counter, _request(deep_cache=3, steps=4, controlnets=[unit])) == 3  # + the ControlNet
    assert new_graphs(engine, counter, _request(deep_cache=3, steps=4, seed=5, controlnets=[unit])) == 0


# -- (f) what is refused --------------------------------------------------------------------------------------------


def test_a_unet_with_attention_in_its_outer_blocks_is_refused_when_prepared():
    config = {**tiny_unet_config(4), "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config)
    with pytest.raises(DeepCacheError, match="outermost blocks have attention"):
        check_decomposable(unet)
    with pytest.raises(DeepCacheError, match="deep_cache cannot run this UNet"):
        DeepCache().prepare(_request(deep_cache=3), Context(SimpleNamespace(unet=unet), CPU, FP32, loras=None))


def test_a_unet_keyword_the_decomposition_does_not_cover_is_refused(engine):
    latents, timestep, kwargs = unet_inputs(engine.pipe.unet)
    with pytest.raises(DeepCacheError, match="cross_attention_kwargs"):
        wrapper(engine.pipe.unet)(latents, timestep, cross_attention_kwargs={"scale": 0.5}, **kwargs)


@pytest.mark.parametrize("interval", [1, 11])
def test_an_interval_outside_2_to_10_is_refused(interval):
    with pytest.raises(ValidationError, match="deep_cache"):
        _request(deep_cache=interval)
