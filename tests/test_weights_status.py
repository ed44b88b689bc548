"""What is installed and what each feature still needs: engine.weights.weights_status, and the API's
GET /refgen/weights (a refgen extension the studio page reads). Files are looked for by name only."""

from __future__ import annotations

import httpx
import pytest

import tiny_faces as tf
from conftest import COMMITTED_MANIFEST
from engine.api.server import PREFIX, service
from engine.api.store import AssetStore
from engine.weights import FEATURE_WEIGHTS, Manifest, weights_status
from live_server import running_server

pytestmark = pytest.mark.usefixtures("private_home")  # an empty weights folder of this test's own


def test_every_feature_names_components_of_the_manifest():
    names = set(Manifest.load(COMMITTED_MANIFEST).names())
    assert {name for needs in FEATURE_WEIGHTS.values() for name in needs} <= names


def test_nothing_installed_means_every_feature_says_what_to_fetch():
    status = weights_status()
    assert not any(component["present"] for component in status["components"])
    instantid = next(f for f in status["features"] if f["feature"] == "Character Reference (InstantID)")
    assert instantid["fetch"] == "refgen weights fetch instantid insightface-antelopev2" and not instantid["ready"]


def test_an_installed_component_counts_for_every_feature_that_needs_it(monkeypatch, tmp_path):
    import os

    tf.write_pack(os.environ["REFGEN_WEIGHTS"], [tf.ASTRONAUT_FACE], manifest_path=COMMITTED_MANIFEST)
    status = weights_status()
    present = {c["name"] for c in status["components"] if c["present"]}
    assert present == {"insightface-antelopev2"}
    features = {f["feature"]: f for f in status["features"]}
    assert features["Face-aware training crops"]["ready"] and features["Face-aware training crops"]["fetch"] is None
    assert features["Character Reference (InstantID)"]["missing"] == ["instantid"]


def test_the_api_answers_the_same_status_behind_the_key(tmp_path):
    with AssetStore(tmp_path / "api") as store:
        app, _ = service(store, api_key="k", model="tiny")
        with running_server(app) as base:
            refused = httpx.get(f"{base}{PREFIX}/refgen/weights")
            answer = httpx.get(f"{base}{PREFIX}/refgen/weights", headers={"Authorization": "Bearer k"})
    assert refused.status_code == 401
    assert answer.status_code == 200 and answer.json() == weights_status()
