"""Helpers for tests that talk to the API over real HTTP: a uvicorn server in a thread, test images."""

from __future__ import annotations

import contextlib
import io
import threading
import time

import numpy as np
from PIL import Image


def dead_worker() -> str:
    """A worker id (engine.api.store.worker_id's form) of a process that has ended: its claims are a dead worker's."""
    import socket
    import subprocess
    import sys

    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True).stdout.strip()
    return f"{socket.gethostname()}:{pid}:worker"


def png_bytes(size=(64, 64), seed=0) -> bytes:
    """A random RGB PNG (random, so canny and the init image have something to work with)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def running_server(app):
    """A real uvicorn server on 127.0.0.1 and a free port, in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serving(root, stop_seconds: float = 60, **options):
    """`refgen serve` over a store in `root`: engine.api.server.service(store, **options) with its worker running,
    on a real uvicorn server. Yields (base URL, worker, store); the worker is stopped after."""
    from engine.api.server import service
    from engine.api.store import AssetStore

    with AssetStore(root) as store:
        app, worker = service(store, **options)
        worker.start()
        try:
            with running_server(app) as base:
                yield base, worker, store
        finally:
            worker.stop(stop_seconds)
