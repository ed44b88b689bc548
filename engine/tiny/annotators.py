"""Random-weight preprocessor networks in the published file layouts (the tiny model's annotators).

- Depth Anything: a transformers `save_pretrained` folder (config.json, model.safetensors,
  preprocessor_config.json), the layout of depth-anything/Depth-Anything-V2-Small-hf, shrunk.
- `body_pose_model.pth` / `hand_pose_model.pth` (lllyasviel/Annotators): pytorch-openpose's conversion of
  CMU's caffe models, a flat dict keyed by the conv names *without* their block prefix (`conv1_1.weight`):
  controlnet-aux's `open_pose.util.transfer` maps network key `model0.conv1_1.weight` to it. `facenet.pth`:
  `FaceNet().state_dict()` keys.
- `ControlNetHED.pth`: `ControlNetHED_Apache2().state_dict()` keys in fp16, as published.
- `sk_model.pth` / `sk_model2.pth`: `lineart.Generator(3, 1, 3).state_dict()` keys.

controlnet-aux's networks have a fixed architecture, so these are full size: the OpenPose three hold 127 M
parameters (written in fp16 here, 255 MB) and are built only when a tiny-model request first needs them.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

DEPTH_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
LINEART_FILES = ("sk_model.pth", "sk_model2.pth")


def _quiet(module_name: str):
    """controlnet-aux modules warn at import time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module_name)


def _save_state(module, path: Path, seed: int, half: bool = False, strip_block: bool = False) -> Path:
    torch.manual_seed(seed)  # before building: the module's init draws the weights
    state = module().state_dict()
    if strip_block:
        state = {name.split(".", 1)[1]: tensor for name, tensor in state.items()}
    if half:
        state = {name: tensor.half() for name, tensor in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


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


def save_openpose_body(path: Path, seed: int = 0, prefixed: bool = False, half: bool = False) -> Path:
    """The body network saved like the published file (flat keys), or with its own `model0.` keys when `prefixed`."""
    network = _quiet("controlnet_aux.open_pose.model").bodypose_model
    return _save_state(network, path, seed, half=half, strip_block=not prefixed)


def save_openpose(folder: Path, seed: int = 0) -> Path:
    """Every file of `annotators-openpose`: body, hand (flat keys) and face networks, fp16."""
    model_module = _quiet("controlnet_aux.open_pose.model")
    save_openpose_body(folder / OPENPOSE_FILES[0], seed, half=True)
    _save_state(model_module.handpose_model, folder / OPENPOSE_FILES[1], seed + 1, half=True, strip_block=True)
    _save_state(_quiet("controlnet_aux.open_pose.face").FaceNet, folder / OPENPOSE_FILES[2], seed + 2, half=True)
    return folder


def save_hed(path: Path, seed: int = 0) -> Path:
    return _save_state(_quiet("controlnet_aux.hed").ControlNetHED_Apache2, path, seed, half=True)


def save_hed_folder(folder: Path, seed: int = 0) -> Path:
    return save_hed(folder / "ControlNetHED.pth", seed)


def save_lineart(path: Path, seed: int = 0) -> Path:
    generator = _quiet("controlnet_aux.lineart").Generator
    return _save_state(lambda: generator(3, 1, 3), path, seed)


def save_lineart_folder(folder: Path, seed: int = 0) -> Path:
    """sk_model.pth (fine) and sk_model2.pth (coarse)."""
    save_lineart(folder / LINEART_FILES[0], seed)
    save_lineart(folder / LINEART_FILES[1], seed + 1)
    return folder
