"""Leonardo generation JSON -> GenerationRequest: every field, every preprocessorId, every refusal, and
the sample requests of Leonardo's Image Guidance guide (seed 003); and refgen -> Leonardo's vocabulary for
answers, checked against the enums of Leonardo's Python SDK. Request objects only: no model, no GPU."""

from __future__ import annotations

import logging

import pytest
from leonardo_ai_sdk.models import operations, shared
from PIL import Image

from engine.request_types import ControlUnit
from engine.request_types import CharacterReference
from engine.request_types import Reference
from engine.errors import RefgenError
from engine.api.leonardo import (
    BUILTIN_MODELS, IGNORED, MAPPED, PREPROCESSORS, PRESET_STYLES, REFUSED, LeonardoConfigError, LeonardoRequestError,
    ModelTable, UnknownImageError, leonardo_scheduler, leonardo_style, local_model, parse_generation,
)
from engine.presets import builtin_presets
from engine.request import GenerationRequest, resolve
from engine.schedulers import SCHEDULERS

KINO_XL = "aa77f04e-3eec-4034-9c07-d0f619684628"
UPLOADED = {f"up-{n}": Image.new("RGB", (64, 64), (n * 40, 0, 0)) for n in range(1, 7)}
GENERATED = {f"gen-{n}": Image.new("RGB", (64, 64), (0, n * 40, 0)) for n in range(1, 7)}


class Resolver:
    """The future asset store, as a dict per image type; records what was asked."""

    def __init__(self):
        self.calls = []

    def __call__(self, image_id, kind):
        self.calls.append((image_id, kind))
        return (UPLOADED if kind == "UPLOADED" else GENERATED).get(image_id)


@pytest.fixture(autouse=True)
def hermetic(private_home):
    """No user model table or presets from the machine running the tests."""


@pytest.fixture
def images():
    return Resolver()


def parse(body, images=None, **kwargs) -> GenerationRequest:
    return parse_generation(body, images or Resolver(), **kwargs)


def unit(preprocessor_id, image_id="up-1", kind="UPLOADED", **extra):
    return {"initImageId": image_id, "initImageType": kind, "preprocessorId": preprocessor_id, **extra}


# ------------------------------------------------------------------------------------------------
# Seed 003's sample requests, as printed; the only edits: `//` comments became `#` comments, the
# <YOUR_..._ID> placeholders became ids, and the comma missing after `"width": 512` in the last one.

SAMPLE_STYLE_REFERENCE = {
  "height": 512,
  "modelId": "aa77f04e-3eec-4034-9c07-d0f619684628",  # Leonardo Kino XL
  "prompt": "A wistful young woman stands in the beaming doorway of a sunlit room",
  "presetStyle":"CINEMATIC",
  "width": 1024,
  "photoReal": True,
  "photoRealVersion":"v2",
  "alchemy":True,
  "controlnets": [
        {
            "initImageId": "gen-1",
            "initImageType": "GENERATED",
            "preprocessorId": 67,  # Style Reference ID
            "strengthType": "High",
            "influence": 0.39
        },
        {
            "initImageId": "up-1",
            "initImageType": "UPLOADED",
            "preprocessorId": 67,
            "strengthType": "High",
            "influence": 0.64
        }
    ]
}

SAMPLE_CHARACTER_REFERENCE = {
  "height": 576,
  "modelId": "aa77f04e-3eec-4034-9c07-d0f619684628",  # Leonardo Kino XL
  "prompt": "A mesmerizing lady with cascading strands of blonde hair gazes through a misty train window",
  "presetStyle":"CINEMATIC",
  "width": 1024,
  "photoReal": True,
  "photoRealVersion":"v2",
  "alchemy":True,
  "controlnets": [
        {
            "initImageId": "up-1",
            "initImageType": "UPLOADED",
            "preprocessorId": 133,  # Character Reference Id
            "strengthType": "Mid",
        },
        {
            "initImageId": "gen-1",
            "initImageType": "GENERATED",
            "preprocessorId": 67,  # Style Reference Id
            "strengthType": "High",
        }
    ]
}

SAMPLE_IMAGE_TO_IMAGE = {
  "height": 644,
  "modelId": "b24e16ff-06e3-43eb-8d33-4416c2d75876",  # Leonardo Lightning XL,
  "prompt": "Vibrant makeup bottle in a showroom",
  "presetStyle":"DYNAMIC",
  "width": 1040,
  "alchemy":True,
  "controlnets": [
        {
            "initImageId":"gen-1",
            "initImageType": "GENERATED",
            "preprocessorId": 67,  # Style Reference ID
            "strengthType": "High",
        }

    ],
  "init_image_id": "up-1" ,
  "init_strength": 0.5,
}

SAMPLE_EDGE_TO_IMAGE = {
  "height": 512,
  "modelId": "aa77f04e-3eec-4034-9c07-d0f619684628",  # Leonardo Kino XL
  "prompt": "Intricately swirling nebulas dance across a vividly colored galactic map",
  "width": 1024,
  "alchemy":True,
  "controlnets": [
        {
            "initImageId": "gen-1",
            "initImageType": "GENERATED",
            "preprocessorId": 19,  # Edge to Image ID
            "weight": "0.5"
        }
    ]
}

SAMPLE_LEGACY_UPLOADED = {
  "height": 512,
  "modelId": "1e60896f-3c26-4296-8ecc-53e2afecc132",
  "prompt": "An oil painting of an orange cat",
  "width": 512,
  "init_image_id": "up-1" ,
  "init_strength": 0.5,
}

SAMPLE_LEGACY_GENERATED = {
  "height": 512,
  "modelId": "1e60896f-3c26-4296-8ecc-53e2afecc132",
  "prompt": "An oil painting of an orange cat",
  "width": 512,
  "init_generation_image_id": "gen-1",
  "init_strength": 0.5,
  "controlNet": True,
  "controlNetType": "CANNY"
}


def test_sample_style_reference(images):
    request = parse(SAMPLE_STYLE_REFERENCE, images)
    assert (request.width, request.height, request.preset, request.mode) == (1024, 512, "cinematic", "quality")
    assert [(r.kind, r.image, r.strength_type, r.influence) for r in request.references] == [
        ("style", GENERATED["gen-1"], "High", 0.39), ("style", UPLOADED["up-1"], "High", 0.64)]
    assert images.calls == [("gen-1", "GENERATED"), ("up-1", "UPLOADED")]


def test_sample_character_reference():
    request = parse(SAMPLE_CHARACTER_REFERENCE)
    assert request.character == CharacterReference(images=[UPLOADED["up-1"]], strength_type="Mid")
    assert request.references == [Reference(kind="style", image=GENERATED["gen-1"], strength_type="High")]
    assert (request.width, request.height, request.preset) == (1024, 576, "cinematic")


def test_sample_image_to_image_floors_the_odd_height(caplog):
    with caplog.at_level(logging.WARNING, logger="refgen.leonardo"):
        request = parse(SAMPLE_IMAGE_TO_IMAGE)
    assert (request.width, request.height) == (1040, 640)  # Leonardo's sample sends 644
    assert "height=644" in caplog.text
    assert request.init_image is UPLOADED["up-1"] and request.init_strength == 0.5
    assert request.preset == "dynamic" and request.mode == "quality"
    assert request.references[0].kind == "style"


def test_sample_edge_to_image_with_a_string_weight():
    request = parse(SAMPLE_EDGE_TO_IMAGE)
    assert request.controlnets == [ControlUnit(type="canny", image=GENERATED["gen-1"], weight=0.5)]
    assert request.preset is None and request.mode == "quality"


def test_sample_legacy_uploaded_init_image():
    request = parse(SAMPLE_LEGACY_UPLOADED)
    assert request.init_image is UPLOADED["up-1"] and request.init_strength == 0.5
    assert request.controlnets == [] and (request.width, request.height) == (512, 512)
    assert local_model(SAMPLE_LEGACY_UPLOADED) == "sdxl-base"


def test_sample_legacy_generated_image_with_canny():
    request = parse(SAMPLE_LEGACY_GENERATED)
    assert request.init_image is GENERATED["gen-1"] and request.init_strength == 0.5
    assert request.controlnets == [ControlUnit(type="canny", image=GENERATED["gen-1"])]


def test_every_sample_resolves():
    """The parsed requests are ones the engine can plan (presets, schedulers, sizes all known)."""
    for sample in (SAMPLE_STYLE_REFERENCE, SAMPLE_CHARACTER_REFERENCE, SAMPLE_IMAGE_TO_IMAGE, SAMPLE_EDGE_TO_IMAGE,
                   SAMPLE_LEGACY_UPLOADED, SAMPLE_LEGACY_GENERATED):
        resolved = resolve(parse(sample))
        assert resolved.width == sample["width"] and resolved.prompt


# ------------------------------------------------------------------------------------ plain fields

def test_scalar_fields_map_by_name():
    request = parse({
        "prompt": "a lighthouse", "negative_prompt": "fog", "width": 832, "height": 1216, "num_images": 3,
        "seed": 9_999_999_998, "guidance_scale": 9, "num_inference_steps": 35, "scheduler": "KLMS",
    })
    assert (request.prompt, request.negative_prompt) == ("a lighthouse", "fog")
    assert (request.width, request.height, request.num_images) == (832, 1216, 3)
    assert (request.seed, request.guidance_scale, request.steps, request.scheduler) == (9_999_999_998, 9.0, 35, "lms")


def test_minimal_body_leaves_everything_to_refgen():
    request = parse({"prompt": "a cat"})
    assert request == GenerationRequest(prompt="a cat")


def test_nulls_mean_absent():
    body = {"prompt": "a cat", "negative_prompt": None, "seed": None, "presetStyle": None, "controlnets": None,
            "init_image_id": None, "public": None, "tiling": None}
    assert parse(body) == GenerationRequest(prompt="a cat")


@pytest.mark.parametrize("name, ours", [("LEONARDO", "dpmpp_2m_karras"), ("EULER_ANCESTRAL_DISCRETE", "euler_a"),
                                        ("EULER_DISCRETE", "euler"), ("DDIM", "ddim"), ("DPM_SOLVER", "dpm_solver"),
                                        ("PNDM", "pndm"), ("KLMS", "lms")])
def test_leonardo_schedulers(name, ours):
    assert parse({"prompt": "x", "scheduler": name}).scheduler == ours


@pytest.mark.parametrize("scheduler", list(shared.SdGenerationSchedulers), ids=lambda s: s.value)
def test_a_leonardo_scheduler_is_answered_as_itself(scheduler):
    """Leonardo's enum from its SDK: what refgen runs for a name is reported as that name."""
    assert leonardo_scheduler(parse({"prompt": "x", "scheduler": scheduler.value}).scheduler) == scheduler.value


@pytest.mark.parametrize("ours", sorted(SCHEDULERS))
def test_every_refgen_scheduler_is_answered_in_leonardos_enum(ours):
    assert shared.SdGenerationSchedulers(leonardo_scheduler(ours))


@pytest.mark.parametrize("style", list(shared.SdGenerationStyle), ids=lambda s: s.value)
def test_every_leonardo_preset_style_is_answered_as_itself_in_any_case(style):
    assert leonardo_style(style.value.lower()) == leonardo_style(style.value) == style.value


def test_every_field_of_the_sdks_request_is_known():
    """The official SDK's request model lists Leonardo's fields: none may be refused as "unknown field"."""
    sent = {field.alias or name for name, field in operations.CreateGenerationRequestBody.model_fields.items()}
    assert sent - (MAPPED | set(IGNORED) | set(REFUSED)) == set()


def test_up_to_eight_images_at_768_and_below():
    assert parse({"prompt": "x", "width": 768, "height": 512, "num_images": 8}).num_images == 8


@pytest.mark.parametrize("style", sorted(PRESET_STYLES))
def test_every_leonardo_preset_style_has_a_builtin_preset(style):
    assert PRESET_STYLES[style] in builtin_presets()
    assert parse({"prompt": "x", "presetStyle": style}).preset == PRESET_STYLES[style]


def test_preset_style_names_that_differ():
    mapped = {style: parse({"prompt": "x", "presetStyle": style}).preset for style in ("LEONARDO", "BOKEH", "CREATIVE", "RETRO")}
    assert mapped == {"LEONARDO": "dynamic", "BOKEH": "cinematic_closeup", "CREATIVE": "illustration", "RETRO": "film"}


def test_alchemy_and_ultra_pick_the_mode():
    assert parse({"prompt": "x", "alchemy": True}).mode == "quality"
    assert parse({"prompt": "x", "alchemy": False}).mode == "fast"
    assert parse({"prompt": "x", "ultra": True}).mode == "ultra"
    assert parse({"prompt": "x", "ultra": True, "alchemy": True}).mode == "ultra"
    assert parse({"prompt": "x", "ultra": False}).mode is None


def test_photoreal_picks_the_photoreal_preset_unless_a_style_is_named():
    alone = parse({"prompt": "x", "photoReal": True, "photoRealVersion": "v1"})
    assert alone.preset == "photoreal" and resolve(alone).mode == "quality"
    assert parse({"prompt": "x", "photoReal": True, "presetStyle": "FILM"}).preset == "film"
    assert parse({"prompt": "x", "photoReal": False}).preset is None
    assert parse({"prompt": "x", "photoReal": True, "alchemy": False}).mode == "fast"


def test_init_image_ids_are_resolved_by_type(images):
    uploaded = parse({"prompt": "x", "init_image_id": "up-2", "init_strength": 0.3}, images)
    generated = parse({"prompt": "x", "init_generation_image_id": "gen-2"}, images)
    assert uploaded.init_image is UPLOADED["up-2"] and uploaded.init_strength == 0.3
    assert generated.init_image is GENERATED["gen-2"] and generated.init_strength is None
    assert images.calls == [("up-2", "UPLOADED"), ("gen-2", "GENERATED")]


def test_resolver_may_return_paths(tmp_path):
    path = tmp_path / "a.png"
    request = parse_generation({"prompt": "x", "init_image_id": "a"}, lambda image_id, kind: path)
    assert request.init_image == path


@pytest.mark.parametrize("kind", ["CANNY", "POSE", "DEPTH"])
def test_legacy_controlnet_types(kind):
    request = parse({"prompt": "x", "init_image_id": "up-1", "controlNet": True, "controlNetType": kind, "weighting": 0.7})
    assert request.controlnets == [ControlUnit(type=kind.lower(), image=UPLOADED["up-1"], weight=0.7)]
    assert request.init_image is UPLOADED["up-1"]


def test_legacy_controlnet_fields_without_controlnet_are_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="refgen.leonardo"):
        request = parse({"prompt": "x", "controlNet": False, "controlNetType": "POSE"})
    assert request.controlnets == [] and "controlNetType" in caplog.text


def test_legacy_and_list_controlnets_combine():
    request = parse({"prompt": "x", "init_image_id": "up-1", "controlNet": True, "controlNetType": "DEPTH",
                     "controlnets": [unit(21, "up-2")]})
    assert [u.type for u in request.controlnets] == ["depth", "pose"]


# ---------------------------------------------------------------------------------- preprocessorId

@pytest.mark.parametrize("preprocessor_id, control_type", [
    (19, "canny"), (20, "depth"), (21, "pose"), (22, "canny"),                             # SDXL
    (1, "canny"), (3, "depth"), (7, "pose"), (11, "canny"), (10, "scribble"), (6, "normal"), (5, "lineart"),  # SD1.5
    (12, "canny"), (13, "depth"), (16, "pose"), (18, "canny"), (17, "scribble"), (15, "normal"),  # SD2.1
])
def test_control_preprocessors(preprocessor_id, control_type):
    request = parse({"prompt": "x", "controlnets": [unit(preprocessor_id, weight=1.5)]})
    assert request.controlnets == [ControlUnit(type=control_type, image=UPLOADED["up-1"], weight=1.5)]


def test_preprocessor_id_may_be_a_whole_float():
    """Leonardo's schema types preprocessorId as a number and the Python SDK sends 19.0."""
    assert parse({"prompt": "x", "controlnets": [unit(19.0)]}).controlnets[0].type == "canny"
    assert parse({"prompt": "x", "controlnets": [unit(67.0)]}).references[0].kind == "style"
    for bad in (19.5, float("inf"), True):
        with pytest.raises(LeonardoRequestError) as caught:
            parse({"prompt": "x", "controlnets": [unit(bad)]})
        assert caught.value.field == "controlnets[0].preprocessorId"


def test_every_table_id_is_tested():
    tested = {19, 20, 21, 22, 1, 3, 7, 11, 10, 6, 5, 12, 13, 16, 18, 17, 15, 67, 100, 133}
    assert set(PREPROCESSORS) == tested


@pytest.mark.parametrize("preprocessor_id, kind", [(67, "style"), (100, "content")])
def test_reference_preprocessors(preprocessor_id, kind):
    request = parse({"prompt": "x", "controlnets": [unit(preprocessor_id, "gen-3", "GENERATED", weight=0.9)]})
    assert request.references == [Reference(kind=kind, image=GENERATED["gen-3"], weight=0.9)]


def test_character_preprocessor():
    request = parse({"prompt": "x", "controlnets": [unit(133, weight=1.2)]})
    assert request.character == CharacterReference(images=[UPLOADED["up-1"]], weight=1.2)
    assert request.controlnets == [] and request.references == []


def test_several_character_entries_merge_into_one_reference():
    entries = [unit(133, "up-1", strengthType="High"), unit(133, "gen-1", "GENERATED", strengthType="High"), unit(67, "up-2")]
    request = parse({"prompt": "x", "controlnets": entries})
    assert request.character == CharacterReference(images=[UPLOADED["up-1"], GENERATED["gen-1"]], strength_type="High")
    assert len(request.references) == 1


@pytest.mark.parametrize("strength, weight", [("Low", 0.2), ("Mid", 0.6), ("High", 1.0), ("Ultra", 1.4), ("Max", 1.8)])
def test_control_unit_strength_type_becomes_the_bucket_middle(strength, weight):
    request = parse({"prompt": "x", "controlnets": [unit(20, strengthType=strength)]})
    assert request.controlnets[0].weight == pytest.approx(weight)


def test_reference_strength_type_and_influence_are_kept():
    request = parse({"prompt": "x", "controlnets": [unit(67, strengthType="Ultra", influence=2), unit(100, strengthType="Max")]})
    assert [(r.kind, r.strength_type, r.influence) for r in request.references] == [("style", "Ultra", 2.0), ("content", "Max", 1.0)]


def test_default_strength_is_the_adapters_own():
    request = parse({"prompt": "x", "controlnets": [unit(19), unit(67), unit(133)]})
    assert request.controlnets[0].weight == 1.0
    assert request.references[0].weight is None and request.references[0].strength_type is None
    assert request.character.weight is None and request.character.strength_type is None


# ------------------------------------------------------------------------------------------- models

def test_builtin_model_table_maps_the_seed_ids_to_sdxl_base():
    for model_id in (KINO_XL, "b24e16ff-06e3-43eb-8d33-4416c2d75876", "1e60896f-3c26-4296-8ecc-53e2afecc132"):
        assert local_model({"modelId": model_id}) == "sdxl-base"
    assert local_model({}) == "sdxl-base"
    assert set(BUILTIN_MODELS) <= set(ModelTable.load().models)


def test_unknown_model_id_lists_the_known_ones():
    with pytest.raises(LeonardoRequestError) as caught:
        parse({"prompt": "x", "modelId": "6b645e3a-d64f-4341-a6d8-7a3690fbf042"})
    assert caught.value.field == "modelId" and KINO_XL in str(caught.value)
    assert "sdxl-base" in str(caught.value) and "leonardo_models.toml" in str(caught.value)


def test_platform_ids_run_on_the_servers_model():
    """`refgen serve --model tiny` sets the table's default: the SDKs' default modelId (Lightning XL) runs on it."""
    sdk_default = operations.CreateGenerationRequestBody.model_fields["model_id"].default
    table = ModelTable(models={**BUILTIN_MODELS, KINO_XL: "kino-local"}, default="tiny")
    assert local_model({"modelId": sdk_default}, table) == local_model({}, table) == "tiny"
    assert local_model({"modelId": KINO_XL}, table) == "kino-local"  # a user's mapping wins
    with pytest.raises(LeonardoRequestError, match="on this server's model, tiny") as caught:
        local_model({"modelId": "6b645e3a-d64f-4341-a6d8-7a3690fbf042"}, table)
    assert f"{KINO_XL} -> kino-local" in str(caught.value)


def test_user_model_table_extends_and_overrides(private_home):
    (private_home / "leonardo_models.toml").write_text(
        'default = "my-default"\n[models]\n"custom-id" = "/models/custom.safetensors"\n'
        f'"{KINO_XL}" = "kino-local"\n')
    assert local_model({"modelId": "custom-id"}) == "/models/custom.safetensors"
    assert local_model({"modelId": KINO_XL}) == "kino-local"
    assert local_model({}) == "my-default"
    assert parse({"prompt": "x", "modelId": "custom-id"}).prompt == "x"


def test_explicit_model_table_is_used():
    table = ModelTable(models={"only-this": "sdxl-turbo"})
    assert local_model({"modelId": "only-this"}, table) == "sdxl-turbo"
    with pytest.raises(LeonardoRequestError, match="modelId"):
        parse({"prompt": "x", "modelId": KINO_XL}, models=table)


@pytest.mark.parametrize("text", ['[models]\n"id" = 3\n', 'colour = "red"\n', "not toml [", 'default = ""\n'])
def test_malformed_user_model_table_is_a_typed_error(private_home, text):
    (private_home / "leonardo_models.toml").write_text(text)
    with pytest.raises(LeonardoConfigError, match="leonardo_models.toml"):
        ModelTable.load()


# -------------------------------------------------------------------------- fields refgen does not honour

@pytest.mark.parametrize("field, value", [
    ("public", True), ("sd_version", "SDXL_1_0"), ("promptMagic", True), ("promptMagicStrength", 0.4),
    ("promptMagicVersion", "v3"), ("highContrast", True), ("contrastRatio", 0.5), ("contrast", 3.5),
    ("expandedDomain", True), ("highResolution", True), ("photoRealStrength", 0.45), ("enhancePrompt", True),
    ("enhancePromptInstruction", "more drama"), ("imagePromptWeight", 0.5), ("unzoomAmount", 0.2),
    ("webhookCallbackUrl", "https://example.invalid/hook"),
])
def test_harmless_fields_are_ignored_with_a_warning(caplog, field, value):
    with caplog.at_level(logging.WARNING, logger="refgen.leonardo"):
        request = parse({"prompt": "x", field: value})
    assert request == GenerationRequest(prompt="x") and field in caplog.text


def test_neutral_values_pass_silently(caplog):
    body = {"prompt": "x", "public": False, "tiling": False, "transparency": "disabled", "elements": [],
            "imagePrompts": [], "canvasRequest": False, "promptMagic": False, "unzoom": False, "upscaleRatio": 1.0}
    with caplog.at_level(logging.WARNING, logger="refgen.leonardo"):
        assert parse(body) == GenerationRequest(prompt="x")
    assert caplog.text == ""


@pytest.mark.parametrize("field, value", [
    ("tiling", True), ("transparency", "foreground_only"), ("unzoom", True), ("fantasyAvatar", True),
    ("canvasRequest", True), ("canvasRequestType", "INPAINT"), ("canvasInitId", "c"), ("canvasMaskId", "m"),
    ("imagePrompts", ["up-1"]), ("elements", [{"akUUID": "a", "weight": 0.5}]), ("userElements", [{"userLoraId": 1}]),
    ("styleUUID", "111dc692-d470-4eec-b791-3475abac4c46"), ("upscaleRatio", 2),
])
def test_fields_that_would_change_the_output_are_refused(field, value):
    with pytest.raises(LeonardoRequestError) as caught:
        parse({"prompt": "x", field: value})
    assert caught.value.field == field


@pytest.mark.parametrize("value", ["x", None])
def test_unknown_keys_are_refused_by_name(value):
    with pytest.raises(LeonardoRequestError, match="colour") as caught:
        parse({"prompt": "x", "colour": value})
    assert caught.value.field == "colour"


# ------------------------------------------------------------------------------------------- errors

ERROR_CASES = [
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"negative_prompt": ["a"]}, "negative_prompt"),
    ({"width": 512}, "height"),
    ({"height": 512}, "width"),
    ({"width": 4, "height": 512}, "width"),
    ({"width": 32, "height": 512}, "width"),  # Leonardo's minimum, below refgen's 64
    ({"width": 512, "height": 8192}, "height"),
    ({"width": "wide", "height": 512}, "width"),
    ({"width": 512.5, "height": 512}, "width"),
    ({"width": 1024, "height": 512, "num_images": 5}, "num_images"),
    ({"num_images": 5}, "num_images"),  # no size: refgen's 1024 px
    ({"width": 512, "height": 512, "num_images": 9}, "num_images"),
    ({"num_images": 0}, "num_images"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"guidance_scale": 25}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"scheduler": "WARP"}, "scheduler"),
    ({"presetStyle": "VAPORWAVE"}, "presetStyle"),
    ({"presetStyle": 3}, "presetStyle"),
    ({"alchemy": "yes"}, "alchemy"),
    ({"ultra": 1}, "ultra"),
    ({"photoReal": True, "photoRealVersion": "v9"}, "photoRealVersion"),
    ({"init_strength": 0.5}, "init_strength"),
    ({"init_image_id": "up-1", "init_strength": 0.95}, "init_strength"),
    ({"init_image_id": "up-1", "init_generation_image_id": "gen-1"}, "init_generation_image_id"),
    ({"init_image_id": "nope"}, "init_image_id"),
    ({"init_image_id": ""}, "init_image_id"),
    ({"init_image_id": 7}, "init_image_id"),
    ({"init_generation_image_id": "up-1"}, "init_generation_image_id"),  # an uploaded id is not a generated one
    ({"controlNet": True, "controlNetType": "CANNY"}, "controlNet"),
    ({"controlNet": True, "init_image_id": "up-1"}, "controlNetType"),
    ({"controlNet": True, "controlNetType": "NORMAL", "init_image_id": "up-1"}, "controlNetType"),
    ({"controlNet": True, "controlNetType": "POSE", "init_image_id": "up-1", "weighting": 3}, "weighting"),
    ({"controlnets": {"preprocessorId": 19}}, "controlnets"),
    ({"controlnets": ["x"]}, "controlnets[0]"),
    ({"controlnets": [unit(19), unit(19, colour="red")]}, "controlnets[1].colour"),
    ({"controlnets": [unit(19), unit(99)]}, "controlnets[1].preprocessorId"),
    ({"controlnets": [unit(9)]}, "controlnets[0].preprocessorId"),
    ({"controlnets": [unit(8)]}, "controlnets[0].preprocessorId"),
    ({"controlnets": [unit("19")]}, "controlnets[0].preprocessorId"),
    ({"controlnets": [unit(19, weight=1, strengthType="Low")]}, "controlnets[0]"),
    ({"controlnets": [unit(67, weight=1, strengthType="Low")]}, "controlnets[0]"),
    ({"controlnets": [unit(19, weight=2.5)]}, "controlnets[0].weight"),
    ({"controlnets": [unit(67, weight=-1)]}, "controlnets[0].weight"),
    ({"controlnets": [unit(133, weight=2.1)]}, "controlnets[0].weight"),
    ({"controlnets": [unit(19, weight="lots")]}, "controlnets[0].weight"),
    ({"controlnets": [unit(19, strengthType="Huge")]}, "controlnets[0].strengthType"),
    ({"controlnets": [unit(67, strengthType="Huge")]}, "controlnets[0].strengthType"),
    ({"controlnets": [unit(133, strengthType="Ultra")]}, "controlnets[0].strengthType"),
    ({"controlnets": [unit(19, influence=0.5)]}, "controlnets[0].influence"),
    ({"controlnets": [unit(100, influence=0.5)]}, "controlnets[0].influence"),
    ({"controlnets": [unit(133, influence=0.5)]}, "controlnets[0].influence"),
    ({"controlnets": [unit(67, influence=0)]}, "controlnets[0].influence"),
    ({"controlnets": [unit(67, "up-1"), unit(67, "missing")]}, "controlnets[1].initImageId"),
    ({"controlnets": [unit(67, "gen-1", "UPLOADED")]}, "controlnets[0].initImageId"),
    ({"controlnets": [unit(67, "up-1", "LINKED")]}, "controlnets[0].initImageId"),
    ({"controlnets": [{"initImageId": "up-1", "preprocessorId": 67}]}, "controlnets[0].initImageType"),
    ({"controlnets": [unit(133, strengthType="Low"), unit(133, "up-2", strengthType="High")]}, "controlnets[1]"),
    ({"controlnets": [unit(133, f"up-{n}") for n in range(1, 7)]}, "controlnets[5]"),
    ({"controlnets": [unit(19)] * 9}, "controlnets"),
]


@pytest.mark.parametrize("update, field", ERROR_CASES, ids=[f"{field}-{i}" for i, (_, field) in enumerate(ERROR_CASES)])
def test_errors_are_typed_and_name_the_leonardo_field(update, field):
    with pytest.raises(LeonardoRequestError) as caught:
        parse({"prompt": "a cat", **update})
    assert isinstance(caught.value, RefgenError)
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")


def test_a_body_that_is_not_an_object():
    with pytest.raises(LeonardoRequestError, match="body"):
        parse(["prompt"])


def test_unknown_image_ids_are_their_own_type():
    with pytest.raises(UnknownImageError) as caught:
        parse({"prompt": "x", "controlnets": [unit(19), unit(20, "gen-404", "GENERATED")]})
    assert caught.value.field == "controlnets[1].initImageId" and "gen-404" in str(caught.value)


def test_resolver_lookup_errors_and_refgen_errors_are_converted():
    def raising_key_error(image_id, kind):
        raise KeyError(image_id)

    def raising_refgen_error(image_id, kind):
        raise RefgenError("file is truncated")

    with pytest.raises(UnknownImageError, match="init_image_id"):
        parse_generation({"prompt": "x", "init_image_id": "a"}, raising_key_error)
    with pytest.raises(LeonardoRequestError, match="truncated") as caught:
        parse_generation({"prompt": "x", "init_image_id": "a"}, raising_refgen_error)
    assert caught.value.field == "init_image_id"
    with pytest.raises(LeonardoRequestError, match="not a path or image"):
        parse_generation({"prompt": "x", "init_image_id": "a"}, lambda image_id, kind: 42)


def test_unknown_model_fails_before_any_image_is_fetched(images):
    with pytest.raises(LeonardoRequestError, match="modelId"):
        parse({"prompt": "x", "modelId": "nope", "init_image_id": "up-1"}, images)
    assert images.calls == []


def test_strict_sizes_refuse_what_is_otherwise_floored():
    with pytest.raises(LeonardoRequestError) as caught:
        parse(SAMPLE_IMAGE_TO_IMAGE, strict_sizes=True)
    assert caught.value.field == "height" and "multiple of 8" in str(caught.value)
    assert parse({"prompt": "x", "width": 1001, "height": 512}).width == 1000
