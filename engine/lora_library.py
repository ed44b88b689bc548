"""The local LoRA library: trained (or copied-in) LoRAs kept by name, so a request can say `loras=["mira"]`.

    from engine.lora_library import LoraLibrary
    library = LoraLibrary()                       # $REFGEN_HOME/loras
    library.list()                                # [LoraInfo(name="mira", trigger="zxq person", ...)]
    library.resolve("mira")                       # Path(".../loras/mira.safetensors")
    library.resolve("./other.safetensors:0.8")    # a path that is not a name stays a path

One file per LoRA, `<root>/<name>.safetensors`, written atomically; what is shown about it (trigger words,
base model, rank, steps, dataset size) is read from its kohya `ss_*` metadata and refgen's training record,
so a LoRA copied in from elsewhere is listed too. Names follow the training request's rule: a plain file
name of letters, digits, '.', '_' or '-', starting with a letter or digit.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import paths
from .errors import RefgenError
from .images import write_atomic

SUFFIX = ".safetensors"
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class LoraLibraryError(RefgenError):
    """A library operation refgen cannot do: a bad name, an unknown LoRA, a name already taken."""


class UnknownLoraError(LoraLibraryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_lora_name(name: str) -> str:
    if not isinstance(name, str) or not LORA_NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise LoraLibraryError(f"invalid LoRA name {name!r}: use a plain name of letters, digits, '.', '_' or '-' "
                               "starting with a letter or digit (no folders, no .safetensors suffix)")
    return name


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    size: int  # bytes
    trigger: list[str] = field(default_factory=list)
    base_model: str = ""
    rank: Optional[int] = None
    alpha: Optional[float] = None
    resolution: str = ""
    steps: Optional[int] = None
    images: Optional[int] = None
    character: str = ""  # the character profile it was trained from, when it was
    trained_by_refgen: bool = False

    def as_dict(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in self.__dict__.items()}


class LoraLibrary:
    """LoRA files by name in one folder (default: $REFGEN_HOME/loras)."""

    def __init__(self, root: Optional[Path | str] = None):
        self.root = Path(root).expanduser() if root is not None else paths.data_dir() / "loras"

    def path(self, name: str) -> Path:
        """Where a LoRA of this name lives (it may not exist yet)."""
        return self.root / f"{check_lora_name(name)}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return LORA_NAME.fullmatch(name or "") is not None and self.path(name).is_file()

    def resolve(self, text: str) -> Path:
        """A request's LoRA reference -> a file: an existing file path wins; otherwise a plain name that is in
        the library is its file; anything else is returned as the path it spells (the loader then says it
        is missing, see `missing_message`)."""
        as_path = Path(text).expanduser()
        if as_path.is_file() or not LORA_NAME.fullmatch(text) or text.endswith(SUFFIX):
            return as_path
        return self.path(text) if self.path(text).is_file() else as_path

    def missing_message(self, text: str) -> str:
        known = ", ".join(info.name for info in self.list()) or "none yet"
        return (f"LoRA not found: {text!r} is neither a file nor a LoRA in the library {self.root} "
                f"(known: {known}; `refgen loras list` shows them, `refgen train` makes one)")

    def save(self, name: str, data: bytes, overwrite: bool = False) -> Path:
        path = self.path(name)
        if path.exists() and not overwrite:
            raise LoraLibraryError(f"a LoRA named {name!r} is already in the library ({path}); "
                                   "choose another name, or delete it first: refgen loras delete " + name)
        return write_atomic(path, data)

    def add(self, name: str, source: Path, overwrite: bool = False) -> Path:
        """Copy a LoRA file into the library under `name` (checked to be a readable safetensors file)."""
        read_metadata(Path(source))
        return self.save(name, Path(source).read_bytes(), overwrite)

    def get(self, name: str) -> LoraInfo:
        path = self.path(name)
        if not path.is_file():
            raise UnknownLoraError(self.missing_message(name))
        return describe(name, path)

    def list(self) -> list[LoraInfo]:
        """Every readable LoRA in the library, sorted by name; unreadable files are listed with no details."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            if LORA_NAME.fullmatch(name) and path.is_file():
                found.append(describe(name, path))
        return found

    def delete(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise UnknownLoraError(self.missing_message(name))
        os.unlink(path)
        return path


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's `__metadata__` (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError kinds
        raise LoraLibraryError(f"{path} is not a readable .safetensors LoRA: {exc}") from exc


def describe(name: str, path: Path) -> LoraInfo:
    try:
        meta = read_metadata(path)
    except LoraLibraryError:
        meta = {}
    record = _json(meta.get("refgen_training"), {})
    return LoraInfo(
        name=name,
        path=path,
        size=path.stat().st_size,
        trigger=list(_json(meta.get("ss_trigger_words"), [])),
        base_model=meta.get("ss_sd_model_name", ""),
        rank=_number(meta.get("ss_network_dim"), int),
        alpha=_number(meta.get("ss_network_alpha"), float),
        resolution=meta.get("ss_resolution", ""),
        steps=_number(meta.get("ss_steps"), int),
        images=_number(meta.get("ss_num_train_images"), int),
        character=str(record.get("request", {}).get("character") or ""),
        trained_by_refgen=bool(record),
    )


def _json(text: Optional[str], default):
    try:
        value = json.loads(text) if text else default
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def _number(text: Optional[str], kind):
    try:
        return kind(float(text)) if text not in (None, "", "None") else None
    except ValueError:
        return None

