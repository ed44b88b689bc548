"""Where refgen keeps things. Read from the environment on every call (no module state).

REFGEN_HOME      user data: presets, characters, outputs, caches  (default ~/.local/share/refgen)
REFGEN_WEIGHTS   downloaded weights                                (default <checkout>/weights, else REFGEN_HOME/weights)
REFGEN_MANIFEST  the weights manifest                              (default <checkout>/weights/manifest.toml,
                                                                   else the copy packaged with refgen)
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    explicit = os.environ.get("REFGEN_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "refgen"


def cache_dir() -> Path:
    return data_dir() / "cache"


def presets_dir() -> Path:
    return data_dir() / "presets"


def weights_dir() -> Path:
    explicit = os.environ.get("REFGEN_WEIGHTS")
    if explicit:
        return Path(explicit).expanduser()
    if (_CHECKOUT / "weights" / "manifest.toml").exists():
        return _CHECKOUT / "weights"
    return data_dir() / "weights"


def manifest_path() -> Path:
    explicit = os.environ.get("REFGEN_MANIFEST")
    if explicit:
        return Path(explicit).expanduser()
    checkout = _CHECKOUT / "weights" / "manifest.toml"
    if checkout.exists():
        return checkout
    # Installed from a wheel: engine/data/manifest.toml (a symlink to weights/manifest.toml in the repo).
    return Path(__file__).resolve().parent / "data" / "manifest.toml"
