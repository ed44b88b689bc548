"""`refgen upscale IMAGE [--scale 2|4] [--model NAME|FILE] [--out PATH] [--tile N] ...`

A plain typer command function; the main CLI mounts it with `app.command()(upscale)`. Errors
refgen raises on purpose become one red line and exit code 1 (`refgen_errors`).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from PIL import Image, PngImagePlugin
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .error_lines import fail, refgen_errors
from ..errors import OutputPathError
from ..images import write_atomic
from ..request import default_upscaler

SCALES = (2, 4)
DEFAULT_SCALE = 4
METADATA_KEY = "refgen-upscale"  # not "refgen": that chunk means "replayable generation" to `refgen replay`


def output_path(image: Path, out: Optional[Path], scale: int) -> Path:
    """`--out x.png` is that file; `--out DIR` (or nothing: the input's folder) gets
    `<stem>_x<scale>.png`, numbered `-1`, `-2`, ... rather than overwriting an earlier result."""
    if out is not None and out.suffix.lower() == ".png":
        return out
    folder = out if out is not None else image.parent
    candidate = folder / f"{image.stem}_x{scale}.png"
    number = 1
    while candidate.exists():
        candidate = folder / f"{image.stem}_x{scale}-{number}.png"
        number += 1
    return candidate


def check_out(out: Optional[Path]) -> None:
    """An --out that cannot be written fails before the model loads (not with a traceback after it)."""
    if out is None:
        return
    if out.suffix.lower() == ".png" and out.is_dir():
        raise OutputPathError(f"--out {out} is an existing folder; name a file inside it or another .png")
    if out.suffix.lower() != ".png" and out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is an existing file, not a folder; name a .png file or a folder")


def upscale(
    image: Annotated[Path, typer.Argument(help="Image to upscale (PNG, JPEG, WebP, ...). Transparency is kept.", dir_okay=False)],
    scale: Annotated[Optional[int], typer.Option("--scale", "-s", help="2 or 4 (default 4): picks the manifest model realesrgan-x<scale>plus. With --model, the model's own scale applies.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Manifest name, an ESRGAN .safetensors/.pth file, or 'tiny' (offline stand-in). Default: realesrgan-x<scale>plus.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .png file, or a folder (default: next to the input, <name>_x<scale>.png).")] = None,
    tile: Annotated[int, typer.Option("--tile", help="Tile size in input pixels, 0 = whole image; halved automatically on GPU out-of-memory.")] = 512,
    overlap: Annotated[int, typer.Option("--overlap", help="Pixels neighbouring tiles share (blended).")] = 32,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available; fp16 there, fp32 on CPU).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle checkpoints (.pth/.pt): trusted files only.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar over tiles.")] = True,
) -> None:
    """Upscale an image 2x or 4x with Real-ESRGAN (or any ESRGAN-family model), tile by tile.

    \b
    Examples:
      refgen upscale photo.png                      # x4, writes photo_x4.png beside it
      refgen upscale photo.png --scale 2 --out big.png
      refgen upscale art.png --model 4x-anime.safetensors --tile 256 --out upscaled/
    """
    from adapters.upscale import Upscaler, load_image

    if scale is not None and scale not in SCALES:
        fail(f"--scale must be 2 or 4, got {scale}")
    console = Console(stderr=True)
    with refgen_errors(tiny_model=model != "tiny"):  # never offer the option already given
        picture = load_image(image, what="input image")  # a bad file fails before any model loads
        check_out(out)
        reference = model or default_upscaler(scale or DEFAULT_SCALE)
        if reference == "tiny":  # the tiny model's random Real-ESRGAN (the real layout, built offline)
            reference = f"tiny-realesrgan-x{scale or DEFAULT_SCALE}plus"
        with console.status(f"loading {reference} ..."):
            upscaler = Upscaler.load(reference, device=device, allow_pickle=allow_pickle)
        if upscaler.notice:
            console.print(f"[yellow]{escape(upscaler.notice)}[/yellow]")
        if scale is not None and model is not None and upscaler.scale != scale:
            fail(f"{reference} upscales x{upscaler.scale}, not x{scale}; drop --scale or pick a x{scale} model")
        target = output_path(image, out, upscaler.scale)
        if target.resolve() == image.resolve():
            fail(f"refusing to overwrite the input image {image}; pass another --out")
        with _tile_progress(console, progress) as report:
            result = upscaler.upscale(picture, tile=tile, overlap=overlap, progress=report)
        meta = {
            "source": image.name,
            "source_sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
            "source_size": list(picture.size),
            "model": upscaler.identity(),
            "tile": tile,
            "overlap": overlap,
        }
        write_atomic(target, _png_bytes(result, meta))
    Console().print(
        f"[green]wrote[/green] {escape(str(target))}  {result.width}x{result.height} "
        f"(x{upscaler.scale}, {escape(reference)})"
    )


def _png_bytes(image: Image.Image, meta: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    extra = {"icc_profile": image.info["icc_profile"]} if image.info.get("icc_profile") else {}
    image.save(buffer, format="PNG", pnginfo=info, **extra)
    return buffer.getvalue()


class _tile_progress:
    """A rich bar over tiles on stderr, as a (done, total) callback; False when disabled."""

    def __init__(self, console: Console, enabled: bool):
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("upscale"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False, disable=not enabled,
        )
        self.task = None

    def __enter__(self):
        if not self.enabled:
            return False
        self.bar.start()

        def report(done: int, total: int) -> None:
            if self.task is None:
                self.task = self.bar.add_task("tiles", total=total)
            self.bar.update(self.task, completed=done, total=total)

        return report

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self.bar.stop()
