"""refgen's own routes beside Leonardo's, under /api/rest/v1/refgen and behind the same API key: what the studio
page (engine/studio) needs that Leonardo's API has no path for. Everything the page does, a script can do with
these and the Leonardo routes.

| method + path                                   | answer                                                  |
|-------------------------------------------------|---------------------------------------------------------|
| GET    /refgen/catalog                          | the generate form's choices: aspect ratios with the size|
|                                                 | they resolve to on the server's model, modes, presets   |
|                                                 | (built-in and the user's), schedulers, ControlNet kinds,|
|                                                 | strength buckets, character parts                       |
| GET    /refgen/images/{id}                      | one generated image: seed, identity score, rank, its    |
|                                                 | provenance (`recipe`) and `replay`, a generation body   |
|                                                 | that makes this image alone again (POST /generations)   |
| DELETE /refgen/images/{id}                      | one image of a generation                               |
| GET    /refgen/characters                       | the saved characters (the CLI's, $REFGEN_HOME)          |
| POST   /refgen/characters                       | {name, anchor, images: [{id, type UPLOADED|GENERATED}]} |
|                                                 | 1-5 photos of one person -> 201; no face / several faces|
|                                                 | are 422 naming the photo                                |
| GET    /refgen/characters/{name}                | one, with its anchors (size, face box) and their URLs   |
| DELETE /refgen/characters/{name}                |                                                         |
| POST   /refgen/characters/{name}/anchors        | {id, type}: one more anchor (add to character, max 5)   |
| GET    /refgen/characters/{name}/anchors/{n}    | anchor n's picture (PNG; n from 1)                      |
| GET    /refgen/characters/{name}/face           | the aligned face crop the identity comes from           |
| POST   /refgen/characters/{name}/train          | {images?, epochs?, learningRate?, resolution?,          |
|                                                 | trainTextEncoder?}: a LoRA of the character, trained on |
|                                                 | its anchors + `images` (5 pictures at least) as an      |
|                                                 | element (POST /elements' queue): sdTrainingJob          |
|                                                 | {userLoraId}; watch GET /elements/{id}, use it with     |
|                                                 | userElements. A character lists its trainings.          |

A character's trainings are the elements whose description is "refgen character <slug>" (what /train writes);
their trigger is the character's identity anchor text (or its name).

Character pictures need the key (they are the user's photos), unlike /files/ URLs: fetch them with the header.
Faces are found with the server model's face pack (the tiny model's stand-ins for `--model tiny`), loaded on the
first character request.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from .leonardo import LeonardoRequestError, ModelTable
from .store import AssetStore, Generation, GeneratedImage, UnknownAssetError
from .trainings import MIN_IMAGES as MIN_TRAINING_IMAGES, element_job

CONTROLS = [{"preprocessorId": 19, "name": "Edge", "type": "canny"},
            {"preprocessorId": 20, "name": "Depth", "type": "depth"},
            {"preprocessorId": 21, "name": "Pose", "type": "pose"}]
REFERENCES = [{"preprocessorId": 67, "name": "Style Reference"}, {"preprocessorId": 100, "name": "Content Reference"},
              {"preprocessorId": 133, "name": "Character Reference"}]
FACE_PACK = "antelopev2"  # InstantID's pack, the default identity adapter's


class ImageRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: str = "UPLOADED"  # or GENERATED


class CharacterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    anchor: str = ""
    images: list[ImageRef] = Field(min_length=1)


class CharacterTrainingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImageRef] = Field(default_factory=list, max_length=195)  # besides the anchors (200 at most in all)
    epochs: int = Field(default=100, ge=1, le=250)  # 5 pictures x 100 = 500 steps, a usual character LoRA
    learningRate: float = Field(default=1e-4, gt=0, le=1e-2)
    resolution: Optional[int] = None  # default: the element default (1024)
    trainTextEncoder: bool = False


class Faces:
    """The server's face analyser: the server model's pack, loaded once, on the first character request."""

    def __init__(self, model: str):
        self.model = model
        self._analyzer = None
        self._lock = threading.Lock()

    def analyzer(self):
        with self._lock:
            if self._analyzer is None:
                from adapters.faces import FaceAnalyzer

                from ..compose import component_sources

                self._analyzer = FaceAnalyzer.load(FACE_PACK, **component_sources(self.model))
            return self._analyzer


def install(router: APIRouter, ctx: Any) -> None:
    """Add the routes above to `router` (the authorised API router); `ctx` is the server's shared context (store,
    models, faces, training settings, queue_training)."""
    _catalog_route(router, ctx.models)
    _image_routes(router, ctx.store)
    _character_routes(router, ctx.store, ctx.faces)
    _character_training_route(router, ctx)


# ------------------------------------------------------------------------------------------ catalog

def catalog(model: str) -> dict:
    """What the generate form offers, with every aspect ratio's size on `model` (the server's default)."""
    from ..presets import all_presets, builtin_presets
    from ..request_types import CHARACTER_WEIGHTS, STRENGTH_WEIGHTS
    from ..schedulers import DEFAULT_SCHEDULER, SCHEDULERS
    from ..sizes import COMMON_RATIOS, size_for_ratio

    native = native_size(model)
    builtin = builtin_presets()
    return {
        "model": model, "nativeSize": native,
        "aspectRatios": [dict(zip(("ratio", "width", "height"), (ratio, *size_for_ratio(ratio, native))))
                         for ratio in COMMON_RATIOS],
        "modes": ["fast", "quality", "ultra"],
        "presets": [{"name": preset.name, "description": preset.description,
                     "source": "builtin" if name in builtin and builtin[name] == preset else "user"}
                    for name, preset in sorted(all_presets().items())],
        "schedulers": [{"name": spec.name, "label": spec.label} for spec in SCHEDULERS.values()],
        "defaultScheduler": DEFAULT_SCHEDULER,
        "controls": CONTROLS, "references": REFERENCES,
        "referenceStrengths": list(STRENGTH_WEIGHTS), "characterStrengths": list(CHARACTER_WEIGHTS),
        "characterParts": ["face", "face+hair", "face+hair+outfit", "all"],
    }


def native_size(model: str) -> int:
    """The model's native square side: SDXL's 1024, or the tiny model's (read from its config, nothing loads)."""
    if model != "tiny":
        return 1024
    from ..tiny import tiny_unet_config

    return tiny_unet_config()["sample_size"] * 8


def _catalog_route(router: APIRouter, models: ModelTable) -> None:
    @router.get("/refgen/catalog", tags=["refgen"])
    def get_catalog() -> dict:
        """The generate form's choices: aspect ratios with their resolved sizes, modes, presets, schedulers..."""
        return catalog(models.default)


# ------------------------------------------------------------------------------------------- images

def _image_routes(router: APIRouter, store: AssetStore) -> None:
    @router.get("/refgen/images/{image_id}", tags=["refgen"])
    def get_image(image_id: str, request: Request) -> dict:
        """One generated image: its facts, its provenance (`recipe`) and the body that replays it (`replay`)."""
        image = store.generated_image(image_id)
        job = store.generation(image.generation_id)
        return {"id": image.id, "generationId": job.id, "kind": job.kind,
                "url": str(request.url_for("file", name=f"{image.id}.png")), "seed": image.seed,
                "identityScore": image.identity_score, "rank": image.index + 1 if _ranked(image) else None,
                "recipe": image.metadata, "replay": replay_body(job, image)}

    @router.delete("/refgen/images/{image_id}", tags=["refgen"])
    def delete_image(image_id: str) -> dict:
        return {"id": store.delete_image(image_id).id}


def _ranked(image: GeneratedImage) -> bool:
    resolved = image.metadata.get("resolved")
    return isinstance(resolved, dict) and bool(resolved.get("ranked"))


def replay_body(job: Generation, image: GeneratedImage) -> Optional[dict]:
    """The generation body that makes `image` alone: the job's body at the image's own seed (image i of a request
    is seed + i, and best-of's ranked images keep theirs), one image, no best-of. None for other job kinds.
    The pixels are the same exactly for an image of a 1-image generation; an image made in a batch of several comes
    back within 1/255 (a batch of N and a batch of 1 round differently in float; tests/test_studio_api.py)."""
    if job.kind != "generation":
        return None
    body = {key: value for key, value in job.body.items() if key != "num_images"}
    body["seed"] = image.seed
    extension = {key: value for key, value in (body.get("refgen") or {}).items() if key != "bestOf"}
    if extension:
        body["refgen"] = extension
    else:
        body.pop("refgen", None)
    return body


# --------------------------------------------------------------------------------------- characters

def _characters():
    """The user's character store ($REFGEN_HOME/characters), imported when a character route runs: the face layer
    brings OpenCV, and `refgen serve` starts without it (tests/test_layering.py)."""
    from adapters.characters import CharacterStore

    return CharacterStore()


def _character_routes(router: APIRouter, store: AssetStore, faces: Faces) -> None:
    @router.get("/refgen/characters", tags=["refgen"])
    def list_characters(request: Request) -> dict:
        trainings = character_trainings(store)  # one query for the whole list
        return {"characters": [character_json(c, request, store, trainings) for c in _characters().list()]}

    @router.post("/refgen/characters", tags=["refgen"], status_code=201)
    def create_character(body: CharacterBody, request: Request) -> dict:
        """A character from 1-5 photos of one person (uploaded or generated image ids)."""
        characters = _characters()
        with _character_errors("name"):
            characters.folder(body.name)  # a bad name is refused before the face models load
        with _character_errors("images"):
            photos = [_image_path(store, ref, f"images[{index}]") for index, ref in enumerate(body.images)]
            character = characters.create(body.name, photos, faces.analyzer(), anchor=body.anchor, select="single")
        return {"character": character_json(character, request, store)}

    @router.get("/refgen/characters/{name}", tags=["refgen"])
    def get_character(name: str, request: Request) -> dict:
        with _character_errors():
            return {"character": character_json(_characters().get(name), request, store)}

    @router.delete("/refgen/characters/{name}", tags=["refgen"])
    def delete_character(name: str) -> dict:
        characters = _characters()
        with _character_errors():
            name = characters.get(name).name
            characters.delete(name)
        return {"name": name}

    @router.post("/refgen/characters/{name}/anchors", tags=["refgen"])
    def add_anchor(name: str, body: ImageRef, request: Request) -> dict:
        """One more anchor picture (e.g. a generated image that came out right): add to character."""
        characters = _characters()
        with _character_errors("id"):
            characters.get(name)  # unknown: 404 before the face models load
            character = characters.add_anchor(name, _image_path(store, body, "id"), faces.analyzer(), select="single")
        return {"character": character_json(character, request, store)}

    @router.get("/refgen/characters/{name}/anchors/{number}", tags=["refgen"], name="character_anchor")
    def get_anchor(name: str, number: int) -> FileResponse:
        with _character_errors():
            paths = _characters().get(name).anchor_paths
        if not 1 <= number <= len(paths):
            raise UnknownAssetError(f"character {name!r} has anchors 1-{len(paths)}, not {number}")
        return FileResponse(paths[number - 1], media_type="image/png")

    @router.get("/refgen/characters/{name}/face", tags=["refgen"], name="character_face")
    def get_face(name: str) -> FileResponse:
        with _character_errors():
            return FileResponse(_characters().get(name).face_path, media_type="image/png")


@contextmanager
def _character_errors(field: str = "name") -> Iterator[None]:
    """The character store's and face layer's errors as the API's: an unknown character is 404, a name already
    taken is 422 naming `name`, the rest (no face or several faces in a photo, too many photos) 422 naming `field`
    (their messages name the photo: "no face found in anchor image 2")."""
    from adapters.characters import CharacterError, CharacterExistsError, UnknownCharacterError
    from adapters.faces import FaceError

    try:
        yield
    except UnknownCharacterError as exc:
        raise UnknownAssetError(str(exc)) from None
    except CharacterExistsError as exc:
        raise LeonardoRequestError("name", str(exc)) from None
    except (CharacterError, FaceError) as exc:
        raise LeonardoRequestError(field, str(exc)) from None


def character_json(character: Any, request: Request, store: AssetStore, trainings: Optional[dict] = None) -> dict:
    """A character as the API shows it; `trainings`: character_trainings(store), when the caller has it already."""
    anchors = [{"index": number, "url": str(request.url_for("character_anchor", name=character.slug, number=number)),
                "width": info["size"][0], "height": info["size"][1], "bbox": info["bbox"],
                "detScore": info.get("det_score")}
               for number, info in enumerate(character.anchors, start=1)]
    return {"name": character.name, "slug": character.slug, "anchor": character.anchor, "created": character.created,
            "keep": character.keep, "hasMask": character.mask_path is not None, "lora": character.lora or None,
            "anchors": anchors, "faceUrl": str(request.url_for("character_face", name=character.slug)),
            "trainings": [{"userLoraId": int(t.id), "status": t.job.status, "progress": t.job.progress, "error": t.job.error}
                          for t in (trainings if trainings is not None else character_trainings(store)).get(
                              _training_mark(character.slug), [])]}


def character_trainings(store: AssetStore) -> dict[str, list]:
    """The elements trained from characters (newest first), by the description /train gives them."""
    from .store import DEFAULT_USER

    found: dict[str, list] = {}
    for training in store.list_trainings("element", DEFAULT_USER, 0, 1000):
        found.setdefault(training.description, []).append(training)
    return found


def _training_mark(slug: str) -> str:
    return f"refgen character {slug}"


def _character_training_route(router: APIRouter, ctx: Any) -> None:
    @router.post("/refgen/characters/{name}/train", tags=["refgen"], status_code=201)
    def train_character(name: str, body: CharacterTrainingBody) -> dict:
        """A LoRA of the character on its anchors plus `images`, queued as an element: poll GET /elements/{id}."""
        with _character_errors():
            character = _characters().get(name)
        photos = [*character.anchor_paths, *(_image_path(ctx.store, ref, f"images[{i}]") for i, ref in enumerate(body.images))]
        if len(photos) < MIN_TRAINING_IMAGES:
            raise LeonardoRequestError("images", f"a LoRA trains on {MIN_TRAINING_IMAGES} pictures at least: "
                                                 f"{character.name} has {len(character.anchor_paths)} anchor image(s); "
                                                 f"add {MIN_TRAINING_IMAGES - len(photos)} or more images")
        element = {"name": character.name, "description": _training_mark(character.slug), "lora_focus": "Character",
                   "instance_prompt": character.anchor or character.name, "num_train_epochs": body.epochs,
                   "learning_rate": body.learningRate, "sd_version": "SDXL_1_0", "train_text_encoder": body.trainTextEncoder,
                   **({"resolution": body.resolution} if body.resolution else {})}
        dataset = ctx.store.create_dataset(f"character {character.name}", _training_mark(character.slug))
        try:
            for photo in photos:
                ctx.store.add_dataset_image(dataset.id, photo.read_bytes(), photo.suffix.lstrip(".").lower(), ctx.max_pixels)
            element["datasetId"] = dataset.id
            training = ctx.queue_training("element", element, element_job(element, ctx.store, ctx.training, ctx.models.default))
        except BaseException:
            ctx.store.delete_dataset(dataset.id)  # nothing queued: nothing kept
            raise
        return {"sdTrainingJob": {"userLoraId": int(training.id), "apiCreditCost": 0}, "datasetId": dataset.id}


def _image_path(store: AssetStore, ref: ImageRef, path: str):
    """An uploaded or generated image's file, by id; unknown ids are a 422 naming the field."""
    if ref.type not in ("UPLOADED", "GENERATED"):
        raise LeonardoRequestError(f"{path}.type", f"must be UPLOADED or GENERATED, got {ref.type!r}")
    found = store.resolve_image(ref.id, ref.type)
    if found is None:
        raise LeonardoRequestError(f"{path}.id", f"unknown {ref.type} image id {ref.id!r}")
    return found

