"""`refgen batch`: the command's output and exit code, and resume after a real process is killed with SIGKILL mid-run:
the second run makes exactly the missing images, and every image equals (pixel for pixel) an uninterrupted run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from killed_runs import kill_after_pngs
from engine.batch import read_manifest, read_results
from engine.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"width": 64, "height": 64, "steps": 2}
runner = CliRunner()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def expected_outputs(manifest: Path) -> set[str]:
    return {name for line in read_manifest(manifest, model="tiny").valid for name in line.output_names()}


def test_batch_reports_bad_lines_by_number_and_exits_1(refgen_home, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([json.dumps({"prompt": "a fox", **SMALL, "seed": 1}), "{broken",
                                   json.dumps({"prompt": "a fox", **SMALL, "steps": 500})]) + "\n")
    result = runner.invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny"])
    assert result.exit_code == 1, result.output
    assert "line 2: invalid JSON" in result.output
    assert "line 3: invalid request -- steps" in result.output
    assert "done 1, skipped 0, failed 2" in result.output
    assert "Traceback" not in result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1

    again = runner.invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny"])
    assert "done 0, skipped 1, failed 2" in again.output


def test_batch_exits_0_when_every_line_ran_and_names_a_missing_manifest(refgen_home, tmp_path):
    template = tmp_path / "t.json"
    template.write_text(json.dumps({"template": {"prompt": "a tree", **SMALL}, "vary": {"seed": [1, 2]}}))
    result = runner.invoke(app, ["batch", str(template), "--out", str(tmp_path / "out"), "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert "done 2, skipped 0, failed 0" in result.output
    missing = runner.invoke(app, ["batch", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"), "--model", "tiny"])
    assert missing.exit_code == 1 and "manifest not found" in missing.output


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_pictures(refgen_home, tmp_path):
    lines = [{"prompt": f"npc {n}", **SMALL, "seed": 100 + seed} for n in range(3) for seed in range(4)]  # 3 batches of 4
    lines += [{"prompt": f"prop {n}", **SMALL} for n in range(10)]  # derived seeds: one unit each
    manifest = tmp_path / "pack.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    expected = expected_outputs(manifest)
    assert len(expected) == 22

    reference = runner.invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "whole"), "--model", "tiny"])
    assert reference.exit_code == 0, reference.output

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "engine.cli", "batch", str(manifest), "--out", str(killed), "--model", "tiny"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the reference run
    before = kill_after_pngs(command, killed, env=env)
    assert 3 <= len(before) < len(expected)

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = {path.name for path in killed.glob("*.png")}
    assert after == expected
    assert {name: (killed / name).read_bytes() for name in before} == before  # nothing that existed was rewritten
    written = json.loads(json.dumps(read_results(killed / "results.jsonl")))
    assert all(record["status"] in ("done", "skipped") for record in written.values())
    assert f"{len(expected) - len(before)} images written" in resumed.stdout
    for name in expected:
        assert np.array_equal(pixels(killed / name), pixels(tmp_path / "whole" / name)), name
    assert not list(killed.glob(".*.partial"))


def test_character_lines_record_their_identity_scores(refgen_home, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)).save(tmp_path / "photo.png")
    manifest = tmp_path / "heroes.csv"
    manifest.write_text("prompt,seed,width,height,steps,character\n"
                        "a hero,3,64,64,2,photo.png\n"
                        "a hero,4,64,64,2,photo.png\n"
                        "a villain,3,64,64,2,nobody-saved\n")
    result = runner.invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny"])
    assert result.exit_code == 1, result.output
    assert "line 4: unknown character 'nobody-saved'" in result.output
    records = read_results(tmp_path / "out" / "results.jsonl")
    heroes = [record for record in records.values() if record["status"] == "done"]
    assert sorted(record["line"] for record in heroes) == [2, 3]
    for record in heroes:
        (score,) = record["identity_scores"]
        assert isinstance(score, float) and -1 <= score <= 1
