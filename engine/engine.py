"""The Engine: one loaded model, and request -> conditioning -> one loop -> images with provenance."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from adapters import inpaint
from adapters.controlnet import ControlNetLibrary, build_guidance
from .request_types import ControlUnit
from adapters.identity import Identity, IdentityAdapters, ranking
from .request_types import CharacterReference
from adapters.ip_adapter import IPAdapters
from .request_types import Reference
from adapters.preprocess import Preprocessors, is_preprocessed
from adapters.upscale import Upscaler

from . import paths
from . import vae as vae_ops
from .conditioning import Conditioning, encode_text, is_guided
from .errors import ProvenanceError
from .hashing import sha256_file
from .images import load_rgb
from .loading import ModelInfo, fp16_safe_vae, load_pipeline
from .devices import pick_device
from .lora import LoraSet
from .provenance import build_metadata, package_versions, read_metadata, save_png
from .request import GenerationRequest, ResolvedRequest, resolve
from .sampling import StepCallback, denoise, initial_noise, schedule
from .tiling import blend_tiles
from .tiny.components import components_dir, components_manifest
from .schedulers import SCHEDULERS, build_scheduler

log = logging.getLogger("refgen")

@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    metadata: list[dict]
    pixels: np.ndarray  # (N, H, W, 3) float32 in [0, 1], before 8-bit rounding

    def pick(self, index: int) -> "GenerationResult":
        return GenerationResult([self.images[index]], [self.seeds[index]], [self.metadata[index]], self.pixels[index : index + 1])

    def save(self, folder: Union[str, Path], stem: Optional[str] = None) -> list[Path]:
        """Write each image as a PNG with its provenance; returns the paths."""
        folder = Path(folder)
        stem = stem or datetime.now().strftime("%Y%m%d-%H%M%S")
        saved = []
        for image, seed, meta in zip(self.images, self.seeds, self.metadata):
            path = _free_name(folder / f"{stem}-seed{seed}.png")
            saved.append(save_png(image, meta, path))
        return saved


def _free_name(path: Path) -> Path:
    candidate, counter = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


@dataclass(frozen=True)
class _Job:
    """One resolved generation with its inputs loaded."""

    resolved: ResolvedRequest
    request: dict
    init_image: Optional[Image.Image] = None
    init_info: Optional[dict] = None
    control_units: tuple[ControlUnit, ...] = ()  # with their prepared (preprocessed) control images
    mask: Optional[Image.Image] = None  # inpainting, same size as init_image
    references: tuple[Reference, ...] = ()  # style/content references with their images loaded
    character: Optional[tuple[CharacterReference, Identity]] = None  # Character Reference and its identity
    on_step: Optional[StepCallback] = field(default=None, compare=False)

    @property
    def steering_character(self) -> Optional[tuple[CharacterReference, Identity]]:
        """The character when it steers the image: at weight 0 it adds nothing (outputs are still scored)."""
        return self.character if self.character is not None and self.character[0].scale > 0 else None


class Engine:
    """One loaded SDXL model. Not thread-safe: use one Engine per worker."""

    def __init__(self, pipe, model: ModelInfo, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False,
                 ip_adapter: str = "vit-h", *, controlnets: Optional[ControlNetLibrary] = None, manifest=None,
                 weights_dir: Optional[Path] = None):
        """`manifest` / `weights_dir`: where adapters look up the components they name (ControlNets, upscalers,
        IP-Adapters, face packs, preprocessors); default weights/manifest.toml and the weights folder."""
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype
        self._manifest, self._weights_dir = manifest, weights_dir
        self.controlnets = controlnets or ControlNetLibrary(device, dtype, manifest=manifest, weights_dir=weights_dir)
        self.preprocessors = Preprocessors(weights_dir, device=device, manifest=manifest,
                                           allow_pickle=allow_pickle)  # photo -> control image, cached
        self.inpaint_unet = None  # a 9-channel SDXL inpainting UNet, see load_inpaint_unet
        self._upscalers: dict = {}  # ESRGAN models by reference, for upscale= and ultra mode
        self.ip_adapters = IPAdapters(pipe, device, dtype, variant=ip_adapter, allow_pickle=allow_pickle,
                                      manifest=manifest, weights_dir=weights_dir)
        self.identity = IdentityAdapters(self.ip_adapters, device, dtype, manifest=manifest,
                                         weights_dir=weights_dir)  # Character Reference
        self._loras = LoraSet(pipe, allow_pickle)
        if model.notice:
            log.warning(model.notice)

    @classmethod
    def load(
        cls,
        model: str = "sdxl-base",
        device: Optional[str] = None,
        dtype: Union[str, torch.dtype, None] = None,
        *,
        allow_pickle: bool = False,
        attention: str = "auto",
        compile: bool = False,
        offload: bool = False,
        vae_tiling: bool = False,
        single_file_config: Optional[Path] = None,
        ip_adapter: str = "vit-h",
        controlnets: Optional[dict[str, Union[str, Path]]] = None,
    ) -> "Engine":
        """Load a model by manifest name, folder, cached repo id, single file or `tiny`.

        attention: auto | sdpa | xformers. compile: torch.compile the UNet (slow first call).
        offload: keep weights on the CPU and move each model to the GPU only while it runs (small GPUs).
        vae_tiling: VAE in tiles and one image at a time (large images or batches on small GPUs).
        ip_adapter: the IP-Adapter for Style/Content Reference: "vit-h" or "plus" (stronger likeness).
        controlnets: your own ControlNets by control type, {"canny": "path/to/folder"} (diffusers folders,
        single-type or ControlNet-Union); checked before the model loads (ControlNetFolderError).

        With `tiny`, every other component (ControlNets, upscalers, IP-Adapters, face packs, preprocessors)
        is a tiny random stand-in too, built on first use in the cache folder: nothing is ever downloaded.
        """
        device, dtype = pick_device(device, dtype)
        sources = _component_sources(str(model))
        library = ControlNetLibrary(device, dtype, dict(controlnets or {}), **sources)
        pipe, info = load_pipeline(str(model), dtype, allow_pickle, single_file_config)
        safe_vae, vae_name = fp16_safe_vae(dtype) if info.kind != "tiny" else (None, None)
        if safe_vae is not None:
            pipe.vae = safe_vae
            info = replace(info, vae=vae_name)
        if offload and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        _configure_attention(pipe, attention, device)
        if vae_tiling:  # large images / small GPUs: tiles, and one image of the batch at a time
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        if compile:
            pipe.unet.compile(mode="max-autotune-no-cudagraphs")
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, info, device, dtype, allow_pickle, ip_adapter, controlnets=library, **sources)

    def load_inpaint_unet(self, reference: Union[str, Path]) -> None:
        """Use an SDXL inpainting UNet (9 input channels) for masked requests: a manifest name
        (`sdxl-inpainting`), a diffusers model folder with unet/, or a UNet folder."""
        from diffusers import UNet2DConditionModel

        from . import weights

        folder = Path(reference).expanduser()
        if not folder.is_dir():
            folder = weights.require(str(reference), self._weights_dir, self._manifest)
        subfolder = "unet" if (folder / "unet").is_dir() else None
        variant = "fp16" if any((folder / (subfolder or "")).glob("*.fp16.safetensors")) else None
        unet = UNet2DConditionModel.from_pretrained(
            str(folder), subfolder=subfolder, variant=variant, dtype=self.dtype, use_safetensors=True, local_files_only=True
        )
        if unet.config.in_channels != inpaint.INPAINT_CHANNELS:
            raise ValueError(f"{reference} is not an inpainting UNet: it has {unet.config.in_channels} input channels, not 9")
        self.inpaint_unet = unet.to(self.device).eval()

    @property
    def native_size(self) -> int:
        """The model's native square side in pixels (1024 for SDXL)."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def generate(self, request: GenerationRequest, on_step: Optional[StepCallback] = None) -> GenerationResult:
        init_image = None
        if request.init_image is not None:
            init_image = load_rgb(request.init_image, "init image")
        resolved = resolve(request, self.native_size, init_image.size if init_image else None)
        mask = None
        if request.mask_image is not None:  # checked before any slow preprocessing
            mask = load_rgb(request.mask_image, "mask").convert("L")
            inpaint.check_mask_size(mask, init_image)
            resolved = resolved.model_copy(update={"mask_image": _image_identity(request.mask_image, mask)})
        sources = [load_rgb(unit.image, f"control image {i + 1} ({unit.type})") for i, unit in enumerate(request.controlnets)]
        records = [_input_record(unit, _image_identity(unit.image, image)) for unit, image in zip(request.controlnets, sources)]
        resolved = resolved.model_copy(update={"controlnets": records})
        units = self._prepare_controls(request.controlnets, sources)
        pictures = [load_rgb(ref.image, f"{ref.kind} reference {i + 1}") for i, ref in enumerate(request.references)]
        resolved = resolved.model_copy(update={"references": [
            _input_record(ref, _image_identity(ref.image, picture)) for ref, picture in zip(request.references, pictures)
        ]})
        references = tuple(ref.model_copy(update={"image": picture}) for ref, picture in zip(request.references, pictures))
        character = None
        if request.character is not None:
            character, record = self._character(request.character)
            resolved = resolved.model_copy(update={"character": record, "prompt": _with_anchor(character[1].anchor, resolved.prompt)})
        init_info = _image_identity(request.init_image, init_image)
        job = _Job(resolved, _request_record(request), init_image, init_info, units, mask, references, character, on_step)
        return self._run(job)

    def _character(self, ref: CharacterReference) -> tuple[tuple[CharacterReference, Identity], dict]:
        """The character's images loaded and its identity worked out; its provenance record."""
        images = [load_rgb(image, f"character image {n}") for n, image in enumerate(ref.images, 1)]
        pose = None if ref.pose_image is None else load_rgb(ref.pose_image, "pose image")
        identity = self.identity.identity(ref, images, pose)
        record = {
            **ref.model_dump(mode="json", exclude={"images", "pose_image"}),
            "images": [_image_identity(source, image) for source, image in zip(ref.images, images)],
            "pose_image": _image_identity(ref.pose_image, pose), "identity_sha256": identity.fingerprint,
            "files": self.identity.record(ref.adapter),
        }
        return (ref.model_copy(update={"images": images, "pose_image": pose}), identity), record

    def replay(self, image_path: Union[str, Path], init_image: Optional[Union[str, Path]] = None) -> GenerationResult:
        """Regenerate a refgen PNG from its metadata (bit-identical on the same device and dtype).

        The whole batch the image came from is re-run, so batched numerics match exactly.
        """
        meta = read_metadata(Path(image_path))
        resolved = ResolvedRequest(**meta["resolved"])
        init, init_info = None, meta.get("init_image")
        if init_info is not None:
            init, init_info = _replay_image(init_info, init_image, "init image")
        units, sources = [], []
        for index, record in enumerate(resolved.controlnets):
            image, _ = _replay_image(record["image"], None, f"control image {index + 1}")
            units.append(ControlUnit(**{**record, "image": image}))
            sources.append(image)
        prepared = self._prepare_controls(units, sources)
        mask = None
        if resolved.mask_image is not None:
            mask = _replay_image(resolved.mask_image, None, "mask")[0].convert("L")
        references = tuple(
            Reference(**{**record, "image": _replay_image(record["image"], None, f"{record['kind']} reference {i + 1}")[0]})
            for i, record in enumerate(resolved.references)
        )
        character = None if resolved.character is None else self._replay_character(resolved.character)
        result = self._run(_Job(resolved, meta["request"], init, init_info, prepared, mask, references, character))
        return result.pick(next(i for i, m in enumerate(result.metadata) if m["image"]["index"] == meta["image"]["index"]))

    def _replay_character(self, record: dict) -> tuple[CharacterReference, Identity]:
        images = [_replay_image(info, None, f"character image {n}")[0] for n, info in enumerate(record["images"], 1)]
        pose = None if record["pose_image"] is None else _replay_image(record["pose_image"], None, "pose image")[0]
        fields = {key: record[key] for key in CharacterReference.model_fields if key not in ("images", "pose_image")}
        ref = CharacterReference(**fields, images=images, pose_image=pose)
        identity = self.identity.identity(ref, images, pose)
        if identity.fingerprint != record["identity_sha256"]:
            raise ProvenanceError(f"character {ref.name or 'photos'!r} has changed since the image was made (its identity embedding differs)")
        return ref, identity

    def _prepare_controls(self, units, sources: list[Image.Image]) -> tuple[ControlUnit, ...]:
        """Each unit with its control image: photos go through the type's preprocessor (cached)."""
        return tuple(unit.model_copy(update={"image": self._control_image(unit, image)}) for unit, image in zip(units, sources))

    def _control_image(self, unit: ControlUnit, image: Image.Image) -> Image.Image:
        if unit.preprocess is False or (unit.preprocess == "auto" and is_preprocessed(image, unit.type)):
            return image
        return self.preprocessors.run(unit.type, image, **unit.options)

    # -- the path of one request -------------------------------------------------------------

    def _run(self, job: _Job) -> GenerationResult:
        resolved = job.resolved
        batch, guided = len(resolved.seeds), is_guided(self.pipe.unet, resolved.guidance_scale)
        character = job.steering_character
        uses = [] if character is None else self.identity.uses(*character, batch, guided)  # instance 0
        uses += self.ip_adapters.reference_uses(list(job.references), batch, guided)
        image_guidance = self.ip_adapters.apply(uses)  # before the LoRAs: loading FaceID switches its LoRA on
        keep = {} if character is None else self.identity.loras(character[0])
        lora_identities = self._loras.activate(resolved.loras, keep)
        cond = encode_text(
            self.pipe, resolved.prompt, resolved.negative_prompt, batch,
            resolved.width, resolved.height, resolved.guidance_scale, self.device,
        )
        cond = replace(cond, contributions=(image_guidance,) if image_guidance else ())  # any size
        base_cond = self._with_controls(cond, job, resolved.width, resolved.height)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in resolved.seeds]
        init_pixels, mask, init_fitted = None, None, None
        if job.init_image is not None:
            init_fitted = _fit(job.init_image, resolved.width, resolved.height)
            init_pixels = vae_ops.pil_to_tensor([init_fitted])
        if job.mask is not None:
            mask = _fit(job.mask, resolved.width, resolved.height)  # the same crop as the init image
        latents = self._sample(base_cond, resolved, generators, init_pixels, resolved.denoise, job.on_step, "base", mask)
        pixels = vae_ops.decode(self.pipe.vae, latents)
        if mask is not None:
            pixels = inpaint.composite(pixels, init_fitted, mask, resolved.mask_feather)
        if resolved.refine_scale != 1.0:
            pixels = self._refine(cond, job, generators, pixels)
        if resolved.upscale:
            pixels = self._upscale(resolved, pixels)
        shared = dict(  # the same for every image of the request: built once
            request=job.request, resolved=resolved.model_dump(mode="json"), size=(pixels.shape[2], pixels.shape[1]),
            model={**self._model_record(), "upscalers": self._upscaler_records(resolved)}, loras=lora_identities,
            init_image=job.init_info, scheduler=self._scheduler_record(resolved.scheduler), device=self._device_record(),
            versions=package_versions(),
        )
        # Each image gets its own copy, so editing one image's metadata never changes another's.
        metadata = [build_metadata(index=index, **copy.deepcopy(shared)) for index in range(len(resolved.seeds))]
        result = GenerationResult(vae_ops.pixels_to_pil(pixels), list(resolved.seeds), metadata, pixels)
        return result if job.character is None else self._scored(result, job.character, resolved.ranked)

    def _scored(self, result: GenerationResult, character: tuple[CharacterReference, Identity], ranked: bool) -> GenerationResult:
        """Every output of a character request gets its identity score ("no face" when none is found);
        best_of requests come back best first (their metadata keep their batch index for replay)."""
        ref, identity = character
        scores = self.identity.score(ref.adapter, identity, result.images)
        for meta, score in zip(result.metadata, scores):
            meta["identity_score"] = "no face" if score is None else round(score, 6)
        if not ranked:
            return result
        order = ranking(scores)
        for rank, index in enumerate(order, 1):
            result.metadata[index]["rank"] = rank
        return GenerationResult([result.images[i] for i in order], [result.seeds[i] for i in order],
                                [result.metadata[i] for i in order], result.pixels[order])

    def _sample(self, cond: Conditioning, resolved: ResolvedRequest, generators, init_pixels, denoise_strength, on_step, phase,
                mask: Optional[Image.Image] = None):
        scheduler = build_scheduler(resolved.scheduler, self.pipe.scheduler.config)
        timesteps = schedule(scheduler, resolved.steps, denoise_strength, self.device)
        batch = len(generators)
        unet = self._unet_for(mask is not None)
        callback = None if on_step is None else (lambda info: on_step(replace(info, phase=phase)))
        if mask is not None:
            latents, guidance = self._inpaint_start(unet, scheduler, timesteps, init_pixels, mask, generators, cond.guided,
                                                     from_noise=denoise_strength >= 1.0)
            cond = replace(cond, contributions=cond.contributions + (guidance,))
            return denoise(unet, scheduler, latents, timesteps, cond, generators, callback)
        if init_pixels is None:
            latents, _ = self._start_latents(scheduler, timesteps, generators, resolved.width, resolved.height)
        else:
            pixels = init_pixels.expand(batch, -1, -1, -1) if init_pixels.shape[0] == 1 else init_pixels
            clean = vae_ops.encode(self.pipe.vae, pixels, generators, self.device, self.dtype)
            latents, _ = self._start_latents(scheduler, timesteps, generators, resolved.width, resolved.height, clean)
        return denoise(unet, scheduler, latents, timesteps, cond, generators, callback)

    def _start_latents(self, scheduler, timesteps, generators, width: int, height: int, clean=None):
        """(start latents, the noise they hold): pure noise, or `clean` latents noised to the first timestep.

        Image i's noise comes from generator i alone, so image i equals a single run with its seed.
        """
        factor = self.pipe.vae_scale_factor
        shape = (len(generators), self.pipe.vae.config.latent_channels, height // factor, width // factor)
        noise = initial_noise(shape, generators, self.device, self.dtype)
        if clean is None:
            return noise * scheduler.init_noise_sigma, noise
        return scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(generators))), noise

    def _unet_for(self, inpainting: bool):
        """The inpainting UNet for masked requests when one is loaded; the model's own UNet otherwise."""
        if inpainting and self.inpaint_unet is not None:
            return self.inpaint_unet
        if self.pipe.unet.config.in_channels == inpaint.INPAINT_CHANNELS and not inpainting:
            raise ValueError("this model is an inpainting model: give an init_image and a mask_image")
        return self.pipe.unet

    def _inpaint_start(self, unet, scheduler, timesteps, init_pixels, mask: Image.Image, generators, guided: bool, from_noise: bool):
        """Start latents and the mask's guidance. Random draws per image follow diffusers' inpaint order."""
        batch = len(generators)
        pixels = init_pixels.expand(batch, -1, -1, -1)
        repaint = inpaint.mask_tensor(mask)
        factor = self.pipe.vae_scale_factor
        latent_mask = inpaint.latent_mask(repaint, pixels.shape[2] // factor, pixels.shape[3] // factor)
        latent_mask = latent_mask.repeat(batch, 1, 1, 1).to(self.device, self.dtype)
        nine_channels = unet.config.in_channels == inpaint.INPAINT_CHANNELS
        known = None if (nine_channels and from_noise) else vae_ops.encode(self.pipe.vae, pixels, generators, self.device, self.dtype)
        height, width = pixels.shape[2], pixels.shape[3]
        latents, noise = self._start_latents(scheduler, timesteps, generators, width, height, None if from_noise else known)
        if nine_channels:
            masked = vae_ops.encode(self.pipe.vae, inpaint.masked_pixels(pixels, repaint), generators, self.device, self.dtype)
            return latents, inpaint.InpaintGuidance(latent_mask, guided, masked_latents=masked)
        return latents, inpaint.InpaintGuidance(latent_mask, guided, known_latents=known, noise=noise)

    def _with_controls(self, cond: Conditioning, job: _Job, width: int, height: int) -> Conditioning:
        """The conditioning with this request's adapter contributions at the given output size."""
        batch = len(job.resolved.seeds)
        guidance = [build_guidance(self.controlnets, list(job.control_units), width, height, batch, cond.guided)]
        if job.steering_character is not None:  # InstantID's IdentityNet
            guidance.append(self.identity.control(*job.steering_character, width, height, batch, cond.guided))
        return replace(cond, contributions=cond.contributions + tuple(g for g in guidance if g is not None))

    def _refine(self, cond, job: _Job, generators, pixels: np.ndarray) -> np.ndarray:
        """Quality/ultra: upsample, then denoise lightly again so detail is added at the new size.

        Up to 1.5x the model's native size the refine is one pass (with the request's ControlNets);
        beyond it, overlapping native-size tiles are refined one after another and blended.
        """
        resolved = job.resolved
        width, height = resolved.refined_size
        if resolved.refine_upsampler == "esrgan":
            pixels = self._upscaler(resolved.upscaler or "realesrgan-x2plus").upscale_pixels(pixels)
        upsampled = _resize_pixels(pixels, width, height) * 2 - 1
        limit = int(self.native_size * 1.5)
        if max(width, height) <= limit:
            refine_cond = self._with_controls(cond.at_size(width, height), job, width, height)
            return self._refine_pass(refine_cond, resolved, generators, upsampled, job.on_step)
        tile = (min(height, self.native_size), min(width, self.native_size))
        run = lambda part: torch.from_numpy(  # noqa: E731 - one tile of the refine, as (B, 3, h, w) in [0, 1]
            self._refine_pass(cond.at_size(part.shape[3], part.shape[2]), resolved, generators, part, job.on_step)
        ).permute(0, 3, 1, 2)
        blended = blend_tiles(upsampled, tile, overlap=self.native_size // 4, run=run, align=self.pipe.vae_scale_factor)
        return blended.permute(0, 2, 3, 1).numpy()

    def _refine_pass(self, cond, resolved: ResolvedRequest, generators, pixels: torch.Tensor, on_step) -> np.ndarray:
        size = resolved.model_copy(update={"width": pixels.shape[3], "height": pixels.shape[2]})
        latents = self._sample(cond, size, generators, pixels, resolved.refine_denoise, on_step, "refine")
        return vae_ops.decode(self.pipe.vae, latents)

    def _upscaler(self, reference: str):
        """An ESRGAN upscaler, loaded once per engine (its weights are small)."""
        if reference not in self._upscalers:
            self._upscalers[reference] = Upscaler.load(reference, device=self.device, manifest=self._manifest,
                                                       weights_dir=self._weights_dir)
        return self._upscalers[reference]

    def _upscale(self, resolved: ResolvedRequest, pixels: np.ndarray) -> np.ndarray:
        """The plain `upscale=` step: ESRGAN only, resized to the exact factor when the model's differs."""
        upscaler = self._upscaler(resolved.upscaler or f"realesrgan-x{resolved.upscale}plus")
        height, width = pixels.shape[1] * resolved.upscale, pixels.shape[2] * resolved.upscale
        return _resize_pixels(upscaler.upscale_pixels(pixels), width, height).permute(0, 2, 3, 1).numpy()

    # -- provenance records ----------------------------------------------------------------

    def _upscaler_records(self, resolved: ResolvedRequest) -> dict:
        """The ESRGAN models this request used, with their hashes."""
        used = []
        if resolved.refine_upsampler == "esrgan":
            used.append(resolved.upscaler or "realesrgan-x2plus")
        if resolved.upscale:
            used.append(resolved.upscaler or f"realesrgan-x{resolved.upscale}plus")
        return {reference: self._upscalers[reference].info.sha256 for reference in used}

    def _model_record(self) -> dict:
        return {
            "reference": self.model.reference, "kind": self.model.kind, "location": self.model.location,
            "hashes": self.model.hashes, "short_hash": self.model.short_hash, "vae": self.model.vae,
        }

    def _scheduler_record(self, name: str) -> dict:
        spec = SCHEDULERS[name]
        return {"name": name, "class": spec.class_name, "options": spec.options, "base_config": _jsonable(dict(self.pipe.scheduler.config))}

    def _device_record(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"type": self.device.type, "name": name, "dtype": str(self.dtype).removeprefix("torch.")}


def _component_sources(model: str) -> dict:
    """Where a model's other components come from: the tiny model's stand-ins for `tiny` (built offline on
    first use, beside it in the cache), else the weights manifest and folder (keyword arguments of Engine)."""
    if model != "tiny":
        return {"manifest": None, "weights_dir": None}
    return {"manifest": components_manifest(), "weights_dir": components_dir(paths.cache_dir())}


def _with_anchor(anchor: str, prompt: str) -> str:
    """A character's identity text leads the prompt (once: a prompt that already starts with it is kept)."""
    if not anchor or prompt.startswith(anchor):
        return prompt
    return f"{anchor}, {prompt}"


def _resize_pixels(pixels: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(B, H, W, 3) floats -> (B, 3, height, width) in [0, 1] (bicubic; unchanged when already that size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    if tensor.shape[2:] == (height, width):
        return tensor
    return torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to the output size (cover), so the init image is never distorted."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.LANCZOS)


def _configure_attention(pipe, attention: str, device: torch.device) -> None:
    """SDPA is diffusers' default; xformers when asked for (or 'auto' on CUDA with xformers installed)."""
    if attention not in {"auto", "sdpa", "xformers"}:
        raise ValueError(f"attention must be auto, sdpa or xformers, not {attention!r}")
    wants_xformers = attention == "xformers" or (attention == "auto" and device.type == "cuda" and _has_xformers())
    if wants_xformers:
        if not _has_xformers():
            raise ValueError("attention='xformers' but xformers is not installed (pip install 'refgen[xformers]')")
        pipe.enable_xformers_memory_efficient_attention()


def _has_xformers() -> bool:
    from importlib.util import find_spec

    return find_spec("xformers") is not None


def _request_record(request: GenerationRequest) -> dict:
    """The request as given, JSON-safe: image inputs become their path (or a marker when in memory)."""
    record = request.model_dump(mode="json", exclude={"init_image", "mask_image", "controlnets", "references", "character"})
    record["init_image"] = _source_label(request.init_image)
    record["mask_image"] = _source_label(request.mask_image)
    if request.character is not None:
        character = request.character
        record["character"] = {**character.model_dump(mode="json", exclude={"images", "pose_image"}),
                               "images": [_source_label(image) for image in character.images],
                               "pose_image": _source_label(character.pose_image)}
    for name in ("controlnets", "references"):
        record[name] = [
            {**item.model_dump(mode="json", exclude={"image"}), "image": _source_label(item.image)} for item in getattr(request, name)
        ]
    return record


def _source_label(source: Any) -> Optional[str]:
    if source is None:
        return None
    return str(source) if isinstance(source, (str, Path)) else "<in-memory image>"


def _image_identity(source: Any, image: Optional[Image.Image]) -> Optional[dict]:
    """Where the init image came from and the hash of the file (or of its pixels, in memory)."""
    if image is None:
        return None
    if isinstance(source, (str, Path)):
        return {"path": str(Path(source).resolve()), "sha256": sha256_file(Path(source))}
    import hashlib

    return {"path": None, "sha256": hashlib.sha256(image.tobytes()).hexdigest(), "hash_of": "rgb pixels"}


def _input_record(item: Union[ControlUnit, Reference], identity: dict) -> dict:
    """An image input (control unit, reference) as provenance: its settings and its image's identity."""
    return {**item.model_dump(mode="json", exclude={"image"}), "image": identity}


def _replay_image(info: dict, override: Optional[Union[str, Path]], what: str) -> tuple[Image.Image, dict]:
    """An input image named in provenance, checked against its recorded hash."""
    path = Path(override) if override else (Path(info["path"]) if info.get("path") else None)
    if path is None or not path.is_file():
        raise ProvenanceError(
            f"this image was made from a {what} that is not available ({info.get('path') or 'in memory'})"
            + ("; pass it with --init / init_image=" if what == "init image" else "")
        )
    actual = sha256_file(path)
    if info.get("path") and actual != info["sha256"]:
        raise ProvenanceError(f"{what} {path} has changed since the image was made (sha256 {actual[:12]} != {info['sha256'][:12]})")
    return load_rgb(path, what), {**info, "path": str(path.resolve())}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
