"""The tested dependency set: constraints.txt pins what the suite runs with.

A fresh install resolves the newest releases pyproject.toml's ranges allow, and new releases break
each other (2026-11-28: transformers 5.24 refused the newest peft). So every install the README
documents goes through constraints.txt, and these tests keep the pins, the ranges and the
environment the suite runs in telling the same story.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*$")

# What the product is made of: each must be pinned, not left to whatever is newest.
ML_STACK = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors", "peft",
            "huggingface-hub", "insightface", "onnxruntime", "controlnet-aux", "spandrel", "numpy")


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        found[canonicalize_name(match["name"])] = match["version"]
    return found


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return [req for req in declared if req.marker is None or req.marker.evaluate()]


def test_the_ml_stack_is_pinned_exactly():
    missing = [name for name in ML_STACK if name not in pins()]
    assert not missing, f"constraints.txt leaves these to chance: {missing}"


@pytest.mark.parametrize("requirement", declared_requirements(), ids=str)
def test_every_declared_dependency_has_a_pin_inside_its_range(requirement):
    version = pins().get(canonicalize_name(requirement.name))
    assert version is not None, f"{requirement.name} is a dependency but constraints.txt does not pin it"
    assert requirement.specifier.contains(version, prereleases=True), (
        f"constraints.txt pins {requirement.name}=={version}, outside pyproject.toml's {requirement}"
    )


def test_the_suite_runs_on_the_pinned_set():
    """Tests passing on other versions prove nothing about what users install."""
    drifted = {}
    for name, pinned in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # platform-only pins (CUDA wheels on Linux x86_64) constrain nothing elsewhere
        if installed.split("+")[0] != pinned.split("+")[0]:
            drifted[name] = f"installed {installed}, pinned {pinned}"
    assert not drifted, (
        f"this environment is not the tested set: {drifted}. "
        "Install with the README's test command (pip install -c constraints.txt ...)"
    )


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("tests/install_browser.sh && python3 -m venv"))
    assert f"\n{command}\n" in readme
    assert "-c constraints.txt" in command and "pip check" in command
