"""Character Reference in generation: FaceID-Plus-v2 and InstantID match diffusers on the same tiny weights,
identities come from photos or saved characters, every output is scored, best_of ranks, and a character
combines with style, content, ControlNets, img2img and inpainting in one request where each part is live.

Weights: tiny random SDXL (conftest), the tiny IP-Adapter folder (its CLIP encoder serves FaceID's face crop),
FaceID-Plus-v2 in the h94 layout (tiny_faceid.py), InstantID in the InstantX layout (tiny_instantid.py), and
tiny insightface packs (tiny_faces.py) that find the astronaut's face. Offline, CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pydantic import ValidationError

import tiny_faces as tf
from adapters.characters import CharacterStore, UnknownCharacterError
from adapters.controlnet import ControlNets, fit_image
from engine.request_types import ControlUnit
from adapters.faces import FaceAnalyzer, FaceIndexError, NoFaceError, keypoints_image
from adapters.identity import FACEID_LORA, CharacterReferences
from engine.request_types import CharacterReference, character_scales
from adapters.ip_adapter import IPAdapters
from engine.request_types import Reference
from engine import Engine, GenerationRequest
from engine.compose import default_adapters
from engine.errors import InvalidImageError, ProvenanceError, UnsafeWeightsError
from conftest import COMMITTED_MANIFEST
from test_parity import TOLERANCE, _diffusers_scheduler, _max_diff
from tiny_controlnet import save_tiny_controlnet
from tiny_faceid import save_tiny_faceid
from tiny_instantid import save_tiny_identitynet, save_tiny_instantid
from tiny_ip_adapter import build_tiny_image_encoder, save_tiny_ip_adapter

pytest.importorskip("peft")

PROMPT = "a portrait of an astronaut"


@pytest.fixture(scope="module")
def weights(tiny_model_dir, tmp_path_factory):
    """Every tiny weight folder the character tests load, in the published layouts."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    root = tmp_path_factory.mktemp("character_weights")
    packs = root / "packs"
    for entry in ("insightface-antelopev2", "insightface-buffalo-l"):
        seed = 0 if entry.endswith("antelopev2") else 5  # two recognisers: their embeddings differ
        tf.write_pack(packs, [tf.ASTRONAUT_FACE], entry_name=entry, manifest_path=COMMITTED_MANIFEST, seed=seed)
    encoder_hidden = build_tiny_image_encoder().config.hidden_size
    instantid = root / "instantid"
    save_tiny_instantid(unet, instantid)
    save_tiny_identitynet(unet, instantid)
    return {
        "ip": save_tiny_ip_adapter(unet, root / "IP-Adapter"),
        "faceid": save_tiny_faceid(unet, root / "faceid", clip_hidden=encoder_hidden).parent,
        "instantid": instantid,
        "canny": save_tiny_controlnet(unet, root / "canny", seed=10),
        "packs": packs,
    }


@pytest.fixture(scope="module")
def analyzers(weights):
    return {pack: FaceAnalyzer.load(pack, device="cpu", weights_dir=weights["packs"], manifest=_manifest())
            for pack in ("antelopev2", "buffalo_l")}


def _manifest():
    from engine.weights import Manifest

    return Manifest.load(COMMITTED_MANIFEST)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CharacterStore:
    return CharacterStore(tmp_path_factory.mktemp("characters"))


def _equip(tiny_model_dir, weights, analyzers, store, **faces) -> Engine:
    """An engine with the tiny IP-Adapter, face adapters and canny ControlNet (`faces`: other face adapter folders)."""
    def adapters(setup):
        ip = IPAdapters(setup.pipe, setup.device, setup.dtype, reference=weights["ip"])
        return default_adapters(setup, ip_adapters=ip, store=store, analyzers=analyzers,
                                **{"faceid": weights["faceid"], "instantid": weights["instantid"], **faces})
    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32", adapters=adapters)
    engine.adapter(ControlNets).library.register("canny", weights["canny"])
    return engine


def _characters(engine: Engine) -> CharacterReferences:
    return engine.adapter(CharacterReferences)


@pytest.fixture(scope="module")
def char_engine(tiny_model_dir, weights, analyzers, store):
    return _equip(tiny_model_dir, weights, analyzers, store)


def _request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, width=64, height=64, steps=3, guidance_scale=5.0, scheduler="euler", seed=11)
    return GenerationRequest(**{**base, **fields})


def _diffusers_pipe(tiny_model_dir, pipeline_class="StableDiffusionXLPipeline", **components):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(str(tiny_model_dir), local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler("euler", tiny_model_dir)
    return pipe


def _id_embeds(vector: np.ndarray) -> torch.Tensor:
    """diffusers' FaceID convention: (2, 1, 512), zeros (unconditional) first."""
    embedding = torch.tensor(vector)[None, None]
    return torch.cat([torch.zeros_like(embedding), embedding])


# ------------------------------------------------------------------------------------- parity


def test_faceid_plus_v2_matches_diffusers_ip_adapter_faceid_pipeline(char_engine, tiny_model_dir, weights, analyzers, astronaut):
    """The recipe of diffusers' IP-Adapter FaceID docs: ArcFace embeds as ip_adapter_image_embeds, the CLIP
    hidden states of the aligned face crop set on the projection, shortcut (v2) on, the file's LoRA active."""
    from transformers import CLIPVisionModelWithProjection

    batch, weight = 2, 1.2
    ours = char_engine.generate(_request(num_images=batch, character=CharacterReference(
        images=[astronaut], adapter="faceid", weight=weight))).pixels

    encoder = CLIPVisionModelWithProjection.from_pretrained(str(weights["ip"] / "models" / "image_encoder"))
    pipe = _diffusers_pipe(tiny_model_dir, image_encoder=encoder)
    pipe.load_ip_adapter(str(weights["faceid"]), subfolder="", weight_name="ip-adapter-faceid-plusv2_sdxl.safetensors",
                         image_encoder_folder=None)
    crop = analyzers["buffalo_l"].analyze(astronaut, crop_size=224).crop
    clip_embeds = pipe.prepare_ip_adapter_image_embeds([crop], None, torch.device("cpu"), batch, True)[0]
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds, projection.shortcut = clip_embeds, True
    pipe.set_ip_adapter_scale(character_scales(weight)[0])
    theirs = pipe(prompt=PROMPT, width=64, height=64, num_inference_steps=3, guidance_scale=5.0,
                  ip_adapter_image_embeds=[_id_embeds(analyzers["buffalo_l"].embed([astronaut]))], num_images_per_prompt=batch,
                  generator=[torch.Generator().manual_seed(11 + i) for i in range(batch)], output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


def _identitynet_class():
    """InstantID's definition of IdentityNet, as a test harness: a ControlNet that attends to the face tokens
    where diffusers' ControlNet pipeline would pass it the prompt."""
    from diffusers import ControlNetModel

    class FaceTokenControlNet(ControlNetModel):
        face_tokens: torch.Tensor

        def forward(self, *args, encoder_hidden_states=None, **kwargs):
            return super().forward(*args, encoder_hidden_states=self.face_tokens, **kwargs)

    return FaceTokenControlNet


def test_instantid_matches_diffusers_controlnet_pipeline_fed_face_tokens(char_engine, tiny_model_dir, weights, analyzers, astronaut):
    weight = 1.66  # High
    ours = char_engine.generate(_request(character=CharacterReference(images=[astronaut], strength_type="High"))).pixels

    identitynet = _identitynet_class().from_pretrained(str(weights["instantid"] / "ControlNetModel"))
    pipe = _diffusers_pipe(tiny_model_dir, "StableDiffusionXLControlNetPipeline", controlnet=identitynet)
    pipe.load_ip_adapter(str(weights["instantid"]), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    adapter_scale, identitynet_scale = character_scales(weight)
    pipe.set_ip_adapter_scale(adapter_scale)
    face = analyzers["antelopev2"].analyze(astronaut)
    assert abs(face.embedding_norm - 1) > 0.1  # so feeding the unit vector instead would show
    id_embeds = _id_embeds(face.embedding * face.embedding_norm)  # (2, 1, 512): InstantID takes the raw ArcFace vector
    with torch.no_grad():
        identitynet.face_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](id_embeds)
    kps = fit_image(keypoints_image(face.kps, astronaut.size), 64, 64, "crop")
    theirs = pipe(prompt=PROMPT, image=kps, controlnet_conditioning_scale=identitynet_scale, width=64, height=64,
                  num_inference_steps=3, guidance_scale=5.0, ip_adapter_image_embeds=[id_embeds[:, :, None]],
                  generator=[torch.Generator().manual_seed(11)], output_type="np").images
    assert _max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("adapter", ["instantid", "faceid"])
def test_weight_zero_is_no_character_and_the_character_changes_the_image(char_engine, astronaut, adapter):
    plain = char_engine.generate(_request()).pixels
    zero = char_engine.generate(_request(character=CharacterReference(images=[astronaut], adapter=adapter, weight=0.0)))
    steered = char_engine.generate(_request(character=CharacterReference(images=[astronaut], adapter=adapter))).pixels
    assert _max_diff(zero.pixels, plain) == 0.0
    assert isinstance(zero.metadata[0]["identity_score"], float)  # scored even when not steering
    assert _max_diff(steered, plain) > 1e-3
    assert char_engine.pipe.unet.encoder_hid_proj is None  # the face adapter was attached for its generation only
    after = char_engine.generate(_request()).pixels  # the adapters and FaceID's LoRA are off again
    assert _max_diff(after, plain) == 0.0


def test_strength_buckets_map_through_one_table():
    assert character_scales(0.0) == (0.0, 0.0)
    assert character_scales(0.99) == pytest.approx((0.8, 0.8))  # Mid: InstantID's published defaults
    low, mid, high = (CharacterReference(name="x", strength_type=s).scale for s in ("Low", "Mid", "High"))
    assert 0 < low < 0.66 <= mid < 1.32 <= high <= 2
    assert character_scales(low) < character_scales(mid) < character_scales(high)
    with pytest.raises(ValidationError, match="not both"):
        CharacterReference(name="x", weight=1.0, strength_type="Low")
    with pytest.raises(ValidationError, match="one or the other"):
        CharacterReference()


# ------------------------------------------------------------------------------------- identities


def test_a_saved_character_equals_its_photos_and_leads_the_prompt_with_its_anchor(char_engine, store, analyzers, astronaut):
    store.create("Eileen", [astronaut], analyzers["antelopev2"], anchor="Eileen, short brown hair", overwrite=True)
    by_name = char_engine.generate(_request(character=CharacterReference(name="eileen")))
    by_photo = char_engine.generate(_request(prompt=f"Eileen, short brown hair, {PROMPT}",
                                             character=CharacterReference(images=[astronaut])))
    assert _max_diff(by_name.pixels, by_photo.pixels) == 0.0
    assert by_name.metadata[0]["resolved"]["prompt"].startswith("Eileen, short brown hair, ")
    assert by_name.metadata[0]["resolved"]["character"]["name"] == "eileen"


def test_a_profile_from_another_pack_is_re_embedded_for_faceid(char_engine, store, analyzers, astronaut):
    store.create("Eileen", [astronaut], analyzers["antelopev2"], overwrite=True)
    ref = CharacterReference(name="Eileen", adapter="faceid")
    identity = _characters(char_engine).identity(ref, [], None)
    np.testing.assert_allclose(identity.embedding, analyzers["buffalo_l"].embed([astronaut]), atol=1e-6)
    assert identity.pack == "buffalo_l"


def test_several_photos_are_averaged(char_engine, analyzers, astronaut):
    mirrored = ImageOps.mirror(astronaut)
    identity = _characters(char_engine).identity(CharacterReference(images=[astronaut, mirrored]), [astronaut, mirrored], None)
    np.testing.assert_allclose(identity.embedding, analyzers["antelopev2"].embed([astronaut, mirrored]), atol=1e-6)
    faces = [analyzers["antelopev2"].analyze(photo) for photo in (astronaut, mirrored)]
    np.testing.assert_allclose(identity.raw_embedding, np.mean([f.embedding * f.embedding_norm for f in faces], axis=0), atol=1e-5)
    one = _characters(char_engine).identity(CharacterReference(images=[astronaut]), [astronaut], None)
    assert identity.fingerprint != one.fingerprint


def test_a_pose_image_moves_instantids_keypoints(char_engine, astronaut):
    pose = astronaut.resize((256, 512))  # the tiny detector puts the face at the same pixels: a narrower canvas
    ref = CharacterReference(images=[astronaut], pose_image=pose)
    identity = _characters(char_engine).identity(ref, [astronaut], pose)
    assert identity.keypoints.size == pose.size
    assert identity.fingerprint == _characters(char_engine).identity(CharacterReference(images=[astronaut]), [astronaut], None).fingerprint
    plain = char_engine.generate(_request(character=CharacterReference(images=[astronaut]))).pixels
    posed = char_engine.generate(_request(character=ref)).pixels
    assert _max_diff(posed, plain) > 0  # same identity, keypoints elsewhere in the frame
    with pytest.raises(ValidationError, match="pose_image"):
        CharacterReference(images=[astronaut], adapter="faceid", pose_image=astronaut)


# ------------------------------------------------------------------------------------- scores, best_of, replay


def test_every_output_is_scored_and_best_of_returns_them_ranked(char_engine, astronaut, tmp_path):
    result = char_engine.generate(_request(best_of=3, character=CharacterReference(images=[astronaut])))
    scores = [meta["identity_score"] for meta in result.metadata]
    assert len(result.images) == 3 and all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert [meta["rank"] for meta in result.metadata] == [1, 2, 3]
    assert sorted(result.seeds) == [11, 12, 13]
    assert [meta["image"]["seed"] for meta in result.metadata] == result.seeds
    # each image is its own seed's image: the best one regenerates alone
    alone = char_engine.generate(_request(seed=result.seeds[0], character=CharacterReference(images=[astronaut])))
    assert _max_diff(alone.pixels, result.pixels[:1]) <= TOLERANCE


def test_a_ranked_character_image_replays_bit_identically(char_engine, astronaut, tmp_path):
    photo = tmp_path / "eileen.png"
    astronaut.save(photo)
    result = char_engine.generate(_request(best_of=2, character=CharacterReference(images=[photo], adapter="faceid")))
    saved = result.save(tmp_path / "out")
    replayed = char_engine.replay(saved[1])
    assert np.array_equal(replayed.pixels, result.pixels[1:2])
    assert replayed.metadata[0]["identity_score"] == result.metadata[1]["identity_score"]

    ImageOps.mirror(astronaut).save(photo)  # the reference changed: refused, not silently different
    with pytest.raises(ProvenanceError, match="changed"):
        char_engine.replay(saved[0])


def test_no_face_in_an_output_is_recorded_as_no_face(char_engine, analyzers, astronaut):
    identity = _characters(char_engine).identity(CharacterReference(images=[astronaut]), [astronaut], None)
    black = Image.new("RGB", (64, 64))
    assert _characters(char_engine).score("instantid", identity, [black, astronaut])[0] is None
    assert _characters(char_engine).score("instantid", identity, [astronaut])[0] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------- one request, everything


def _canny_map() -> Image.Image:
    canvas = np.zeros((64, 64, 3), np.uint8)
    canvas[10:54:6, :, :] = 255
    return Image.fromarray(canvas)


def _everything(astronaut, *, character=1.0, style=1.0, content=1.0, control=1.0, drop=()) -> GenerationRequest:
    rng = np.random.default_rng(4)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 8, 56, 56))
    parts = dict(
        character=CharacterReference(images=[astronaut], weight=character),
        references=[r for r in (Reference(kind="style", image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)), weight=style),
                                Reference(kind="content", image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)), weight=content))
                    if r.kind not in drop],
        controlnets=[] if "control" in drop else [ControlUnit(type="canny", image=_canny_map(), weight=control, preprocess=False)],
    )
    if "character" in drop:
        parts.pop("character")
    return _request(init_image=init, init_strength=0.3, mask_image=mask, **parts)


@pytest.mark.parametrize("part", ["character", "style", "content", "control"])
def test_everything_in_one_request_and_each_part_is_live(char_engine, astronaut, part):
    everything = char_engine.generate(_everything(astronaut)).pixels
    zeroed = char_engine.generate(_everything(astronaut, **{part: 0.0})).pixels
    without = char_engine.generate(_everything(astronaut, drop=(part,))).pixels
    assert _max_diff(everything, zeroed) > 1e-4, f"{part} changed nothing"
    assert _max_diff(zeroed, without) <= 1e-5, f"{part} at 0 is not the same as no {part}"


# ------------------------------------------------------------------------------------- bad input


def test_bad_character_input_is_a_typed_error(char_engine, astronaut, tmp_path):
    with pytest.raises(UnknownCharacterError, match="unknown character 'nobody'"):
        char_engine.generate(_request(character=CharacterReference(name="nobody")))
    with pytest.raises(NoFaceError, match="the character image"):
        char_engine.generate(_request(character=CharacterReference(images=[Image.new("RGB", (512, 512))])))
    with pytest.raises(FaceIndexError):
        char_engine.generate(_request(character=CharacterReference(images=[astronaut], face_index=3)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InvalidImageError):
        char_engine.generate(_request(character=CharacterReference(images=[broken])))
    with pytest.raises(ValidationError, match="best_of"):
        _request(best_of=3)


def test_the_published_pickle_is_refused_without_allow_pickle(tiny_model_dir, weights, analyzers, store, astronaut, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    pickled = tmp_path / "instantid"
    save_tiny_instantid(unet, pickled, pickle=True)
    save_tiny_identitynet(unet, pickled)
    engine = _equip(tiny_model_dir, weights, analyzers, store, instantid=pickled)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        engine.generate(_request(character=CharacterReference(images=[astronaut])))
    assert FACEID_LORA not in (getattr(engine.pipe.unet, "peft_config", None) or {})


def test_converting_the_published_pickle_once_makes_it_load_without_allow_pickle(
        tiny_model_dir, weights, analyzers, store, astronaut, tmp_path, monkeypatch, char_engine):
    """`refgen weights convert instantid`: the hash-checked .bin becomes a .safetensors the engine prefers."""
    import hashlib

    from diffusers import UNet2DConditionModel

    from engine import weights as weights_module
    from engine.errors import WeightsIntegrityError
    from test_weights import write_manifest

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    folder = tmp_path / "weights" / "instantid"
    pickled = save_tiny_instantid(unet, folder, pickle=True)
    save_tiny_identitynet(unet, folder)
    files = [{"path": "ip-adapter.bin", "sha256": hashlib.sha256(pickled.read_bytes()).hexdigest()},
             {"path": "ControlNetModel/config.json"}, {"path": "ControlNetModel/diffusion_pytorch_model.safetensors"}]
    manifest = write_manifest(tmp_path / "manifest.toml", [{"name": "instantid", "kind": "instantid", "repo": "InstantX/InstantID",
                                                              "revision": "main", "license": "apache-2.0", "local_dir": "instantid",
                                                              "files": files}])
    monkeypatch.setenv("REFGEN_MANIFEST", str(manifest))
    monkeypatch.setenv("REFGEN_WEIGHTS", str(tmp_path / "weights"))

    written = weights_module.convert_pickles(weights_module.Manifest.load().get("instantid"))
    assert written == [folder / "ip-adapter.safetensors"]
    engine = _equip(tiny_model_dir, weights, analyzers, store, instantid="instantid")
    request = _request(character=CharacterReference(images=[astronaut]))
    assert np.array_equal(engine.generate(request).pixels, char_engine.generate(request).pixels)

    tampered = bytearray(pickled.read_bytes())
    tampered[-1] ^= 0xFF
    pickled.write_bytes(bytes(tampered))  # not the published file any more: never unpickled
    with pytest.raises(WeightsIntegrityError, match="published sha256"):
        weights_module.convert_pickles(weights_module.Manifest.load().get("instantid"))


def test_instantid_alone_needs_no_clip_image_encoder(tiny_model_dir, weights, analyzers, store, astronaut, char_engine):
    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32",  # its IP-Adapter folder is not fetched here
                         adapters=lambda setup: default_adapters(setup, instantid=weights["instantid"], store=store, analyzers=analyzers))
    request = _request(character=CharacterReference(images=[astronaut]))
    assert np.array_equal(engine.generate(request).pixels, char_engine.generate(request).pixels)


@pytest.mark.parametrize("adapter, stop", [("faceid", "raise"), ("instantid", "cancel")])
def test_a_generation_that_stops_half_way_leaves_the_models_as_a_fresh_engine_has_them(
        tiny_model_dir, weights, analyzers, store, astronaut, tmp_path, adapter, stop):
    """A LoRA, a style reference and a character (FaceID brings a LoRA of its own, InstantID its IdentityNet) patch
    the shared models for one generation only: when it raises or is cancelled half-way, the next plain generation
    is bit-identical to a fresh engine's."""
    from engine.errors import GenerationCancelled
    from lora_layouts import random_lora, write_diffusers_lora

    engine = _equip(tiny_model_dir, weights, analyzers, store)
    lora = write_diffusers_lora(engine.pipe, random_lora(engine.pipe, seed=4), tmp_path / "lora.safetensors")

    def half_way(info):
        if info.step == 1:
            if stop == "raise":
                raise RuntimeError("out of memory")
            return False

    busy = _request(loras=[str(lora)], references=[Reference(kind="style", image=astronaut)],
                    character=CharacterReference(images=[astronaut], adapter=adapter))
    with pytest.raises(RuntimeError if stop == "raise" else GenerationCancelled):
        engine.generate(busy, on_step=half_way)
    fresh = Engine.load(str(tiny_model_dir), device="cpu", dtype="fp32")

    def untouched(pipe):  # diffusers' own call on the shared models: no request of ours comes in between
        return pipe(prompt=PROMPT, width=64, height=64, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert engine.pipe.unet.encoder_hid_proj is None
    assert np.array_equal(untouched(engine.pipe), untouched(fresh.pipe))
    assert np.array_equal(engine.generate(_request()).pixels, fresh.generate(_request()).pixels)


def test_ranking_puts_the_best_likeness_first_and_faceless_images_last():
    from adapters.faces import ranking

    assert ranking([0.2, None, 0.9, -0.5, 0.9]) == [2, 4, 0, 3, 1]
    assert ranking([None, None]) == [0, 1]
