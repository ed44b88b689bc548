"""Tiny stand-ins for insightface's model packs, built in code for the face tests.

* `save_tiny_arcface(path)`: a small random-weight torch net (1,3,112,112) -> (1,512), exported to
  ONNX with `torch.onnx.export(..., dynamo=False)` and a dynamic batch axis. insightface's model
  router takes a square input >= 112 divisible by 16 with one output for an ArcFace recogniser, so it
  loads as `ArcFaceONNX`, exactly as glintr100.onnx / w600k_r50.onnx do.
* `save_constant_scrfd(path, faces)`: an SCRFD-shaped detector (fixed 1x3x640x640 input, the nine
  outputs score/bbox/kps x strides 8/16/32 of the `*_bnkps` models, unbatched rank-2 outputs)
  whose outputs are constants encoding the given faces. insightface decodes them with its own
  anchor/distance code, so a face comes back where it was put, whatever the picture shows (except a
  black picture, which shows none: the scores are gated on the input's mean).
* `write_pack(weights_dir, faces, entry_name=...)`: both files at the paths the committed manifest gives
  the pack, so `FaceAnalyzer.load` finds them through `engine.weights.require` like real weights.

Face coordinates are given in the pixels of the image the test will analyse (`image_size`): the
detector runs on a 640x640 letterbox of it, and insightface divides by the same scale on the way
back, so the boxes and keypoints round-trip (to float precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2  # SCRFD's *_bnkps models: two anchors per location

# skimage.data.astronaut() (512x512): Eileen Collins' face, measured on the picture. Box from the
# hairline to the chin and cheek to cheek; keypoints in insightface's order: the eye on the image's
# left, the other eye, the nose tip, the mouth corner on the left, the one on the right.
ASTRONAUT_SIZE = (512, 512)


@dataclass(frozen=True)
class FaceSpec:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    kps: tuple[tuple[float, float], ...]  # five (x, y) in image pixels
    score: float = 0.9


ASTRONAUT_FACE = FaceSpec(
    bbox=(180.0, 62.0, 272.0, 186.0),
    kps=((204.0, 101.0), (247.5, 102.5), (224.0, 127.5), (204.5, 142.0), (243.0, 142.0)),
    score=0.92,
)


def scaled_face(box: tuple[float, float, float, float], score: float = 0.8) -> FaceSpec:
    """A face of plausible proportions filling `box` (keypoints placed like the astronaut's)."""
    x1, y1, x2, y2 = box
    ref = ASTRONAUT_FACE
    rx1, ry1, rx2, ry2 = ref.bbox
    sx, sy = (x2 - x1) / (rx2 - rx1), (y2 - y1) / (ry2 - ry1)
    kps = tuple((x1 + (x - rx1) * sx, y1 + (y - ry1) * sy) for x, y in ref.kps)
    return FaceSpec(bbox=box, kps=kps, score=score)


# A second, smaller face (lower right of the astronaut picture, on the suit), given a HIGHER score
# than the astronaut's so insightface returns it first: sorting largest-first is then our doing.
SECOND_FACE = scaled_face((380.0, 300.0, 452.0, 388.0), score=0.97)  # 72 x 88 px
TINY_FACE = scaled_face((200.0, 80.0, 240.0, 128.0), score=0.9)  # 40 x 48 px


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
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, 112, 112),),
            str(path),
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


# ------------------------------------------------------------------------------ detector


def encode_faces(
    faces: Sequence[FaceSpec], image_size: tuple[int, int] = ASTRONAUT_SIZE, det_size: int = DET_SIZE
) -> list[np.ndarray]:
    """The nine SCRFD outputs (scores x3, bboxes x3, kps x3) that decode to `faces`.

    Each face sits on the stride-8 anchor nearest its box centre; distances are in stride units,
    as the network predicts them. `image_size` (width, height) is the picture that will be analysed:
    insightface letterboxes it into det_size x det_size and scales the result back.
    """
    width, height = image_size
    scale = det_size / max(width, height)  # insightface's det_scale for a letterboxed image
    scores = [np.zeros((_count(s, det_size), 1), np.float32) for s in STRIDES]
    boxes = [np.zeros((_count(s, det_size), 4), np.float32) for s in STRIDES]
    kpss = [np.zeros((_count(s, det_size), 10), np.float32) for s in STRIDES]
    stride, level = STRIDES[0], 0
    columns = det_size // stride
    used = set()
    for face in faces:
        x1, y1, x2, y2 = (value * scale for value in face.bbox)
        column = int(round((x1 + x2) / 2 / stride))
        row = int(round((y1 + y2) / 2 / stride))
        if (row, column) in used:
            raise ValueError(f"two faces on one anchor ({row}, {column}): move one")
        used.add((row, column))
        cx, cy = column * stride, row * stride
        index = (row * columns + column) * ANCHORS  # first of the two anchors at this location
        scores[level][index, 0] = face.score
        boxes[level][index] = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy], np.float32) / stride
        offsets = [(x * scale - cx, y * scale - cy) for x, y in face.kps]
        kpss[level][index] = np.array(offsets, np.float32).reshape(-1) / stride
    return scores + boxes + kpss


def _count(stride: int, det_size: int) -> int:
    return (det_size // stride) ** 2 * ANCHORS


def save_constant_scrfd(
    path: Path | str,
    faces: Sequence[FaceSpec],
    image_size: tuple[int, int] = ASTRONAUT_SIZE,
    det_size: int = DET_SIZE,
) -> Path:
    """An ONNX detector with SCRFD's input and nine outputs, the outputs constants encoding `faces`.

    One concession to realism: a blank (black) picture has no face. The scores are multiplied by a
    gate that is 1 when the mean of the normalised input is above -0.9 and 0 below (a black image
    normalises to about -1), so any ordinary photo shows the encoded faces and a black one none.
    """
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
    initializers = [
        numpy_helper.from_array(np.array(value, np.float32), name)
        for name, value in (("blank_level", 0.9), ("steep", 1000.0), ("zero", 0.0), ("one", 1.0))
    ]
    graph_outputs = []
    for name, value in zip(names, outputs):
        initializers.append(numpy_helper.from_array(value, f"{name}_const"))
        if name.startswith("score"):
            nodes.append(helper.make_node("Mul", [f"{name}_const", "gate"], [name]))
        else:
            nodes.append(helper.make_node("Identity", [f"{name}_const"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes,
        "constant_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, det_size, det_size])],
        graph_outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------------ packs


def pack_files(entry_name: str, weights_dir: Path | str, manifest_path: Path | str | None = None) -> tuple[Path, Path]:
    """(detector path, recogniser path) of a pack as the manifest lays it out under weights_dir."""
    from engine.weights import Manifest

    entry = Manifest.load(manifest_path).get(entry_name)
    folder = entry.folder(weights_dir)
    detector = [folder / f.path for f in entry.files if _is_detector(f.path)]
    recogniser = [folder / f.path for f in entry.files if not _is_detector(f.path)]
    assert len(detector) == 1 and len(recogniser) == 1, f"{entry_name}: expected one detector and one recogniser"
    return detector[0], recogniser[0]


def _is_detector(path: str) -> bool:
    name = Path(path).name
    return name.startswith(("scrfd", "det_"))


def write_pack(
    weights_dir: Path | str,
    faces: Sequence[FaceSpec] = (ASTRONAUT_FACE,),
    entry_name: str = "insightface-antelopev2",
    image_size: tuple[int, int] = ASTRONAUT_SIZE,
    seed: int = 0,
    manifest_path: Path | str | None = None,
) -> Path:
    """Write a tiny detector encoding `faces` and a tiny recogniser where the manifest wants the
    pack's files; returns the folder holding the .onnx files."""
    detector, recogniser = pack_files(entry_name, weights_dir, manifest_path)
    save_constant_scrfd(detector, faces, image_size)
    save_tiny_arcface(recogniser, seed=seed)
    return detector.parent
