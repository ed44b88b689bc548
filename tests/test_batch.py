"""engine/batch: manifest formats, line ids and seeds, bad lines by number, grouping and batching, running with
resume and the results file. Runs on the session's tiny Engine at 64x64, 2 steps; pictures are compared as pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest
from engine.batch import ManifestError, plan_batch, read_manifest, read_results, run_batch
from engine.provenance import read_metadata

SMALL = {"width": 64, "height": 64, "steps": 2}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def noise_png(path: Path, seed: int, size: int = 32) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------------- manifests

def test_refgen_lines_get_absolute_images_stable_ids_and_derived_seeds(tmp_path):
    noise_png(tmp_path / "photo.png", 1)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a fox", **SMALL, "init_image": "photo.png"},
        {"prompt": "a fox", **SMALL},
        {"prompt": "a fox", **SMALL, "model": "other-model"},
    ])
    first, again = read_manifest(manifest, model="tiny"), read_manifest(manifest, model="tiny")
    img2img, plain, other = first.lines
    assert Path(img2img.request.init_image) == tmp_path / "photo.png"
    assert [line.id for line in first.lines] == [line.id for line in again.lines]
    assert [line.request.seed for line in first.lines] == [line.request.seed for line in again.lines]
    assert len({line.id for line in first.lines}) == 3  # an init image or another model is another request
    assert (plain.model, other.model) == ("tiny", "other-model")
    assert 0 <= plain.request.seed < 2**32 and plain.output_names() == [f"{plain.id}-0.png"]

    explicit = write_jsonl(tmp_path / "seeded.jsonl", [{"prompt": "a fox", **SMALL, "seed": plain.request.seed}])
    assert read_manifest(explicit, model="tiny").lines[0].id == plain.id  # the derived seed, given: the same line


def test_an_image_counts_by_its_pixels_not_its_file(tmp_path):
    noise_png(tmp_path / "a.png", 1)
    (tmp_path / "sub").mkdir()
    noise_png(tmp_path / "sub" / "renamed.png", 1)
    noise_png(tmp_path / "other.png", 2)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "x", **SMALL, "seed": 3, "references": [{"kind": "style", "image": image}]}
        for image in ("a.png", "sub/renamed.png", "other.png")])
    same, moved, different = (line.id for line in read_manifest(manifest, model="tiny").lines)
    assert same == moved != different


def test_bad_lines_are_kept_with_their_line_numbers(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "fine", **SMALL},
        "{not json",
        "",
        "# a comment",
        "[1, 2]",
        {"prompt": "x", "width": 65, "height": 64},
        {"prompt": "x", "init_image": "missing.png"},
        {"prompt": "x", "colour": "red"},
        {"prompt": "also fine", **SMALL},
        {"format": "xml", "prompt": "x"},
    ])
    lines = read_manifest(manifest, model="tiny").lines
    errors = {line.number: line.error for line in lines if not line.ok}
    assert [line.number for line in lines if line.ok] == [1, 9]
    assert set(errors) == {2, 5, 6, 7, 8, 10}
    assert "'xml' is not a line format" in errors[10]
    assert errors[2].startswith("invalid JSON")
    assert "JSON object" in errors[5]
    assert "width" in errors[6] and "multiple of 8" in errors[6]
    assert "not found" in errors[7] and "missing.png" in errors[7]
    assert "colour" in errors[8]


def test_leonardo_bodies_by_their_keys_or_format_with_image_ids_as_paths(tmp_path):
    noise_png(tmp_path / "ref.png", 4)
    style = {"initImageId": "ref.png", "initImageType": "UPLOADED", "preprocessorId": 67, "strengthType": "High"}
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a lion", "num_inference_steps": 3, "width": 64, "height": 64, "presetStyle": "ANIME", "controlnets": [style]},
        {"format": "leonardo", "prompt": "a lion", "width": 64, "height": 64},
        {"prompt": "a lion", "num_inference_steps": 3, "init_image_id": "nowhere.png", "init_strength": 0.5},
        {"prompt": "a lion", "width": 64, "height": 64, "controlnets": [style]},
    ])
    styled, plain, missing, by_entries = read_manifest(manifest, model="tiny").lines
    assert by_entries.ok and by_entries.request.references[0].kind == "style", by_entries.error
    assert styled.ok and plain.ok, (styled.error, plain.error)
    assert styled.request.steps == 3 and styled.request.preset == "anime" and styled.model == "tiny"
    assert styled.request.references[0].kind == "style" and Path(styled.request.references[0].image) == tmp_path / "ref.png"
    assert plain.request.steps is None
    assert "nowhere.png" in missing.error
    everything = read_manifest(write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a lion", "width": 64, "height": 64}]),
                               model="tiny", format="leonardo")
    assert everything.lines[0].id == plain.id


def test_csv_rows(tmp_path):
    noise_png(tmp_path / "ink.png", 5)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "prompt,seed,width,height,steps,guidance_scale,style,character,character_strength,num_images\n"
        "a fox,7,64,64,2,5.5,ink.png:High,,,2\n"
        "\"a cat, sitting\",,64,64,2,,,hero,Low,\n"
        "bad row,x,64,64,2,,,,,\n"
        "a dog,1,64,64,2,,,,,,extra\n"
        "\"two\nlines\",1,64,64,2,,,,,\n")
    lines = read_manifest(manifest, model="tiny").lines
    fox, cat, bad, extra, quoted = lines
    assert (fox.number, cat.number, bad.number, extra.number, quoted.number) == (2, 3, 4, 5, 7)  # a row ends on its line
    assert quoted.request.prompt == "two\nlines"
    assert fox.request.seed == 7 and fox.request.guidance_scale == 5.5 and fox.request.num_images == 2
    assert fox.request.references[0].strength_type == "High" and fox.image_count == 2
    assert cat.request.prompt == "a cat, sitting" and cat.request.character.name == "hero"
    assert cat.request.character.strength_type == "Low"
    assert "seed" in bad.error and "header" in extra.error
    (tmp_path / "bad.csv").write_text("prompt,colour\nx,red\n")
    with pytest.raises(ManifestError, match="colour"):
        read_manifest(tmp_path / "bad.csv")


def test_template_expands_the_cross_product_in_written_order(tmp_path):
    template = {"template": {"prompt": "base", **SMALL}, "vary": {"prompt": ["a", "b"], "seed": [1, 2, 3]}}
    (tmp_path / "t.json").write_text(json.dumps(template))
    (tmp_path / "t.toml").write_text('[template]\nprompt = "base"\nwidth = 64\nheight = 64\nsteps = 2\n'
                                     '[vary]\nprompt = ["a", "b"]\nseed = [1, 2, 3]\n')
    from_json, from_toml = read_manifest(tmp_path / "t.json", model="tiny"), read_manifest(tmp_path / "t.toml", model="tiny")
    assert [(line.number, line.request.prompt, line.request.seed) for line in from_json.lines] == [
        (1, "a", 1), (2, "a", 2), (3, "a", 3), (4, "b", 1), (5, "b", 2), (6, "b", 3)]
    assert [line.id for line in from_json.lines] == [line.id for line in from_toml.lines]
    (tmp_path / "bad.json").write_text(json.dumps({"template": {"prompt": "x"}, "vary": {"seed": []}}))
    with pytest.raises(ManifestError, match="vary.seed"):
        read_manifest(tmp_path / "bad.json")


def test_an_unknown_format_or_missing_file_is_one_clear_error(tmp_path):
    (tmp_path / "m.txt").write_text("{}")
    with pytest.raises(ManifestError, match="format"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.jsonl")


# ------------------------------------------------------------------------------------------- plan

def test_plan_groups_by_model_adapters_and_size_and_merges_following_seeds(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "fox", **SMALL, "seed": 10},                      # 1 ┐ one unit: seeds 10..13
        {"prompt": "cat", **SMALL, "seed": 10},                      # 2
        {"prompt": "fox", **SMALL, "seed": 11, "num_images": 2},     # 3 ┘
        {"prompt": "fox", **SMALL, "seed": 13},                      # 4 ┘
        {"prompt": "fox", **SMALL, "seed": 14},                      # 5  over 4 images: a unit of its own
        {"prompt": "fox", "width": 128, "height": 64, "steps": 2, "seed": 10},  # 6  another size
        {"prompt": "fox", **SMALL, "seed": 20, "model": "other"},   # 7  another model
        {"prompt": "cat", **SMALL, "seed": 11},                      # 8  follows line 2
        {"prompt": "fox", **SMALL, "seed": 10},                      # 9  line 1 again: planned once
    ])
    units = plan_batch(read_manifest(manifest, model="tiny").valid)
    assert [[line.number for line in unit.lines] for unit in units] == [[1, 3, 4], [2, 8], [5], [6], [7]]
    assert units[0].request.num_images == 4 and units[0].request.seed == 10
    assert [(line.number, part) for line, part in units[0].slices()] == [(1, slice(0, 1)), (3, slice(1, 3)), (4, slice(3, 4))]
    assert units[2].request is units[2].lines[0].request
    assert [unit.model for unit in units] == ["tiny"] * 4 + ["other"]


def test_each_model_runs_its_groups_together(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a", **SMALL, "seed": 1},
        {"prompt": "b", **SMALL, "seed": 1, "model": "other"},
        {"prompt": "c", "width": 128, "height": 64, "steps": 2, "seed": 1},
        {"prompt": "d", "width": 128, "height": 64, "steps": 2, "seed": 1, "model": "other"},
    ])
    units = plan_batch(read_manifest(manifest, model="tiny").valid)
    assert [(unit.model, unit.lines[0].number) for unit in units] == [("tiny", 1), ("tiny", 3), ("other", 2), ("other", 4)]


def test_best_of_lines_are_never_merged(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "hero", **SMALL, "seed": 1, "character": "someone", "best_of": 2},
        {"prompt": "hero", **SMALL, "seed": 3, "character": "someone", "best_of": 2}])
    assert [len(unit.lines) for unit in plan_batch(read_manifest(manifest, model="tiny").valid)] == [1, 1]


# ------------------------------------------------------------------------------------------- run

@pytest.fixture
def merged_manifest(tmp_path):
    return write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a red fox", **SMALL, "seed": 40},
        {"prompt": "a red fox", **SMALL, "seed": 41},
        {"prompt": "a blue cat", **SMALL},
        "oops",
    ])


def test_run_writes_named_pngs_with_provenance_and_a_results_file(engine, merged_manifest, tmp_path):
    manifest = read_manifest(merged_manifest, model="tiny")
    out = tmp_path / "out"
    seen = []
    summary = run_batch(manifest, out, lambda model: engine, on_record=lambda record, written: seen.append((record, written)))
    assert (summary.done, summary.skipped, summary.failed, summary.images_written) == (3, 0, 1, 3)
    fox0, fox1, cat = manifest.valid
    # The two fox lines ran as one batch of 2: exactly the pictures of that request, seed 40 and 41.
    batch = engine.generate(GenerationRequest(prompt="a red fox", **SMALL, seed=40, num_images=2))
    assert np.array_equal(pixels(out / fox0.output_names()[0]), np.asarray(batch.images[0]))
    assert np.array_equal(pixels(out / fox1.output_names()[0]), np.asarray(batch.images[1]))
    alone = engine.generate(cat.request)
    assert np.array_equal(pixels(out / cat.output_names()[0]), np.asarray(alone.images[0]))
    meta = read_metadata(out / fox1.output_names()[0])
    assert meta["image"]["seed"] == 41 and meta["request"]["num_images"] == 2  # the request that ran: replayable

    records = read_results(out / "results.jsonl")
    assert records[fox1.id]["status"] == "done" and records[fox1.id]["seeds"] == [41] and records[fox1.id]["line"] == 2
    assert records[fox1.id]["outputs"] == [f"{fox1.id}-0.png"]
    assert records["line 4"]["status"] == "failed" and "invalid JSON" in records["line 4"]["error"]
    assert sorted(record.line for record, _ in seen) == [1, 2, 3, 4]
    assert not list(out.glob(".*.partial"))


def test_resume_redoes_a_whole_unit_but_writes_only_the_missing_files(engine, merged_manifest, tmp_path):
    manifest = read_manifest(merged_manifest, model="tiny")
    out = tmp_path / "out"
    run_batch(manifest, out, lambda model: engine)
    fox0, fox1, cat = manifest.valid
    kept, lost, broken = (out / line.output_names()[0] for line in (fox0, fox1, cat))
    originals = {path: pixels(path) for path in (kept, lost, broken)}
    kept_bytes = kept.read_bytes()
    lost.unlink()
    broken.write_bytes(broken.read_bytes()[:100])  # a damaged file is redone too
    (out / f".{kept.name}.abcd1234.partial").write_bytes(b"left by a kill")

    summary = run_batch(read_manifest(merged_manifest, model="tiny"), out, lambda model: engine)
    assert (summary.done, summary.skipped, summary.failed, summary.images_written) == (2, 1, 1, 2)
    assert kept.read_bytes() == kept_bytes  # regenerated with its batch, not rewritten
    for path, before in originals.items():
        assert np.array_equal(pixels(path), before)
    records = read_results(out / "results.jsonl")
    assert (records[fox0.id]["status"], records[fox1.id]["status"], records[cat.id]["status"]) == ("skipped", "done", "done")
    assert not list(out.glob(".*.partial"))

    untouched = run_batch(read_manifest(merged_manifest, model="tiny"), out, lambda model: pytest.fail("nothing to load"))
    assert (untouched.done, untouched.skipped, untouched.images_written) == (0, 3, 0)


def test_a_failing_line_does_not_stop_the_others(engine, tmp_path):
    manifest = read_manifest(write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a hero", **SMALL, "loras": ["nobody-made-this.safetensors"]},
        {"prompt": "a tree", **SMALL},
        {"prompt": "a house", **SMALL, "model": "not-a-model"},
    ]), model="tiny")

    def load(model):
        if model != "tiny":
            raise ManifestError(f"no model {model}")
        return engine

    summary = run_batch(manifest, tmp_path / "out", load)
    records = read_results(tmp_path / "out" / "results.jsonl")
    hero, tree, house = (records[line.id] for line in manifest.lines)
    assert (summary.done, summary.failed) == (1, 2)
    assert hero["status"] == "failed" and "nobody-made-this" in hero["error"] and hero["line"] == 1
    assert tree["status"] == "done"
    assert house["status"] == "failed" and house["error"] == "no model not-a-model"


def test_a_repeated_line_is_made_once_and_recorded_for_both(engine, tmp_path):
    manifest = read_manifest(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "twice", **SMALL}] * 2), model="tiny")
    seen = []
    summary = run_batch(manifest, tmp_path / "out", lambda model: engine, on_record=lambda record, written: seen.append((record.line, written)))
    assert sorted(seen) == [(1, 1), (2, 0)] and summary.images_written == 1
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
