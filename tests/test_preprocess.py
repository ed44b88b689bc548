"""ControlNet preprocessors: real Canny on a real photo, tiny random-weight annotators in their
published layouts loaded through the real (hash-checked, weights-only) loaders, the result cache,
and `is_preprocessed`. Offline, CPU."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import tiny_annotators as ta
from adapters import preprocess as pp
from engine.errors import UnsafeWeightsError, WeightsIntegrityError, WeightsMissingError
from engine.weights import Manifest

COMMITTED_MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.toml"


@pytest.fixture(autouse=True)
def hermetic(private_home):
    """Caches (sha256.json, preprocess/) in a folder of this test only."""


@pytest.fixture(scope="module")
def annotator_weights(tmp_path_factory):
    """(weights dir, manifest path): tiny/random weights for every model-based preprocessor."""
    root = tmp_path_factory.mktemp("annotators")
    weights = root / "weights"
    ta.save_tiny_depth_model(weights / "depth-anything-v2-small")
    body = ta.save_openpose_body(weights / "annotators-openpose" / "body_pose_model.pth")
    hed = ta.save_hed(weights / "annotators-hed" / "ControlNetHED.pth")
    fine = ta.save_lineart(weights / "annotators-lineart" / "sk_model.pth", seed=1)
    coarse = ta.save_lineart(weights / "annotators-lineart" / "sk_model2.pth", seed=2)
    manifest = ta.write_manifest(root / "manifest.toml", [
        # safetensors: no hash needed (the file is data, not code)
        ta.component("depth-anything-v2-small", "depth-anything-v2-small",
                     [("config.json", None), ("model.safetensors", None), ("preprocessor_config.json", None)],
                     kind="depth-estimator"),
        # pickles: loadable only with a recorded hash
        ta.component("annotators-openpose", "annotators-openpose", [("body_pose_model.pth", ta.sha256(body))]),
        ta.component("annotators-hed", "annotators-hed", [("ControlNetHED.pth", ta.sha256(hed))]),
        ta.component("annotators-lineart", "annotators-lineart",
                     [("sk_model.pth", ta.sha256(fine)), ("sk_model2.pth", ta.sha256(coarse))]),
    ])
    return weights, manifest


@pytest.fixture
def loaded(annotator_weights):
    weights, manifest_path = annotator_weights
    manifest = Manifest.load(manifest_path)
    return lambda kind, **kwargs: pp.get_preprocessor(kind, weights, manifest=manifest, **kwargs)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ------------------------------------------------------------------------------------- canny


def test_canny_on_a_photo_draws_the_face_and_helmet_contours_white_on_black(astronaut):
    edges = _pixels(pp.get_preprocessor("canny")(astronaut))
    assert edges.shape == (512, 512, 3)
    assert (edges[:, :, 0] == edges[:, :, 1]).all() and (edges[:, :, 1] == edges[:, :, 2]).all()
    assert set(np.unique(edges)) <= {0, 255}
    white = edges[:, :, 0] > 0
    assert 0.02 < white.mean() < 0.20  # mostly black
    assert white[80:170, 175:275].mean() > 0.05  # eyes, nose, mouth, hairline
    assert white[335:365, 395:405].any()  # the top of the helmet's outline
    assert white[20:80, 300:350].mean() < 0.01  # the plain studio backdrop


def test_canny_thresholds_change_the_edge_count_monotonically(astronaut):
    canny = pp.get_preprocessor("edge")  # Leonardo's name for it
    counts = [int((_pixels(canny(astronaut, low_threshold=low, high_threshold=2 * low))[:, :, 0] > 0).sum())
              for low in (20, 50, 100, 200, 300)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts), counts
    default = _pixels(canny(astronaut))
    assert np.array_equal(default, _pixels(canny(astronaut, low_threshold=100, high_threshold=200)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"low_threshold": 300, "high_threshold": 100}, "low_threshold <= high_threshold"),
        ({"low_threshold": "lots"}, "expected float"),
        ({"sigma": 2}, "no option sigma; options: high_threshold, low_threshold"),
    ],
)
def test_canny_rejects_bad_options_with_a_clear_message(astronaut, options, message):
    with pytest.raises(pp.PreprocessorError, match=re.escape(message)):
        pp.get_preprocessor("canny")(astronaut, **options)


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda rgb: rgb.convert("L")),
        ("LA", lambda rgb: rgb.convert("LA")),
        ("RGBA", lambda rgb: rgb.convert("RGBA")),
        ("CMYK", lambda rgb: rgb.convert("CMYK")),
        ("P", lambda rgb: rgb.convert("P")),
        ("I;16", lambda rgb: Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)),
    ],
)
def test_any_input_mode_becomes_an_rgb_control_image_of_the_same_size(astronaut, mode, make):
    source = make(astronaut.resize((160, 96)))
    assert source.mode == mode
    for kind in ("canny", "scribble"):
        out = pp.get_preprocessor(kind)(source)
        assert out.mode == "RGB" and out.size == (160, 96)
        assert _pixels(out).max() == 255  # found something


def test_transparent_pixels_count_as_white_not_black():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (16, 16, 48, 48))  # an opaque black square on transparency
    edges = _pixels(pp.get_preprocessor("canny")(image))[:, :, 0] > 0
    assert edges[14:18, 16:48].any() and not edges[:8].any()  # the square's outline, on white


def test_scribble_is_thick_and_binary(astronaut):
    canny = _pixels(pp.get_preprocessor("canny")(astronaut))[:, :, 0] > 0
    scribble = _pixels(pp.get_preprocessor("sketch")(astronaut, thickness=5))
    assert set(np.unique(scribble)) <= {0, 255}
    assert (scribble[:, :, 0] > 0).sum() > 1.5 * canny.sum()  # thicker strokes
    with pytest.raises(pp.PreprocessorError, match="source='pencil'.*canny, hed"):
        pp.get_preprocessor("scribble")(astronaut, source="pencil")


# --------------------------------------------------------------------------- model-based types


def test_depth_model_loads_from_the_manifest_folder_and_maps_the_input_size(annotator_weights, astronaut, monkeypatch):
    weights, manifest = annotator_weights
    monkeypatch.setenv("REFGEN_WEIGHTS", str(weights))
    monkeypatch.setenv("REFGEN_MANIFEST", str(manifest))
    depth = pp.get_preprocessor("depth")  # both locations from the environment
    out = _pixels(depth(astronaut.resize((320, 200))))
    assert out.shape == (200, 320, 3)
    assert (out[:, :, 0] == out[:, :, 2]).all()  # grey
    assert out.min() == 0 and out.max() == 255  # normalised per image
    model_hash = ta.sha256(weights / "depth-anything-v2-small" / "model.safetensors")
    assert depth.identity({}) == f"depth-anything-v2-small@{model_hash[:16]}"


def test_pose_loads_the_published_body_layout_through_the_hash_checked_loader(loaded, annotator_weights, astronaut):
    pose = loaded("openpose")
    # The network holds the file's tensors (published key `conv1_1.weight` = network `model0.conv1_1.weight`).
    published = torch.load(annotator_weights[0] / "annotators-openpose" / "body_pose_model.pth", weights_only=True)
    network = pose._parts["body"][0].model
    assert torch.equal(network.state_dict()["model0.conv1_1.weight"], published["conv1_1.weight"])
    assert torch.equal(network.state_dict()["model6_2.Mconv7_stage6_L2.bias"], published["Mconv7_stage6_L2.bias"])
    out = pose(astronaut.resize((256, 192)), detect_resolution=128)
    assert out.mode == "RGB" and out.size == (256, 192)  # random weights: usually nobody found, a black map


def test_pose_accepts_a_body_file_already_in_the_networks_own_key_names(tmp_path, astronaut):
    body = ta.save_openpose_body(tmp_path / "w" / "op" / "body_pose_model.pth", seed=3, prefixed=True)
    manifest = Manifest.load(ta.write_manifest(tmp_path / "m.toml", [
        ta.component("annotators-openpose", "op", [("body_pose_model.pth", ta.sha256(body))])]))
    pose = pp.get_preprocessor("pose", tmp_path / "w", manifest=manifest)
    assert pose(astronaut.resize((128, 128)), detect_resolution=64).size == (128, 128)


def test_pose_hands_need_the_hand_model_and_say_how_to_fetch_it(loaded, astronaut):
    with pytest.raises(WeightsMissingError, match="hand_pose_model.pth.*refgen weights fetch annotators-openpose"):
        loaded("pose")(astronaut, hands=True)


@pytest.mark.parametrize(
    "kind, options",
    [("softedge", {}), ("hed", {"safe": True}), ("lineart", {}), ("lineart", {"coarse": True}),
     ("scribble", {"source": "hed"})],
)
def test_annotator_networks_run_and_return_a_grey_map_of_the_input_size(loaded, astronaut, kind, options):
    out = _pixels(loaded(kind)(astronaut.resize((200, 150)), detect_resolution=96, **options))
    assert out.shape == (150, 200, 3)
    assert (out[:, :, 0] == out[:, :, 1]).all()


def test_lineart_coarse_uses_its_own_weights(loaded, astronaut):
    lineart = loaded("lineart")
    fine, coarse = (lineart.identity(lineart.resolve_options(coarse=flag)) for flag in (False, True))
    assert fine != coarse
    image = astronaut.resize((128, 128))
    assert not np.array_equal(_pixels(lineart(image, detect_resolution=64)),
                              _pixels(lineart(image, detect_resolution=64, coarse=True)))


# ------------------------------------------------------------------------------ pickle safety


class _Payload:
    """Unpickling this touches a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hed_folder(tmp_path: Path, digest_of=None):
    """A weights dir with one HED file, and a manifest recording `digest_of(file)` (None: no hash)."""
    path = ta.save_hed(tmp_path / "w" / "hed" / "ControlNetHED.pth", seed=4)
    digest = digest_of(path) if digest_of else None
    manifest = Manifest.load(ta.write_manifest(tmp_path / "m.toml", [
        ta.component("annotators-hed", "hed", [("ControlNetHED.pth", digest)])]))
    return tmp_path / "w", manifest, path


def test_an_annotator_pickle_whose_hash_differs_is_refused_before_loading(tmp_path):
    weights, manifest, path = _hed_folder(tmp_path, ta.sha256)
    marker = tmp_path / "pwned"
    torch.save({"norm": torch.zeros(1), "x": _Payload(marker)}, path)  # swapped after the hash was recorded
    with pytest.raises(WeightsIntegrityError, match="refgen weights fetch annotators-hed"):
        pp.get_preprocessor("softedge", weights, manifest=manifest, allow_pickle=True)
    assert not marker.exists()


def test_an_annotator_pickle_with_no_recorded_hash_needs_the_opt_in(tmp_path, astronaut):
    weights, manifest, _ = _hed_folder(tmp_path)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        pp.get_preprocessor("softedge", weights, manifest=manifest)
    softedge = pp.get_preprocessor("softedge", weights, manifest=manifest, allow_pickle=True)
    assert softedge(astronaut.resize((64, 64)), detect_resolution=64).size == (64, 64)


def test_a_lock_file_hash_from_refgen_weights_fetch_counts_as_recorded(tmp_path, astronaut):
    """A pickle nobody vouched for needs allow_pickle; the same file, hashed by `refgen weights fetch`
    into the lock file, loads without it (weights-only) and runs."""
    from engine.weights import _record_in_lock

    weights, manifest, path = _hed_folder(tmp_path)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        pp.get_preprocessor("softedge", weights, manifest=manifest)
    _record_in_lock(path.parent, {"ControlNetHED.pth": {"sha256": ta.sha256(path)}})
    softedge = pp.get_preprocessor("softedge", weights, manifest=manifest)
    assert softedge(astronaut.resize((64, 64)), detect_resolution=64).size == (64, 64)


def test_even_a_hash_matching_pickle_is_loaded_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "w" / "hed" / "ControlNetHED.pth"
    path.parent.mkdir(parents=True)
    torch.save({"norm": torch.zeros(1), "x": _Payload(marker)}, path)
    manifest = Manifest.load(ta.write_manifest(tmp_path / "m.toml", [
        ta.component("annotators-hed", "hed", [("ControlNetHED.pth", ta.sha256(path))])]))
    with pytest.raises(UnsafeWeightsError, match="not a plain tensor checkpoint"):
        pp.get_preprocessor("softedge", tmp_path / "w", manifest=manifest)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- cache


class CountingCanny(pp.CannyPreprocessor):
    """The real Canny preprocessor, counting how often it actually runs."""

    def __init__(self):
        self.runs = 0

    def _run(self, image, options):
        self.runs += 1
        return super()._run(image, options)


def test_a_repeated_call_is_served_from_the_cache(tmp_path, astronaut):
    canny, cache = CountingCanny(), pp.PreprocessorCache(tmp_path / "cache")
    first = cache.run(canny, astronaut)
    second = cache.run(canny, astronaut.copy())  # same pixels, another object
    third = cache.run(canny, astronaut, low_threshold=100)  # the default, spelled out
    assert canny.runs == 1 and cache.hits == 2
    assert np.array_equal(_pixels(first), _pixels(second)) and np.array_equal(_pixels(first), _pixels(third))
    assert np.array_equal(_pixels(first), _pixels(pp.CannyPreprocessor()(astronaut)))


def test_the_disk_cache_survives_a_new_cache_object(tmp_path, astronaut):
    canny = CountingCanny()
    first = pp.PreprocessorCache(tmp_path / "cache").run(canny, astronaut)
    pngs = list((tmp_path / "cache").rglob("*.png"))
    assert len(pngs) == 1 and not list((tmp_path / "cache").rglob("*.partial"))
    again = pp.PreprocessorCache(tmp_path / "cache").run(canny, astronaut)
    assert canny.runs == 1
    assert np.array_equal(_pixels(first), _pixels(again))


def test_different_options_or_pixels_miss(tmp_path, astronaut):
    canny, cache = CountingCanny(), pp.PreprocessorCache(tmp_path / "cache")
    cache.run(canny, astronaut)
    cache.run(canny, astronaut, low_threshold=50)
    flipped = astronaut.transpose(Image.FLIP_LEFT_RIGHT)
    cache.run(canny, flipped)
    assert canny.runs == 3 and cache.misses == 3


def test_a_damaged_cache_file_is_recomputed(tmp_path, astronaut):
    canny, cache = CountingCanny(), pp.PreprocessorCache(tmp_path / "cache", max_items=0)
    cache.run(canny, astronaut)
    (png,) = (tmp_path / "cache").rglob("*.png")
    png.write_bytes(png.read_bytes()[:100])
    out = cache.run(canny, astronaut)
    assert canny.runs == 2 and out.size == astronaut.size


def test_memory_cache_is_bounded_lru(astronaut):
    canny, cache = CountingCanny(), pp.PreprocessorCache(max_items=2, disk=False)
    images = [astronaut.rotate(angle) for angle in (0, 90, 180)]
    for image in images:
        cache.run(canny, image)
    assert len(cache) == 2
    cache.run(canny, images[2])  # still held
    assert canny.runs == 3
    cache.run(canny, images[0])  # evicted
    assert canny.runs == 4


def test_the_depth_model_runs_once_for_a_repeated_request(loaded, astronaut, tmp_path):
    depth = loaded("depth")
    forwards = []
    depth._model.register_forward_hook(lambda *args: forwards.append(1))
    engine_side = pp.Preprocessors(cache=pp.PreprocessorCache(tmp_path / "cache"))
    engine_side._loaded["depth"] = depth  # the engine's holder, with this loaded model
    first = engine_side.run("depth", astronaut)
    second = engine_side.run("depth", astronaut)
    assert len(forwards) == 1
    assert np.array_equal(_pixels(first), _pixels(second))


def test_preprocessors_build_each_type_once_and_cache_under_refgen_home(tmp_path, astronaut):
    holder = pp.Preprocessors()
    assert holder.get("canny") is holder.get("edges")
    holder.run("canny", astronaut)
    assert list((tmp_path / "home" / "cache" / "preprocess").rglob("*.png"))


# -------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["normal", "segmentation", ""])
def test_an_unknown_type_lists_the_available_ones(name):
    available = "canny, depth, lineart, pose, scribble, softedge"
    with pytest.raises(pp.UnknownControlTypeError, match=re.escape(f"available: {available}")):
        pp.get_preprocessor(name)
    with pytest.raises(pp.UnknownControlTypeError, match=re.escape(available)):
        pp.Preprocessors(cache=pp.PreprocessorCache(disk=False)).run(name, Image.new("RGB", (64, 64)))


@pytest.mark.parametrize(
    "kind, entry",
    [("depth", "depth-anything-v2-small"), ("pose", "annotators-openpose"), ("softedge", "annotators-hed"),
     ("lineart", "annotators-lineart")],
)
def test_missing_weights_name_the_component_and_the_fetch_command(tmp_path, monkeypatch, kind, entry):
    monkeypatch.setenv("REFGEN_MANIFEST", str(COMMITTED_MANIFEST))
    with pytest.raises(WeightsMissingError, match=re.escape(f"refgen weights fetch {entry}")):
        pp.get_preprocessor(kind, weights_dir=tmp_path / "empty")


def test_scribble_from_hed_needs_the_hed_weights(tmp_path, monkeypatch, astronaut):
    monkeypatch.setenv("REFGEN_MANIFEST", str(COMMITTED_MANIFEST))
    scribble = pp.get_preprocessor("scribble", weights_dir=tmp_path / "empty")  # canny needs none
    scribble(astronaut)
    with pytest.raises(WeightsMissingError, match="refgen weights fetch annotators-hed"):
        scribble(astronaut, source="hed")


# --------------------------------------------------------------------------- is_preprocessed


def _pose_map() -> Image.Image:
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    points = [(0.5, 0.15), (0.5, 0.3), (0.38, 0.3), (0.33, 0.45), (0.3, 0.6), (0.62, 0.3), (0.67, 0.45), (0.7, 0.6),
              (0.42, 0.6), (0.42, 0.78), (0.42, 0.95), (0.58, 0.6), (0.58, 0.78), (0.58, 0.95), (0.47, 0.12),
              (0.53, 0.12), (0.44, 0.14), (0.56, 0.14)]
    canvas = draw_bodypose(np.zeros((512, 384, 3), np.uint8), [Keypoint(x, y) for x, y in points])
    return Image.fromarray(canvas)


def _normal_map() -> Image.Image:
    y, x = np.mgrid[-1:1:256j, -1:1:256j]
    z = np.sqrt(np.clip(1 - x**2 - y**2, 0, 1))
    inside = x**2 + y**2 < 1
    normal = np.where(inside[..., None], np.stack([x, -y, z], axis=-1), [0.0, 0.0, 1.0])
    return Image.fromarray(np.round((normal + 1) * 127.5).astype(np.uint8))


def _depth_map() -> Image.Image:
    y, x = np.mgrid[0:384, 0:512]
    depth = 40 + 120 * (y / 383)  # a floor receding upwards
    depth[100:300, 150:350] = 200 - 0.1 * (x[100:300, 150:350] - 150)  # a box in front
    return Image.fromarray(np.repeat(depth.astype(np.uint8)[..., None], 3, axis=2)).filter(ImageFilter.GaussianBlur(2))


def test_is_preprocessed_says_no_for_a_photo_and_yes_for_a_control_map_of_that_type(astronaut):
    canny = pp.get_preprocessor("canny")(astronaut)
    scribble = pp.get_preprocessor("scribble")(astronaut)
    maps = {"canny": canny, "scribble": scribble, "pose": _pose_map(), "normal": _normal_map(), "depth": _depth_map()}
    for kind in pp.RECOGNISED_MAP_TYPES:
        assert not pp.is_preprocessed(astronaut, kind), kind
        assert not pp.is_preprocessed(astronaut.convert("L"), kind), kind  # a grey photo is no depth map
    assert pp.is_preprocessed(canny, "canny") and pp.is_preprocessed(canny, "edge")
    assert pp.is_preprocessed(canny, "lineart") and pp.is_preprocessed(canny, "softedge")
    assert pp.is_preprocessed(scribble, "scribble")
    assert pp.is_preprocessed(maps["pose"], "openpose") and not pp.is_preprocessed(maps["pose"], "canny")
    assert pp.is_preprocessed(maps["normal"], "normal") and not pp.is_preprocessed(maps["normal"], "depth")
    assert pp.is_preprocessed(maps["depth"], "depth") and not pp.is_preprocessed(maps["depth"], "canny")
    assert not pp.is_preprocessed(canny, "depth") and not pp.is_preprocessed(canny, "pose")


def test_is_preprocessed_rejects_an_unknown_type(astronaut):
    with pytest.raises(pp.UnknownControlTypeError, match="known: canny, depth"):
        pp.is_preprocessed(astronaut, "segmentation")


# ------------------------------------------------------------------------------- the manifest


def test_the_committed_manifest_has_every_preprocessor_and_controlnet_component():
    manifest = Manifest.load(COMMITTED_MANIFEST)
    kinds = {
        "depth-anything-v2-small": "depth-estimator", "annotators-openpose": "annotator", "annotators-hed": "annotator",
        "annotators-lineart": "annotator", "controlnet-canny-sdxl": "controlnet", "controlnet-depth-sdxl": "controlnet",
        "controlnet-openpose-sdxl": "controlnet", "controlnet-union-sdxl": "controlnet", "sdxl-inpainting": "unet",
    }
    for name, kind in kinds.items():
        entry = manifest.get(name)
        assert entry.kind == kind
        assert re.fullmatch(r"[0-9a-f]{40}", entry.revision), name  # pinned, not "main"
        assert entry.license and entry.license_url
        # every pickle has a recorded hash, so it loads without --allow-pickle
        assert all(f.sha256 for f in entry.files if f.path.endswith(".pth")), name
    assert {f.path for f in manifest.get("annotators-openpose").files} == {
        "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"}
    assert {f.path for f in manifest.get("sdxl-inpainting").files} >= {
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"}
    assert "noncommercial" in manifest.get("annotators-openpose").license_name.lower()
