"""The one memory + disk cache (engine/cache.py) behind face analyses, preprocessor outputs and
reference encodings: bounded in memory, durable on disk, a damaged file is a miss."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from engine.cache import DiskCache


def text_cache(folder: Optional[Path], max_items: int = 2) -> DiskCache:
    def decode(path: Path) -> Optional[str]:
        try:
            return path.read_bytes().decode("ascii")
        except UnicodeDecodeError:
            return None  # damaged

    return DiskCache(folder, suffix=".txt", encode=str.encode, decode=decode, max_items=max_items)


def test_memory_is_bounded_least_recently_used_first():
    cache = text_cache(None)
    for key in ("aa", "bb", "cc"):
        cache.put(key, key.upper())
    assert len(cache) == 2 and cache.get("aa") is None and cache.get("cc") == "CC"
    assert (cache.hits, cache.misses) == (1, 1)


def test_values_outlive_the_process_on_disk_and_a_damaged_file_is_a_miss(tmp_path):
    text_cache(tmp_path).put("abcd", "kept")
    later = text_cache(tmp_path)  # a new session
    assert later.get("abcd") == "kept" and later.hits == 1
    (tmp_path / "ab" / "abcd.txt").write_bytes(b"\xff\xfe")
    assert text_cache(tmp_path).get("abcd") is None


def test_a_value_the_caller_rejects_is_a_miss():
    cache = text_cache(None)
    cache.put("aa", "short")
    assert cache.get("aa", accept=lambda value: len(value) > 5) is None and cache.misses == 1


def test_a_folder_given_as_a_callable_is_read_at_each_use(tmp_path):
    where = {"folder": tmp_path / "one"}
    cache = text_cache(lambda: where["folder"])
    cache.put("aa", "first")
    where["folder"] = tmp_path / "two"
    cache.put("bb", "second")
    assert (tmp_path / "one" / "aa" / "aa.txt").is_file() and (tmp_path / "two" / "bb" / "bb.txt").is_file()
