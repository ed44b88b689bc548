"""The `refgen` command line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .batch import batch
from .character import character_app
from .error_lines import refgen_errors
from .serve import SpeedChoice, serve, worker
from .sheet import sheet
from .train import loras_app, train
from .upscale import upscale
from .weights import weights_app

app = typer.Typer(help="refgen: local SDXL image generation with references, reproducible to the bit.", no_args_is_help=True)
presets_app = typer.Typer(help="Built-in and user presets.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
app.add_typer(presets_app, name="presets")
app.add_typer(character_app, name="character")
app.add_typer(loras_app, name="loras")

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Manifest name, diffusers folder, cached repo id, .safetensors file, or 'tiny'.")]
ControlNetModelOption = Annotated[Optional[list[str]], typer.Option(
    "--controlnet-model", metavar="TYPE=FOLDER",
    help="Your own ControlNet for a control type: a diffusers ControlNet (or ControlNet-Union) folder, e.g. canny=./my-canny-cn (repeatable).")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available).")]
DtypeOption = Annotated[Optional[str], typer.Option("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU).")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs (created if missing).", file_okay=False)]

# Request field -> the option a user types, so validation errors name the flag (see error_lines.py).
GENERATE_FLAGS = MappingProxyType({
    "prompt": "PROMPT", "negative_prompt": "--negative", "aspect_ratio": "--aspect", "width": "--width",
    "height": "--height", "num_images": "--n", "seed": "--seed", "steps": "--steps", "guidance_scale": "--guidance", "guidance_cutoff": "--guidance-cutoff", "deep_cache": "--deep-cache",
    "scheduler": "--scheduler", "mode": "--mode", "preset": "--preset", "init_image": "--init",
    "init_strength": "--init-strength", "mask_image": "--mask", "mask_feather": "--feather", "loras": "--lora",
    "controlnets": "--control", "t2i_adapters": "--adapter", "references": "--style/--content",
    "character": "--character",
    "character.weight": "--character-strength", "character.strength_type": "--character-strength",
    "character.adapter": "--character-adapter", "character.pose_image": "--pose",
    "character.face_index": "--face-index", "character.keep": "--character-keep", "character.mask": "--character-mask", "character.mask_mode": "--character-mask-mode", "best_of": "--best-of", "upscale": "--upscale", "upscaler": "--upscaler",
})
REMIX_FLAGS = MappingProxyType({
    "prompt": "PROMPT", "init_image": "IMAGE", "num_images": "--n", "seed": "--seed", "preset": "--preset",
    "steps": "--steps", "init_strength": "--init-strength", "controlnets": "--control", "type": "--control",
    "weight": "--control-weight",
})
# Commands that load diffusers/transformers models; others skip importing them (seconds) just to silence them.
MODEL_COMMANDS = frozenset({"batch", "generate", "remix", "replay", "serve", "train", "worker"})


@app.callback()
def _main(context: typer.Context) -> None:
    if context.invoked_subcommand in MODEL_COMMANDS:
        context.with_resource(_quiet_libraries())


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers'/transformers' progress bars and info/warning lines off for this run: the CLI shows its own
    progress, and errors come as refgen's one line. Restored after, for code sharing the process (tests).
    torch's pytree registry warns about torchao's enums when torchao is first imported (by diffusers and peft):
    a deprecation notice for torchao's authors, not for a user, so it is off too."""
    import logging

    pytree = logging.getLogger("torch.utils._pytree")
    pytree_level = pytree.level
    pytree.setLevel(logging.ERROR)  # before the imports below, which import torchao
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        pytree.setLevel(pytree_level)
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _load_engine(model: str, device, dtype, allow_pickle=False, offload=False, speed="eager", vae_tiling=False, attention="auto",
                 controlnets: Optional[dict[str, str]] = None, quantize: Optional[str] = None):
    from .. import Engine

    console = Console(stderr=True)
    with console.status(f"loading {model} ..."):
        return Engine.load(model, device, dtype, allow_pickle=allow_pickle, offload=offload, speed=speed, quantize=quantize,
                           vae_tiling=vae_tiling, attention=attention, controlnets=controlnets)


def _controlnet_models(values: Optional[list[str]]) -> dict[str, str]:
    """--controlnet-model canny=./my-cn ... -> {"canny": "./my-cn"}; the folders are checked by Engine.load."""
    from ..request_types import canonical_type

    models = {}
    for text in values or []:
        kind, equals, folder = text.partition("=")
        if not equals or not folder:
            raise typer.BadParameter(f"{text!r} is not TYPE=FOLDER, e.g. canny=./my-canny-cn", param_hint="--controlnet-model")
        try:
            models[canonical_type(kind)] = folder
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--controlnet-model") from None
    return models


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


def _step_reporter(progress: Progress):
    tasks: dict[str, int] = {}

    def on_step(info) -> None:
        if info.phase not in tasks:
            tasks[info.phase] = progress.add_task(f"{info.phase:>6}", total=info.total)
        progress.update(tasks[info.phase], completed=info.step + 1)

    return on_step


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative: Annotated[Optional[str], typer.Option("--negative", help="Negative prompt: what to keep out of the picture.")] = None,
    aspect: Annotated[Optional[str], typer.Option("--aspect", "-a", help="Aspect ratio, e.g. 16:9: the model-optimal size of that shape (default: 1:1, or the preset's).")] = None,
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Width in px, a multiple of 8 (64-4096); give with --height, instead of --aspect.")] = None,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Height in px, a multiple of 8 (64-4096); give with --width, instead of --aspect.")] = None,
    count: Annotated[int, typer.Option("--n", "-n", "--count", help="Images (1-8); image i uses seed+i.")] = 1,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Seed (random when omitted; always recorded).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps 1-150 (default: the preset's, else the mode's: fast 20, quality 40, ultra 30).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", "-g", help="CFG scale 1-20 (default: the preset's, else 7).")] = None,
    deep_cache: Annotated[Optional[int], typer.Option("--deep-cache", help="Less work: run the whole UNet every N-th step (2-10) and reuse its deep features in between (DeepCache). Changes the image.")] = None,
    guidance_cutoff: Annotated[Optional[float], typer.Option("--guidance-cutoff", help="Less work: guidance stops after this fraction of the steps (0-1); later steps cost half. Changes the image.")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="e.g. dpmpp_2m_karras (default), euler_a, EULER_DISCRETE.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="fast (default); quality (more steps + x1.5 refine pass); ultra (ESRGAN x2 + tiled refine).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="See `refgen presets list`.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Init image for img2img.", dir_okay=False)] = None,
    init_strength: Annotated[Optional[float], typer.Option("--init-strength", help="0.1-0.9; higher = closer to the init image.")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA file, optionally :weight (repeatable).")] = None,
    control: Annotated[Optional[list[str]], typer.Option("--control", help="ControlNet unit TYPE:IMAGE[:WEIGHT[:START:END]], e.g. canny:photo.jpg:0.8 (repeatable).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="T2I-Adapter unit TYPE:IMAGE[:WEIGHT[:START:END]] (canny, lineart, sketch, depth, pose): like --control, but run once per image, not every step (repeatable).")] = None,
    style: Annotated[Optional[list[str]], typer.Option("--style", help="Style Reference IMAGE[:WEIGHT 0-2 or Low..Max[:INFLUENCE]] (repeatable).")] = None,
    content: Annotated[Optional[str], typer.Option("--content", help="Content Reference IMAGE[:WEIGHT or Low..Max].")] = None,
    character: Annotated[Optional[list[str]], typer.Option("--character", "-c", help="Character Reference: a saved character's name, or photos of one person (repeatable, averaged).")] = None,
    character_strength: Annotated[Optional[str], typer.Option("--character-strength", help="Low, Mid (default), High, or a weight 0-2.")] = None,
    character_adapter: Annotated[str, typer.Option("--character-adapter", help="instantid (strongest likeness) or faceid (lighter, face free to move).")] = "instantid",
    pose: Annotated[Optional[Path], typer.Option("--pose", help="InstantID: take the face's position and angle from this picture.", dir_okay=False)] = None,
    face_index: Annotated[Optional[int], typer.Option("--face-index", help="Which face of the character photos (0 = largest).")] = None,
    character_keep: Annotated[Optional[str], typer.Option("--character-keep", help="What the character carries besides the face: face, face+hair, face+hair+outfit or all (default: the saved character's, else face).")] = None,
    character_mask: Annotated[Optional[Path], typer.Option("--character-mask", help="Greyscale mask over the (first) character photo, white = carried besides the face.", dir_okay=False)] = None,
    character_mask_mode: Annotated[str, typer.Option("--character-mask-mode", help="replace: the mask alone; add / subtract: the mask adjusts --character-keep's parts.")] = "replace",
    best_of: Annotated[Optional[int], typer.Option("--best-of", help="Make N (2-8) and rank them by likeness to the character.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Inpainting mask (white = repaint), same size as --init.", dir_okay=False)] = None,
    feather: Annotated[int, typer.Option("--feather", help="Soft seam inside the mask edge, px.")] = 4,
    upscale_by: Annotated[Optional[int], typer.Option("--upscale", help="ESRGAN x2 or x4 after generation (default: none).")] = None,
    upscaler: Annotated[Optional[str], typer.Option("--upscaler", help="ESRGAN model for --upscale / ultra, manifest name or file (default: realesrgan-x2plus / -x4plus).")] = None,
    inpaint_unet: Annotated[Optional[str], typer.Option("--inpaint-unet", help="SDXL inpainting UNet for --mask, e.g. sdxl-inpainting.")] = None,
    controlnet_model: ControlNetModelOption = None,
    model: ModelOption = "sdxl-base",
    out: OutOption = Path("out"),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle checkpoints (.ckpt/.bin): trusted files only.")] = False,
    offload: Annotated[bool, typer.Option("--offload", help="Model CPU offload for small GPUs.")] = False,
    speed: Annotated[SpeedChoice, typer.Option("--speed", help="eager, compiled or max: compiled runs the models through torch.compile (the first image of each size compiles; later processes reuse the cache), max adds fused QKV. auto: compiled on a GPU.")] = SpeedChoice.eager,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8 (CPU and CUDA) or fp8 (CUDA Ada/Hopper) UNet Linear layers through torchao (pip install 'refgen[fast]'); changes the image slightly.")] = None,
    vae_tiling: Annotated[bool, typer.Option("--vae-tiling", help="Tiled VAE for large images on small GPUs.")] = False,
) -> None:
    """Generate images and write them as PNGs with replayable provenance.

    \b
    Examples:
      refgen generate "a red fox in the snow" --aspect 16:9 -n 4 --seed 7
      refgen generate "a castle at dusk" --preset cinematic --mode quality --negative "blurry, text"
      refgen generate "a watercolor harbour" --model tiny --steps 2 --width 64 --height 64   # offline smoke run
      refgen generate "a knight, oil painting" --adapter sketch:knight.png:0.9 --control pose:dancer.jpg
    """
    from .. import GenerationRequest

    with refgen_errors(GENERATE_FLAGS, tiny_model=model != "tiny"):  # never offer what was given
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, aspect_ratio=aspect, width=width, height=height,
            num_images=count, seed=seed, steps=steps, guidance_scale=guidance, guidance_cutoff=guidance_cutoff, deep_cache=deep_cache, scheduler=scheduler, mode=mode,
            preset=preset, init_image=init, init_strength=init_strength, loras=lora or [],
            controlnets=[_control_unit(text) for text in control or []], mask_image=mask, mask_feather=feather,
            t2i_adapters=[_control_unit(text) for text in adapter or []],
            upscale=upscale_by, upscaler=upscaler,
            references=[_reference("style", text) for text in style or []] + ([_reference("content", content)] if content else []),
            character=_character(character, character_strength, character_adapter, pose, face_index, character_keep,
                                 character_mask, character_mask_mode), best_of=best_of,
        )
        _check_inputs(request, allow_pickle)
        engine = _load_engine(model, device, dtype, allow_pickle, offload, speed.value, vae_tiling,
                              controlnets=_controlnet_models(controlnet_model), quantize=quantize)
        if inpaint_unet:
            engine.load_inpaint_unet(inpaint_unet)
        _generate_and_save(engine, request, out)


def _generate_and_save(engine, request, out: Path) -> None:
    with _progress() as progress:
        result = engine.generate(request, on_step=_step_reporter(progress))
    for path, seed_used, meta in zip(result.save(out), result.seeds, result.metadata):
        score = meta.get("identity_score")
        likeness = "" if score is None else f", identity {score if isinstance(score, str) else f'{score:.3f}'}"
        typer.echo(f"{path}  (seed {seed_used}{likeness})")


def _check_inputs(request, allow_pickle: bool) -> None:
    """Read every input file before the model loads: a typo costs a second, not a model load."""
    from ..images import load_rgb

    for source, label in _input_images(request):
        load_rgb(source, label)
    for spec in request.loras:
        _check_lora(spec.path, allow_pickle)
    if request.character is not None and request.character.name is not None:
        from adapters.characters import CharacterStore

        CharacterStore().get(request.character.name)


def _input_images(request) -> list[tuple[Any, str]]:
    """(path, label naming the flag) of every image a request reads."""
    images = [(request.init_image, "init image (--init)"), (request.mask_image, "mask (--mask)")]
    images += [(unit.image, f"control image {n} (--control)") for n, unit in enumerate(request.controlnets, 1)]
    images += [(unit.image, f"adapter image {n} (--adapter)") for n, unit in enumerate(request.t2i_adapters, 1)]
    images += [(ref.image, f"{ref.kind} reference image (--{ref.kind})") for ref in request.references]
    if request.character is not None:
        images += [(image, f"character image {n} (--character)") for n, image in enumerate(request.character.images, 1)]
        images.append((request.character.pose_image, "pose image (--pose)"))
        images.append((request.character.mask, "character mask (--character-mask)"))
    return [(source, label) for source, label in images if source is not None]


def _check_lora(path_text: str, allow_pickle: bool) -> None:
    from ..lora import LoraError, lora_file
    from ..lora_library import LoraLibrary

    try:
        lora_file(path_text, LoraLibrary(), allow_pickle)
    except LoraError as exc:
        raise LoraError(f"(--lora) {exc}") from exc


def _control_unit(text: str) -> dict:
    """'canny:edges.png:0.8:0:0.9' -> ControlUnit (or T2IAdapterUnit) fields (weight, start and end optional),
    validated with the request so errors name --control (--adapter)."""
    from ..request import is_number

    kind, _, rest = text.partition(":")
    parts = rest.rsplit(":", 3)
    numbers: list[float] = []
    while len(parts) > 1 and is_number(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    fields = dict(zip(("weight", "start", "end"), numbers))
    return {"type": kind, "image": ":".join(parts), **fields}


def _character(values: Optional[list[str]], strength: Optional[str], adapter: str, pose: Optional[Path],
               face_index: Optional[int], keep: Optional[str] = None, mask: Optional[Path] = None,
               mask_mode: str = "replace") -> Optional[dict]:
    """--character NAME, or --character photo.jpg [--character photo2.jpg ...] -> CharacterReference fields."""
    from ..request import is_number

    if not values:
        if strength or pose or face_index is not None or keep or mask:
            raise typer.BadParameter("--character-strength, --pose, --face-index, --character-keep and "
                                     "--character-mask need --character")
        return None
    if mask is not None and keep is None:
        keep = "all"  # a mask of one's own says what is carried
    fields: dict = {"adapter": adapter, "pose_image": pose, "face_index": face_index, "keep": keep, "mask": mask,
                    "mask_mode": mask_mode}
    if strength is not None:
        fields["weight" if is_number(strength) else "strength_type"] = float(strength) if is_number(strength) else strength
    if len(values) == 1 and not _is_photo(values[0]):
        return {"name": values[0], **fields}
    return {"images": [Path(value) for value in values], **fields}


def _is_photo(value: str) -> bool:
    """A file, or shaped like a path: a saved character's name has no '.', '/' or '\\', so a mistyped
    photo is reported as a missing photo, not as an unknown character."""
    return Path(value).expanduser().is_file() or any(mark in value for mark in "./\\")


def _reference(kind: str, text: str) -> dict:
    """'ink.png:High:2' / 'ink.png:0.8' / 'ink.png' -> Reference fields."""
    from ..request_types import STRENGTH_WEIGHTS

    from ..request import is_number

    parts = text.split(":")
    fields: dict = {}
    if len(parts) >= 3 and is_number(parts[-1]) and (parts[-2] in STRENGTH_WEIGHTS or is_number(parts[-2])):
        fields["influence"] = float(parts.pop())
    if len(parts) >= 2 and parts[-1] in STRENGTH_WEIGHTS:
        fields["strength_type"] = parts.pop()
    elif len(parts) >= 2 and is_number(parts[-1]):
        fields["weight"] = float(parts.pop())
    return {"kind": kind, "image": ":".join(parts), **fields}


@app.command()
def remix(
    image: Annotated[Path, typer.Argument(help="The picture whose structure to keep.", exists=True, dir_okay=False)],
    prompt: Annotated[str, typer.Argument(help="What it should become.")],
    control: Annotated[str, typer.Option("--control", help="canny (outlines) or depth (3D layout).")] = "canny",
    init_strength: Annotated[float, typer.Option("--init-strength", help="0.1-0.9; higher = closer to the original.")] = 0.35,
    control_weight: Annotated[float, typer.Option("--control-weight", help="How strongly the structure is held, 0-2.")] = 0.6,
    count: Annotated[int, typer.Option("--n", "-n", "--count", help="Images (1-8); image i uses seed+i.")] = 1,
    seed: Annotated[Optional[int], typer.Option("--seed", "-s", help="Seed (random when omitted; always recorded).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="See `refgen presets list`.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps 1-150 (default: the preset's, else 20).")] = None,
    controlnet_model: ControlNetModelOption = None,
    model: ModelOption = "sdxl-base",
    out: OutOption = Path("out"),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Remix an image: same structure, new content or style (init image + ControlNet from the same image).

    \b
    Examples:
      refgen remix photo.jpg "a bronze statue"
      refgen remix room.png "a cosy cabin interior" --control depth --init-strength 0.2 -n 3
      refgen remix sketch.png "an oil painting" --control-weight 1.0 --preset cinematic --seed 11
    """
    from ..remix import remix_request

    with refgen_errors(REMIX_FLAGS, tiny_model=model != "tiny"):
        request = remix_request(image, prompt, control=control, init_strength=init_strength, control_weight=control_weight,
                                num_images=count, seed=seed, preset=preset, steps=steps)
        _generate_and_save(_load_engine(model, device, dtype, controlnets=_controlnet_models(controlnet_model)), request, out)


@app.command()
def replay(
    image: Annotated[Path, typer.Argument(help="A PNG written by refgen.", exists=True, dir_okay=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to use (default: the one recorded).")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="The init image, if it has moved.", dir_okay=False)] = None,
    out: OutOption = Path("out"),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Regenerate an image from its metadata and say whether the pixels are identical (exit 2 when not).

    \b
    Examples:
      refgen replay out/20260101-120000-seed7.png
      refgen replay old.png --init photos/moved.jpg --out replays
      refgen replay gpu-made.png --device cpu --dtype fp32
    """
    import numpy as np
    from PIL import Image

    from ..images import load_rgb
    from ..provenance import read_metadata

    with refgen_errors(tiny_model=True):
        meta = read_metadata(image)
        if init is not None:
            load_rgb(init, "init image (--init)")  # before the model loads
        recorded = meta["device"]
        engine = _load_engine(model or meta["model"]["reference"], device or None, dtype or recorded["dtype"],
                              speed=recorded.get("speed", "eager"), quantize=recorded.get("quantize"))
        result = engine.replay(image, init_image=init)
        (path,) = result.save(out, stem=f"replay-{image.stem}")
        with Image.open(image) as original:
            before = np.asarray(original.convert("RGB"), dtype=np.int16)
        after = np.asarray(result.images[0], dtype=np.int16)
        typer.echo(str(path))
        if before.shape == after.shape and (before == after).all():
            typer.echo("pixels identical to the original")
        else:
            difference = "size differs" if before.shape != after.shape else f"max difference {np.abs(before - after).max()}/255"
            typer.echo(f"pixels differ from the original ({difference}); recorded device {recorded['name']} {recorded['dtype']}")
            raise typer.Exit(code=2)


@presets_app.command("list")
def list_presets() -> None:
    """Every preset (user presets override built-in ones of the same name).

    \b
    Examples:
      refgen presets list
      refgen generate "a fox" --preset anime
    """
    from .. import paths
    from ..presets import all_presets, builtin_presets

    with refgen_errors():
        builtin = builtin_presets()
        table = Table("name", "source", "description", "steps", "guidance", "scheduler", "mode")
        for name, preset in sorted(all_presets().items()):
            source = "built-in" if builtin.get(name) == preset else "user"
            table.add_row(name, source, preset.description, _text(preset.steps), _text(preset.guidance_scale),
                          _text(preset.scheduler), _text(preset.mode))
        Console().print(table)
        Console().print(f"user presets folder: {paths.presets_dir()}")


@presets_app.command("show")
def show_preset(name: Annotated[str, typer.Argument(help="A preset name (any case), see `refgen presets list`.")]) -> None:
    """A preset's fields, and what it does to an example prompt.

    \b
    Examples:
      refgen presets show cinematic
      refgen presets show PORTRAIT
    """
    from ..presets import get_preset

    with refgen_errors():
        preset = get_preset(name)
        for key, value in preset.model_dump(exclude_none=True).items():
            typer.echo(f"{key}: {value}")
        typer.echo(f"example: {preset.compose_prompt('a red fox')}")


def _text(value) -> str:
    return "" if value is None else escape(str(value))


app.command()(upscale)  # defined in upscale.py / sheet.py; registered last so `refgen --help` lists generate first
app.command()(sheet)
app.command()(serve)
app.command()(worker)
app.command()(train)
app.command()(batch)
