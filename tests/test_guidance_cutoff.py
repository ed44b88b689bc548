"""guidance_cutoff (less work, opt-in): classifier-free guidance stops after step int(steps x cutoff) of a pass.

The oracle is diffusers' own SDXLCFGCutoffCallback / SDXLControlnetCFGCutoffCallback on its SDXL pipelines,
and the number of UNet rows a user would count per step.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from adapters.identity import CharacterReferenceError
from conftest import generators
from engine import GenerationRequest
from engine.request_types import CharacterReference, ControlUnit, Reference, T2IAdapterUnit
from test_character_reference import analyzers, char_engine, store, weights  # noqa: F401 (fixtures)
from test_controlnet import _control_map, loaded_controlnets  # noqa: F401 (a fixture)
from test_host_syncs import every_adapter  # noqa: F401 (a fixture)
from test_parity import TOLERANCE, _diffusers_scheduler, _max_diff
from test_references import ip_root  # noqa: F401 (a fixture)
from test_t2i_adapter import t2i_dirs  # noqa: F401 (a fixture)

PROMPT = "a robot in a field"


def _request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, width=64, height=64, steps=10, guidance_scale=5.0, scheduler="euler", seed=3)
    return GenerationRequest(**{**base, **fields})


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8))


def unet_rows(engine, request: GenerationRequest) -> list[int]:
    """The batch rows of every UNet call while `request` runs (observed with a forward pre-hook)."""
    rows: list[int] = []
    handle = engine.pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        engine.generate(request)
    finally:
        handle.remove()
    return rows


def test_the_steps_after_the_cutoff_run_the_unet_on_half_the_rows(engine):
    # 0.4 of 10 steps: diffusers' callback cuts after step int(10 x 0.4) = 4, so steps 0-4 are guided.
    assert unet_rows(engine, _request(guidance_cutoff=0.4)) == [2] * 5 + [1] * 5
    assert unet_rows(engine, _request(guidance_cutoff=0.4, num_images=3)) == [6] * 5 + [3] * 5
    assert unet_rows(engine, _request(guidance_cutoff=0.0, steps=4)) == [2] + [1] * 3
    assert unet_rows(engine, _request(steps=4)) == [2] * 4  # no cutoff: every step guided
    # 0.7 of 20 is 14 exactly (in binary 0.7 * 20 is 13.999999999999998, which would cut a step early).
    assert unet_rows(engine, _request(guidance_cutoff=0.7, steps=20)) == [2] * 15 + [1] * 5


@pytest.mark.parametrize("scheduler, cutoff, seed", [("euler", 0.4, 0), ("dpmpp_2m_karras", 0.5, 1), ("ddim", 0.2, 2)])
def test_matches_diffusers_sdxl_pipeline_with_its_cfg_cutoff_callback(engine, reference_pipe, tiny_model_dir, scheduler, cutoff, seed):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    ours = engine.generate(_request(scheduler=scheduler, guidance_cutoff=cutoff, seed=seed)).pixels
    reference_pipe.scheduler = _diffusers_scheduler(scheduler, tiny_model_dir)
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=cutoff)
    theirs = reference_pipe(prompt=PROMPT, width=64, height=64, num_inference_steps=10, guidance_scale=5.0,
                            generator=generators(seed, 1), output_type="np", callback_on_step_end=callback,
                            callback_on_step_end_tensor_inputs=callback.tensor_inputs).images
    assert _max_diff(ours, theirs) <= TOLERANCE
    assert _max_diff(ours, engine.generate(_request(scheduler=scheduler, seed=seed)).pixels) > TOLERANCE  # told apart from full guidance


def test_matches_diffusers_controlnet_pipeline_with_its_cfg_cutoff_callback(control_engine, reference_pipe, loaded_controlnets,  # noqa: F811
                                                                            tiny_model_dir):
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.callbacks import SDXLControlnetCFGCutoffCallback

    control = _control_map(64, 64, 5)
    unit = ControlUnit(type="canny", image=control, preprocess=False, weight=0.8)
    ours = control_engine.generate(_request(controlnets=[unit], guidance_cutoff=0.4)).pixels
    pipe = StableDiffusionXLControlNetPipeline(**reference_pipe.components, controlnet=loaded_controlnets["canny"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    callback = SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.4)
    theirs = pipe(prompt=PROMPT, image=control, width=64, height=64, num_inference_steps=10, guidance_scale=5.0,
                  controlnet_conditioning_scale=0.8, generator=generators(3, 1), output_type="np",
                  callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs).images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_works_with_every_adapter_and_inpainting_at_once(every_adapter):  # noqa: F811
    units = dict(controlnets=[ControlUnit(type="canny", image=_picture(2), preprocess=False)],
                 t2i_adapters=[T2IAdapterUnit(type="depth", image=_picture(3), preprocess=False)],
                 references=[Reference(kind="style", image=_picture(4)), Reference(kind="content", image=_picture(6))],
                 init_image=_picture(1), mask_image=Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16), mode="L"),
                 num_images=2, steps=4)
    full = every_adapter.generate(_request(**units))
    cut = every_adapter.generate(_request(guidance_cutoff=0.25, **units))
    assert np.isfinite(cut.pixels).all() and _max_diff(full.pixels, cut.pixels) > 0


def test_is_recorded_and_replayed(engine, tmp_path):
    result = engine.generate(_request(guidance_cutoff=0.3, steps=4))
    assert result.metadata[0]["resolved"]["guidance_cutoff"] == 0.3
    path = result.save(tmp_path)[0]
    assert _max_diff(engine.replay(path).pixels, result.pixels) == 0.0


def test_faceid_refuses_a_cutoff_with_a_clear_error(char_engine, astronaut):  # noqa: F811
    with pytest.raises(CharacterReferenceError, match="instantid"):
        char_engine.generate(_request(guidance_cutoff=0.5, character=CharacterReference(images=[astronaut], adapter="faceid")))
    char_engine.generate(_request(guidance_cutoff=0.5, steps=3, character=CharacterReference(images=[astronaut])))  # InstantID works


@pytest.mark.parametrize("cutoff", [-0.1, 1.0, 1.5])
def test_a_cutoff_outside_0_to_1_is_refused(cutoff):
    with pytest.raises(ValidationError, match="guidance_cutoff"):
        _request(guidance_cutoff=cutoff)
