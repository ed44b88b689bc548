"""The character mask's face parser (adapters/face_parsing.py): the parts table on synthetic label maps,
and a tiny random-weight SegFormer in the published key layout and config, saved where the committed
manifest puts `face-parsing` and loaded through the same loader the real checkpoint uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_face_parsing as tfp
from adapters import face_parsing as fp
from engine.errors import InvalidImageError, WeightsMissingError
from engine.weights import Manifest

COMMITTED_MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.toml"

# keep -> the class names its mask must hold: the documented parts table, spelled out independently.
EXPECTED_PARTS = {
    "face": set(),
    "face+hair": {"hair", "hat"},
    "face+hair+outfit": {"hair", "hat", "cloth", "neck_l", "ear_r", "eye_g"},
    "all": set(tfp.PUBLISHED_CONFIG["id2label"].values()) - {"background"},
}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    weights = tmp_path_factory.mktemp("face-parsing-weights")
    tfp.write_face_parsing(weights, COMMITTED_MANIFEST)
    return weights


@pytest.fixture(scope="module")
def parser(tiny_weights) -> fp.FaceParser:
    return fp.FaceParser.load(device="cpu", weights_dir=tiny_weights, manifest=Manifest.load(COMMITTED_MANIFEST))


def _every_class_label_map(block: int = 4) -> tuple[np.ndarray, dict[int, tuple[slice, slice]]]:
    """A label map with each class id 0..18 in its own known block (a 4x5 grid of blocks)."""
    labels = np.zeros((4 * block, 5 * block), np.uint8)
    regions = {}
    for class_id in range(fp.NUM_CLASSES):
        row, col = divmod(class_id, 5)
        region = (slice(row * block, (row + 1) * block), slice(col * block, (col + 1) * block))
        labels[region] = class_id
        regions[class_id] = region
    return labels, regions


# ---------------------------------------------------------------------------- the parts table


def test_the_class_table_is_the_published_id2label() -> None:
    published = {name: int(i) for i, name in tfp.PUBLISHED_CONFIG["id2label"].items()}
    assert dict(fp.CLASSES) == published
    assert fp.CLASS_NAMES == tuple(name for _, name in sorted((i, n) for n, i in published.items()))
    # Face, body, hair, outfit and accessories split the 18 foreground classes, each class once.
    groups = [fp.FACE_CLASSES, fp.BODY_CLASSES, fp.HAIR_CLASSES, fp.OUTFIT_CLASSES, fp.ACCESSORY_CLASSES]
    assert sum(len(g) for g in groups) == fp.NUM_CLASSES - 1
    assert frozenset().union(*groups) == frozenset(range(1, fp.NUM_CLASSES))
    names = {fp.CLASS_NAMES[i] for i in fp.FACE_CLASSES}
    assert names == {"skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip"}


@pytest.mark.parametrize("keep", sorted(EXPECTED_PARTS))
def test_each_keep_value_selects_exactly_its_classes(keep: str) -> None:
    labels, regions = _every_class_label_map()
    mask = fp.parts_mask(labels, keep)
    assert mask.shape == labels.shape and mask.dtype == bool
    for class_id, region in regions.items():
        name = fp.CLASS_NAMES[class_id]
        expected = name in EXPECTED_PARTS[keep]
        assert mask[region].all() == expected and mask[region].any() == expected, (keep, name)
    assert fp.PARTS[keep] == frozenset(fp.CLASSES[n] for n in EXPECTED_PARTS[keep])


def test_the_keep_values_nest_and_none_holds_the_background_or_outfit_holds_the_face() -> None:
    chain = [fp.PARTS[k] for k in ("face", "face+hair", "face+hair+outfit", "all")]
    assert all(a < b for a, b in zip(chain, chain[1:]))
    assert all(0 not in classes for classes in fp.PARTS.values())
    assert not fp.PARTS["face+hair+outfit"] & (fp.FACE_CLASSES | fp.BODY_CLASSES)
    assert fp.KEEP_VALUES == ("face", "face+hair", "face+hair+outfit", "all")


def test_parts_mask_rejects_an_unknown_keep_and_a_non_label_map() -> None:
    labels, _ = _every_class_label_map()
    with pytest.raises(fp.PartsSelectionError, match="face\\+hair\\+outfit"):
        fp.parts_mask(labels, "hair")
    with pytest.raises(ValueError):  # PartsSelectionError is a ValueError
        fp.parts_mask(labels.astype(np.float32), "all")
    with pytest.raises(fp.PartsSelectionError):
        fp.parts_mask(labels[None], "all")


def test_class_mask_by_name() -> None:
    labels, regions = _every_class_label_map()
    mask = fp.class_mask(labels, ["neck", "hat"])
    assert mask.sum() == 2 * 16 and mask[regions[17]].all() and mask[regions[14]].all()
    with pytest.raises(fp.PartsSelectionError, match="beard"):
        fp.class_mask(labels, "beard")


def test_mask_preview_tints_only_the_masked_pixels() -> None:
    photo = Image.new("RGB", (20, 16), (100, 100, 100))
    labels, regions = _every_class_label_map()
    mask = fp.parts_mask(labels, "face+hair")
    out = np.asarray(fp.mask_preview(photo, mask, color=(255, 0, 0), alpha=0.5))
    assert out.shape == (16, 20, 3)
    assert (out[regions[fp.CLASSES["hair"]]] == (178, 50, 50)).all()
    assert (out[~mask] == 100).all()
    with pytest.raises(fp.PartsSelectionError, match="mask"):
        fp.mask_preview(photo, mask[:, :10])


# ---------------------------------------------------------------------- the manifest entry


def test_the_manifest_entry_lists_the_published_files_and_licence() -> None:
    entry = Manifest.load(COMMITTED_MANIFEST).get("face-parsing")
    assert (entry.kind, entry.repo, entry.local_dir) == ("face-parsing", "jonathandinu/face-parsing", "face-parsing")
    assert sorted(f.path for f in entry.files) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert entry.license == "MIT" and entry.license_url.startswith("https://huggingface.co/jonathandinu/face-parsing")
    assert "CelebAMask-HQ" in entry.license_name and "non-commercial" in entry.license_name
    assert not any(f.sha256 for f in entry.files)  # none published: the hub's hash and the lock cover them


# --------------------------------------------------------------- the tiny model, published layout


def test_the_tiny_checkpoint_has_the_published_key_layout(tiny_weights) -> None:
    import torch
    from safetensors import safe_open
    from transformers import SegformerForSemanticSegmentation

    folder = tfp.entry_folder(tiny_weights, COMMITTED_MANIFEST)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
        classifier = handle.get_slice("decode_head.classifier.weight").get_shape()
    with torch.device("meta"):
        full = SegformerForSemanticSegmentation(tfp.full_config())
    full_keys = full.state_dict()
    try:  # transformers >= 5 renames modules internally and writes the checkpoint names back on save
        from transformers.core_model_loading import revert_weight_conversion

        full_keys = revert_weight_conversion(full, full_keys)
    except ImportError:
        pass
    assert saved == set(full_keys)
    # The published (transformers 4) names: mit-b5's 40-block third stage, its sequence reduction, the
    # all-MLP decoder; 19 classes.
    for key in ("segformer.encoder.patch_embeddings.0.proj.weight", "segformer.encoder.block.2.39.attention.self.sr.weight",
                "segformer.encoder.block.3.2.mlp.dwconv.dwconv.weight", "segformer.encoder.layer_norm.3.weight",
                "decode_head.linear_c.3.proj.weight", "decode_head.linear_fuse.weight", "decode_head.batch_norm.running_var"):
        assert key in saved, key
    assert "segformer.encoder.block.3.0.attention.self.sr.weight" not in saved  # sr_ratio 1 in the last stage
    assert list(classifier) == [19, tfp.TINY_WIDTHS["decoder_hidden_size"], 1, 1]


def test_the_tiny_config_is_the_published_one_but_for_the_widths(tiny_weights) -> None:
    import json

    folder = tfp.entry_folder(tiny_weights, COMMITTED_MANIFEST)
    config = json.loads((folder / "config.json").read_text())
    for key, value in tfp.PUBLISHED_CONFIG.items():
        assert config[key] == (tfp.TINY_WIDTHS[key] if key in tfp.TINY_WIDTHS else value), key
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SegformerImageProcessor"
    assert processor["size"] == {"height": 512, "width": 512} and processor["do_reduce_labels"] is False


def test_the_tiny_parser_loads_through_the_manifest_and_labels_every_pixel(parser, astronaut) -> None:
    assert parser.entry == "face-parsing" and str(parser.device) == "cpu"
    assert parser.id2label == dict(enumerate(fp.CLASS_NAMES))
    photo = astronaut.resize((203, 150))
    labels = parser.labels(photo)
    assert labels.shape == (150, 203) and labels.dtype == np.uint8
    assert labels.max() < fp.NUM_CLASSES
    # The same from a path and from an RGB array; the mask follows the label map.
    assert np.array_equal(labels, parser.labels(np.asarray(photo)))
    assert np.array_equal(parser.mask(photo, "all"), labels > 0)


def test_describe_names_the_entry_its_source_and_the_weights_hash(parser, tiny_weights, tmp_path, monkeypatch) -> None:
    import json

    from engine.hashing import sha256_file

    monkeypatch.setenv("REFGEN_HOME", str(tmp_path / "home"))  # the sha256 cache stays in this test
    record = parser.describe()
    weights = tfp.entry_folder(tiny_weights, COMMITTED_MANIFEST) / "model.safetensors"
    assert record == {"entry": "face-parsing", "repo": "jonathandinu/face-parsing", "revision": "main", "license": "MIT",
                      "weights_sha256": sha256_file(weights, progress=False), "device": "cpu", "dtype": "float32"}
    assert json.loads(json.dumps(record)) == record


def test_labels_are_the_argmax_class_at_the_image_size(tmp_path) -> None:
    manifest = Manifest.load(COMMITTED_MANIFEST)
    tfp.write_face_parsing(tmp_path, COMMITTED_MANIFEST, constant_class=fp.CLASSES["hair"])
    parser = fp.FaceParser.load(device="cpu", weights_dir=tmp_path, manifest=manifest)
    path = tmp_path / "photo.png"
    Image.new("RGB", (37, 61), (200, 150, 120)).save(path)
    labels = parser.labels(path)
    assert labels.shape == (61, 37) and (labels == fp.CLASSES["hair"]).all()
    assert parser.mask(path, "face+hair").all() and not parser.mask(path, "face").any()


def test_a_large_image_is_labelled_at_its_size_through_a_bounded_logit_map(parser, monkeypatch) -> None:
    monkeypatch.setattr(fp, "MAX_LOGIT_PIXELS", 64 * 64)
    labels = parser.labels(Image.new("RGB", (300, 100), (90, 60, 40)))
    assert labels.shape == (100, 300) and labels.dtype == np.uint8 and labels.max() < fp.NUM_CLASSES
    assert fp._logit_size(300, 100) == (36, 110)


# ------------------------------------------------------------------------------- errors


def test_missing_weights_name_the_fetch_command(tmp_path) -> None:
    with pytest.raises(WeightsMissingError, match="refgen weights fetch face-parsing") as info:
        fp.FaceParser.load(weights_dir=tmp_path / "empty", manifest=Manifest.load(COMMITTED_MANIFEST))
    assert set(info.value.missing) == {"config.json", "model.safetensors", "preprocessor_config.json"}


def test_a_bad_image_is_a_typed_invalid_image_error(parser, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for bad in (b"not an image", broken, tmp_path / "absent.jpg", np.zeros((4, 4), np.uint8)):
        with pytest.raises(InvalidImageError):
            parser.labels(bad)
    with pytest.raises(InvalidImageError):
        fp.mask_preview(b"not an image", np.zeros((2, 2), bool))


def test_a_checkpoint_with_other_classes_is_refused(tmp_path) -> None:
    import json

    folder = tfp.write_face_parsing(tmp_path, COMMITTED_MANIFEST)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"]["13"], config["id2label"]["17"] = "neck", "hair"  # BiSeNet-like order
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(fp.FaceParsingModelError, match="classes"):
        fp.FaceParser.load(device="cpu", weights_dir=tmp_path, manifest=Manifest.load(COMMITTED_MANIFEST))


def test_a_checkpoint_in_another_key_layout_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tfp.write_face_parsing(tmp_path, COMMITTED_MANIFEST)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {key.replace("decode_head.", "head."): value for key, value in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(fp.FaceParsingModelError, match="layout"):
        fp.FaceParser.load(device="cpu", weights_dir=tmp_path, manifest=Manifest.load(COMMITTED_MANIFEST))
