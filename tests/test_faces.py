"""The face layer (adapters/faces.py): insightface packs loaded through insightface's own loader from
the folder the committed manifest gives them, a real photo through detection + alignment +
recognition, identity scores, averaged references, typed errors, the InstantID keypoint picture.

The packs are tiny stand-ins built by tests/tiny_faces.py: a random-weight ArcFace-shaped ONNX net
and an SCRFD-shaped detector whose outputs are constants encoding the faces a test wants (placed
where the astronaut's face is in skimage's 512x512 photo). Offline, CPU, about a second per pack.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import tiny_faces as tf
from conftest import COMMITTED_MANIFEST
from adapters import faces as fl
from adapters.faces import (
    Face,
    FaceAnalyzer,
    face_cache,
    FaceIndexError,
    FaceModelError,
    FaceSelectionError,
    FaceTooSmallError,
    MultipleFacesError,
    NoFaceError,
    identity_score,
    keypoints_image,
)
from engine.errors import InvalidImageError, RefgenError, WeightsMissingError
from engine.weights import Manifest, license_notice



# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def other_photo() -> Image.Image:
    from skimage.data import coffee

    return Image.fromarray(coffee()).resize((512, 512))  # no person at all: "some other face" to ArcFace


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """Weights folders, each holding the antelopev2 pack with a detector encoding other faces."""
    root = tmp_path_factory.mktemp("face_packs")
    layouts = {
        "one": [tf.ASTRONAUT_FACE],
        "two": [tf.ASTRONAUT_FACE, tf.SECOND_FACE],
        "none": [],
        "tiny": [tf.TINY_FACE],
    }
    folders = {}
    for name, faces in layouts.items():
        tf.write_pack(root / name, faces, manifest_path=COMMITTED_MANIFEST)
        folders[name] = root / name
    tf.write_pack(root / "buffalo", [tf.ASTRONAUT_FACE], entry_name="insightface-buffalo-l",
                  manifest_path=COMMITTED_MANIFEST, seed=1)
    folders["buffalo"] = root / "buffalo"
    return folders


@pytest.fixture(autouse=True)
def hermetic(private_home):
    """Every test here: a private home, the committed manifest, no weights, no insightface download."""


def use_weights(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv("REFGEN_WEIGHTS", str(folder))


@pytest.fixture
def analyzer(packs, monkeypatch) -> FaceAnalyzer:
    use_weights(monkeypatch, packs["one"])
    return FaceAnalyzer.load("antelopev2", device="cpu")


# ------------------------------------------------------------------------------------ loading


def test_the_pack_loads_through_insightfaces_own_loader_from_the_manifest_folder(analyzer, packs):
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(analyzer.app, FaceAnalysis)
    assert isinstance(analyzer.app.models["detection"], SCRFD)
    assert isinstance(analyzer.app.models["recognition"], ArcFaceONNX)
    assert set(analyzer.app.models) == {"detection", "recognition"}
    expected = (packs["one"] / "insightface" / "models" / "antelopev2").resolve()
    assert analyzer.folder == expected  # <root>/models/<name>, the layout insightface expects
    assert analyzer.model_files == {
        "detection": expected / "scrfd_10g_bnkps.onnx",
        "recognition": expected / "glintr100.onnx",
    }
    assert analyzer.providers == ["CPUExecutionProvider"] and analyzer.device == "cpu"
    assert analyzer.describe()["files"] == {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"}


def test_model_zoo_routes_the_tiny_files_like_the_real_ones(packs):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    detector, recogniser = tf.pack_files("insightface-antelopev2", packs["one"], COMMITTED_MANIFEST)
    det = get_model(str(detector), providers=["CPUExecutionProvider"])
    rec = get_model(str(recogniser), providers=["CPUExecutionProvider"])
    assert isinstance(det, SCRFD) and det.use_kps  # the 9-output, keypoint-predicting SCRFD (strides 8/16/32)
    assert isinstance(rec, ArcFaceONNX) and rec.input_size == (112, 112)
    assert rec.session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
    assert rec.get_feat([np.zeros((112, 112, 3), np.uint8)] * 2).shape == (2, 512)


def test_buffalo_l_loads_from_its_own_manifest_layout(packs, monkeypatch, astronaut):
    use_weights(monkeypatch, packs["buffalo"])
    buffalo = FaceAnalyzer.load("buffalo_l", device="cpu")
    folder = (packs["buffalo"] / "insightface" / "models" / "buffalo_l").resolve()
    assert buffalo.pack == "buffalo_l" and buffalo.entry == "insightface-buffalo-l"
    assert buffalo.model_files == {"detection": folder / "det_10g.onnx", "recognition": folder / "w600k_r50.onnx"}
    face = buffalo.analyze(astronaut)
    assert face.embedding.shape == (512,)
    # the manifest entry name works as the pack name too
    assert FaceAnalyzer.load("insightface-buffalo-l", device="cpu").identity == buffalo.identity


def test_a_missing_pack_names_the_fetch_command_and_insightface_downloads_nothing(tmp_path, monkeypatch):
    use_weights(monkeypatch, tmp_path / "weights")
    with pytest.raises(WeightsMissingError, match="refgen weights fetch insightface-antelopev2") as caught:
        FaceAnalyzer.load("antelopev2", device="cpu")
    assert "glintr100.onnx" in str(caught.value) and "scrfd_10g_bnkps.onnx" in str(caught.value)
    with pytest.raises(WeightsMissingError, match="refgen weights fetch insightface-buffalo-l"):
        FaceAnalyzer.load("buffalo_l", device="cpu")
    assert not (tmp_path / "weights").exists()  # nothing created, nothing fetched


def test_a_half_present_pack_is_missing_too(tmp_path, monkeypatch):
    detector, _ = tf.pack_files("insightface-antelopev2", tmp_path, COMMITTED_MANIFEST)
    tf.save_constant_scrfd(detector, [tf.ASTRONAUT_FACE])
    use_weights(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissingError, match=r"missing: glintr100\.onnx\)"):
        FaceAnalyzer.load("antelopev2", device="cpu")


def test_a_corrupt_model_file_is_a_typed_error_naming_verify(tmp_path, monkeypatch):
    tf.write_pack(tmp_path, manifest_path=COMMITTED_MANIFEST)
    _, recogniser = tf.pack_files("insightface-antelopev2", tmp_path, COMMITTED_MANIFEST)
    recogniser.write_bytes(b"not an onnx file")
    use_weights(monkeypatch, tmp_path)
    with pytest.raises(FaceModelError, match="refgen weights verify insightface-antelopev2"):
        FaceAnalyzer.load("antelopev2", device="cpu")


def test_an_unknown_pack_lists_the_known_ones():
    with pytest.raises(FaceModelError, match="known: antelopev2, buffalo_l"):
        FaceAnalyzer.load("antelopev3", device="cpu")


# ------------------------------------------------------------------------------------ a real photo


def test_a_real_photo_gives_the_face_an_aligned_crop_and_a_unit_embedding(analyzer, astronaut):
    face = analyzer.analyze(astronaut)
    assert isinstance(face, Face)
    np.testing.assert_allclose(face.bbox, tf.ASTRONAUT_FACE.bbox, atol=1e-3)
    np.testing.assert_allclose(face.kps, np.array(tf.ASTRONAUT_FACE.kps), atol=1e-3)
    assert face.det_score == pytest.approx(0.92, abs=1e-6)
    assert face.image_size == (512, 512) and (face.width, face.height) == (92, 124)
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert face.crop.size == (112, 112) and face.crop.mode == "RGB"
    # Where the astronaut's face is in skimage's photo (measured on it, independent of tiny_faces)
    x1, y1, x2, y2 = face.bbox
    assert 165 <= x1 <= 195 and 255 <= x2 <= 285 and 45 <= y1 <= 80 and 170 <= y2 <= 200
    # ... and the crop is that face, aligned: skin tones in the middle, each eye (where ArcFace's
    # template puts it) darker than the cheek below it. Keypoints 20-30 px off fail this.
    crop = np.asarray(face.crop).astype(float)
    red, green, blue = crop[30:90, 20:92].mean(axis=(0, 1))
    assert red > green > blue and red - blue > 45
    assert crop[46:58, 30:46].mean() < crop[60:76, 24:44].mean() - 30  # left eye, left cheek
    assert crop[46:58, 66:82].mean() < crop[60:76, 68:88].mean() - 30  # right eye, right cheek
    assert analyzer.analyze(astronaut, crop_size=224).crop.size == (224, 224)


def test_the_embedding_is_the_recognition_models_on_the_aligned_crop(analyzer, astronaut):
    face = analyzer.analyze(astronaut)
    bgr = np.asarray(face.crop)[:, :, ::-1].copy()
    raw = analyzer.app.models["recognition"].get_feat(bgr).reshape(-1)
    np.testing.assert_allclose(face.embedding, raw / np.linalg.norm(raw), atol=1e-5)


def test_identity_score_is_one_for_the_same_picture_and_lower_for_another_face(analyzer, astronaut, other_photo):
    face = analyzer.analyze(astronaut)
    assert identity_score(face.embedding, face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert analyzer.score_image(astronaut, face.embedding) == pytest.approx(1.0, abs=1e-5)
    flipped = analyzer.analyze(ImageOps.mirror(astronaut)).embedding
    other = analyzer.analyze(other_photo).embedding
    assert identity_score(face, flipped) < 0.95 and identity_score(face, other) < 0.95
    assert identity_score(face, other) == pytest.approx(identity_score(other, face))
    assert analyzer.score_image(other_photo, face.embedding) == pytest.approx(identity_score(other, face))


def test_several_references_average_to_a_unit_vector(analyzer, astronaut, other_photo):
    first = analyzer.analyze(astronaut).embedding
    second = analyzer.analyze(ImageOps.mirror(astronaut)).embedding
    mean = analyzer.embed([astronaut, ImageOps.mirror(astronaut)])
    assert mean.shape == (512,) and mean.dtype == np.float32
    assert np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-5)
    expected = (first + second) / np.linalg.norm(first + second)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    assert identity_score(mean, first) > identity_score(second, first)  # the mean sits between them
    np.testing.assert_allclose(analyzer.embed([astronaut]), first, atol=1e-6)
    np.testing.assert_allclose(analyzer.embed(astronaut), first, atol=1e-6)  # one image, not a list
    with pytest.raises(FaceSelectionError, match="at least one"):
        analyzer.embed([])


def test_paths_bytes_and_arrays_give_the_same_face(analyzer, astronaut, tmp_path):
    path = tmp_path / "astronaut.png"
    astronaut.save(path)
    from_pil = analyzer.analyze(astronaut).embedding
    for source in (path, str(path), path.read_bytes(), np.asarray(astronaut)):
        np.testing.assert_array_equal(analyzer.analyze(source).embedding, from_pil)


# ------------------------------------------------------------------------------------ selection


def test_faces_come_largest_first_whatever_the_detectors_order(packs, monkeypatch, astronaut):
    use_weights(monkeypatch, packs["two"])
    two = FaceAnalyzer.load("antelopev2", device="cpu")
    raw = two.app.get(np.asarray(astronaut)[:, :, ::-1].copy())
    assert raw[0].det_score > raw[1].det_score and (raw[0].bbox[2] - raw[0].bbox[0]) < 92  # small one first
    found = two.analyze_all(astronaut)
    assert [f.bbox.tolist() for f in found] == [list(tf.ASTRONAUT_FACE.bbox), list(tf.SECOND_FACE.bbox)]
    assert two.analyze(astronaut).bbox.tolist() == list(tf.ASTRONAUT_FACE.bbox)  # default: largest
    assert two.analyze(astronaut, select=1).bbox.tolist() == list(tf.SECOND_FACE.bbox)
    assert not np.allclose(found[0].embedding, found[1].embedding)


def test_strict_single_face_refuses_several_faces(packs, monkeypatch, astronaut):
    use_weights(monkeypatch, packs["two"])
    two = FaceAnalyzer.load("antelopev2", device="cpu")
    with pytest.raises(MultipleFacesError, match=r"reference image shows 2 faces.*select=0\.\.1"):
        two.analyze(astronaut, select="single", what="reference image")
    with pytest.raises(MultipleFacesError, match="reference image 1 shows 2 faces"):
        two.embed([astronaut, astronaut], select="single")
    use_weights(monkeypatch, packs["one"])
    one = FaceAnalyzer.load("antelopev2", device="cpu")
    assert one.analyze(astronaut, select="single").bbox.tolist() == list(tf.ASTRONAUT_FACE.bbox)


def test_an_index_out_of_range_says_how_many_faces_were_found(packs, monkeypatch, astronaut):
    use_weights(monkeypatch, packs["two"])
    two = FaceAnalyzer.load("antelopev2", device="cpu")
    with pytest.raises(FaceIndexError, match=r"face index 2 is out of range: 2 faces found in image \(valid: 0\.\.1"):
        two.analyze(astronaut, select=2)
    with pytest.raises(IndexError, match="out of range"):  # also an IndexError
        two.analyze(astronaut, select=-1)


def test_bad_arguments_are_typed_errors(analyzer, astronaut):
    for kwargs in ({"select": "biggest"}, {"select": True}, {"min_face": -1}, {"crop_size": 100}):
        with pytest.raises(FaceSelectionError):
            analyzer.analyze(astronaut, **kwargs)
    with pytest.raises(FaceSelectionError, match="multiples of 32"):
        FaceAnalyzer.load("antelopev2", device="cpu", det_size=(600, 600))


def test_no_face_is_a_typed_error_and_scoring_says_none(packs, monkeypatch, analyzer, astronaut):
    blank = Image.new("RGB", (512, 512))  # the tiny detector sees no face in a black picture
    assert analyzer.analyze_all(blank) == []
    with pytest.raises(NoFaceError, match="no face found in image"):
        analyzer.analyze(blank)
    with pytest.raises(NoFaceError, match="no face found in reference image 2"):
        analyzer.embed([astronaut, blank, astronaut])
    with pytest.raises(NoFaceError, match="no face found in the reference image"):
        analyzer.embed([blank])
    assert analyzer.score_image(blank, analyzer.analyze(astronaut).embedding) is None
    use_weights(monkeypatch, packs["none"])
    blind = FaceAnalyzer.load("antelopev2", device="cpu")  # a detector that never finds one
    assert blind.analyze_all(astronaut) == []
    with pytest.raises(NoFaceError, match="no face found in image"):
        blind.analyze(astronaut, select="single")
    assert blind.score_image(astronaut, np.ones(512, np.float32)) is None


def test_a_face_smaller_than_min_face_is_refused_with_its_size(packs, monkeypatch, astronaut):
    use_weights(monkeypatch, packs["tiny"])
    tiny = FaceAnalyzer.load("antelopev2", device="cpu")
    with pytest.raises(FaceTooSmallError, match=r"face in image is 40x48 px, smaller than the 64 px minimum"):
        tiny.analyze(astronaut)
    assert tiny.analyze(astronaut, min_face=32).bbox.tolist() == list(tf.TINY_FACE.bbox)
    assert len(tiny.analyze_all(astronaut)) == 1  # listed, only refused as a reference
    assert tiny.score_image(astronaut, tiny.analyze(astronaut, min_face=0).embedding) == pytest.approx(1.0, abs=1e-5)


def test_an_unreadable_image_is_an_invalid_image_error(analyzer, astronaut, tmp_path):
    buffer = io.BytesIO()
    astronaut.save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(InvalidImageError, match="reference image"):
        analyzer.analyze(b"definitely not an image", what="reference image")
    with pytest.raises(InvalidImageError):
        analyzer.analyze(truncated)
    with pytest.raises(InvalidImageError, match="not found"):
        analyzer.analyze(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError):
        analyzer.score_image(truncated, np.ones(512, np.float32))
    with pytest.raises(InvalidImageError, match="RGB uint8"):
        analyzer.analyze(np.zeros((64, 64), np.float32))
    assert issubclass(InvalidImageError, RefgenError) and issubclass(NoFaceError, RefgenError)


# ------------------------------------------------------------------------------------ caching


def test_results_are_cached_by_image_content_and_analyzer_identity(packs, monkeypatch, astronaut):
    use_weights(monkeypatch, packs["one"])
    shared = face_cache(max_entries=8)
    analyzer = FaceAnalyzer.load("antelopev2", device="cpu", cache=shared)
    calls = []
    real_get = analyzer.app.get
    monkeypatch.setattr(analyzer.app, "get", lambda image, **kw: calls.append(1) or real_get(image, **kw))
    first = analyzer.analyze(astronaut)
    again = analyzer.analyze(astronaut.copy())  # same pixels, another object
    assert len(calls) == 1 and np.array_equal(first.embedding, again.embedding)
    analyzer.analyze(ImageOps.mirror(astronaut))
    assert len(calls) == 2
    assert not first.embedding.flags.writeable  # cached arrays cannot be changed by a caller
    # another detector setting is another identity: no stale hit from the shared cache
    stricter = FaceAnalyzer.load("antelopev2", device="cpu", det_thresh=0.95, cache=shared)
    assert stricter.identity != analyzer.identity
    with pytest.raises(NoFaceError):  # score 0.92 < 0.95
        stricter.analyze(astronaut)
    same = FaceAnalyzer.load("antelopev2", device="cpu", cache=shared)
    assert same.identity == analyzer.identity


# ------------------------------------------------------------------------------------ keypoints


def test_keypoints_image_draws_instantids_five_coloured_points_and_sticks():
    kps = np.array([[100, 100], [160, 100], [130, 140], [105, 175], [155, 175]], np.float32)
    picture = keypoints_image(kps, (256, 320))
    assert picture.size == (256, 320) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(kps.astype(int), expected):
        assert tuple(pixels[y, x]) == colour
    # a stick from each eye and mouth corner to the nose, in that point's colour at 60 %
    for index in (0, 1, 3, 4):
        x, y = ((kps[index] + kps[2]) / 2).astype(int)  # halfway: clear of both dots
        assert tuple(pixels[y, x]) == tuple(int(c * 0.6) for c in expected[index])
    assert tuple(pixels[120, 115]) == (153, 0, 0)  # on the left eye's stick
    assert pixels[0:50].max() == 0 and pixels[:, 200:].max() == 0  # black elsewhere
    drawn = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert drawn <= {(0, 0, 0), *expected, (153, 0, 0), (0, 153, 0), (153, 153, 0), (153, 0, 153)}


def test_keypoints_image_scales_from_the_analysed_image(analyzer, astronaut):
    face = analyzer.analyze(astronaut)
    direct = keypoints_image(face.kps * 2, (1024, 1024))
    scaled = keypoints_image(face.kps, (1024, 1024), from_size=astronaut.size)
    assert np.array_equal(np.asarray(direct), np.asarray(scaled))
    with pytest.raises(FaceSelectionError, match="five"):
        keypoints_image(face.kps[:4], (64, 64))


# ------------------------------------------------------------------------------------ providers


def test_onnx_providers_follow_the_device(monkeypatch):
    import onnxruntime
    import torch

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert fl.onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    assert fl.onnx_providers(torch.device("cuda")) == ["CPUExecutionProvider"]  # CPU-only onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert fl.onnx_providers(torch.device("cuda:1")) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert fl.onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------ manifest


def test_the_manifest_lists_both_packs_in_insightfaces_layout_with_published_hashes():
    manifest = Manifest.load(COMMITTED_MANIFEST)
    expected = {
        "insightface-antelopev2": ("insightface/models/antelopev2", {"scrfd_10g_bnkps.onnx", "glintr100.onnx"}),
        "insightface-buffalo-l": ("insightface/models/buffalo_l", {"det_10g.onnx", "w600k_r50.onnx"}),
    }
    for name, (folder, files) in expected.items():
        entry = manifest.get(name)
        assert entry.kind == "face-analysis"
        assert {Path(f.path).name for f in entry.files} == files
        assert {str((Path(entry.local_dir) / f.path).parent) for f in entry.files} == {folder}
        assert all(f.sha256 and re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.size for f in entry.files)
        assert "non-commercial" in entry.license and "non-commercial research" in entry.license_name
        assert "non-commercial research" in license_notice(entry)


def test_refgen_weights_list_shows_the_packs_are_non_commercial(tmp_path):
    from typer.testing import CliRunner

    from engine.cli.weights import weights_app

    result = CliRunner().invoke(
        weights_app, ["list", "--manifest", str(COMMITTED_MANIFEST), "--weights-dir", str(tmp_path)],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    for name in ("insightface-antelopev2", "insightface-buffalo-l"):
        (line,) = [row for row in result.output.splitlines() if name in row]
        assert "non-commercial" in line and "missing" in line


def test_results_persist_on_disk_for_the_next_session(packs, monkeypatch, astronaut, tmp_path):
    use_weights(monkeypatch, packs["one"])
    first = FaceAnalyzer.load("antelopev2", device="cpu", cache=face_cache(tmp_path / "faces"))
    analysed = first.analyze(astronaut)
    first.analyze_all(Image.new("RGB", (64, 64)))  # no face is a result too
    later = FaceAnalyzer.load("antelopev2", device="cpu", cache=face_cache(tmp_path / "faces"))
    monkeypatch.setattr(later.app, "get", lambda *a, **kw: pytest.fail("analysed again despite the disk cache"))
    again = later.analyze(astronaut)
    assert np.array_equal(again.embedding, analysed.embedding) and np.array_equal(again.kps, analysed.kps)
    assert again.det_score == pytest.approx(analysed.det_score) and not again.embedding.flags.writeable
    assert later.analyze_all(Image.new("RGB", (64, 64))) == []
    for file in (tmp_path / "faces").rglob("*.npz"):
        file.write_bytes(b"damaged")
    assert np.array_equal(FaceAnalyzer.load("antelopev2", device="cpu", cache=face_cache(tmp_path / "faces"))
                          .analyze(astronaut).embedding, analysed.embedding)  # a damaged file is analysed again
