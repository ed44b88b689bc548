"""The tiny face parser (engine/tiny/face_parsing.py, which the tiny model's stand-in uses too) written where the
committed manifest gives the `face-parsing` entry, so `FaceParser.load` finds it through `engine.weights.require`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from engine.tiny.face_parsing import (  # noqa: F401  (re-exported for the tests)
    PROCESSOR_SETTINGS, PUBLISHED_CONFIG, TINY_WIDTHS, full_config, save_tiny_face_parser, tiny_config,
)


def entry_folder(weights_dir: Path | str, manifest_path: Path | str | None = None, entry_name: str = "face-parsing") -> Path:
    from engine.weights import Manifest

    return Manifest.load(manifest_path).get(entry_name).folder(weights_dir)


def write_face_parsing(
    weights_dir: Path | str,
    manifest_path: Path | str | None = None,
    seed: int = 0,
    constant_class: Optional[int] = None,
    entry_name: str = "face-parsing",
) -> Path:
    """Save the tiny parser where the manifest wants the entry's files; returns that folder.
    `constant_class`: every pixel parses as that class."""
    from engine.weights import Manifest

    entry = Manifest.load(manifest_path).get(entry_name)
    folder = save_tiny_face_parser(entry.folder(weights_dir), seed, constant_class)
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    listed = sorted(f.path for f in entry.files)
    assert written == listed, f"the tiny parser wrote {written}, the manifest lists {listed}"
    return folder
