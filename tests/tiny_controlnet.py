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


def build_tiny_union(unet_config: dict, seed: int):
    """A tiny ControlNet-Union (xinsir layout: 8 control modes) with live zero-convs and projections."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    width = unet_config["block_out_channels"][0]
    union = ControlNetUnionModel(
        in_channels=unet_config["in_channels"], block_out_channels=unet_config["block_out_channels"],
        down_block_types=unet_config["down_block_types"], layers_per_block=unet_config["layers_per_block"],
        attention_head_dim=unet_config["attention_head_dim"], use_linear_projection=True,
        cross_attention_dim=unet_config["cross_attention_dim"], norm_num_groups=unet_config["norm_num_groups"],
        transformer_layers_per_block=unet_config["transformer_layers_per_block"],
        addition_embed_type="text_time", addition_time_embed_dim=unet_config["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=unet_config["projection_class_embeddings_input_dim"],
        conditioning_embedding_out_channels=(8, 16, 16, 32), num_control_type=8,
        num_trans_channel=width, num_trans_head=4, num_proj_channel=width,
    )
    live = [*union.controlnet_down_blocks, union.controlnet_mid_block, union.controlnet_cond_embedding.conv_out, union.spatial_ch_projs]
    with torch.no_grad():
        for layer in live:
            layer.weight.normal_(0.0, 0.3)
            layer.bias.normal_(0.0, 0.05)
    return union.eval()
