"""`refgen serve [--host H] [--port P] [--api-key KEY] [--model M] [--device D] [--dtype T]`

The Leonardo-compatible local HTTP API (engine/api/server.py). A plain typer command function; the
main CLI mounts it with `app.command()(serve)`. Without an API key it listens on loopback only.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .error_lines import refgen_errors


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
) -> None:
    """Serve Leonardo's REST API (/api/rest/v1/...) from this machine; OpenAPI docs at /docs.

    \b
    Examples:
      refgen serve                                  # http://127.0.0.1:8377, loopback only
      refgen serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
      refgen serve --model tiny --port 9000         # offline smoke server
    """
    from ..api.server import serve as run_server

    with refgen_errors(tiny_model=True):
        run_server(host, port, api_key or None, model, device, dtype, upscaler=upscaler, max_queue=max_queue)
