"""Random-weight preprocessor weights in the published file layouts (the product's builders,
engine/tiny/annotators.py), and a manifest that lists them.

Layouts (what refgen's loaders must accept, taken from the code that loads the published files):
- `body_pose_model.pth` / `hand_pose_model.pth` (lllyasviel/Annotators): pytorch-openpose's conversion
  of CMU's caffe models, a flat dict keyed by the conv names *without* their block prefix
  (`conv1_1.weight`, `Mconv7_stage6_L2.bias`, ...): controlnet-aux's `open_pose.util.transfer` maps
  network key `model0.conv1_1.weight` to file key `conv1_1.weight`. fp32: 52,311,446 body parameters
  x 4 bytes is the published 209,267,595-byte file minus pickle overhead.
- `ControlNetHED.pth`: `ControlNetHED_Apache2().state_dict()` keys (`norm`, `block1.convs.0.weight`,
  ...) in fp16: 14.7 M parameters x 2 bytes matches the published 29,444,406 bytes.
- `sk_model.pth` / `sk_model2.pth`: `lineart.Generator(3, 1, 3).state_dict()` keys, fp32.
- Depth Anything: a transformers `save_pretrained` folder (config.json, model.safetensors,
  preprocessor_config.json), the layout of depth-anything/Depth-Anything-V2-Small-hf, shrunk.

The full-size OpenPose body network is needed because its architecture is fixed; it is built
once per test session (about 0.5 s, 209 MB on disk).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from engine.tiny.annotators import save_hed, save_lineart, save_openpose_body, save_tiny_depth_model  # noqa: F401


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def component(name: str, local_dir: str, files: list[tuple[str, Optional[str]]], kind: str = "annotator") -> str:
    """One `[[component]]` TOML table; files are (path, sha256 or None)."""
    listed = ",\n".join(
        f'  {{ path = "{path}"' + (f', sha256 = "{digest}"' if digest else "") + " }" for path, digest in files
    )
    return (
        f'[[component]]\nname = "{name}"\nkind = "{kind}"\nrepo = "test/{name}"\nlicense = "test"\n'
        f'local_dir = "{local_dir}"\nfiles = [\n{listed},\n]\n'
    )


def write_manifest(path: Path, components: list[str]) -> Path:
    path.write_text("\n".join(components), encoding="utf-8")
    return path
