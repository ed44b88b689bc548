"""Tiles: as few pixels as possible for the number of tiles a size needs, and seamless blending."""

from __future__ import annotations

import pytest
import torch

from engine.tiling import balanced_tile, blend_tiles, tile_starts


@pytest.mark.parametrize("length, tile, overlap, align", [(1024, 512, 32, 1), (512, 256, 64, 8), (2048, 1024, 256, 8),
                                                          (1000, 512, 32, 4), (777, 128, 16, 1), (300, 300, 16, 1)])
def test_a_balanced_tile_keeps_the_tile_count_and_never_grows(length, tile, overlap, align):
    balanced = balanced_tile(length, tile, overlap, align)
    assert balanced <= tile and balanced % align == 0 or balanced == length
    assert len(tile_starts(length, balanced, overlap, align)) == len(tile_starts(length, tile, overlap, align))


def test_a_1024_side_in_512_tiles_is_covered_by_three_363_px_tiles():
    assert balanced_tile(1024, 512, 32) == 363


def test_blending_an_identity_operation_reproduces_the_input():
    x = torch.rand(2, 3, 70, 90)
    assert torch.allclose(blend_tiles(x, (32, 40), overlap=8, run=lambda part: part), x, atol=1e-6)


def test_blending_a_scaling_operation_gives_the_scaled_image():
    x = torch.rand(1, 3, 40, 50)
    upscale = lambda part: part.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # noqa: E731
    assert torch.allclose(blend_tiles(x, (16, 16), overlap=4, run=upscale, scale=2), upscale(x), atol=1e-6)
