"""The Engine: one loaded model, and request -> conditioning -> one loop -> images with provenance.

Every kind of guidance is an adapter (engine/adapter.py) in the list the Engine is given (default:
engine/compose.py); the Engine loops over them and never asks which one it has.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from . import compose
from . import vae as vae_ops
from .adapter import Adapter, Context, Frame, Prepared, patched
from .conditioning import Conditioning, encode_text, is_guided
from .devices import pick_device
from .images import load_rgb
from .loading import ModelInfo, configure_attention, fp16_safe_vae, load_inpaint_unet, load_pipeline
from .lora import LoraPatch, LoraSet
from .provenance import (build_metadata, device_record, image_record, model_record, package_versions, read_metadata,
                         replay_input, request_record, save_png, scheduler_record)
from .refine import refine, upscale, upscalers_used
from .request import GenerationRequest, ResolvedRequest, resolve
from .sampling import Start, StepCallback, denoise, schedule
from .schedulers import build_scheduler
from .speed import Speed, apply_speed, prepare_unet, speed_for

log = logging.getLogger("refgen")


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    metadata: list[dict]
    pixels: np.ndarray  # (N, H, W, 3) float32 in [0, 1], before 8-bit rounding

    def pick(self, index: int) -> "GenerationResult":
        return self.reordered([index])

    def reordered(self, order: list[int]) -> "GenerationResult":
        """These images, in this order."""
        return GenerationResult([self.images[i] for i in order], [self.seeds[i] for i in order],
                                [self.metadata[i] for i in order], self.pixels[order])

    def save(self, folder: Union[str, Path], stem: Optional[str] = None) -> list[Path]:
        """Write each image as a PNG with its provenance; returns the paths."""
        folder = Path(folder)
        stem = stem or datetime.now().strftime("%Y%m%d-%H%M%S")
        return [save_png(image, meta, _free_name(folder / f"{stem}-seed{seed}.png"))
                for image, seed, meta in zip(self.images, self.seeds, self.metadata)]


def _free_name(path: Path) -> Path:
    candidate, counter = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


@dataclass(frozen=True)
class _Job:
    """One resolved generation with its inputs loaded and its adapters prepared."""

    resolved: ResolvedRequest
    request: dict  # the request as given, for provenance
    init_image: Optional[Image.Image]
    init_info: Optional[dict]
    prepared: tuple[Prepared, ...]
    on_step: Optional[StepCallback] = field(default=None, compare=False)


class Engine:
    """One loaded SDXL model. Not thread-safe: use one Engine per worker."""

    def __init__(self, pipe, model: ModelInfo, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, *,
                 adapters: Optional[Sequence[Adapter]] = None, manifest=None, weights_dir: Optional[Path] = None,
                 speed: Optional[Speed] = None):
        """`adapters`: every kind of guidance this engine serves (default: engine/compose.py's list).
        `manifest` / `weights_dir`: where components named by reference are looked up (default
        weights/manifest.toml and the weights folder). `speed`: what Engine.load did to the models (apply_speed)."""
        self.pipe, self.model, self.device, self.dtype, self.speed = pipe, model, device, dtype, speed or Speed()
        setup = compose.Setup(pipe, device, dtype, allow_pickle, manifest, weights_dir, self.speed)
        self.adapters = tuple(compose.default_adapters(setup) if adapters is None else adapters)
        self.inpaint_unet = None  # a 9-channel SDXL inpainting UNet, see load_inpaint_unet
        self._sources = {"manifest": manifest, "weights_dir": weights_dir}
        self._load_upscaler = compose.upscaler_loader(setup)
        self._upscalers: dict = {}  # ESRGAN models by reference, for upscale= and ultra mode
        self._loras = LoraSet(pipe, allow_pickle)
        if model.notice:
            log.warning(model.notice)

    @classmethod
    def load(cls, model: str = "sdxl-base", device: Optional[str] = None, dtype: Union[str, torch.dtype, None] = None, *,
             allow_pickle: bool = False, attention: str = "auto", speed: Union[str, Speed] = "eager",
             quantize: Optional[str] = None, offload: bool = False,
             vae_tiling: bool = False, single_file_config: Optional[Path] = None, ip_adapter: str = "vit-h",
             controlnets: Optional[dict[str, Union[str, Path]]] = None,
             adapters: Optional[Callable[[compose.Setup], Sequence[Adapter]]] = None) -> "Engine":
        """Load a model by manifest name, folder, cached repo id, single file or `tiny`.

        attention: auto | sdpa | xformers.
        speed: eager | compiled | max (engine/speed.py): compiled runs the UNet, VAE decoder and ControlNets through
        torch.compile (the first request of each size, batch and adapter set compiles, see Engine.warm_up); max
        adds fused QKV projections. quantize: "int8" (CPU and CUDA) or "fp8" (CUDA, Ada/Hopper) Linear layers in the
        UNet through torchao (`pip install 'refgen[fast]'`; changes the image slightly, see engine/quantize.py).
        offload: keep weights on the CPU and move each model to the GPU only while it runs (small GPUs).
        vae_tiling: VAE in tiles and one image at a time (large images or batches on small GPUs).
        ip_adapter: the IP-Adapter for Style/Content Reference: "vit-h" or "plus" (stronger likeness).
        controlnets: your own ControlNets by control type, {"canny": "path/to/folder"} (diffusers folders,
        single-type or ControlNet-Union); checked before the model loads (ControlNetFolderError).
        adapters: builds the adapter list from the loaded model (default engine.compose.default_adapters,
        with `ip_adapter` and `controlnets`).

        With `tiny`, every other component (ControlNets, upscalers, IP-Adapters, face packs, preprocessors)
        is a tiny random stand-in too, built on first use in the cache folder: nothing is ever downloaded.
        """
        if adapters is not None and (controlnets or ip_adapter != "vit-h"):
            raise ValueError("controlnets= and ip_adapter= configure the default adapters: with adapters=, configure yours")
        device, dtype = pick_device(device, dtype)
        plan = speed_for(speed, device, offload, quantize)
        sources = compose.component_sources(str(model))
        build = adapters or compose.defaults(device, dtype, ip_adapter=ip_adapter, controlnets=controlnets, speed=plan, **sources)
        pipe, info = load_pipeline(str(model), dtype, allow_pickle, single_file_config)
        safe_vae, vae_name = fp16_safe_vae(dtype) if info.kind != "tiny" else (None, None)
        if safe_vae is not None:
            pipe.vae = safe_vae
            info = replace(info, vae=vae_name)
        if offload and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        configure_attention(pipe, attention, device)
        if vae_tiling:  # large images / small GPUs: tiles, and one image of the batch at a time
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        vae_ops.keep_in_work_dtype(pipe.vae)
        apply_speed(pipe, plan)
        pipe.set_progress_bar_config(disable=True)
        setup = compose.Setup(pipe, device, dtype, allow_pickle, speed=plan, **sources)
        return cls(pipe, info, device, dtype, allow_pickle, adapters=build(setup), speed=plan, **sources)

    def load_inpaint_unet(self, reference: Union[str, Path]) -> None:
        """Use an SDXL inpainting UNet (9 input channels) for masked requests: a manifest name
        (`sdxl-inpainting`), a diffusers model folder with unet/, or a UNet folder."""
        self.inpaint_unet = prepare_unet(load_inpaint_unet(reference, self.device, self.dtype, **self._sources), self.speed)

    def adapter(self, kind: type):
        """The first of this engine's adapters of this class (tests and tools look inside one)."""
        for adapter in self.adapters:
            if isinstance(adapter, kind):
                return adapter
        raise LookupError(f"this engine has no {kind.__name__} adapter")

    @property
    def native_size(self) -> int:
        """The model's native square side in pixels (1024 for SDXL)."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def generate(self, request: GenerationRequest, on_step: Optional[StepCallback] = None) -> GenerationResult:
        init_image = None if request.init_image is None else load_rgb(request.init_image, "init image")
        ctx = self._context(init_image)
        prepared = tuple(p for adapter in self.adapters if (p := adapter.prepare(request, ctx)) is not None)
        resolved = resolve(request, self.native_size, init_image.size if init_image else None, prepared)
        init_info = image_record(request.init_image, init_image)
        return self._run(_Job(resolved, request_record(request), init_image, init_info, prepared, on_step))

    def replay(self, image_path: Union[str, Path], init_image: Optional[Union[str, Path]] = None) -> GenerationResult:
        """Regenerate a refgen PNG from its metadata (bit-identical on the same device and dtype).

        The whole batch the image came from is re-run, so batched numerics match exactly.
        """
        meta = read_metadata(Path(image_path))
        resolved = ResolvedRequest(**meta["resolved"])
        init, init_info = None, meta.get("init_image")
        if init_info is not None:
            init, init_info = replay_input(init_info, "init image", init_image)
        ctx = self._context(init)
        prepared = tuple(p for adapter in self.adapters if (p := adapter.replay(resolved, ctx)) is not None)
        result = self._run(_Job(resolved, meta["request"], init, init_info, prepared))
        return result.pick(next(i for i, m in enumerate(result.metadata) if m["image"]["index"] == meta["image"]["index"]))

    def _context(self, init_image: Optional[Image.Image]) -> Context:
        return Context(self.pipe, self.device, self.dtype, self._loras, self.inpaint_unet, init_image)

    # -- the path of one request -------------------------------------------------------------

    def warm_up(self, *requests: GenerationRequest) -> float:
        """Run these requests once and drop the images, so that a compiled engine has its graphs for their sizes,
        batches, guidance on/off and adapter sets before the first real request. Returns the seconds it took."""
        started = time.perf_counter()
        for request in requests:
            self.generate(request)
        return time.perf_counter() - started

    def _run(self, job: _Job) -> GenerationResult:
        with self.speed.compiling():
            return self._run_job(job)

    def _run_job(self, job: _Job) -> GenerationResult:
        resolved = job.resolved
        batch, guided = len(resolved.seeds), is_guided(self.pipe.unet, resolved.guidance_scale)
        frame = Frame(resolved.width, resolved.height, batch, guided)
        loras = self._loras.identities(resolved.loras)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in resolved.seeds]
        with patched(job.prepared, frame, (self._loras, LoraPatch(tuple(resolved.loras)))) as model_guidance:
            cond = encode_text(self.pipe, resolved.prompt, resolved.negative_prompt, batch, resolved.width,
                               resolved.height, resolved.guidance_scale, self.device)
            cond = replace(cond, contributions=model_guidance, guidance_cutoff=resolved.guidance_cutoff)  # any size
            init = None if job.init_image is None else vae_ops.pil_to_tensor([vae_ops.cover(job.init_image, frame.width, frame.height)])
            latents = self._pass(job, cond, frame, generators, init, resolved.denoise, "base")
            pixels = vae_ops.decode(self.pipe.vae, latents)
            for part in job.prepared:
                pixels = part.decoded(pixels)
            if resolved.refine_scale != 1.0:
                run = lambda part, whole: self._refine_pass(job, cond, frame, generators, part, whole)  # noqa: E731
                pixels = refine(pixels, resolved, self.native_size, self.pipe.vae_scale_factor, self._upscaler, run)
        if resolved.upscale:
            pixels = upscale(pixels, resolved, self._upscaler)
        shared = dict(  # the same for every image of the request: built once
            request=job.request, resolved=resolved.model_dump(mode="json"), size=(pixels.shape[2], pixels.shape[1]),
            model={**model_record(self.model), "upscalers": {ref: self._upscalers[ref].info.sha256 for ref in upscalers_used(resolved)}},
            loras=loras, init_image=job.init_info, scheduler=scheduler_record(resolved.scheduler, self.pipe.scheduler.config),
            device=device_record(self.device, self.dtype, self.speed.name, self.speed.quantize), versions=package_versions(),
        )
        # Each image gets its own copy, so editing one image's metadata never changes another's.
        metadata = [build_metadata(index=index, **copy.deepcopy(shared)) for index in range(batch)]
        result = GenerationResult(vae_ops.pixels_to_pil(pixels), list(resolved.seeds), metadata, pixels)
        for part in job.prepared:
            result = part.finish(result, resolved)
        return result

    def _pass(self, job: _Job, cond: Conditioning, frame: Frame, generators, pixels, strength: float, phase: str):
        """One run of the loop at the frame's size, from noise or from `pixels`; the base pass lets adapters pick
        the UNet and the start (inpainting)."""
        scheduler = build_scheduler(job.resolved.scheduler, self.pipe.scheduler.config)
        timesteps = schedule(scheduler, job.resolved.steps, strength, self.device)
        base = phase == "base"
        unet = self.pipe.unet
        for part in job.prepared if base else ():
            unet = part.unet(unet)
        start = Start(self.pipe, unet, scheduler, timesteps, generators, frame.width, frame.height, strength, frame.guided,
                      self.device, self.dtype, pixels)
        owned = next((s for part in job.prepared if base and (s := part.start(start)) is not None), None)
        latents = start.latents() if owned is None else owned[0]
        contributions = cond.contributions + tuple(g for part in job.prepared for g in part.guidance(frame))
        cond = replace(cond, contributions=contributions + (() if owned is None else (owned[1],)))
        callback = None if job.on_step is None else (lambda info: job.on_step(replace(info, phase=phase)))
        return denoise(unet, scheduler, latents, timesteps, cond, generators, callback)

    def _refine_pass(self, job: _Job, cond: Conditioning, frame: Frame, generators, pixels: torch.Tensor, whole: bool) -> np.ndarray:
        size = replace(frame, width=pixels.shape[3], height=pixels.shape[2], whole=whole)
        latents = self._pass(job, cond.at_size(size.width, size.height), size, generators, pixels, job.resolved.refine_denoise, "refine")
        return vae_ops.decode(self.pipe.vae, latents)

    def _upscaler(self, reference: str):
        """An ESRGAN upscaler, loaded once per engine (its weights are small)."""
        if reference not in self._upscalers:
            self._upscalers[reference] = self._load_upscaler(reference)
        return self._upscalers[reference]

