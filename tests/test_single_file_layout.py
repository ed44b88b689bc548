"""The single-file (original SDXL layout) loading path, tested offline with the tiny model.

Model sites share SDXL checkpoints as one ``.safetensors`` in Stability's original key layout.
diffusers 0.42 loads them offline with

    StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)

where ``folder`` is a LOCAL diffusers-layout folder: ``model_index.json`` plus each component's
config (``unet/config.json``, ``vae/config.json``, ``text_encoder*/config.json``),
``scheduler/scheduler_config.json`` and both tokenizers. No ``original_config`` (yaml) is needed,
and the folder needs no weights: they all come from the file (this test deletes the folder's
weights to prove it; with them present, a component diffusers fails to find in the file would be
silently loaded from the folder instead and the test could not tell).

Caveats found on the way (diffusers 0.42.1, transformers 5.23):

* diffusers tells the two text encoders apart by hidden size only: ``text_encoder_2`` is first
  tried as CLIP-L ("is there ``conditioner.embedders.0...position_embedding`` whose width equals
  mine?"). When both encoders have the same width, as in ``engine/tiny.py`` (32 and 32),
  ``text_encoder_2`` silently gets CLIP-L's weights and its ``text_projection`` is left on the
  ``meta`` device, with no warning. The real model (768 vs 1280) is not affected, and
  ``engine/tiny.py`` gives its encoders different widths (32 and 48) for this reason.
* diffusers silently ignores the non-weight entries of published files
  (``...embeddings.position_ids``, ``...model.logit_scale``) and leaves weights it does not find
  on the ``meta`` device, also silently: hence the explicit comparisons below.
"""

from __future__ import annotations

import socket

import pytest
import torch

try:  # pytest's default "prepend" import mode puts tests/ on sys.path (no tests/__init__.py)
    from sdxl_original_layout import (
        TE1_PREFIX,
        TE2_PREFIX,
        save_original_sdxl_checkpoint,
        to_original_sdxl_state_dict,
    )
except ImportError:  # tests/ made a package
    from tests.sdxl_original_layout import (
        TE1_PREFIX,
        TE2_PREFIX,
        save_original_sdxl_checkpoint,
        to_original_sdxl_state_dict,
    )

from engine.tiny import build_tiny_pipeline, save_tiny_model, tiny_unet_config

SEED = 0
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Entries of published files that are no model weight (written with include_buffers=True).
NON_WEIGHTS = (TE1_PREFIX + "text_model.embeddings.position_ids", TE2_PREFIX + "logit_scale")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(original pipeline, config-only diffusers folder, single .safetensors in the original layout)."""
    tmp_path = tmp_path_factory.mktemp("single_file")
    folder = tmp_path / "folder"
    pipe = build_tiny_pipeline(SEED)
    # diffusers tells the encoders apart by width (module doc): the tiny model keeps them distinct.
    assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size
    save_tiny_model(folder, seed=SEED)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()  # config-only: every weight must come from the single file
    file = save_original_sdxl_checkpoint(pipe, tmp_path / "tiny_sdxl.safetensors", include_buffers=True)
    return pipe, folder, file


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _compare(name, expected: dict, got: dict) -> list[str]:
    """Every difference between two state dicts, as readable lines."""
    problems = []
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    if missing:
        problems.append(f"{name}: {len(missing)} missing keys: {missing[:10]}")
    if unexpected:
        problems.append(f"{name}: {len(unexpected)} unexpected keys: {unexpected[:10]}")
    not_loaded, wrong_shape, wrong_value = [], [], []
    for key in sorted(expected.keys() & got.keys()):
        a, b = expected[key], got[key]
        if b.is_meta:
            not_loaded.append(key)
        elif a.shape != b.shape:
            wrong_shape.append(f"{key} {tuple(a.shape)} != {tuple(b.shape)}")
        elif not torch.equal(a, b.to(a.dtype)):
            wrong_value.append(key)
    if not_loaded:
        problems.append(f"{name}: {len(not_loaded)} weights not in the file (left on meta): {not_loaded[:10]}")
    if wrong_shape:
        problems.append(f"{name}: {len(wrong_shape)} wrong shapes: {wrong_shape[:10]}")
    if wrong_value:
        problems.append(f"{name}: {len(wrong_value)} wrong values: {wrong_value[:10]}")
    return problems


def test_keys_look_like_the_published_checkpoint(tiny):
    from safetensors import safe_open

    pipe, _, file = tiny
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        text_projection = f.get_tensor(TE2_PREFIX + "text_projection")
        attn_in = f.get_tensor(TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")

    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.out.2.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.label_emb.0.2.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.ff.net.2.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.mid.block_2.norm2.weight",
        # the decoder has layers_per_block + 1 resnets per level
        f"first_stage_model.decoder.up.0.block.{pipe.vae.config.layers_per_block}.conv2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.conv_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.text_projection",
        *NON_WEIGHTS,
    ):
        stem = ".".join(key.split(".")[:3])
        assert key in keys, f"{key} missing; keys under {stem}: {sorted(k for k in keys if k.startswith(stem))[:20]}"

    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert not [k for k in keys if not k.startswith(prefixes)]
    # No diffusers or HF naming survives.
    leftovers = ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_norm_out",
                 "add_embedding", "q_proj", "layer_norm1", "fc1", "encoder.layers", "group_norm")
    assert not [k for k in keys if not k.startswith(TE1_PREFIX) and any(s in k for s in leftovers)]
    assert not [k for k in keys if k.startswith("first_stage_model.") and ".to_" in k]
    # VAE: (stable) 4 levels -> encoder.down.0..3, no downsample on the last; decoder.up reversed.
    levels = len(pipe.vae.config.block_out_channels)
    assert {k.split(".")[3] for k in keys if k.startswith("first_stage_model.encoder.down.")} == {
        str(i) for i in range(levels)
    }
    assert f"first_stage_model.encoder.down.{levels - 1}.downsample.conv.weight" not in keys
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in keys

    te2 = pipe.text_encoder_2.config
    assert tuple(text_projection.shape) == (te2.hidden_size, te2.projection_dim)
    assert torch.equal(text_projection, pipe.text_encoder_2.text_projection.weight.T)
    assert tuple(attn_in.shape) == (3 * te2.hidden_size, te2.hidden_size)
    assert vae_q.ndim == 4 and vae_q.shape[2:] == (1, 1)


def test_every_tensor_in_the_file_is_a_model_weight(tiny):
    """No stray or duplicated tensors: the file holds exactly the models' parameters (+ the 2 buffers)."""
    from safetensors.torch import load_file

    pipe, _, file = tiny
    state = load_file(str(file))
    file_numel = sum(v.numel() for k, v in state.items() if k not in NON_WEIGHTS)
    model_numel = sum(v.numel() for name in COMPONENTS for v in getattr(pipe, name).state_dict().values())
    assert file_numel == model_numel
    # in-memory conversion and file agree
    converted = to_original_sdxl_state_dict(pipe, include_buffers=True)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_from_single_file_loads_every_weight_offline(tiny, no_network):
    from diffusers import StableDiffusionXLPipeline

    pipe, folder, file = tiny
    # The exact offline call: a local diffusers folder as `config`, no original_config yaml.
    loaded = StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)

    problems = []
    for name in COMPONENTS:
        problems += _compare(name, getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict())
        assert type(getattr(loaded, name)) is type(getattr(pipe, name))
    assert not problems, "from_single_file did not reproduce the pipeline:\n" + "\n".join(problems)
    # The non-weight parts came from the folder.
    assert loaded.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids


@pytest.mark.parametrize(
    "unet_overrides, vae_overrides",
    [
        # 3 levels, one resnet per level, deeper transformers, attention at the top level too.
        (
            {
                "block_out_channels": (32, 32, 64),
                "layers_per_block": 1,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": (2, 2, 4),
                "transformer_layers_per_block": (1, 1, 3),
            },
            {"block_out_channels": [8, 16], "layers_per_block": 1},
        ),
        # SDXL-like layout with layers_per_block 3 and a conv (non-linear) transformer projection.
        (
            {"layers_per_block": 3, "use_linear_projection": False},
            {"block_out_channels": [8, 8, 16], "layers_per_block": 3},
        ),
    ],
)
def test_converter_is_generic_over_the_config(unet_overrides, vae_overrides):
    """Round trip through diffusers' own original->diffusers converters for other shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**{**tiny_unet_config(), **unet_overrides})
    levels = len(vae_overrides["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4,
        norm_num_groups=8,
        **vae_overrides,
    )
    base = build_tiny_pipeline(SEED)
    pipe = type(base)(**{**base.components, "unet": unet, "vae": vae})

    state = to_original_sdxl_state_dict(pipe)
    problems = _compare("unet", unet.state_dict(), convert_ldm_unet_checkpoint(state, dict(unet.config)))
    problems += _compare("vae", vae.state_dict(), convert_ldm_vae_checkpoint(state, dict(vae.config)))
    assert not problems, "\n".join(problems)
