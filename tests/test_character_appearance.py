"""The character mask: a Character Reference that keeps more than the face carries the reference photo's masked
parts (hair, outfit, accessories) through IP-Adapter plus at the character's strength. keep="face" is exactly
today's behaviour; the appearance path matches diffusers' IP-Adapter given the same masked-image embeddings;
bad masks are typed errors; the appearance is recorded and replays. Tiny weights, CPU, offline."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.appearance import CharacterMaskError, appearance_picture, checked_mask
from adapters.controlnet import fit_image
from adapters.faces import keypoints_image
from engine.request_types import CharacterReference, character_scales
from test_character_reference import (  # noqa: F401  (fixtures, reused)
    PROMPT, _diffusers_pipe, _equip, _id_embeds, _identitynet_class, _request, analyzers, store, weights,
)
from conftest import COMMITTED_MANIFEST
from test_parity import TOLERANCE, _max_diff
from tiny_ip_adapter import save_tiny_ip_adapter_plus

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ip_with_plus(weights, tiny_model_dir, tmp_path_factory):
    """The tiny IP-Adapter folder with the plus variant beside the plain one (h94's sdxl_models layout)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("ip_plus") / "IP-Adapter"
    shutil.copytree(weights["ip"], folder)
    save_tiny_ip_adapter_plus(UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet"), folder)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_model_dir, weights, analyzers, store, ip_with_plus):
    return _equip(tiny_model_dir, {**weights, "ip": ip_with_plus}, analyzers, store)


@pytest.fixture(scope="module")
def hair_mask(astronaut) -> Image.Image:
    """White over the top of the astronaut picture (her hair and the flag behind), the rest black."""
    mask = np.zeros((astronaut.height, astronaut.width), np.uint8)
    mask[:110, 120:330] = 255
    return Image.fromarray(mask, "L")


def test_keep_face_is_exactly_todays_character_reference(engine, astronaut):
    today = engine.generate(_request(character=CharacterReference(images=[astronaut])))
    face = engine.generate(_request(character=CharacterReference(images=[astronaut], keep="face")))
    assert _max_diff(face.pixels, today.pixels) == 0.0
    assert face.metadata[0]["resolved"].get("character_appearance") is None


def test_a_mask_carries_the_masked_parts_and_changes_the_image(engine, astronaut, hair_mask):
    face = engine.generate(_request(character=CharacterReference(images=[astronaut], keep="face"))).pixels
    hair = engine.generate(_request(character=CharacterReference(images=[astronaut], keep="face+hair", mask=hair_mask)))
    assert _max_diff(hair.pixels, face) > 1e-3
    record = hair.metadata[0]["resolved"]["character_appearance"]
    assert record["keep"] == "face+hair" and record["mask"]["sha256"] and record["parser"] is None
    assert isinstance(hair.metadata[0]["identity_score"], float)  # still scored against the face
    assert engine.pipe.unet.encoder_hid_proj is None  # both adapters were attached for that generation only


def test_the_appearance_matches_diffusers_ip_adapter_given_the_same_masked_image_embeddings(
        engine, tiny_model_dir, weights, analyzers, ip_with_plus, astronaut, hair_mask):
    """InstantID (instance 0) and IP-Adapter plus (instance 1) loaded together in diffusers' ControlNet pipeline,
    fed the face tokens and the CLIP hidden states of the masked, cropped picture: the same pixels as refgen."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    weight = 1.66  # High
    ref = CharacterReference(images=[astronaut], strength_type="High", keep="face+hair", mask=hair_mask)
    ours = engine.generate(_request(character=ref)).pixels

    identitynet = _identitynet_class().from_pretrained(str(weights["instantid"] / "ControlNetModel"))
    pipe = _diffusers_pipe(tiny_model_dir, "StableDiffusionXLControlNetPipeline", controlnet=identitynet)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(ip_with_plus / "models" / "image_encoder"))
    size = encoder.config.image_size
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    pipe.load_ip_adapter([str(weights["instantid"]), str(ip_with_plus)], subfolder=["", "sdxl_models"],
                         weight_name=["ip-adapter.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"],
                         image_encoder_folder=None)
    adapter_scale, identitynet_scale = character_scales(weight)
    pipe.set_ip_adapter_scale([adapter_scale, weight])
    face = analyzers["antelopev2"].analyze(astronaut)
    id_embeds = _id_embeds(face.embedding * face.embedding_norm)
    with torch.no_grad():
        identitynet.face_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](id_embeds)
        carried = appearance_picture(astronaut, hair_mask)
        positive, negative = pipe.encode_image(carried, "cpu", 1, output_hidden_states=True)
    kps = fit_image(keypoints_image(face.kps, astronaut.size), 64, 64, "crop")
    theirs = pipe(prompt=PROMPT, image=kps, controlnet_conditioning_scale=identitynet_scale, width=64, height=64,
                  num_inference_steps=3, guidance_scale=5.0,
                  ip_adapter_image_embeds=[id_embeds[:, :, None], torch.cat([negative, positive])[:, None]],
                  generator=[torch.Generator().manual_seed(11)], output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_the_carried_picture_is_the_masked_region_on_grey_cropped_square(astronaut, hair_mask):
    picture = np.asarray(appearance_picture(astronaut, hair_mask))
    assert picture.shape[0] == picture.shape[1]
    grey = np.all(picture == 127, axis=-1)
    assert 0.05 < grey.mean() < 0.9  # the margin and the square padding are grey, the hair region is not
    assert np.array_equal(np.asarray(appearance_picture(astronaut, hair_mask)), picture)


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (100, 100), 255), "must be the size of the reference photo, 512x512"),
    (Image.new("RGB", (512, 512), (255, 0, 0)), "must be greyscale"),
    (Image.new("L", (512, 512), 0), "is empty"),
])
def test_bad_masks_are_typed_errors(engine, astronaut, mask, message):
    with pytest.raises(CharacterMaskError, match=message):
        checked_mask(mask, astronaut.size)
    with pytest.raises(CharacterMaskError, match=message):
        engine.generate(_request(character=CharacterReference(images=[astronaut], keep="all", mask=mask)))


def test_a_mask_with_keep_face_is_refused():
    with pytest.raises(ValueError, match="needs keep other than 'face'"):
        CharacterReference(name="x", keep="face", mask=Image.new("L", (8, 8), 255))


def test_an_appearance_image_replays_bit_identically(engine, astronaut, hair_mask, tmp_path):
    photo, mask = tmp_path / "astronaut.png", tmp_path / "mask.png"
    astronaut.save(photo)
    hair_mask.save(mask)
    made = engine.generate(_request(character=CharacterReference(images=[photo], keep="face+hair", mask=mask)))
    saved = made.save(tmp_path / "out")[0]
    replayed = engine.replay(saved)
    assert _max_diff(replayed.pixels, made.pixels) == 0.0


def test_without_a_mask_the_parts_come_from_the_face_parsing_model(engine, astronaut, tmp_path, monkeypatch):
    """The tiny parser labels every pixel hair (13): keep="face+hair" carries the whole photo, and says which
    parser made the mask; a parser that finds only skin carries nothing for face+hair, a typed error."""
    from adapters.appearance import CharacterAppearance
    from adapters.face_parsing import FaceParser
    from tiny_face_parsing import write_face_parsing

    monkeypatch.setenv("REFGEN_WEIGHTS", str(tmp_path / "weights"))
    write_face_parsing(tmp_path / "weights", COMMITTED_MANIFEST, constant_class=13)
    appearance = engine.adapter(CharacterAppearance)
    appearance.set_parser(None)  # loaded again, from this test's weights folder
    face = engine.generate(_request(character=CharacterReference(images=[astronaut], keep="face"))).pixels
    hair = engine.generate(_request(character=CharacterReference(images=[astronaut], keep="face+hair")))
    assert _max_diff(hair.pixels, face) > 1e-3
    record = hair.metadata[0]["resolved"]["character_appearance"]
    assert record["mask"] is None and record["parser"]["entry"] == "face-parsing"

    write_face_parsing(tmp_path / "skin", COMMITTED_MANIFEST, constant_class=1)
    appearance.set_parser(FaceParser.load(device="cpu", weights_dir=tmp_path / "skin"))
    with pytest.raises(CharacterMaskError, match="found none of those parts"):
        engine.generate(_request(character=CharacterReference(images=[astronaut], keep="face+hair")))
    appearance.set_parser(None)


def test_a_saved_characters_default_mask_is_used_when_the_request_sets_none(engine, store, analyzers, astronaut, hair_mask):
    store.create("Masked", [astronaut], analyzers["antelopev2"], overwrite=True)
    store.set_appearance("Masked", "all", hair_mask)
    by_name = engine.generate(_request(character=CharacterReference(name="Masked")))
    by_photo = engine.generate(_request(character=CharacterReference(images=[astronaut], keep="all", mask=hair_mask)))
    assert _max_diff(by_name.pixels, by_photo.pixels) == 0.0
    explicit_face = engine.generate(_request(character=CharacterReference(name="Masked", keep="face")))
    assert _max_diff(explicit_face.pixels, by_name.pixels) > 1e-3  # the request's own choice wins
    store.set_appearance("Masked", "face")
    assert store.get("Masked").mask_path is None


def test_character_mask_and_show_from_the_command_line(private_home, analyzers, astronaut, hair_mask, tmp_path):
    from typer.testing import CliRunner

    from adapters.characters import CharacterStore
    from engine.cli import app
    from tiny_face_parsing import write_face_parsing

    CharacterStore().create("Mira", [astronaut], analyzers["antelopev2"], anchor="mira")
    runner = CliRunner()
    hair_mask.save(tmp_path / "mask.png")
    result = runner.invoke(app, ["character", "mask", "Mira", "--mask", str(tmp_path / "mask.png")])
    assert result.exit_code == 0 and "what its own mask shows" in result.output, result.output
    shown = runner.invoke(app, ["character", "show", "Mira"])
    preview = private_home / "characters" / "mira" / "mask_preview.png"
    assert shown.exit_code == 0 and str(preview) in " ".join(shown.output.split()), shown.output
    with Image.open(preview) as image:
        tinted = np.any(np.asarray(image) != np.asarray(astronaut), axis=-1)
    assert np.array_equal(tinted, np.asarray(hair_mask) >= 128)  # exactly the carried pixels are tinted

    missing = runner.invoke(app, ["character", "mask", "Mira", "--keep", "face+hair"])
    assert missing.exit_code == 0
    no_parser = runner.invoke(app, ["character", "show", "Mira"])
    assert no_parser.exit_code == 1 and "refgen weights fetch face-parsing" in no_parser.output
    write_face_parsing(os.environ["REFGEN_WEIGHTS"], COMMITTED_MANIFEST, constant_class=13)
    assert runner.invoke(app, ["character", "show", "Mira"]).exit_code == 0
    bad = runner.invoke(app, ["character", "mask", "Mira", "--mask", str(tmp_path / "mask.png"), "--keep", "face"])
    assert bad.exit_code == 1 and "needs --keep other than face" in bad.output


def test_the_appearance_works_in_one_request_with_everything_else(engine, astronaut, hair_mask):
    """Character with a mask + style + content + ControlNet + img2img + inpainting: the appearance is live there
    (it changes the image), and best_of still ranks by identity score."""
    from test_character_reference import _everything

    def request(**character):
        base = _everything(astronaut)
        return base.model_copy(update={"character": CharacterReference(images=[astronaut], **character), "best_of": 2})

    face = engine.generate(request())
    carried = engine.generate(request(keep="face+hair", mask=hair_mask))
    assert _max_diff(carried.pixels, face.pixels) > 1e-4
    assert [meta["rank"] for meta in carried.metadata] == [1, 2]
    assert all(isinstance(meta["identity_score"], float) for meta in carried.metadata)


def test_a_mask_can_adjust_the_parsed_parts(engine, astronaut, hair_mask, tmp_path, monkeypatch):
    """With mask_mode add the carried region is the parts plus the mask; subtract cuts the mask out of them. The
    tiny parser here calls the left half hair and the rest background."""
    from adapters.appearance import CharacterAppearance, combined_mask

    parts = np.zeros((4, 4), bool)
    parts[:, :2] = True
    user = np.zeros((4, 4), bool)
    user[0, :] = True
    assert combined_mask(parts, user, "replace").sum() == 4
    assert combined_mask(parts, user, "add").sum() == 8 + 2
    assert combined_mask(parts, user, "subtract").sum() == 8 - 2

    class HalfHair:  # a parser stand-in with a known answer, so the carried picture can be checked exactly
        def labels(self, image):
            labels = np.zeros((image.height, image.width), np.uint8)
            labels[:, : image.width // 2] = 13
            return labels

        def describe(self):
            return {"entry": "half-hair"}

    appearance = engine.adapter(CharacterAppearance)
    appearance.set_parser(HalfHair())
    try:
        made = {mode: engine.generate(_request(character=CharacterReference(
            images=[astronaut], keep="face+hair", mask=hair_mask, mask_mode=mode))) for mode in ("replace", "add", "subtract")}
    finally:
        appearance.set_parser(None)
    digests = {mode: result.metadata[0]["resolved"]["character_appearance"]["picture_sha256"] for mode, result in made.items()}
    assert len(set(digests.values())) == 3
    with pytest.raises(ValueError, match="needs both a mask and keep"):
        CharacterReference(images=[astronaut], mask=hair_mask, mask_mode="add")
