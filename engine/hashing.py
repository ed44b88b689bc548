"""sha256 of weight files, cached by (path, size, mtime) so a model is hashed once, not per load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import paths
from .images import write_atomic


def sha256_file(path: Path | str, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1-MiB chunks so multi-GB weights never sit in memory."""
    from tqdm.auto import tqdm

    path = Path(path)
    digest = hashlib.sha256()
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"sha256 {path.name}", disable=not progress, leave=False)
    with path.open("rb") as handle, bar:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = paths.cache_dir() / "sha256.json"
    cache = _read(cache_file)
    if key not in cache:
        # First sight of this file: hash it once (a progress bar for multi-GB weights).
        cache[key] = sha256_file(path, progress=stat.st_size > 1 << 30)
        write_atomic(cache_file, json.dumps(cache, indent=0).encode())
    return cache[key]


def _read(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
