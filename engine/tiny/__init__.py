"""The built-in ``tiny`` model: a random-weight SDXL with the real architecture, shrunk.

It exists so that the CLI, the library and the tests run with no download. It makes
noise, not pictures. The same builder serves the test suite, which saves it to a temp
folder and loads it back through the loaders used for real weights.

With ``--model tiny`` every other component is a tiny random stand-in too: `components_manifest()`
lists them under the real manifest names (ControlNets, ControlNet-Union, the inpainting UNet,
Real-ESRGAN, IP-Adapter and its CLIP image encoder, InstantID, FaceID-Plus-v2, the insightface
packs, the preprocessors' networks), each with a recipe that writes it in its published file
layout. `engine.weights.require` runs a recipe on first use, under the tiny model's cache folder,
and the engine loads the result through the same loaders as fetched weights. The registry is engine/tiny/components.py;
the recipes live here and in engine/tiny/adapters.py, faces.py and annotators.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..sdxl_configs import SDXL_SCHEDULER_CONFIG
from .tokenizer import BOS, EOS, VOCAB_SIZE, build_tiny_tokenizer

TINY_NOTICE = "the 'tiny' model has random weights: it makes noise, not pictures (smoke runs only)"

# Consistency rules of SDXL (see TESTBED.md): cross_attention_dim = hidden(te1) + hidden(te2);
# projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim(te2).
# The two text encoders have different widths, as in SDXL (768 vs 1280): diffusers' single-file
# loader tells them apart by width.
_TE1_HIDDEN, _TE2_HIDDEN, _TE2_PROJECTION, _TIME_EMBED = 32, 48, 32, 8


def tiny_unet_config(in_channels: int = 4) -> dict:
    return {
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_EMBED,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 6 * _TIME_EMBED + _TE2_PROJECTION,
        "cross_attention_dim": _TE1_HIDDEN + _TE2_HIDDEN,
        "norm_num_groups": 8,
    }


def build_tiny_unet(seed: int = 0, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(in_channels))


def build_tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks give the real VAE scale factor of 8 (64 px image -> 8x8 latent).
    return AutoencoderKL(
        block_out_channels=[8, 8, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=False,
    )


def _text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2]
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection,
    )


def build_tiny_text_encoders(seed: int = 2):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    te1 = CLIPTextModel(_text_config(_TE1_HIDDEN, _TE1_HIDDEN))
    te2 = CLIPTextModelWithProjection(_text_config(_TE2_HIDDEN, _TE2_PROJECTION))
    return te1.eval(), te2.eval()


def build_tiny_pipeline(seed: int = 0):
    """All SDXL components with random weights, as a diffusers pipeline (the component container)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1, te2 = build_tiny_text_encoders(seed + 2)
    tokenizer = build_tiny_tokenizer()
    return StableDiffusionXLPipeline(
        unet=build_tiny_unet(seed),
        vae=build_tiny_vae(seed + 1),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)  # samples like the real model,
    )


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model in diffusers layout (safetensors), atomically as a whole folder."""
    folder = Path(folder)
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left over by a crash
    build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    (staging / "refgen_tiny.json").write_text(json.dumps({"seed": seed, "notice": TINY_NOTICE}))
    try:
        staging.rename(folder)
    except OSError:
        if not (folder / "model_index.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process built it first
    return folder


def ensure_tiny_model(cache_dir: Path) -> Path:
    """The tiny model's folder in the cache, built on first use (no download). Built beside it and renamed into
    place, so that processes starting together (batch actors, API workers) never load a half-written model: the
    first rename wins, and the others' copies (the same seeded weights) are dropped."""
    from ..images import make_staging_folder

    folder = Path(cache_dir) / "tiny-sdxl"
    if not (folder / "model_index.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_folder(folder)
        try:
            save_tiny_model(staging)
            try:
                os.rename(staging, folder)
            except OSError as exc:
                if not (folder / "model_index.json").exists():  # not another process's finished build
                    raise OSError(f"{folder} holds an incomplete tiny model (an older refgen's build was killed): "
                                  "delete that folder and run again") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------- stand-in components

def randomise(layers) -> None:
    """Give zero-initialised layers random weights. ControlNet's zero-convs (and the union model's
    projections) start at zero, and a ControlNet that changes nothing proves nothing."""
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, 0.3)
            layer.bias.normal_(0.0, 0.05)


def build_tiny_controlnet(unet, seed: int):
    """An SDXL ControlNet copied from `unet` (as ControlNetModel.from_unet does), zero-convs live."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    randomise([*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
               controlnet.controlnet_cond_embedding.conv_out])
    return controlnet.eval()


def save_tiny_controlnet(unet, folder: Path, seed: int) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, the layout of diffusers' SDXL ControlNets."""
    build_tiny_controlnet(unet, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_union(unet_config: dict, seed: int):
    """A tiny ControlNet-Union (xinsir layout: 8 control modes) with live zero-convs and projections."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    width = unet_config["block_out_channels"][0]
    shared = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim",
              "cross_attention_dim", "norm_num_groups", "transformer_layers_per_block", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim")
    union = ControlNetUnionModel(
        **{key: unet_config[key] for key in shared}, use_linear_projection=True, addition_embed_type="text_time",
        conditioning_embedding_out_channels=(8, 16, 16, 32), num_control_type=8,
        num_trans_channel=width, num_trans_head=4, num_proj_channel=width,
    )
    randomise([*union.controlnet_down_blocks, union.controlnet_mid_block, union.controlnet_cond_embedding.conv_out,
               union.spatial_ch_projs])
    return union.eval()


def save_tiny_union_promax(folder: Path, seed: int = 13) -> Path:
    """xinsir's promax files: config_promax.json + diffusion_pytorch_model_promax.safetensors."""
    from safetensors.torch import save_file

    union = build_tiny_union(tiny_unet_config(), seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config_promax.json").write_text(union.to_json_string())
    save_file({k: v.contiguous() for k, v in union.state_dict().items()}, folder / "diffusion_pytorch_model_promax.safetensors")
    return folder


def save_tiny_inpaint_unet(folder: Path, seed: int = 14) -> Path:
    """unet/ of an SDXL inpainting model: 9 input channels (latents, mask, masked-image latents)."""
    build_tiny_unet(seed, in_channels=9).save_pretrained(folder / "unet", safe_serialization=True)
    return folder


# Real-ESRGAN / BasicSR RRDBNet (xinntao/Real-ESRGAN, basicsr/archs/rrdbnet_arch.py), the layout of
# RealESRGAN_x4plus / x2plus: conv_first (nf, 3*u*u) with u = 2 for x2 (pixel-unshuffle), body.{i}.rdb{1,2,3}
# .conv{1..5} (conv1 nf->gc ... conv5 nf+4gc->nf), conv_body, conv_up1, conv_up2, conv_hr, conv_last (3, nf).
# Grow channels are 32 in every published checkpoint, and spandrel builds RRDBNet with gc = 32 only.
ESRGAN_GROW = 32


def realesrgan_state_dict(scale: int = 4, nf: int = 8, nb: int = 1, gc: int = ESRGAN_GROW, seed: int = 0) -> dict:
    """A random RRDBNet state dict, scaled so the network maps an image to something image-like in [0, 1]."""
    if scale not in (2, 4):
        raise ValueError("scale must be 2 or 4")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, out_ch: int, in_ch: int, gain: float = 1.0) -> None:
        std = gain / (in_ch * 9) ** 0.5
        state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
        state[f"{name}.bias"] = torch.randn(out_ch, generator=generator) * 0.01

    put("conv_first", nf, 3 * (4 if scale == 2 else 1))
    for block in range(nb):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                put(f"body.{block}.rdb{rdb}.conv{conv}", nf if conv == 5 else gc, nf + (conv - 1) * gc)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        put(name, nf, nf)
    put("conv_last", 3, nf, 0.7)
    state["conv_last.bias"] = state["conv_last.bias"] + 0.5  # centre the output in [0, 1]
    return state


def save_tiny_realesrgan(folder: Path, scale: int) -> Path:
    """RealESRGAN_x{scale}plus.safetensors with flat keys, as the repackaged safetensors files have them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"RealESRGAN_x{scale}plus.safetensors"
    save_file(realesrgan_state_dict(scale, seed=scale), path)
    return path
