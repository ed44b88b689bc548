"""One cache for work done on a picture that is worth keeping: face analyses, preprocessor outputs,
reference encodings. A bounded LRU in memory over one file per key on disk, so a reference seen in an
earlier session costs nothing again.

    cache = DiskCache(lambda: paths.cache_dir() / "faces", suffix=".npz", encode=to_bytes, decode=from_file)
    value = cache.get(key)            # memory, then disk; None on a miss (an absent or damaged file too)
    cache.put(key, value)             # memory, and disk (written atomically) when the cache has a folder

Keys are hex digests made by the caller from everything the value depends on. Thread-safe; `hits` and
`misses` count lookups, so a test (or a benchmark) can see the cache work.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Optional, TypeVar, Union

from .images import write_atomic

V = TypeVar("V")
Folder = Union[Path, Callable[[], Path], None]  # a callable is read at each use: REFGEN_HOME may change


class DiskCache(Generic[V]):
    def __init__(self, folder: Folder, *, suffix: str, encode: Callable[[V], bytes],
                 decode: Callable[[Path], Optional[V]], max_items: int = 64, copy: Callable[[V], V] = lambda value: value):
        """`decode(path)` returns None for a file it cannot read (a miss); `copy` hands out copies of
        mutable values (PIL images), so a caller that edits its result never edits the cache."""
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        self._folder, self.suffix, self.max_items = folder, suffix, max_items
        self._encode, self._decode, self._copy = encode, decode, copy
        self._memory: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def folder(self) -> Optional[Path]:
        return self._folder() if callable(self._folder) else self._folder

    def get(self, key: str, accept: Callable[[V], bool] = lambda value: True) -> Optional[V]:
        """The value for `key` if it is cached and `accept`able, else None."""
        with self._lock:
            value = self._memory.get(key)
            if value is not None and accept(value):
                self._memory.move_to_end(key)
                self.hits += 1
                return self._copy(value)
        value = self._read(key)
        with self._lock:
            if value is None or not accept(value):
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, value)
        return self._copy(value)

    def put(self, key: str, value: V, *, persist: bool = True, encoded: Optional[bytes] = None) -> None:
        """Keep `value`; with a folder, also on disk (`encoded` when the caller already has the bytes)."""
        with self._lock:
            self._remember(key, self._copy(value))
        if persist and self.folder is not None:
            write_atomic(self.path(key), encoded if encoded is not None else self._encode(value))

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{self.suffix}"

    def clear(self) -> None:
        """Forget what is in memory (the files stay)."""
        with self._lock:
            self._memory.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory)

    def _remember(self, key: str, value: V) -> None:
        if self.max_items == 0:
            return
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def _read(self, key: str) -> Optional[V]:
        if self.folder is None:
            return None
        path = self.path(key)
        return self._decode(path) if path.is_file() else None
