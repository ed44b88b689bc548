"""The weights manifest, presence checks, and the one place refgen downloads.

`weights/manifest.toml` lists every model component: its Hugging Face repo and pinned revision,
license, local folder and files (with sha256/size where published). The engine calls `require()`
before loading a manifest model; only `fetch()` (behind `refgen weights fetch`) touches the
network, and huggingface_hub is imported inside the hub functions so importing this module never
does.

Every fetched file lands under its final name only after its sha256 checked out, and its hash is
recorded in `<folder>/.refgen-lock.json`, so `verify()` can later detect a changed file even where
the manifest has no hash.

An entry may instead carry a `build` recipe (the tiny model's random stand-ins, engine/tiny.py):
`require()` then writes its files offline on first use, records them in the same lock file, and
every loader reads them exactly as it reads fetched weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine import paths
from engine.errors import (
    RefgenError,
    UnknownModelError,
    WeightsDownloadError,
    WeightsIntegrityError,
    WeightsMissingError,
)
from engine.hashing import sha256_file
from engine.images import write_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

LOCK_FILE_NAME = ".refgen-lock.json"
# Downloads land here first: inside the component folder, so the final os.replace stays on one
# filesystem (atomic), and at a fixed name, so huggingface_hub can resume an interrupted download.
STAGING_DIR_NAME = ".refgen-download"
HUB_PROBE_TIMEOUT = 10.0  # seconds to wait for the hub's first answer
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# (repo, filename, revision, dest_dir) -> path of the downloaded file (expected under dest_dir)
Downloader = Callable[[str, str, str, Path], Path]
# (repo, filename, revision) -> the hub's sha256 of that file, or None when it publishes none
HashLookup = Callable[[str, str, str], str | None]
CheckStatus = Literal["ok", "missing", "mismatch", "unverified"]


# ----------------------------------------------------------------------------------- manifest


def _relative_inside(value: str) -> str:
    """Reject paths that could escape the weights folder (absolute, '..', backslashes)."""
    pure = PurePosixPath(value)
    if not value or pure.is_absolute() or ".." in pure.parts or "\\" in value:
        raise ValueError(f"must be a relative path inside the weights folder, got {value!r}")
    return str(pure)


class WeightFile(BaseModel):
    """One file of a component, relative to the component's folder (and to the repo root)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str | None = None
    size: int | None = Field(default=None, ge=0)

    @field_validator("path")
    @classmethod
    def _path_inside(cls, value: str) -> str:
        return _relative_inside(value)

    @field_validator("sha256")
    @classmethod
    def _lowercase_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
        return value


class ManifestEntry(BaseModel):
    """One model component: where it comes from, under which license, and which files it needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    kind: str
    description: str = ""
    repo: str
    revision: str = "main"
    license: str
    license_name: str | None = None
    license_url: str = ""
    local_dir: str
    variant: str | None = None
    files: tuple[WeightFile, ...] = Field(min_length=1)
    # Writes every listed file into the folder it is given, offline; None: the files come from `fetch`.
    build: Callable[[Path], None] | None = Field(default=None, exclude=True, repr=False)

    @field_validator("local_dir")
    @classmethod
    def _local_dir_inside(cls, value: str) -> str:
        return _relative_inside(value)

    @model_validator(mode="after")
    def _unique_file_paths(self) -> ManifestEntry:
        seen = [f.path for f in self.files]
        duplicates = sorted({p for p in seen if seen.count(p) > 1})
        if duplicates:
            raise ValueError(f"component {self.name!r} lists files twice: {', '.join(duplicates)}")
        return self

    def folder(self, weights_dir: Path | str | None = None) -> Path:
        root = Path(weights_dir).expanduser() if weights_dir is not None else paths.weights_dir()
        return root / self.local_dir

    @property
    def total_size(self) -> int | None:
        """Sum of the file sizes, or None when any size is unknown."""
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def license_label(self) -> str:
        if self.license_name and self.license_name != self.license:
            return f"{self.license_name} ({self.license})"
        return self.license


class Manifest(BaseModel):
    """All components of `weights/manifest.toml` (one `[[component]]` table each)."""

    model_config = ConfigDict(frozen=True)

    entries: tuple[ManifestEntry, ...]
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Manifest:
        names = [e.name for e in self.entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"component names must be unique, repeated: {', '.join(duplicates)}")
        return self

    @classmethod
    def load(cls, path: Path | str | None = None) -> Manifest:
        source = Path(path).expanduser() if path is not None else paths.manifest_path()
        try:
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RefgenError(
                f"weights manifest not found at {source}; point REFGEN_MANIFEST at a manifest.toml"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise RefgenError(f"weights manifest {source} is not valid TOML: {exc}") from exc
        try:
            return cls(entries=tuple(raw.get("component", [])), source=source)
        except ValidationError as exc:
            raise RefgenError(f"weights manifest {source} is malformed:\n{exc}") from exc

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def get(self, name: str) -> ManifestEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        where = f" ({self.source})" if self.source else ""
        raise UnknownModelError(
            f"no component named {name!r} in the weights manifest{where}; "
            f"known: {', '.join(self.names()) or '(none)'}"
        )


# ------------------------------------------------------------------------------ presence, hashes


def missing_files(entry: ManifestEntry, weights_dir: Path | str | None = None) -> list[str]:
    folder = entry.folder(weights_dir)
    return [f.path for f in entry.files if not (folder / f.path).is_file()]


def require(
    entry_name: str,
    weights_dir: Path | str | None = None,
    manifest: Manifest | None = None,
) -> Path:
    """The component's folder, or WeightsMissingError naming the files and the fetch command.
    An entry with a `build` recipe is built there instead, on first use."""
    entry = (manifest or Manifest.load()).get(entry_name)
    missing = missing_files(entry, weights_dir)
    if missing and entry.build is not None:
        build(entry, weights_dir)
        missing = missing_files(entry, weights_dir)
        if missing:  # a recipe that does not match its entry: a bug, not a download to suggest
            raise RefgenError(f"building '{entry_name}' did not write {', '.join(missing)}")
    if missing:
        raise WeightsMissingError(entry_name, missing)
    return entry.folder(weights_dir)


def locate(reference: str | Path, weights_dir: Path | str | None = None, manifest: Manifest | None = None) -> Path:
    """A user's folder as it is, or a manifest name's folder through `require` (WeightsMissingError names
    `refgen weights fetch NAME` when it is not on disk): how every component reference is resolved."""
    folder = Path(reference).expanduser()
    return folder if folder.is_dir() else require(str(reference), weights_dir, manifest)


def build(entry: ManifestEntry, weights_dir: Path | str | None = None) -> Path:
    """Run the entry's recipe in a private folder, then move each missing file into place and record
    its hash, so a crash never leaves half a component and two processes never mix their files."""
    if entry.build is None:
        raise RefgenError(f"'{entry.name}' has no build recipe; fetch it with: refgen weights fetch {entry.name}")
    folder = entry.folder(weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".building", dir=folder))
    try:
        entry.build(staging)
        records = {}
        for weight_file in entry.files:
            final = folder / weight_file.path
            if final.is_file():
                continue  # another process finished first
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / weight_file.path, final)
            records[weight_file.path] = _built_record(entry, final)
        _record_in_lock(folder, records)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _built_record(entry: ManifestEntry, path: Path) -> dict[str, Any]:
    return {
        "sha256": sha256_file(path, progress=False), "size": path.stat().st_size, "verified_against": "built",
        "entry": entry.name, "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# ------------------------------------------------------------------------------------ lock file


def lock_path(folder: Path) -> Path:
    return folder / LOCK_FILE_NAME


def read_lock(folder: Path) -> dict[str, dict[str, Any]]:
    """Recorded file hashes of a component folder, keyed by relative path ({} when none)."""
    path = lock_path(folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RefgenError(f"lock file {path} is corrupt ({exc}); delete it and fetch again") from exc
    files = data.get("files", {}) if isinstance(data, dict) else {}
    return files if isinstance(files, dict) else {}


def _record_in_lock(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    """Merge records into the lock file; shared folders (sdxl-base, sdxl-base-config) keep both."""
    files = {**read_lock(folder), **records}
    payload = json.dumps({"version": 1, "files": dict(sorted(files.items()))}, indent=2) + "\n"
    write_atomic(lock_path(folder), payload.encode("utf-8"))


# ------------------------------------------------------------------------------ hub boundary


def hub_download(repo: str, filename: str, revision: str, dest_dir: Path, *, progress: bool = True) -> Path:
    """Download one file with huggingface_hub into dest_dir/filename (its own progress bar)."""
    from huggingface_hub import hf_hub_download

    check_hub_reachable(repo, filename, revision)
    try:
        downloaded = hf_hub_download(
            repo_id=repo,
            filename=filename,
            revision=revision,
            local_dir=dest_dir,
            tqdm_class=None if progress else _quiet_tqdm_class(),
        )
    except Exception as exc:  # network boundary: turn hub/HTTP errors into one actionable message
        raise WeightsDownloadError(f"could not download {filename} from {repo}@{revision}: {exc}") from exc
    return Path(downloaded)


def check_hub_reachable(repo: str, filename: str, revision: str, timeout: float = HUB_PROBE_TIMEOUT) -> None:
    """One metadata request, without retries. hf_hub_download retries a network error for ~25 s and
    has no setting for it, so with no network this answers at once instead (WeightsDownloadError)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise WeightsDownloadError("HF_HUB_OFFLINE is set, so the Hugging Face hub is not contacted (unset it to download)")
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=timeout)
    except HfHubHTTPError:
        return  # the hub answered (e.g. 401, 404): hf_hub_download reports the exact problem
    except Exception as exc:  # no answer at all: DNS, refused connection, timeout, proxy
        raise WeightsDownloadError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}): {exc}") from exc


def hub_sha256(repo: str, filename: str, revision: str) -> str | None:
    """The hub's sha256 of a file: the etag of an LFS file is its sha256; a small git file's etag
    is a git blob sha1, which says nothing about sha256, so those get None."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        metadata = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=HUB_PROBE_TIMEOUT)
    except Exception as exc:  # network boundary, as in hub_download
        raise WeightsDownloadError(f"could not read hub metadata of {filename} in {repo}@{revision}: {exc}") from exc
    etag = (metadata.etag or "").strip('"').lower()
    return etag if _SHA256_HEX.match(etag) else None


def _quiet_tqdm_class() -> type:
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


# ------------------------------------------------------------------------------------- fetch


def license_notice(entry: ManifestEntry) -> str:
    url = f" {entry.license_url}" if entry.license_url else ""
    return (
        f"{entry.name}: {entry.repo}@{entry.revision} is licensed under {entry.license_label}.{url}\n"
        f"  Downloading it means you accept that license's terms."
    )


def fetch(
    entry: ManifestEntry,
    weights_dir: Path | str | None = None,
    download: Downloader | None = None,
    progress: bool = True,
    expected_hash: HashLookup | None = None,
) -> Path:
    """Download the entry's missing files, check each sha256, move it into place, record the lock.

    `download` and `expected_hash` default to the Hugging Face hub; tests pass a local source.
    """
    download = download or functools.partial(hub_download, progress=progress)
    expected_hash = expected_hash or hub_sha256
    folder = entry.folder(weights_dir)
    print(license_notice(entry))
    missing = set(missing_files(entry, weights_dir))
    todo = [f for f in entry.files if f.path in missing]
    if not todo:
        print(f"{entry.name}: all {len(entry.files)} files already in {folder}")
        return folder
    staging = folder / STAGING_DIR_NAME
    try:
        for weight_file in todo:
            record = _fetch_one(entry, weight_file, folder, staging, download, expected_hash, progress)
            # Recorded per file, so an interrupted fetch still remembers what it verified.
            _record_in_lock(folder, {weight_file.path: record})
            print(_summary_line(weight_file.path, record))
    except WeightsDownloadError as exc:
        _discard_staging(staging)
        raise WeightsDownloadError(exc.reason, [still_missing(entry, weights_dir)]) from exc
    shutil.rmtree(staging, ignore_errors=True)
    print(f"{entry.name}: {len(todo)} file(s) fetched into {folder}")
    return folder


def _discard_staging(staging: Path) -> None:
    """Remove the download folder, and the component folder if that leaves it empty; a partial
    download is kept, so the next fetch resumes it."""
    if any(p.stat().st_size for p in staging.rglob("*.incomplete")):
        return
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only succeeds when empty


def still_missing(entry: ManifestEntry, weights_dir: Path | str | None = None) -> str:
    """'name: file, file and 3 more (in folder)' for the entry's files not on disk."""
    missing = missing_files(entry, weights_dir)
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{entry.name}: {shown} (in {entry.folder(weights_dir)})"


def _fetch_one(
    entry: ManifestEntry,
    weight_file: WeightFile,
    folder: Path,
    staging: Path,
    download: Downloader,
    expected_hash: HashLookup,
    progress: bool,
) -> dict[str, Any]:
    expected, source = _expected_sha256(entry, weight_file, expected_hash)
    staged = _download_into(staging, entry, weight_file, download)
    try:
        actual = sha256_file(staged, progress=progress)
        _check_integrity(entry, weight_file, expected, actual, staged.stat().st_size)
    except BaseException:
        # A bad (or half-hashed) file must not survive anywhere, under the final name or the temp one.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = folder / weight_file.path
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return {
        "sha256": actual,
        "size": final.stat().st_size,
        "verified_against": source,
        "entry": entry.name,
        "repo": entry.repo,
        "revision": entry.revision,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _expected_sha256(
    entry: ManifestEntry, weight_file: WeightFile, expected_hash: HashLookup
) -> tuple[str | None, str]:
    """(expected hash, where it came from): the manifest first, else the hub, else nothing."""
    if weight_file.sha256:
        return weight_file.sha256, "manifest"
    from_hub = expected_hash(entry.repo, weight_file.path, entry.revision)
    return (from_hub.lower(), "hub") if from_hub else (None, "none")


def _download_into(staging: Path, entry: ManifestEntry, weight_file: WeightFile, download: Downloader) -> Path:
    staging.mkdir(parents=True, exist_ok=True)
    returned = Path(download(entry.repo, weight_file.path, entry.revision, staging))
    staged = staging / weight_file.path
    if returned.resolve() != staged.resolve():
        # A source that left the file elsewhere: copy it next to the final place so the move is atomic.
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(returned, staged)
    return staged


def _check_integrity(
    entry: ManifestEntry, weight_file: WeightFile, expected: str | None, actual: str, size: int
) -> None:
    where = f"{weight_file.path} of '{entry.name}' ({entry.repo}@{entry.revision})"
    if expected is not None and actual != expected:
        raise WeightsIntegrityError(
            f"sha256 mismatch for {where}: expected {expected}, got {actual}. "
            "The download was discarded; fetch again, and if it persists the upstream file changed."
        )
    if weight_file.size is not None and size != weight_file.size:
        raise WeightsIntegrityError(
            f"size mismatch for {where}: expected {weight_file.size} bytes, got {size} "
            f"(sha256 {actual}). The download was discarded."
        )


def _summary_line(path: str, record: dict[str, Any]) -> str:
    checked = {"manifest": "matches manifest", "hub": "matches hub", "none": "no published hash"}
    return (
        f"  {path}  {human_size(record['size'])}  sha256 {record['sha256'][:16]}  "
        f"({checked.get(record['verified_against'], record['verified_against'])})"
    )


# ------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: CheckStatus
    expected: str | None
    actual: str | None

    @property
    def failed(self) -> bool:
        return self.status in ("missing", "mismatch")


def verify(entry: ManifestEntry, weights_dir: Path | str | None = None, progress: bool = False) -> list[FileCheck]:
    """Hash every file of the entry against the manifest sha256, else the lock file's record."""
    folder = entry.folder(weights_dir)
    lock = read_lock(folder)
    return [_check_file(folder, f, lock.get(f.path, {}), progress) for f in entry.files]


def _check_file(folder: Path, weight_file: WeightFile, locked: dict[str, Any], progress: bool) -> FileCheck:
    expected = weight_file.sha256 or locked.get("sha256")
    path = folder / weight_file.path
    if not path.is_file():
        return FileCheck(weight_file.path, "missing", expected, None)
    actual = sha256_file(path, progress=progress)
    if expected is None:
        return FileCheck(weight_file.path, "unverified", None, actual)
    size_ok = weight_file.size is None or path.stat().st_size == weight_file.size
    status: CheckStatus = "ok" if actual == expected and size_ok else "mismatch"
    return FileCheck(weight_file.path, status, expected, actual)


def convert_pickles(entry: ManifestEntry, weights_dir: Path | str | None = None, progress: bool = False) -> list[Path]:
    """Write a .safetensors copy beside each pickled `.bin` of an entry (IP-Adapter style nested dicts are
    flattened to `group.key`, the layout diffusers' loaders read back), so later loads need no pickle.

    Only files whose sha256 matches the manifest (or the fetch lock) are unpickled, and then with torch's
    weights-only unpickler: the published file, not whatever sits at its path."""
    import torch
    from safetensors.torch import save

    written = []
    for check in verify(entry, weights_dir, progress=progress):
        if not check.path.endswith(".bin"):
            continue
        if check.status != "ok":
            raise WeightsIntegrityError(
                f"{entry.name}: {check.path} is {check.status}; only a file matching its published sha256 is "
                f"converted (refgen weights fetch {entry.name})"
            )
        source = entry.folder(weights_dir) / check.path
        state = torch.load(str(source), map_location="cpu", weights_only=True)
        flat = {key: tensor.contiguous() for key, tensor in _flatten(state).items()}
        target = source.with_suffix(".safetensors")
        write_atomic(target, save(flat))
        written.append(target)
    return written


def _flatten(state: Any, prefix: str = "") -> dict:
    if isinstance(state, dict):
        return {key: value for name, part in state.items() for key, value in _flatten(part, f"{prefix}{name}.").items()}
    return {prefix[:-1]: state}


# What each feature needs, by manifest name (the studio's Weights view and GET /refgen/weights show it): the
# preprocessors only where a photo is turned into a control map (a ready map needs none).
FEATURE_WEIGHTS: dict[str, tuple[str, ...]] = {
    "Text to image (SDXL base)": ("sdxl-base", "sdxl-vae-fp16-fix"),
    "Style and Content Reference": ("ip-adapter-sdxl",),
    "Character Reference (InstantID)": ("instantid", "insightface-antelopev2"),
    "Character Reference (FaceID)": ("ip-adapter-faceid-plusv2-sdxl", "ip-adapter-sdxl", "insightface-buffalo-l"),
    "Character mask (hair, outfit)": ("face-parsing", "ip-adapter-sdxl"),
    "Edge (Canny) ControlNet": ("controlnet-canny-sdxl",),
    "Depth ControlNet (from a photo)": ("controlnet-depth-sdxl", "depth-anything-v2-small"),
    "Pose ControlNet (from a photo)": ("controlnet-openpose-sdxl", "annotators-openpose"),
    "Inpainting UNet": ("sdxl-inpainting",),
    "Upscale x2 and x4": ("realesrgan-x2plus", "realesrgan-x4plus"),
    "Face-aware training crops": ("insightface-antelopev2",),
}


def weights_status(manifest: Manifest | None = None, weights_dir: Path | str | None = None) -> dict[str, Any]:
    """Every component (present, or which files are missing) and every feature (what it still needs, and the one
    `refgen weights fetch` command that gets it). Reads only file names: nothing is hashed or downloaded."""
    manifest = manifest or Manifest.load()
    missing = {entry.name: missing_files(entry, weights_dir) for entry in manifest.entries}
    components = [{"name": entry.name, "kind": entry.kind, "license": entry.license, "size": entry.total_size,
                   "present": not missing[entry.name], "missing_files": missing[entry.name],
                   "folder": str(entry.folder(weights_dir))} for entry in manifest.entries]
    features = []
    for feature, names in FEATURE_WEIGHTS.items():
        needed = [name for name in names if name in missing and missing[name]]
        features.append({"feature": feature, "needs": list(names), "missing": needed, "ready": not needed,
                         "fetch": f"refgen weights fetch {' '.join(needed)}" if needed else None})
    return {"weights_dir": str(Path(weights_dir) if weights_dir else paths.weights_dir()),
            "components": components, "features": features}
