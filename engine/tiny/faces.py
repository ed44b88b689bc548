"""Tiny stand-ins for insightface's model packs (antelopev2, buffalo_l), as ONNX files insightface loads.

* `save_tiny_arcface(path)`: a small random-weight torch net (N,3,112,112) -> (N,512), exported to ONNX with
  `torch.onnx.export(..., dynamo=False)` and a dynamic batch axis. insightface's model router takes a square
  input >= 112 divisible by 16 with one output for an ArcFace recogniser, so it loads as `ArcFaceONNX`,
  exactly as glintr100.onnx / w600k_r50.onnx do.
* `save_constant_scrfd(path, faces)`: an SCRFD-shaped detector (fixed 1x3x640x640 input, the nine outputs
  score/bbox/kps x strides 8/16/32 of the `*_bnkps` models, unbatched rank-2 outputs) whose outputs are
  constants encoding the given faces. insightface decodes them with its own anchor/distance code, so a face
  comes back where it was put, whatever the picture shows, except a black picture, which shows none (the
  scores are gated on the input's mean).

Face coordinates are given in the pixels of the image that will be analysed (`image_size`): the detector runs
on a 640x640 letterbox of it and insightface divides by the same scale on the way back. The tiny model's packs
(`save_tiny_pack`) put one face in the middle of the letterbox: 3/5 of a square picture's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2  # SCRFD's *_bnkps models: two anchors per location
ANTELOPEV2_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
BUFFALO_L_FILES = ("models/buffalo_l/det_10g.onnx", "models/buffalo_l/w600k_r50.onnx")


@dataclass(frozen=True)
class FaceSpec:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    kps: tuple[tuple[float, float], ...]  # five (x, y) in image pixels, insightface's order
    score: float = 0.9


# The face every picture shows to the tiny packs, in 640x640 letterbox pixels: box and keypoints in the
# proportions of a real frontal face (eyes, nose tip, mouth corners).
CENTRED_FACE = FaceSpec(
    bbox=(128.0, 96.0, 512.0, 576.0),
    kps=((234.0, 287.0), (406.0, 287.0), (320.0, 390.0), (250.0, 470.0), (390.0, 470.0)),
    score=0.9,
)


# ------------------------------------------------------------------------------ recogniser


def save_tiny_arcface(path: Path | str, seed: int = 0) -> Path:
    """A random-weight ArcFace stand-in: (N,3,112,112) -> (N,512), ONNX with a dynamic batch axis."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=4, stride=4),  # 28x28
        nn.PReLU(16),
        nn.Conv2d(16, 32, kernel_size=4, stride=4),  # 7x7
        nn.PReLU(32),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 512),
    ).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), input_names=["input.1"],
                          output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


# ------------------------------------------------------------------------------ detector


def encode_faces(faces: Sequence[FaceSpec], image_size: tuple[int, int], det_size: int = DET_SIZE) -> list[np.ndarray]:
    """The nine SCRFD outputs (scores x3, bboxes x3, kps x3) that decode to `faces`.

    Each face sits on the stride-8 anchor nearest its box centre; distances are in stride units, as the
    network predicts them. `image_size` (width, height) is the picture that will be analysed.
    """
    scale = det_size / max(image_size)  # insightface's det_scale for a letterboxed image
    scores = [np.zeros((_count(s, det_size), 1), np.float32) for s in STRIDES]
    boxes = [np.zeros((_count(s, det_size), 4), np.float32) for s in STRIDES]
    kpss = [np.zeros((_count(s, det_size), 10), np.float32) for s in STRIDES]
    stride, columns, used = STRIDES[0], det_size // STRIDES[0], set()
    for face in faces:
        x1, y1, x2, y2 = (value * scale for value in face.bbox)
        column, row = int(round((x1 + x2) / 2 / stride)), int(round((y1 + y2) / 2 / stride))
        if (row, column) in used:
            raise ValueError(f"two faces on one anchor ({row}, {column}): move one")
        used.add((row, column))
        cx, cy = column * stride, row * stride
        index = (row * columns + column) * ANCHORS  # first of the two anchors at this location
        scores[0][index, 0] = face.score
        boxes[0][index] = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy], np.float32) / stride
        kpss[0][index] = np.array([(x * scale - cx, y * scale - cy) for x, y in face.kps], np.float32).reshape(-1) / stride
    return scores + boxes + kpss


def _count(stride: int, det_size: int) -> int:
    return (det_size // stride) ** 2 * ANCHORS


def save_constant_scrfd(path: Path | str, faces: Sequence[FaceSpec], image_size: tuple[int, int] = (DET_SIZE, DET_SIZE),
                        det_size: int = DET_SIZE) -> Path:
    """An ONNX detector with SCRFD's input and nine outputs, the outputs constants encoding `faces`; the
    scores are multiplied by a gate that is 0 for a black picture (normalised mean below -0.9), else 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outputs = encode_faces(faces, image_size, det_size)
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in STRIDES]
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
        helper.make_node("Add", ["mean", "blank_level"], ["above_blank"]),
        helper.make_node("Mul", ["above_blank", "steep"], ["ramp"]),
        helper.make_node("Clip", ["ramp", "zero", "one"], ["gate"]),
    ]
    initializers = [numpy_helper.from_array(np.array(value, np.float32), name)
                    for name, value in (("blank_level", 0.9), ("steep", 1000.0), ("zero", 0.0), ("one", 1.0))]
    graph_outputs = []
    for name, value in zip(names, outputs):
        initializers.append(numpy_helper.from_array(value, f"{name}_const"))
        gated = name.startswith("score")
        nodes.append(helper.make_node("Mul" if gated else "Identity", [f"{name}_const", "gate"][: 2 if gated else 1], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "constant_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, det_size, det_size])],
                              graph_outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def save_tiny_pack(folder: Path, files: Sequence[str], seed: int = 0) -> Path:
    """A pack's detector (the first file) showing CENTRED_FACE, and its recogniser (the second)."""
    detector, recogniser = (Path(folder) / name for name in files)
    save_constant_scrfd(detector, [CENTRED_FACE])
    save_tiny_arcface(recogniser, seed=seed)
    return detector.parent
