"""`refgen serve [--host H] [--port P] [--api-key KEY] [--model M] [--device D] [--dtype T] [--train-max-steps N] ...`

The Leonardo-compatible local HTTP API (engine/api/server.py). A plain typer command function; the
main CLI mounts it with `app.command()(serve)`. Without an API key it listens on loopback only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from enum import Enum

import typer

from .error_lines import refgen_errors


class SpeedChoice(str, Enum):
    """engine.speed's modes, named here so that parsing the command line does not import torch (a test checks they match)."""

    auto = "auto"
    eager = "eager"
    compiled = "compiled"
    max = "max"

    def __str__(self) -> str:  # as typed and as --help shows it
        return self.value


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8377,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="REFGEN_API_KEY", show_default=False,
                                                   help="Clients must send 'Authorization: Bearer <key>'.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Local model for requests without a modelId and for Leonardo's platform model ids (e.g. the SDKs' default, Lightning XL) [default: the Leonardo model table's default, sdxl-base].")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU).")] = None,
    upscaler: Annotated[Optional[str], typer.Option("--upscaler", show_default=False, help="ESRGAN model for POST /variations/upscale [default: realesrgan-x4plus; with --model tiny, tiny (random Real-ESRGAN x4, offline)].")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Queued jobs before POST answers 429.")] = 64,
    speed: Annotated[SpeedChoice, typer.Option("--speed", help="auto, eager, compiled or max (auto: compiled on a GPU). Compiled engines compile once per image size and batch; the compiled kernels are cached on disk for the next start.")] = SpeedChoice.auto,
    warm_up: Annotated[Optional[list[str]], typer.Option("--warm-up", metavar="WxH", help="Generate once at this size when a model loads, so the first job of that size does not wait for compilation (repeatable).")] = None,
    train_max_steps: Annotated[Optional[int], typer.Option("--train-max-steps", min=1, show_default=False, help="Cap on the steps of a LoRA training asked for over the API (POST /elements, /models, a character's /train) [default: no cap].")] = None,
    train_max_resolution: Annotated[Optional[int], typer.Option("--train-max-resolution", min=64, show_default=False, help="Cap on a training's resolution in px [default: no cap].")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker threads on the queue, each with its own engine: one per GPU, with --device cuda:0,cuda:1 (more workers: `refgen worker` processes on the same store).")] = 1,
    store: Annotated[Optional[Path], typer.Option("--store", file_okay=False, show_default=False, help="Folder of the database and images [default: $REFGEN_HOME/api].")] = None,
) -> None:
    """Serve Leonardo's REST API (/api/rest/v1/...) from this machine; OpenAPI docs at /docs.

    \b
    Examples:
      refgen serve                                  # http://127.0.0.1:8377, loopback only
      refgen serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
      refgen serve --model tiny --port 9000         # offline smoke server
      refgen serve --speed compiled --warm-up 1024x1024 --warm-up 1344x768
      refgen serve --train-max-steps 1500 --train-max-resolution 1024   # what API users may ask of the GPU
      refgen serve --workers 2 --device cuda:0,cuda:1   # one worker per GPU on the one queue
    """
    from ..api.server import serve as run_server
    from ..api.store import AssetStore
    from ..api.trainings import TrainingSettings

    with refgen_errors(tiny_model=True):
        training = TrainingSettings(max_steps=train_max_steps, max_resolution=train_max_resolution)
        run_server(host, port, api_key or None, model, device, dtype, upscaler=upscaler, max_queue=max_queue,
                   speed=speed.value, warm_up=[_size(text) for text in warm_up or []], training=training,
                   workers=workers, store=AssetStore(store) if store else None)


def worker(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The server's model: use the same as its `refgen serve --model` [default: the Leonardo model table's default, sdxl-base].")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU).")] = None,
    upscaler: Annotated[Optional[str], typer.Option("--upscaler", show_default=False, help="ESRGAN model for upscale jobs [default: as refgen serve].")] = None,
    speed: Annotated[SpeedChoice, typer.Option("--speed", help="auto, eager, compiled or max (as refgen serve).")] = SpeedChoice.auto,
    train_max_steps: Annotated[Optional[int], typer.Option("--train-max-steps", min=1, show_default=False, help="As refgen serve.")] = None,
    train_max_resolution: Annotated[Optional[int], typer.Option("--train-max-resolution", min=64, show_default=False, help="As refgen serve.")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", file_okay=False, show_default=False, help="The server's store folder [default: $REFGEN_HOME/api].")] = None,
) -> None:
    """Run jobs of a `refgen serve` queue in this process: one more worker on the same store, e.g. one per GPU.

    Workers share the queue safely: each job runs once; a worker that dies has its job run again by another.
    All of them must be on the server's machine (SQLite and the image files are on its disk). Ctrl-C stops it
    after the current job.

    \b
    Examples:
      refgen serve --device cuda:0 &  refgen worker --device cuda:1 &  refgen worker --device cuda:2
      refgen worker --model tiny --store /tmp/api        # beside `refgen serve --model tiny --store /tmp/api`
    """
    from ..api.server import run_worker
    from ..api.store import AssetStore
    from ..api.trainings import TrainingSettings

    with refgen_errors(tiny_model=True):
        training = TrainingSettings(max_steps=train_max_steps, max_resolution=train_max_resolution)
        run_worker(AssetStore(store) if store else AssetStore(), model=model, device=device, dtype=dtype,
                   upscaler=upscaler, speed=speed.value, training=training)


def _size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768)."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise typer.BadParameter(f"{text!r} is not a size like 1024x1024", param_hint="--warm-up")
    return int(width), int(height)
