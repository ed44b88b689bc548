"""No host reads inside the denoising loop: on a GPU each read of a tensor's value by Python waits for every
kernel queued so far, so the host could never run ahead of the device.

On CPU a read cannot be timed, but it can be counted: for one generation, torch's value-reading methods are
wrapped by counters (a measurement in this test; nothing in refgen is patched) that note each read made while
`engine.sampling.denoise` is on the stack, in the bucket of its step (the step callback closes each bucket),
with the file that made it. Measured before this change, per step (diffusers 0.42): euler 3, ddim 3, pndm 2,
lms 58+, every other scheduler 1 (the callback's float(timestep)), plus 2 at step 0 for each scheduler that
searched for its first step (index_for_timestep's nonzero and item), and more in inpainting's add_noise.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.controlnet import ControlNetLibrary
from adapters.ip_adapter import IPAdapters
from adapters.t2i_adapter import T2IAdapterLibrary
from conftest import generators
from engine import Engine, GenerationRequest, T2IAdapterUnit
from engine import sampling
from engine.compose import default_adapters
from engine.conditioning import Guidance, encode_text
from engine.request_types import ControlUnit, Reference
from engine.schedulers import SCHEDULERS, build_scheduler
from test_inpaint import inpaint_engine, inpaint_unet_dir  # noqa: F401 (fixtures)
from test_references import ip_root  # noqa: F401 (a fixture)
from test_t2i_adapter import t2i_dirs  # noqa: F401 (a fixture)

READS = ("item", "tolist", "nonzero", "numpy", "__float__", "__int__", "__bool__", "__index__")
OURS = ("engine", "adapters", "schedulers", "tests")  # folders whose frames are named as the reader
CPU, FP32 = torch.device("cpu"), torch.float32

# Reads that diffusers' own step makes, per scheduler, on the sigmas it keeps on the CPU by design
# (`self.sigmas.to("cpu")`): Python reads of host memory, not waits for the device. Measured on diffusers 0.42.
# euler: 2 per step, its churn window `s_tmin <= sigma <= s_tmax`; lms: a varying number (8 to 90 here) per
# step, scipy.integrate.quad over its sigmas for the multistep coefficients. Every other scheduler: none.
SCHEDULER_READS = {"euler": ("scheduling_euler_discrete.py", 2), "lms": ("scheduling_lms_discrete.py", None)}


class StepReads:
    """Reads made inside the loop: `log` of (step, file, method), the step being that of the next callback."""

    def __init__(self):
        self.step = 0
        self.log: list[tuple[int, str, str]] = []

    def read(self, method: str) -> None:
        frame, reader = sys._getframe(2), None
        while frame is not None and frame.f_code is not sampling.denoise.__code__:
            path = Path(frame.f_code.co_filename)
            reader = reader or (path.name if path.parent.name in OURS else None)
            frame = frame.f_back
        if frame is not None:
            self.log.append((self.step, reader or "sampling.py", method))

    def on_step(self, info) -> None:
        self.step += 1

    def in_steps(self) -> list[tuple[int, str, str]]:
        """Every read but the one the loop makes before its first step: the timesteps to the host."""
        assert self.log[0] == (0, "sampling.py", "tolist"), self.log[:3]
        return self.log[1:]


@contextmanager
def counting(reads: StepReads, owner=torch.Tensor, names=READS):
    """`owner`'s functions `names` (torch.Tensor's value reads unless told) report to `reads` while the block runs."""
    originals = {name: getattr(owner, name) for name in names}

    def counted(name):
        def wrapper(*args, **kwargs):
            reads.read(name)
            return originals[name](*args, **kwargs)
        return wrapper

    try:
        for name in names:
            setattr(owner, name, counted(name))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


def measure(engine, request: GenerationRequest, callback: bool = True, **what) -> StepReads:
    reads = StepReads()
    with counting(reads, **what):
        engine.generate(request, on_step=reads.on_step if callback else None)
    return reads


def assert_only_documented_reads(reads: StepReads, scheduler: str) -> None:
    """No read in any step but the scheduler's own documented ones, that many in every step."""
    in_steps = reads.in_steps()
    reader, per_step = SCHEDULER_READS.get(scheduler, (None, 0))
    assert {file for _, file, _ in in_steps} <= {reader}, in_steps[:5]
    counts = [sum(1 for step, _, _ in in_steps if step == k) for k in range(reads.step + 1)]
    assert counts[-1] == 0 and (per_step is None or counts[:-1] == [per_step] * reads.step), counts


def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a lantern", width=64, height=64, steps=3, guidance_scale=5.0, seed=4)
    return GenerationRequest(**{**base, **fields})


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8))


def _mask() -> Image.Image:
    canvas = np.zeros((64, 64), np.uint8)
    canvas[16:48, 16:48] = 255
    return Image.fromarray(canvas, mode="L")


@pytest.fixture(scope="module")
def every_adapter(tiny_model_dir, controlnet_dirs, t2i_dirs, ip_root):  # noqa: F811
    """The tiny model with tiny ControlNets, T2I-Adapters and IP-Adapter."""
    adapters = partial(default_adapters, controlnets=ControlNetLibrary(CPU, FP32, controlnet_dirs),
                       t2i_adapters=T2IAdapterLibrary(CPU, FP32, t2i_dirs))
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32",
                       adapters=lambda setup: adapters(setup, ip_adapters=IPAdapters(setup.pipe, CPU, FP32, reference=ip_root)))


def _guided(**fields) -> GenerationRequest:
    """A ControlNet (windowed), a T2I-Adapter, a Style Reference and a mask over an init image, all at once."""
    units = dict(controlnets=[ControlUnit(type="canny", image=_picture(2), preprocess=False, start=0.2, end=0.8)],
                 t2i_adapters=[T2IAdapterUnit(type="depth", image=_picture(3), preprocess=False, end=0.6)],
                 references=[Reference(kind="style", image=_picture(4))])
    return _request(init_image=_picture(1), mask_image=_mask(), **{**units, **fields})


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_no_scheduler_reads_the_host_in_a_step(engine, scheduler):
    reads = measure(engine, _request(scheduler=scheduler, num_images=2))
    assert_only_documented_reads(reads, scheduler)


@pytest.mark.parametrize("init_strength", [None, 0.5])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_with_every_adapter_and_inpainting_no_step_reads_the_host(every_adapter, scheduler, init_strength):
    """From noise and from the init image (6 steps at 0.5: the last 3 run), the known region re-noised after each."""
    steps = 3 if init_strength is None else 6
    reads = measure(every_adapter, _guided(scheduler=scheduler, steps=steps, init_strength=init_strength, num_images=2))
    assert reads.step >= 3
    assert_only_documented_reads(reads, scheduler)


@pytest.mark.parametrize("callback", [False, True])
@pytest.mark.parametrize("scheduler", ["euler_a", "ddim", "dpmpp_2m_sde_karras"])
def test_only_the_timesteps_are_read_with_or_without_a_callback_and_with_an_inpainting_unet(
        every_adapter, inpaint_engine, scheduler, callback):  # noqa: F811
    for engine, request in ((every_adapter, _guided(scheduler=scheduler)),
                            (inpaint_engine, _request(scheduler=scheduler, init_image=_picture(1), mask_image=_mask()))):
        reads = measure(engine, request, callback)
        assert reads.log == [(0, "sampling.py", "tolist")] and reads.step == (3 if callback else 0)


class Reading(Guidance):
    """A contribution that reads its timestep on the host, as the loop's callback once did."""

    def unet_kwargs(self, latent_input, timestep, step, total, cond) -> dict:
        float(timestep)
        return {}


def test_the_counter_sees_a_read_in_a_step(engine):
    scheduler = build_scheduler("ddim", engine.pipe.scheduler.config)
    timesteps = sampling.schedule(scheduler, 3, 1.0, CPU)
    cond = replace(encode_text(engine.pipe, "a lantern", None, 1, 64, 64, 5.0, CPU), contributions=(Reading(),))
    reads = StepReads()
    with counting(reads):
        sampling.denoise(engine.pipe.unet, scheduler, torch.zeros(1, 4, 8, 8), timesteps, cond, generators(0, 1), reads.on_step)
    assert reads.in_steps() == [(step, "test_host_syncs.py", "__float__") for step in range(3)]


@pytest.mark.parametrize("scheduler, drawn_in_steps_by", [("dpmpp_2m_sde_karras", None), ("euler_a", "scheduling_euler_ancestral_discrete.py")])
def test_sde_noise_is_drawn_before_the_loop(engine, scheduler, drawn_in_steps_by):
    """On a GPU a step's own draw on the CPU generators is copied to the device, a wait, in every step. Diffusers'
    SDE DPM-Solver step takes its noise drawn in advance; its Euler a step takes none, so it still draws (documented)."""
    reads = measure(engine, _request(scheduler=scheduler, num_images=2), owner=torch, names=("randn",))
    before = [entry for entry in reads.log if entry[0] == 0 and entry[1] == "sampling.py"]
    in_steps = [entry for entry in reads.log if entry not in before]
    assert len(before) == (2 * 3 if drawn_in_steps_by is None else 0)
    assert {file for _, file, _ in in_steps} == ({drawn_in_steps_by} if drawn_in_steps_by else set())
