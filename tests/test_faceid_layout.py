"""A tiny FaceID-Plus-v2 in the published h94/IP-Adapter-FaceID layout loads through diffusers' own
`load_ip_adapter` and is live: the ID embedding and the CLIP face-crop hidden states both steer the image, and
scale 0 gives the plain pipeline back. Offline, CPU, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_faceid import DEPTH, NUM_TOKENS, WEIGHT_NAME, save_tiny_faceid, tiny_faceid_plusv2_state_dict  # noqa: E402
from tiny_ip_adapter import build_tiny_image_encoder, fresh_pipe, generate_np, resampler_keys  # noqa: E402

pytest.importorskip("peft")

ID_DIM = 512


@pytest.fixture(scope="module")
def encoder():
    return build_tiny_image_encoder()


def _face_crop(size: int) -> torch.Tensor:
    ramp = torch.linspace(-1, 1, size)
    return torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        (ramp[None, :] * ramp[:, None])])[None]


def _clip_embeds(encoder, face: torch.Tensor) -> torch.Tensor:
    """CLIP penultimate hidden states of a face crop, unconditional (zeros image) half first, shaped
    (2B, 1, tokens, hidden) as diffusers' prepare_ip_adapter_image_embeds returns them for non-ImageProjection."""
    with torch.no_grad():
        cond = encoder(face, output_hidden_states=True).hidden_states[-2]
        uncond = encoder(torch.zeros_like(face), output_hidden_states=True).hidden_states[-2]
    return torch.stack([uncond, cond])


@pytest.fixture(scope="module")
def clip_embeds(encoder):
    return _clip_embeds(encoder, _face_crop(encoder.config.image_size))


@pytest.fixture(scope="module")
def other_clip_embeds(encoder):
    """A different crop (mirrored): the resampler has no positions of its own, so merely permuting the tokens
    of the same crop would change nothing."""
    return _clip_embeds(encoder, _face_crop(encoder.config.image_size).flip(-1))


@pytest.fixture(scope="module")
def id_embeds():
    embedding = torch.nn.functional.normalize(torch.randn(1, 1, ID_DIM, generator=torch.Generator().manual_seed(3)), dim=-1)
    return torch.cat([torch.zeros_like(embedding), embedding])  # (2B, 1, 512), unconditional zeros first


@pytest.fixture(scope="module")
def faceid_files(tmp_path_factory, tiny_model_dir, encoder):
    """Two files in the published layout: adapter + LoRA (as the .bin ships) and adapter only."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    root = tmp_path_factory.mktemp("faceid")
    with_lora = save_tiny_faceid(unet, root / "with_lora", clip_hidden=encoder.config.hidden_size)
    adapter_only = save_tiny_faceid(unet, root / "adapter_only", clip_hidden=encoder.config.hidden_size, lora_rank=None)
    return {"with_lora": with_lora, "adapter_only": adapter_only}


def _load(pipe, path: Path, clip_embeds=None):
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    if clip_embeds is not None:
        projection.clip_embeds = clip_embeds
        projection.shortcut = True  # v2
    return projection


def test_state_dict_is_in_published_layout(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    cross = unet.config.cross_attention_dim
    state = tiny_faceid_plusv2_state_dict(unet, clip_hidden=32)
    names = list(unet.attn_processors)
    proj_keys = {key for key in state if key.startswith("image_proj.")}
    expected = {"image_proj.proj.0.weight", "image_proj.proj.0.bias", "image_proj.proj.2.weight",
                "image_proj.proj.2.bias", "image_proj.norm.weight", "image_proj.norm.bias"}
    resampler = "image_proj.perceiver_resampler"
    expected |= resampler_keys(resampler, DEPTH)
    assert proj_keys == expected
    assert state["image_proj.proj.0.weight"].shape == (2 * ID_DIM, ID_DIM)
    assert state["image_proj.proj.2.weight"].shape == (NUM_TOKENS * cross, 2 * ID_DIM)
    assert state[f"{resampler}.proj_in.weight"].shape == (cross, 32)
    assert state[f"{resampler}.layers.0.0.to_q.weight"].shape == (64, cross)  # heads = rows // 64 = 1

    ip_keys = {key for key in state if key.startswith("ip_adapter.")}
    expected_ip = set()
    for index, name in enumerate(names):
        expected_ip |= {f"ip_adapter.{index}.{p}_lora.{d}.weight" for p in ("to_q", "to_k", "to_v", "to_out")
                        for d in ("down", "up")}
        if name.endswith("attn2.processor"):
            assert index % 2 == 1
            expected_ip |= {f"ip_adapter.{index}.to_k_ip.weight", f"ip_adapter.{index}.to_v_ip.weight"}
            assert state[f"ip_adapter.{index}.to_k_ip.weight"].shape[1] == cross
    assert ip_keys == expected_ip
    no_lora = tiny_faceid_plusv2_state_dict(unet, clip_hidden=32, lora_rank=None)
    assert not any("_lora." in key for key in no_lora)


def test_loads_as_faceid_plus_projection_with_inferred_sizes(tiny_model_dir, faceid_files, encoder):
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection
    from safetensors.torch import load_file

    pipe = fresh_pipe(tiny_model_dir)
    projection = _load(pipe, faceid_files["adapter_only"])
    cross = pipe.unet.config.cross_attention_dim
    assert type(projection) is IPAdapterFaceIDPlusImageProjection
    assert projection.num_tokens == NUM_TOKENS and projection.embed_dim == cross
    assert projection.proj.net[0].proj.in_features == ID_DIM  # id_embeddings_dim
    assert projection.proj_in.in_features == encoder.config.hidden_size  # hidden_dims (CLIP)
    assert projection.proj_out.out_features == cross  # output_dims
    assert len(projection.layers) == DEPTH and projection.layers[0].attn.heads == 1
    assert projection.shortcut is False and projection.clip_embeds is None  # the caller sets both for v2

    # the weights landed where the converter maps them (to_kv split into to_k / to_v)
    state = load_file(str(faceid_files["adapter_only"]))
    to_kv = state["image_proj.perceiver_resampler.layers.2.0.to_kv.weight"]
    torch.testing.assert_close(projection.layers[2].attn.to_k.weight, to_kv[: to_kv.shape[0] // 2])
    torch.testing.assert_close(projection.layers[2].attn.to_v.weight, to_kv[to_kv.shape[0] // 2:])
    torch.testing.assert_close(projection.proj.net[2].weight, state["image_proj.proj.2.weight"])
    torch.testing.assert_close(projection.layers[3].ff[1].net[2].weight,
                               state["image_proj.perceiver_resampler.layers.3.1.3.weight"])
    assert not getattr(pipe.unet, "peft_config", {})  # adapter-only file: no LoRA


def test_adapter_is_live_and_scale_zero_is_plain(tiny_model_dir, faceid_files, clip_embeds, other_clip_embeds, id_embeds):
    pipe = fresh_pipe(tiny_model_dir)
    plain = generate_np(pipe)
    projection = _load(pipe, faceid_files["adapter_only"], clip_embeds)

    with_face = generate_np(pipe, ip_adapter_image_embeds=[id_embeds])
    assert np.isfinite(with_face).all()
    assert np.abs(with_face - plain).max() > 0.05, "the FaceID adapter changed nothing"

    # both inputs are live: another CLIP face crop, and another identity, each change the image
    projection.clip_embeds = other_clip_embeds
    other_crop = generate_np(pipe, ip_adapter_image_embeds=[id_embeds])
    projection.clip_embeds = clip_embeds
    other_id = generate_np(pipe, ip_adapter_image_embeds=[torch.cat([id_embeds[:1], -id_embeds[1:]])])
    assert np.abs(other_crop - with_face).max() > 1e-3
    assert np.abs(other_id - with_face).max() > 1e-3

    pipe.set_ip_adapter_scale(0.0)
    off = generate_np(pipe, ip_adapter_image_embeds=[id_embeds])
    assert np.abs(off - plain).max() <= 1e-5


def test_lora_inside_the_file_becomes_a_peft_adapter(tiny_model_dir, faceid_files, clip_embeds, id_embeds):
    pipe = fresh_pipe(tiny_model_dir)
    plain = generate_np(pipe)
    _load(pipe, faceid_files["with_lora"], clip_embeds)
    assert "faceid_0" in pipe.unet.peft_config
    assert pipe.unet.peft_config["faceid_0"].r == 4

    pipe.set_ip_adapter_scale(0.0)
    lora_only = generate_np(pipe, ip_adapter_image_embeds=[id_embeds])
    assert np.isfinite(lora_only).all()
    assert np.abs(lora_only - plain).max() > 1e-3, "the FaceID LoRA changed nothing"
    pipe.unet.disable_lora()
    off = generate_np(pipe, ip_adapter_image_embeds=[id_embeds])
    assert np.abs(off - plain).max() <= 1e-5


def test_weight_name_is_the_published_one(faceid_files):
    assert faceid_files["with_lora"].name == WEIGHT_NAME == "ip-adapter-faceid-plusv2_sdxl.safetensors"
