"""The weights manifest, `require`, `fetch`, `verify` and `refgen weights ...`, all offline.

The network boundary (the hub download and the hub's hash lookup) is replaced by a local folder
laid out as <source>/<repo>/<file>; everything else is the code users run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli.weights import weights_app
from engine.errors import RefgenError, UnknownModelError, WeightsIntegrityError, WeightsMissingError
from engine.weights import (
    LOCK_FILE_NAME,
    STAGING_DIR_NAME,
    Manifest,
    fetch,
    missing_files,
    require,
    sha256_file,
    verify,
)

COMMITTED_MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.toml"
REPO = "acme/tiny-model"
CONFIG = b'{"layers": 2}\n'
# Over 1 MiB so hashing crosses several chunks.
WEIGHTS = bytes(range(256)) * (5 * 4096 + 7)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[\n" + "".join(f"  {toml_value(v)},\n" for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # JSON strings and ints are valid TOML for these plain values


def write_manifest(path: Path, components: list[dict]) -> Path:
    tables = ["[[component]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in c.items()) for c in components]
    path.write_text("\n".join(tables), encoding="utf-8")
    return path


def component(name: str = "tiny", files: list[dict] | None = None, local_dir: str | None = None) -> dict:
    return {
        "name": name,
        "kind": "sdxl-pipeline",
        "description": "a tiny test component",
        "repo": REPO,
        "revision": "main",
        "license": "MIT",
        "license_url": "https://example.org/LICENSE",
        "local_dir": local_dir or name,
        "files": files
        if files is not None
        else [
            {"path": "config.json", "sha256": sha256_of(CONFIG), "size": len(CONFIG)},
            {"path": "unet/weights.safetensors", "sha256": sha256_of(WEIGHTS), "size": len(WEIGHTS)},
        ],
    }


class LocalSource:
    """A fake hub: serves <root>/<repo>/<file> into dest_dir and counts what it was asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []

    def put(self, filename: str, data: bytes) -> None:
        path = self.root / REPO / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def __call__(self, repo: str, filename: str, revision: str, dest_dir: Path) -> Path:
        self.requests.append(filename)
        target = dest_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((self.root / repo / filename).read_bytes())
        return target


def no_hub_hash(repo: str, filename: str, revision: str) -> str | None:
    raise AssertionError(f"the hub was asked for a hash the manifest already has: {filename}")


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def source(tmp_path: Path) -> LocalSource:
    src = LocalSource(tmp_path / "source")
    src.put("config.json", CONFIG)
    src.put("unet/weights.safetensors", WEIGHTS)
    return src


@pytest.fixture
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("REFGEN_WEIGHTS", str(folder))
    return folder


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Manifest:
    path = write_manifest(tmp_path / "manifest.toml", [component()])
    monkeypatch.setenv("REFGEN_MANIFEST", str(path))
    return Manifest.load()


# ------------------------------------------------------------------------- committed manifest


def test_committed_manifest_parses_with_repo_license_and_files_for_every_entry() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    assert len(manifest.names()) == len(set(manifest.names()))
    for entry in manifest.entries:
        assert entry.repo.count("/") == 1, entry.name
        assert entry.license and entry.license_url.startswith("https://"), entry.name
        assert entry.files, entry.name


def test_committed_manifest_has_the_sdxl_components_the_engine_needs() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    assert {"sdxl-base", "sdxl-vae-fp16-fix", "sdxl-base-config"} <= set(manifest.names())
    base = manifest.get("sdxl-base")
    assert base.variant == "fp16"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in {f.path for f in base.files}
    assert manifest.get("sdxl-vae-fp16-fix").repo == "madebyollin/sdxl-vae-fp16-fix"


def test_sdxl_base_config_is_a_weightless_subset_of_sdxl_base_in_the_same_folder() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    base, config = manifest.get("sdxl-base"), manifest.get("sdxl-base-config")
    assert (config.repo, config.revision, config.local_dir) == (base.repo, base.revision, base.local_dir)
    base_files = {f.path: f for f in base.files}
    for file in config.files:
        assert not file.path.endswith(".safetensors")
        assert base_files[file.path] == file  # same path, same hash, same size


def test_manifest_get_unknown_name_lists_the_known_ones() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    with pytest.raises(UnknownModelError, match="sdxl-base.*sdxl-vae-fp16-fix"):
        manifest.get("sdxl-turbo")


@pytest.mark.parametrize(
    ("field", "value"),
    [("path", "../escape.bin"), ("path", "/etc/passwd"), ("sha256", "not-a-hash")],
)
def test_manifest_rejects_unsafe_paths_and_malformed_hashes(tmp_path: Path, field: str, value: str) -> None:
    bad_file = {"path": "config.json", field: value}
    path = write_manifest(tmp_path / "manifest.toml", [component(files=[bad_file])])
    with pytest.raises(RefgenError, match="malformed"):
        Manifest.load(path)


def test_manifest_rejects_duplicate_names(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "manifest.toml", [component("twice"), component("twice")])
    with pytest.raises(RefgenError, match="unique"):
        Manifest.load(path)


def test_missing_manifest_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(RefgenError, match="REFGEN_MANIFEST"):
        Manifest.load(tmp_path / "nowhere.toml")


# ---------------------------------------------------------------------------------- require


def test_require_on_empty_weights_dir_names_the_entry_and_the_fetch_command(tmp_path: Path) -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    with pytest.raises(WeightsMissingError) as caught:
        require("sdxl-base", weights_dir=tmp_path, manifest=manifest)
    assert caught.value.entry == "sdxl-base"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in caught.value.missing
    assert "'sdxl-base'" in str(caught.value)
    assert "refgen weights fetch sdxl-base" in str(caught.value)


def test_require_reads_manifest_and_weights_dir_from_the_environment(weights_dir: Path, manifest: Manifest) -> None:
    with pytest.raises(WeightsMissingError, match="refgen weights fetch tiny"):
        require("tiny")


def test_require_returns_the_folder_once_every_file_is_there(
    weights_dir: Path, manifest: Manifest, source: LocalSource
) -> None:
    fetch(manifest.get("tiny"), download=source, expected_hash=no_hub_hash, progress=False)
    assert require("tiny") == weights_dir / "tiny"


# ------------------------------------------------------------------------------------ fetch


def test_fetch_writes_the_files_and_a_lock_and_verify_says_ok(
    weights_dir: Path, manifest: Manifest, source: LocalSource, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = manifest.get("tiny")
    folder = fetch(entry, download=source, expected_hash=no_hub_hash, progress=False)

    assert folder == weights_dir / "tiny"
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "unet/weights.safetensors").read_bytes() == WEIGHTS
    assert all_files(folder) == [LOCK_FILE_NAME, "config.json", "unet/weights.safetensors"]
    lock = json.loads((folder / LOCK_FILE_NAME).read_text())["files"]
    assert lock["unet/weights.safetensors"]["sha256"] == sha256_of(WEIGHTS)
    assert lock["unet/weights.safetensors"]["verified_against"] == "manifest"
    assert [c.status for c in verify(entry)] == ["ok", "ok"]
    printed = capsys.readouterr().out
    assert "MIT" in printed and "https://example.org/LICENSE" in printed  # license shown first


def test_fetch_downloads_only_what_is_missing(weights_dir: Path, manifest: Manifest, source: LocalSource) -> None:
    entry = manifest.get("tiny")
    (weights_dir / "tiny").mkdir()
    (weights_dir / "tiny" / "config.json").write_bytes(CONFIG)
    fetch(entry, download=source, expected_hash=no_hub_hash, progress=False)
    fetch(entry, download=source, expected_hash=no_hub_hash, progress=False)
    assert source.requests == ["unet/weights.safetensors"]


def test_corrupted_download_raises_and_leaves_no_file_under_any_name(
    weights_dir: Path, manifest: Manifest, source: LocalSource
) -> None:
    source.put("unet/weights.safetensors", WEIGHTS[:-1] + b"\x00")  # one flipped byte, same size
    entry = manifest.get("tiny")
    with pytest.raises(WeightsIntegrityError) as caught:
        fetch(entry, download=source, expected_hash=no_hub_hash, progress=False)

    message = str(caught.value)
    assert "unet/weights.safetensors" in message
    assert sha256_of(WEIGHTS) in message  # expected
    assert sha256_of(WEIGHTS[:-1] + b"\x00") in message  # actual
    folder = weights_dir / "tiny"
    assert not (folder / "unet/weights.safetensors").exists()
    assert not (folder / STAGING_DIR_NAME).exists()
    # config.json was good and fetched first; nothing of the bad file remains anywhere.
    assert all_files(folder) == [LOCK_FILE_NAME, "config.json"]


def test_without_a_manifest_hash_the_hubs_sha256_is_checked(
    weights_dir: Path, tmp_path: Path, source: LocalSource
) -> None:
    path = write_manifest(tmp_path / "m.toml", [component(files=[{"path": "unet/weights.safetensors"}])])
    entry = Manifest.load(path).get("tiny")
    wrong_hub = {"unet/weights.safetensors": sha256_of(b"something else")}
    with pytest.raises(WeightsIntegrityError, match="sha256 mismatch"):
        fetch(entry, download=source, expected_hash=lambda r, f, v: wrong_hub[f], progress=False)
    assert all_files(weights_dir) == []

    right_hub = {"unet/weights.safetensors": sha256_of(WEIGHTS)}
    folder = fetch(entry, download=source, expected_hash=lambda r, f, v: right_hub[f], progress=False)
    assert json.loads((folder / LOCK_FILE_NAME).read_text())["files"]["unet/weights.safetensors"][
        "verified_against"
    ] == "hub"


def test_size_mismatch_is_refused_even_when_no_hash_is_known(
    weights_dir: Path, tmp_path: Path, source: LocalSource
) -> None:
    files = [{"path": "config.json", "size": len(CONFIG) + 1}]
    entry = Manifest.load(write_manifest(tmp_path / "m.toml", [component(files=files)])).get("tiny")
    with pytest.raises(WeightsIntegrityError, match="size mismatch"):
        fetch(entry, download=source, expected_hash=lambda r, f, v: None, progress=False)
    assert all_files(weights_dir) == []


def test_fetching_the_full_component_satisfies_a_config_entry_sharing_its_folder(
    weights_dir: Path, tmp_path: Path, source: LocalSource
) -> None:
    full = component("full", local_dir="shared")
    config_only = component("full-config", files=full["files"][:1], local_dir="shared")
    manifest = Manifest.load(write_manifest(tmp_path / "m.toml", [full, config_only]))
    fetch(manifest.get("full"), download=source, expected_hash=no_hub_hash, progress=False)
    assert require("full-config", manifest=manifest) == weights_dir / "shared"
    assert [c.status for c in verify(manifest.get("full-config"))] == ["ok"]


# ----------------------------------------------------------------------------------- verify


def test_verify_uses_the_lock_to_detect_a_file_changed_after_fetch(
    weights_dir: Path, tmp_path: Path, source: LocalSource
) -> None:
    # No hash in the manifest and none on the hub: only the lock file remembers what was fetched.
    files = [{"path": "config.json"}, {"path": "unet/weights.safetensors"}]
    entry = Manifest.load(write_manifest(tmp_path / "m.toml", [component(files=files)])).get("tiny")
    folder = fetch(entry, download=source, expected_hash=lambda r, f, v: None, progress=False)
    assert [c.status for c in verify(entry)] == ["ok", "ok"]

    with (folder / "unet/weights.safetensors").open("r+b") as handle:
        handle.seek(1234)
        handle.write(b"\xff")
    checks = {c.path: c for c in verify(entry)}
    assert checks["config.json"].status == "ok"
    changed = checks["unet/weights.safetensors"]
    assert changed.status == "mismatch"
    assert changed.expected == sha256_of(WEIGHTS)
    assert changed.actual == sha256_file(folder / "unet/weights.safetensors") != changed.expected


def test_verify_reports_missing_and_unverified_files(weights_dir: Path, tmp_path: Path) -> None:
    files = [{"path": "config.json"}, {"path": "unet/weights.safetensors"}]
    entry = Manifest.load(write_manifest(tmp_path / "m.toml", [component(files=files)])).get("tiny")
    (weights_dir / "tiny").mkdir()
    (weights_dir / "tiny" / "config.json").write_bytes(CONFIG)  # placed by hand: nothing to compare with
    checks = verify(entry)
    assert [(c.path, c.status) for c in checks] == [
        ("config.json", "unverified"),
        ("unet/weights.safetensors", "missing"),
    ]
    assert checks[0].actual == sha256_of(CONFIG)
    assert missing_files(entry) == ["unet/weights.safetensors"]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(WEIGHTS)
    assert sha256_file(path) == sha256_file(path, progress=True) == sha256_of(WEIGHTS)


def test_importing_the_module_does_not_import_huggingface_hub() -> None:
    code = "import sys, engine.weights, engine.cli.weights; print('huggingface_hub' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, check=True)
    assert result.stdout.strip() == "False"


# -------------------------------------------------------------------------------------- CLI


def test_cli_list_shows_every_component_and_whether_it_is_present(
    weights_dir: Path, manifest: Manifest, source: LocalSource
) -> None:
    runner = CliRunner()
    before = runner.invoke(weights_app, ["list"], env={"COLUMNS": "200"})
    assert before.exit_code == 0, before.output
    assert "tiny" in before.output and "missing" in before.output and "MIT" in before.output

    fetch(manifest.get("tiny"), download=source, expected_hash=no_hub_hash, progress=False)
    after = runner.invoke(weights_app, ["list"], env={"COLUMNS": "200"})
    assert after.exit_code == 0, after.output
    assert "present" in after.output


def test_cli_list_reads_the_committed_manifest(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        weights_app, ["list", "--manifest", str(COMMITTED_MANIFEST), "--weights-dir", str(tmp_path)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for name in ("sdxl-base", "sdxl-vae-fp16-fix", "sdxl-base-config"):
        assert name in result.output


def test_cli_verify_exits_1_on_missing_weights_and_says_how_to_fetch(weights_dir: Path, manifest: Manifest) -> None:
    result = CliRunner().invoke(weights_app, ["verify"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "missing" in result.output
    assert "refgen weights fetch tiny" in result.output


def test_cli_verify_exits_0_when_everything_matches(weights_dir: Path, manifest: Manifest, source: LocalSource) -> None:
    fetch(manifest.get("tiny"), download=source, expected_hash=no_hub_hash, progress=False)
    result = CliRunner().invoke(weights_app, ["verify", "tiny"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_cli_errors_are_one_red_line_not_a_traceback(weights_dir: Path, manifest: Manifest) -> None:
    for command in (["verify", "nope"], ["fetch", "nope"]):
        result = CliRunner().invoke(weights_app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 1
        assert isinstance(result.exception, SystemExit)  # a clean exit, no RefgenError escaping
        assert "error:" in result.output and "known: tiny" in result.output
        assert "Traceback" not in result.output


# ------------------------------------------------------------- Character Reference adapters

CHARACTER_ADAPTER_FILES = {
    # name -> (kind, repo, local_dir, the published repo paths, in manifest order)
    "ip-adapter-faceid-plusv2-sdxl": (
        "ip-adapter",
        "h94/IP-Adapter-FaceID",
        "ip-adapter-faceid",
        ["ip-adapter-faceid-plusv2_sdxl.bin", "ip-adapter-faceid-plusv2_sdxl_lora.safetensors"],
    ),
    "instantid": (
        "instantid",
        "InstantX/InstantID",
        "instantid",
        ["ip-adapter.bin", "ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors"],
    ),
}


@pytest.mark.parametrize("name", sorted(CHARACTER_ADAPTER_FILES))
def test_character_adapter_entries_list_the_published_files_at_a_pinned_commit(name: str) -> None:
    entry = Manifest.load(COMMITTED_MANIFEST).get(name)
    kind, repo, local_dir, paths = CHARACTER_ADAPTER_FILES[name]
    assert (entry.kind, entry.repo, entry.local_dir) == (kind, repo, local_dir)
    assert [f.path for f in entry.files] == paths
    # A pinned commit (40 hex digits), not a branch that can move under the hashes.
    assert len(entry.revision) == 40 and all(c in "0123456789abcdef" for c in entry.revision)
    # Every weight file carries its published LFS sha256 and size; small configs may rely on the lock.
    for file in entry.files:
        if not file.path.endswith(".json"):
            assert file.sha256 and file.size, (name, file.path)


@pytest.mark.parametrize("name", sorted(CHARACTER_ADAPTER_FILES))
def test_character_adapter_entries_have_license_fields(name: str) -> None:
    entry = Manifest.load(COMMITTED_MANIFEST).get(name)
    assert entry.license and entry.license_name
    assert entry.license_url.startswith("https://huggingface.co/" + entry.repo)
    assert entry.license_label.endswith(f"({entry.license})")


def test_faceid_is_marked_non_commercial_like_the_insightface_packs() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    faceid = manifest.get("ip-adapter-faceid-plusv2-sdxl")
    for pack in ("insightface-antelopev2", "insightface-buffalo-l"):
        assert faceid.license == manifest.get(pack).license == "non-commercial-research-only"
    assert "research purposes" in faceid.license_name and "commercial use" in faceid.license_name


def test_instantid_is_apache_per_its_card_with_the_research_only_and_antelopev2_caveats() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    instantid = manifest.get("instantid")
    assert instantid.license == "apache-2.0"
    assert "research purposes only" in instantid.license_name  # the GitHub README's disclaimer
    assert "antelopev2" in instantid.license_name and "antelopev2" in instantid.description
    assert "insightface-antelopev2" in manifest.names()


def test_faceid_uses_the_vit_h_image_encoder_of_the_ip_adapter_sdxl_entry() -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    faceid = manifest.get("ip-adapter-faceid-plusv2-sdxl")
    assert "`ip-adapter-sdxl`" in faceid.description and "ViT-H" in faceid.description
    encoder_files = {f.path for f in manifest.get("ip-adapter-sdxl").files}
    assert {"models/image_encoder/config.json", "models/image_encoder/model.safetensors"} <= encoder_files
    assert not any("image_encoder" in f.path for f in faceid.files)  # not fetched twice


def test_every_pickle_in_the_committed_manifest_carries_a_published_sha256() -> None:
    from engine.loading import PICKLE_SUFFIXES  # imports torch: keep it out of module import

    pickles = [
        (entry.name, file)
        for entry in Manifest.load(COMMITTED_MANIFEST).entries
        for file in entry.files
        if Path(file.path).suffix.lower() in PICKLE_SUFFIXES
    ]
    names = {name for name, _ in pickles}
    assert {"ip-adapter-faceid-plusv2-sdxl", "instantid", "annotators-openpose"} <= names
    for name, file in pickles:
        assert file.sha256, f"{name}: pickle {file.path} has no sha256; refgen refuses unhashed pickles"


def test_a_pickled_adapter_with_the_wrong_bytes_is_never_left_on_disk(
    weights_dir: Path, tmp_path: Path, source: LocalSource
) -> None:
    # Same shape as the committed adapters: a .bin pickle next to a safetensors file, each hashed.
    pickled = b"\x80\x04fake-pickle"
    source.put("ip-adapter.bin", pickled + b"tampered")
    files = [
        {"path": "ip-adapter.bin", "sha256": sha256_of(pickled), "size": len(pickled)},
        {"path": "unet/weights.safetensors", "sha256": sha256_of(WEIGHTS), "size": len(WEIGHTS)},
    ]
    entry = Manifest.load(write_manifest(tmp_path / "m.toml", [component("adapter", files=files)])).get("adapter")
    with pytest.raises(WeightsIntegrityError, match="ip-adapter.bin"):
        fetch(entry, download=source, expected_hash=no_hub_hash, progress=False)
    assert not (weights_dir / "adapter" / "ip-adapter.bin").exists()
    assert not (weights_dir / "adapter" / STAGING_DIR_NAME).exists()


def test_cli_list_shows_the_character_adapters_and_their_licenses(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        weights_app, ["list", "--manifest", str(COMMITTED_MANIFEST), "--weights-dir", str(tmp_path)],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    for name in CHARACTER_ADAPTER_FILES:
        assert name in result.output
