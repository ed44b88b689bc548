"""A tiny InstantID in the published InstantX/InstantID layout: the face adapter loads through diffusers' own
`load_ip_adapter` (both the .safetensors and the published .bin form) and is live, scale 0 gives the plain
pipeline back, and IdentityNet loads as a plain ControlNetModel whose residuals follow the face tokens.
Offline, CPU, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_ip_adapter import fresh_pipe, generate_np, resampler_keys  # noqa: E402
from tiny_instantid import (  # noqa: E402
    CONTROLNET_FOLDER, DEPTH, EMBEDDING_DIM, NUM_QUERIES, SAFE_WEIGHT_NAME, WEIGHT_NAME,
    save_tiny_identitynet, save_tiny_instantid, tiny_instantid_state_dict,
)


def _id_embeds(seed: int) -> torch.Tensor:
    """An ArcFace-like identity as the pipeline takes it: (2B, images, sequence, 512), unconditional zeros first
    (InstantID's own _encode_prompt_image_emb also uses zeros for the negative half)."""
    embedding = torch.nn.functional.normalize(torch.randn(1, 1, 1, EMBEDDING_DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return torch.cat([torch.zeros_like(embedding), embedding])


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")


@pytest.fixture(scope="module")
def instantid_root(tmp_path_factory, unet):
    """One folder like the published repo, plus the safetensors form beside the .bin."""
    root = tmp_path_factory.mktemp("instantid")
    save_tiny_instantid(unet, root)
    save_tiny_instantid(unet, root, pickle=True)
    save_tiny_identitynet(unet, root)
    return root


def _load(pipe, root: Path, weight_name: str = SAFE_WEIGHT_NAME):
    pipe.load_ip_adapter(str(root), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    return pipe.unet.encoder_hid_proj.image_projection_layers[0]


def test_state_dict_is_in_published_layout(unet):
    cross = unet.config.cross_attention_dim
    state = tiny_instantid_state_dict(unet)
    expected = {"image_proj.latents"} | resampler_keys("image_proj", DEPTH)
    cross_layers = [index for index, name in enumerate(unet.attn_processors) if name.endswith("attn2.processor")]
    assert cross_layers and all(index % 2 == 1 for index in cross_layers)
    expected |= {f"ip_adapter.{index}.{kv}.weight" for index in cross_layers for kv in ("to_k_ip", "to_v_ip")}
    assert set(state) == expected

    dim = 64  # Resampler width; heads = 1 (InstantID: 1280 wide, 20 heads)
    shapes = {
        "image_proj.latents": (1, NUM_QUERIES, dim),
        "image_proj.proj_in.weight": (dim, EMBEDDING_DIM), "image_proj.proj_in.bias": (dim,),
        "image_proj.proj_out.weight": (cross, dim), "image_proj.norm_out.weight": (cross,),
        "image_proj.layers.0.0.norm1.weight": (dim,), "image_proj.layers.3.0.norm2.bias": (dim,),
        "image_proj.layers.0.0.to_q.weight": (64, dim), "image_proj.layers.1.0.to_kv.weight": (128, dim),
        "image_proj.layers.2.0.to_out.weight": (dim, 64), "image_proj.layers.3.1.0.weight": (dim,),
        "image_proj.layers.3.1.1.weight": (4 * dim, dim), "image_proj.layers.3.1.3.weight": (dim, 4 * dim),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    for index, name in enumerate(unet.attn_processors):
        if index in cross_layers:
            attention = unet.get_submodule(name[: -len(".processor")])
            assert state[f"ip_adapter.{index}.to_k_ip.weight"].shape == (attention.to_k.out_features, cross)
            assert state[f"ip_adapter.{index}.to_v_ip.weight"].shape == (attention.to_v.out_features, cross)


def test_published_bin_is_the_nested_pickle(instantid_root):
    from safetensors.torch import load_file

    published = torch.load(instantid_root / WEIGHT_NAME, map_location="cpu", weights_only=True)
    assert set(published) == {"image_proj", "ip_adapter"}
    flat = load_file(str(instantid_root / SAFE_WEIGHT_NAME))
    assert {f"{group}.{key}" for group, part in published.items() for key in part} == set(flat)
    torch.testing.assert_close(published["image_proj"]["layers.1.0.to_kv.weight"], flat["image_proj.layers.1.0.to_kv.weight"])


@pytest.mark.parametrize("weight_name", [SAFE_WEIGHT_NAME, WEIGHT_NAME])
def test_loads_as_plus_projection_with_inferred_sizes(tiny_model_dir, instantid_root, weight_name):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import load_file

    pipe = fresh_pipe(tiny_model_dir)
    projection = _load(pipe, instantid_root, weight_name)
    cross = pipe.unet.config.cross_attention_dim
    assert type(projection) is IPAdapterPlusImageProjection
    assert projection.proj_in.in_features == EMBEDDING_DIM  # embed_dims
    assert projection.latents.shape == (1, NUM_QUERIES, 64)  # num_queries, hidden_dims
    assert projection.proj_out.out_features == cross and projection.norm_out.normalized_shape == (cross,)
    assert len(projection.layers) == DEPTH and projection.layers[0].attn.heads == 1

    # the weights landed where the converter maps them (to_kv split into to_k / to_v)
    state = load_file(str(instantid_root / SAFE_WEIGHT_NAME))
    to_kv = state["image_proj.layers.2.0.to_kv.weight"]
    torch.testing.assert_close(projection.layers[2].attn.to_k.weight, to_kv[: to_kv.shape[0] // 2])
    torch.testing.assert_close(projection.layers[2].attn.to_v.weight, to_kv[to_kv.shape[0] // 2:])
    torch.testing.assert_close(projection.latents, state["image_proj.latents"])
    torch.testing.assert_close(projection.layers[1].ln0.weight, state["image_proj.layers.1.0.norm1.weight"])
    torch.testing.assert_close(projection.layers[3].ff[1].net[2].weight, state["image_proj.layers.3.1.3.weight"])
    index, name = next((i, n) for i, n in enumerate(pipe.unet.attn_processors) if n.endswith("attn2.processor"))
    processor = pipe.unet.attn_processors[name]
    assert processor.num_tokens == [NUM_QUERIES]
    torch.testing.assert_close(processor.to_k_ip[0].weight, state[f"ip_adapter.{index}.to_k_ip.weight"])
    torch.testing.assert_close(processor.to_v_ip[0].weight, state[f"ip_adapter.{index}.to_v_ip.weight"])


def test_adapter_is_live_and_scale_zero_is_plain(tiny_model_dir, instantid_root):
    pipe = fresh_pipe(tiny_model_dir)
    plain = generate_np(pipe)
    _load(pipe, instantid_root)

    face = generate_np(pipe, ip_adapter_image_embeds=[_id_embeds(3)])
    assert np.isfinite(face).all()
    assert np.abs(face - plain).max() > 0.05, "the InstantID adapter changed nothing"
    other = generate_np(pipe, ip_adapter_image_embeds=[_id_embeds(4)])
    assert np.abs(other - face).max() > 1e-3, "another identity changed nothing"

    pipe.set_ip_adapter_scale(0.0)
    off = generate_np(pipe, ip_adapter_image_embeds=[_id_embeds(3)])
    assert np.abs(off - plain).max() <= 1e-5


def test_identitynet_follows_the_face_tokens(tiny_model_dir, instantid_root):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(str(instantid_root / CONTROLNET_FOLDER)).eval()
    config = controlnet.config
    assert config.conditioning_channels == 3 and config.addition_embed_type == "text_time"
    pipe = fresh_pipe(tiny_model_dir)
    assert config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    projection = _load(pipe, instantid_root)

    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    keypoints = torch.zeros(2, 3, 64, 64)  # the five face keypoints drawn as coloured dots (draw_kps), here squares
    for channel, (y, x) in enumerate([(20, 22), (20, 42), (34, 32)]):
        keypoints[:, channel, y - 2: y + 2, x - 2: x + 2] = 1.0
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, text_dim, generator=generator),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1)}

    def residuals(id_embeds):
        with torch.no_grad():
            tokens = projection(id_embeds[:, 0])  # (2, 16, cross): what InstantID passes as encoder_hidden_states
            assert tokens.shape == (2, NUM_QUERIES, config.cross_attention_dim)
            down, mid = controlnet(sample, torch.tensor(500), encoder_hidden_states=tokens, controlnet_cond=keypoints,
                                   added_cond_kwargs=added, return_dict=False)
        return [*down, mid]

    first, second = residuals(_id_embeds(3)), residuals(_id_embeds(4))
    assert all(torch.isfinite(r).all() and r.abs().max() > 1e-3 for r in first), "IdentityNet output is dead"
    assert max((a - b).abs().max().item() for a, b in zip(first, second)) > 1e-4, "residuals ignore the face tokens"
