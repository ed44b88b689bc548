"""Random-weight preprocessor weights in the published file layouts, and a manifest that lists them.

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
import warnings
from pathlib import Path
from typing import Optional

import torch


def _quiet(module_name: str):
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module_name)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_tiny_depth_model(folder: Path, seed: int = 0) -> Path:
    """A ~40k-parameter Depth Anything (DINOv2 backbone) with its image processor."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, patch_size=14,
        image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8, head_hidden_size=4, patch_size=14, depth_estimation_type="relative",
    )
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # a live head: random inits leave the ReLU'd output nearly flat
        for parameter in model.head.parameters():
            parameter.normal_(0.0, 0.5)
    processor = DPTImageProcessor(
        do_resize=True, size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
        do_rescale=True, do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def save_openpose_body(path: Path, seed: int = 0, prefixed: bool = False) -> Path:
    """A random body network saved like the published file (flat keys), or with the network's own
    `model0.`-prefixed keys when `prefixed`."""
    model_module = _quiet("controlnet_aux.open_pose.model")
    torch.manual_seed(seed)
    state = model_module.bodypose_model().state_dict()
    if not prefixed:
        state = {name.split(".", 1)[1]: tensor for name, tensor in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def save_hed(path: Path, seed: int = 0) -> Path:
    hed = _quiet("controlnet_aux.hed")
    torch.manual_seed(seed)
    state = {name: tensor.half() for name, tensor in hed.ControlNetHED_Apache2().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def save_lineart(path: Path, seed: int = 0) -> Path:
    lineart = _quiet("controlnet_aux.lineart")
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lineart.Generator(3, 1, 3).state_dict(), path)
    return path


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
