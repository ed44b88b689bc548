"""sha256 of weight files, cached by (path, size, mtime) so a model is hashed once, not per load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import paths
from .images import write_atomic


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = paths.cache_dir() / "sha256.json"
    cache = _read(cache_file)
    if key not in cache:
        cache[key] = sha256_file(path)
        write_atomic(cache_file, json.dumps(cache, indent=0).encode())
    return cache[key]


def _read(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
