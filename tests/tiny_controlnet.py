"""Tiny SDXL ControlNets for tests, with LIVE output convolutions.

`ControlNetModel.from_unet` zero-initialises the zero-convs (controlnet_down_blocks, mid block and
the conditioning embedding's conv_out), so a fresh ControlNet changes nothing and proves nothing.
These are randomised here.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.05)
    return controlnet.eval()


def save_tiny_controlnet(unet, folder: Path, seed: int) -> Path:
    build_tiny_controlnet(unet, seed).save_pretrained(folder, safe_serialization=True)
    return folder
