"""Character Reference: keep one person's identity across images, from a photo or a saved profile.

Two face-embedding adapters behind one interface (`IdentityAdapter.plan`):
- `instantid` (default): InstantID. Its face adapter (a Resampler over the 512-d ArcFace embedding of
  insightface's antelopev2 pack) feeds 16 identity tokens to the UNet's cross-attention through an
  IP-Adapter, and IdentityNet, a ControlNet that attends to those face tokens instead of the text,
  is fed a five-keypoint picture (from the reference, or from `pose_image`). Strongest likeness.
- `faceid`: IP-Adapter FaceID-Plus-v2. The ArcFace embedding (buffalo_l pack) gives 4 tokens, which
  a Resampler refines with the CLIP hidden states of the aligned face crop; the file's LoRA is active
  while a character is used. Lighter: no ControlNet, so the face is free to move.

Strength (`weight` 0-2 or `strength_type` Low/Mid/High, never both) -> scales, one table, linear
between its rows:

| strengthType | weight range | weight used | adapter scale | IdentityNet scale (InstantID) |
|--------------|--------------|-------------|---------------|-------------------------------|
|              | 0            |             | 0 (no character: exactly the plain image)     |
| Low          | 0    - 0.66  | 0.33        | 0.40          | 0.30                          |
| Mid          | 0.66 - 1.32  | 0.99        | 0.80          | 0.80                          |
| High         | 1.32 - 2     | 1.66        | 1.00          | 1.00                          |
|              | 2            |             | 1.20          | 1.20                          |

Mid is InstantID's published default (0.8 / 0.8). The FaceID LoRA stays at 1.0 for any weight > 0
(it adapts the UNet to the adapter's tokens; scaling it down does not weaken the likeness evenly).

Several images (a profile's anchors or `images=[...]`) are averaged: the identity is the normalised
mean of their ArcFace embeddings; the face crop (FaceID) and the keypoints (InstantID) are the first
image's. A profile whose embeddings were made with another insightface pack than the adapter's is
re-embedded from its stored anchor images (embeddings of different recognisers are not comparable).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from engine.errors import RefgenError
from engine.hashing import cached_sha256
from engine.images import load_rgb
from engine.request_types import CharacterReference, character_scales

from .characters import FACE_CROP_SIZE, CharacterStore, unit_mean
from .controlnet import ControlGuidance, ReadyControl, control_tensor
from .faces import FaceAnalyzer, keypoints_image
from .ip_adapter import AdapterFile, AdapterUse, IPAdapters, cfg_rows

# ------------------------------------------------------------------------------------- adapters

PACKS: dict[str, str] = {"instantid": "antelopev2", "faceid": "buffalo_l"}  # the recogniser each was trained on
FACEID_ENTRY = "ip-adapter-faceid-plusv2-sdxl"
FACEID_FILES = ("ip-adapter-faceid-plusv2_sdxl.safetensors", "ip-adapter-faceid-plusv2_sdxl.bin")
INSTANTID_ENTRY = "instantid"
INSTANTID_FILES = ("ip-adapter.safetensors", "ip-adapter.bin")
IDENTITYNET_FOLDER = "ControlNetModel"
FACEID_LORA = "faceid_0"  # diffusers names the LoRA of adapter instance k `faceid_k`; the character is instance 0


def ranking(scores: list[Optional[float]]) -> list[int]:
    """Indices best first: highest identity score first, images without a face last, ties in batch order."""
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0)))


class CharacterReferenceError(RefgenError):
    """A Character Reference that cannot be served (missing adapter files, unusable profile)."""


@dataclass(frozen=True, eq=False)
class Identity:
    """What a character's adapters are fed, worked out once per request."""

    label: str  # the character's name, or "photos"
    anchor: str  # a profile's identity text, prepended to the prompt ("" for photos)
    embedding: np.ndarray  # (512,) unit length, made by `pack`'s recogniser: FaceID's input, and what scores compare to
    raw_embedding: np.ndarray  # (512,) mean of the raw ArcFace vectors: InstantID was trained on them unnormalised
    pack: str
    face_crop: Image.Image  # aligned crop of the first image's face (FaceID's CLIP input)
    keypoints: Image.Image  # InstantID's five-keypoint picture, at the size of the image they came from

    @property
    def fingerprint(self) -> str:
        """sha256 of the identity embedding: replay checks that a profile still means the same person."""
        vectors = np.concatenate([self.embedding, self.raw_embedding]).astype(np.float32)
        return hashlib.sha256(vectors.tobytes()).hexdigest()


class IdentityAdapters:
    """The Character Reference side of an engine: face analysis, the identity of a request, and what the
    chosen adapter contributes (IP-Adapter instances, InstantID's IdentityNet, FaceID's LoRA)."""

    def __init__(self, ip_adapters: IPAdapters, device, dtype, *, faceid: Union[str, Path] = FACEID_ENTRY,
                 instantid: Union[str, Path] = INSTANTID_ENTRY, store: Optional[CharacterStore] = None,
                 analyzers: Optional[dict[str, FaceAnalyzer]] = None, manifest=None, weights_dir: Optional[Path] = None):
        self._ip, self._device, self._dtype = ip_adapters, device, dtype
        self._manifest, self._weights_dir = manifest, weights_dir  # where manifest names are looked up
        self._references = {"faceid": str(faceid), "instantid": str(instantid)}
        self._store = store
        self._analyzers: dict[str, FaceAnalyzer] = dict(analyzers or {})
        self._identitynet = None

    def analyzer(self, adapter: str) -> FaceAnalyzer:
        """insightface over the pack `adapter` was trained with, loaded on first use."""
        pack = PACKS[adapter]
        if pack not in self._analyzers:
            self._analyzers[pack] = FaceAnalyzer.load(pack, device=str(self._device), weights_dir=self._weights_dir,
                                                      manifest=self._manifest)
        return self._analyzers[pack]

    @property
    def store(self) -> CharacterStore:
        return self._store or CharacterStore()

    # -- identity ---------------------------------------------------------------------------------

    def identity(self, ref: CharacterReference, images: list[Image.Image], pose: Optional[Image.Image]) -> Identity:
        """The averaged identity of a saved character (from its anchor photos) or of photos, the first
        face's crop and keypoints. Raises the face layer's typed errors naming the image, and
        UnknownCharacterError for an unknown name. Analyses are cached, so a profile costs nothing twice."""
        analyzer = self.analyzer(ref.adapter)
        if ref.name is not None:
            character = self.store.get(ref.name)
            pictures = [load_rgb(path, f"anchor image {n} of {character.name!r}") for n, path in enumerate(character.anchor_paths, 1)]
            label, anchor, select, what = character.name, character.anchor, "largest", f"anchor image {{}} of {character.name!r}"
        else:
            pictures, label, anchor = images, "photos", ""
            select = "largest" if ref.face_index is None else ref.face_index
            what = "the character image" if len(images) == 1 else "character image {}"
        faces = [analyzer.analyze(picture, select=select, what=what.format(n), crop_size=FACE_CROP_SIZE)
                 for n, picture in enumerate(pictures, 1)]
        units = np.stack([face.embedding for face in faces]).astype(np.float64)
        raw = np.mean([face.embedding * face.embedding_norm for face in faces], axis=0)  # InstantID: sum / n of raw vectors
        posed = faces[0] if pose is None else analyzer.analyze(pose, what="the pose image", min_face=0)
        return Identity(label, anchor, unit_mean(units), raw.astype(np.float32), analyzer.pack, faces[0].crop,
                        keypoints_image(posed.kps, posed.image_size))

    def score(self, adapter: str, identity: Identity, images: list[Image.Image]) -> list[Optional[float]]:
        """ArcFace cosine of each image's largest face to the identity; None where no face is found."""
        analyzer = self.analyzer(adapter)
        return [analyzer.score_image(image, identity.embedding, what=f"output image {n}") for n, image in enumerate(images, 1)]

    # -- contributions ------------------------------------------------------------------------------

    def uses(self, ref: CharacterReference, identity: Identity, batch: int, guided: bool) -> list[AdapterUse]:
        """The IP-Adapter instance of the character (always instance 0, see FACEID_LORA)."""
        adapter_scale, _ = character_scales(ref.scale)
        embeds = self._id_rows(ref, identity, batch, guided)
        if ref.adapter == "instantid":
            return [AdapterUse(self._adapter_file("instantid"), adapter_scale, embeds[:, :, None])]  # (rows, 1, 1, 512)
        positive, negative = self._ip.encode(identity.face_crop, hidden_states=True)
        clip = cfg_rows(positive, negative, batch, guided)  # (rows, 1, tokens, hidden)
        return [AdapterUse(self._adapter_file("faceid"), adapter_scale, embeds, clip_embeds=clip)]

    def loras(self, ref: CharacterReference) -> dict[str, float]:
        """peft adapters to keep active: FaceID's LoRA while a FaceID character is used."""
        return {FACEID_LORA: 1.0} if ref.adapter == "faceid" else {}

    def control(self, ref: CharacterReference, identity: Identity, width: int, height: int, batch: int,
                guided: bool) -> Optional[ControlGuidance]:
        """InstantID's IdentityNet: a ControlNet on the keypoint picture that attends to the face tokens
        (the loaded face adapter's projection of the same embeddings the UNet gets)."""
        _, identitynet_scale = character_scales(ref.scale)
        if ref.adapter != "instantid" or identitynet_scale == 0:
            return None
        model = self._identity_net()
        rows = self._id_rows(ref, identity, batch, guided)
        with torch.inference_mode():
            tokens = self._ip.projection(0)(rows)  # (rows, 16, cross)
        image = control_tensor(identity.keypoints, width, height, "crop", rows.shape[0], model)
        return ControlGuidance([ReadyControl(model, image, identitynet_scale, context=tokens.to(model.dtype))])

    def _id_rows(self, ref: CharacterReference, identity: Identity, batch: int, guided: bool) -> torch.Tensor:
        """(rows, 1, 512) identity embeddings, zeros for the unconditional half (both adapters' convention)."""
        vector = identity.raw_embedding if ref.adapter == "instantid" else identity.embedding
        embedding = torch.tensor(vector)[None]  # (1, 512): one image per adapter
        return cfg_rows(embedding, torch.zeros_like(embedding), batch, guided).to(self._device, self._dtype)

    def record(self, adapter: str) -> dict:
        """The files a character request used, for provenance."""
        file = self._adapter_file(adapter)
        record = {"adapter": adapter, "file": str(file.folder / file.weight_name),
                  "sha256": cached_sha256(file.folder / file.weight_name), "face_analysis": self.analyzer(adapter).describe()}
        if adapter == "instantid":
            record["identitynet"] = str(self._folder("instantid") / IDENTITYNET_FOLDER)
        return record

    def _adapter_file(self, adapter: str) -> AdapterFile:
        folder = self._folder(adapter)
        names = FACEID_FILES if adapter == "faceid" else INSTANTID_FILES
        for name in names:  # a converted .safetensors first: the published .bin is a pickle
            if (folder / name).is_file():
                return AdapterFile(folder, name)
        raise CharacterReferenceError(f"no {adapter} adapter file ({' or '.join(names)}) in {folder}")

    def _folder(self, adapter: str) -> Path:
        from engine import weights

        reference = self._references[adapter]
        folder = Path(reference).expanduser()
        return folder if folder.is_dir() else weights.require(reference, self._weights_dir, self._manifest)

    def _identity_net(self):
        if self._identitynet is None:
            from diffusers import ControlNetModel

            folder = self._folder("instantid") / IDENTITYNET_FOLDER
            model = ControlNetModel.from_pretrained(str(folder), dtype=self._dtype, use_safetensors=True, local_files_only=True)
            self._identitynet = model.to(self._device).eval()
        return self._identitynet
