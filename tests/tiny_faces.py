"""Tiny stand-ins for insightface's model packs for the face tests: the product's builders
(engine/tiny/faces.py, which the tiny model's packs use too) with the tests' faces and pack layout.

* `save_tiny_arcface` / `save_constant_scrfd`: a random ArcFace and a constant SCRFD (engine/tiny/faces.py).
* `write_pack(weights_dir, faces, entry_name=...)`: both files at the paths the committed manifest gives
  the pack, so `FaceAnalyzer.load` finds them through `engine.weights.require` like real weights.

Face coordinates are given in the pixels of the image the test will analyse (`image_size`): the
detector runs on a 640x640 letterbox of it, and insightface divides by the same scale on the way
back, so the boxes and keypoints round-trip (to float precision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from engine.tiny import faces as product
from engine.tiny.faces import ANCHORS, DET_SIZE, STRIDES, FaceSpec, save_tiny_arcface  # noqa: F401

# skimage.data.astronaut() (512x512): Eileen Collins' face, measured on the picture. Box from the
# hairline to the chin and cheek to cheek; keypoints in insightface's order: the eye on the image's
# left, the other eye, the nose tip, the mouth corner on the left, the one on the right.
ASTRONAUT_SIZE = (512, 512)


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


# ------------------------------------------------------------------- recogniser and detector


def encode_faces(faces: Sequence[FaceSpec], image_size: tuple[int, int] = ASTRONAUT_SIZE, det_size: int = DET_SIZE):
    """engine.tiny.faces.encode_faces, for pictures the size of the astronaut by default."""
    return product.encode_faces(faces, image_size, det_size)


def save_constant_scrfd(path: Path | str, faces: Sequence[FaceSpec], image_size: tuple[int, int] = ASTRONAUT_SIZE,
                        det_size: int = DET_SIZE) -> Path:
    """engine.tiny.faces.save_constant_scrfd, faces given in the astronaut picture's pixels by default."""
    return product.save_constant_scrfd(path, faces, image_size, det_size)


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
