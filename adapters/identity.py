"""Character Reference: keep one person's identity across images, from a photo or a saved profile.

Two face-embedding adapters behind one interface (`FaceAdapter`), served by one Adapter (`CharacterReferences`):
- `instantid` (default, class `InstantID`): Its face adapter (a Resampler over the 512-d ArcFace embedding of
  insightface's antelopev2 pack) feeds 16 identity tokens to the UNet's cross-attention through an
  IP-Adapter, and IdentityNet, a ControlNet that attends to those face tokens instead of the text,
  is fed a five-keypoint picture (from the reference, or from `pose_image`). Strongest likeness.
- `faceid` (class `FaceIDPlusV2`): IP-Adapter FaceID-Plus-v2. The ArcFace embedding (buffalo_l pack) gives 4 tokens, which
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
from typing import ClassVar, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from engine.adapter import Context, Frame, Prepared
from engine.conditioning import Guidance
from engine.errors import ProvenanceError, RefgenError
from engine.hashing import cached_sha256
from engine.images import load_rgb
from engine.lora import LoraPatch
from engine.provenance import image_record, replay_image
from engine.request import GenerationRequest, ResolvedRequest
from engine.request_types import CharacterReference, character_scales
from engine.speed import Speed, prepare_module

from .characters import FACE_CROP_SIZE, CharacterStore
from .controlnet import ControlGuidance, ReadyControl, control_tensor
from .faces import FaceAnalyzer, keypoints_image, mean_identity, ranking
from .ip_adapter import AdapterFile, AdapterUse, IPAdapters, cfg_rows

# ------------------------------------------------------------------------------------- adapters

FACEID_ENTRY = "ip-adapter-faceid-plusv2-sdxl"
FACEID_FILES = ("ip-adapter-faceid-plusv2_sdxl.safetensors", "ip-adapter-faceid-plusv2_sdxl.bin")
INSTANTID_ENTRY = "instantid"
INSTANTID_FILES = ("ip-adapter.safetensors", "ip-adapter.bin")
IDENTITYNET_FOLDER = "ControlNetModel"
FACEID_LORA = "faceid_0"  # diffusers names the LoRA of adapter instance k `faceid_k`; the character is instance 0


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


class FaceAdapter:
    """One face-embedding adapter: what it feeds the UNet (always IP-Adapter instance 0, see FACEID_LORA),
    and what else it switches on. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # CharacterReference.adapter
    pack: ClassVar[str]  # the insightface pack whose recogniser it was trained on
    entry: ClassVar[str]  # its manifest entry
    files: ClassVar[tuple[str, ...]]  # its adapter file, a converted .safetensors first (the published .bin is a pickle)

    def __init__(self, ip_adapters: IPAdapters, device, dtype, reference: Union[str, Path, None] = None, *,
                 manifest=None, weights_dir: Optional[Path] = None):
        self.ip_adapters, self._device, self._dtype = ip_adapters, device, dtype
        self._reference = str(reference or self.entry)
        self._manifest, self._weights_dir = manifest, weights_dir  # where manifest names are looked up

    def use(self, ref: CharacterReference, identity: Identity, batch: int, guided: bool) -> AdapterUse:
        """Its IP-Adapter instance: file, scale and CFG-batched embeddings."""
        raise NotImplementedError

    def loras(self) -> dict[str, float]:
        """peft adapters to keep active while the character steers."""
        return {}

    def control(self, ref: CharacterReference, identity: Identity, frame: Frame) -> Optional[Guidance]:
        """A ControlNet of its own, when it has one."""
        return None

    def record(self) -> dict:
        """The files a character request used, for provenance."""
        file = self.adapter_file()
        return {"adapter": self.name, "file": str(file.folder / file.weight_name), "sha256": cached_sha256(file.folder / file.weight_name)}

    def _rows(self, vector: np.ndarray, batch: int, guided: bool) -> torch.Tensor:
        """(rows, 1, 512) identity embeddings, zeros for the unconditional half (both adapters' convention)."""
        embedding = torch.tensor(vector)[None]  # (1, 512): one image per adapter
        return cfg_rows(embedding, torch.zeros_like(embedding), batch, guided).to(self._device, self._dtype)

    def adapter_file(self) -> AdapterFile:
        folder = self.folder()
        for name in self.files:
            if (folder / name).is_file():
                return AdapterFile(folder, name)
        raise CharacterReferenceError(f"no {self.name} adapter file ({' or '.join(self.files)}) in {folder}")

    def folder(self) -> Path:
        from engine import weights

        return weights.locate(self._reference, self._weights_dir, self._manifest)


class InstantID(FaceAdapter):
    """16 face tokens from the raw ArcFace embedding, and IdentityNet on the face's keypoints."""

    name, pack, entry, files = "instantid", "antelopev2", INSTANTID_ENTRY, INSTANTID_FILES

    def __init__(self, *args, speed: Optional[Speed] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._identitynet = None
        self._speed = speed or Speed()  # IdentityNet compiled like the engine's other ControlNets

    def use(self, ref, identity, batch, guided) -> AdapterUse:
        adapter_scale, _ = character_scales(ref.scale)
        embeds = self._rows(identity.raw_embedding, batch, guided)  # trained on raw, unnormalised vectors
        return AdapterUse(self.adapter_file(), adapter_scale, embeds[:, :, None])  # (rows, 1, 1, 512)

    def control(self, ref, identity, frame: Frame) -> Optional[ControlGuidance]:
        """IdentityNet: a ControlNet on the keypoint picture that attends to the face tokens (the loaded face
        adapter's projection of the same embeddings the UNet gets)."""
        _, identitynet_scale = character_scales(ref.scale)
        if identitynet_scale == 0:
            return None
        model = self._identity_net()
        rows = self._rows(identity.raw_embedding, frame.batch, frame.guided)
        with torch.inference_mode():
            tokens = self.ip_adapters.projection(0)(rows)  # (rows, 16, cross)
        image = control_tensor(identity.keypoints, frame.width, frame.height, "crop", rows.shape[0], model)
        return ControlGuidance([ReadyControl(model, image, identitynet_scale, context=tokens.to(model.dtype))])

    def record(self) -> dict:
        return {**super().record(), "identitynet": str(self.folder() / IDENTITYNET_FOLDER)}

    def _identity_net(self):
        if self._identitynet is None:
            from diffusers import ControlNetModel

            folder = self.folder() / IDENTITYNET_FOLDER
            model = ControlNetModel.from_pretrained(str(folder), dtype=self._dtype, use_safetensors=True, local_files_only=True)
            self._identitynet = prepare_module(model.to(self._device).eval(), self._speed)
        return self._identitynet


class FaceIDPlusV2(FaceAdapter):
    """4 tokens from the unit ArcFace embedding, refined with the CLIP hidden states of the face crop; its LoRA on."""

    name, pack, entry, files = "faceid", "buffalo_l", FACEID_ENTRY, FACEID_FILES

    def use(self, ref, identity, batch, guided) -> AdapterUse:
        adapter_scale, _ = character_scales(ref.scale)
        positive, negative = self.ip_adapters.encode(identity.face_crop, hidden_states=True)
        clip = cfg_rows(positive, negative, batch, guided)  # (rows, 1, tokens, hidden)
        return AdapterUse(self.adapter_file(), adapter_scale, self._rows(identity.embedding, batch, guided), clip_embeds=clip)

    def loras(self) -> dict[str, float]:
        return {FACEID_LORA: 1.0}


class CharacterReferences:
    """Character Reference, an Adapter (engine/adapter.py): face analysis, the identity of a request, and
    its face adapter's contributions; every output is scored against the identity."""

    def __init__(self, face_adapters: Sequence[FaceAdapter], device, *, store: Optional[CharacterStore] = None,
                 analyzers: Optional[dict[str, FaceAnalyzer]] = None, manifest=None, weights_dir: Optional[Path] = None):
        self._adapters = {adapter.name: adapter for adapter in face_adapters}
        self._device, self._store = device, store
        self._manifest, self._weights_dir = manifest, weights_dir
        self._analyzers: dict[str, FaceAnalyzer] = dict(analyzers or {})

    def adapter(self, name: str) -> FaceAdapter:
        if name not in self._adapters:
            raise CharacterReferenceError(f"this engine has no {name!r} face adapter (it has: {', '.join(self._adapters)})")
        return self._adapters[name]

    def analyzer(self, adapter: str) -> FaceAnalyzer:
        """insightface over the pack `adapter` was trained with, loaded on first use."""
        pack = self.adapter(adapter).pack
        if pack not in self._analyzers:
            self._analyzers[pack] = FaceAnalyzer.load(pack, device=str(self._device), weights_dir=self._weights_dir,
                                                      manifest=self._manifest)
        return self._analyzers[pack]

    @property
    def store(self) -> CharacterStore:
        return self._store or CharacterStore()

    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional["PreparedCharacter"]:
        ref = request.character
        if ref is None:
            return None
        if request.guidance_cutoff is not None and ref.adapter == FaceIDPlusV2.name:
            raise CharacterReferenceError("guidance_cutoff does not work with the faceid adapter (its face CLIP states are "
                                          "set once for both guidance halves); use adapter='instantid' or no cutoff")
        images = [load_rgb(image, f"character image {n}") for n, image in enumerate(ref.images, 1)]
        pose = None if ref.pose_image is None else load_rgb(ref.pose_image, "pose image")
        identity = self.identity(ref, images, pose)
        record = {
            **ref.model_dump(mode="json", exclude={"images", "pose_image", "mask"}),  # the mask: adapters/appearance.py
            "images": [image_record(source, image) for source, image in zip(ref.images, images)],
            "pose_image": image_record(ref.pose_image, pose), "identity_sha256": identity.fingerprint,
            "files": self._files(ref.adapter),
        }
        return PreparedCharacter(self, ref.model_copy(update={"images": images, "pose_image": pose}), identity, record, ctx.loras)

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional["PreparedCharacter"]:
        record = resolved.character
        if record is None:
            return None
        images = [replay_image(info, f"character image {n}") for n, info in enumerate(record["images"], 1)]
        pose = None if record["pose_image"] is None else replay_image(record["pose_image"], "pose image")
        fields = {key: record[key] for key in CharacterReference.model_fields
                  if key not in ("images", "pose_image", "mask", "keep", "mask_mode") and key in record}
        ref = CharacterReference(**fields, images=images, pose_image=pose)
        identity = self.identity(ref, images, pose)
        if identity.fingerprint != record["identity_sha256"]:
            raise ProvenanceError(f"character {ref.name or 'photos'!r} has changed since the image was made (its identity embedding differs)")
        return PreparedCharacter(self, ref, identity, record, ctx.loras)

    def _files(self, adapter: str) -> dict:
        return {**self.adapter(adapter).record(), "face_analysis": self.analyzer(adapter).describe()}

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
        raw = np.mean([face.embedding * face.embedding_norm for face in faces], axis=0)  # InstantID: sum / n of raw vectors
        posed = faces[0] if pose is None else analyzer.analyze(pose, what="the pose image", min_face=0)
        embedding = mean_identity([face.embedding for face in faces], f"the faces of {label}")
        return Identity(label, anchor, embedding, raw.astype(np.float32), analyzer.pack, faces[0].crop,
                        keypoints_image(posed.kps, posed.image_size))

    def score(self, adapter: str, identity: Identity, images: list[Image.Image]) -> list[Optional[float]]:
        """ArcFace cosine of each image's largest face to the identity; None where no face is found."""
        analyzer = self.analyzer(adapter)
        return [analyzer.score_image(image, identity.embedding, what=f"output image {n}") for n, image in enumerate(images, 1)]


class PreparedCharacter(Prepared):
    def __init__(self, owner: CharacterReferences, ref: CharacterReference, identity: Identity, record: dict, loras):
        self._owner, self._ref, self._identity, self._record, self._loras = owner, ref, identity, record, loras
        self._adapter = owner.adapter(ref.adapter)
        self._steers = ref.scale > 0  # at weight 0 it adds nothing (outputs are still scored)

    def record(self) -> dict:
        return {"character": self._record}

    def prompt(self, prompt: str) -> str:
        """A character's identity text leads the prompt (once: a prompt that already starts with it is kept)."""
        anchor = self._identity.anchor
        return prompt if not anchor or prompt.startswith(anchor) else f"{anchor}, {prompt}"

    def patches(self, frame: Frame) -> list:
        if not self._steers:
            return []
        patches = [(self._adapter.ip_adapters, self._adapter.use(self._ref, self._identity, frame.batch, frame.guided))]
        keep = self._adapter.loras()
        return patches + ([(self._loras, LoraPatch(keep=keep))] if keep else [])

    def guidance(self, frame: Frame) -> tuple[Guidance, ...]:
        if not (self._steers and frame.whole):
            return ()
        control = self._adapter.control(self._ref, self._identity, frame)
        return () if control is None else (control,)

    def finish(self, result, resolved: ResolvedRequest):
        """Every output gets its identity score ("no face" when none is found); best_of requests come back
        best first (their metadata keep their batch index for replay)."""
        scores = self._owner.score(self._ref.adapter, self._identity, result.images)
        for meta, score in zip(result.metadata, scores):
            meta["identity_score"] = "no face" if score is None else round(score, 6)
        if not resolved.ranked:
            return result
        order = ranking(scores)
        for rank, index in enumerate(order, 1):
            result.metadata[index]["rank"] = rank
        return result.reordered(order)
