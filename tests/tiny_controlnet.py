"""Tiny SDXL ControlNets for tests, with LIVE output convolutions: the product's builders (engine/tiny.py).

`ControlNetModel.from_unet` zero-initialises the zero-convs (controlnet_down_blocks, mid block and
the conditioning embedding's conv_out), so a fresh ControlNet changes nothing and proves nothing.
engine/tiny.py randomises them; the tiny model's stand-in ControlNets are built the same way.
"""

from __future__ import annotations

from engine.tiny import build_tiny_controlnet, build_tiny_union, save_tiny_controlnet

__all__ = ["build_tiny_controlnet", "build_tiny_union", "save_tiny_controlnet"]
