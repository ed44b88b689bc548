"""The built-in ``tiny`` model: a random-weight SDXL with the real architecture, shrunk.

It exists so that the CLI, the library and the tests run with no download. It makes
noise, not pictures. The same builder serves the test suite, which saves it to a temp
folder and loads it back through the loaders used for real weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .sdxl_configs import SDXL_SCHEDULER_CONFIG

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
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        pad_token_id=_EOS,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2]
        vocab_size=_VOCAB_SIZE,
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


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return list(symbols.values())


def _byte_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


_VOCAB_SIZE = 2 * 256 + 2
_BOS, _EOS = _VOCAB_SIZE - 2, _VOCAB_SIZE - 1


def build_tiny_tokenizer():
    """A byte-level CLIP tokenizer (no merges): every character is a token."""
    from transformers import CLIPTokenizer

    # transformers 5 ignores vocab_file/merges_file arguments: pass the vocab itself.
    return CLIPTokenizer(
        vocab=_byte_vocab(),
        merges=[],
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


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
    """The tiny model's folder in the cache, built on first use (no download)."""
    folder = Path(cache_dir) / "tiny-sdxl"
    if not (folder / "model_index.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_tiny_model(folder)
    return folder
