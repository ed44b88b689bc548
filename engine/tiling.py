"""Overlapping tiles with seamless blending, for any per-tile operation (ESRGAN, tiled refine).

Tiles cover the image exactly; where two tiles share pixels their outputs are cross-faded, and
neither contributes the quarter of the shared band next to its own edge (where padding distorts
a model's output). Outputs are accumulated as weighted sum / weight sum.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering [0, length) exactly: the first starts at 0,
    the last ends at `length`, neighbours share at least `overlap` pixels, starts are multiples of
    `align` (length and tile are multiples of it)."""
    if length <= tile:
        return [0]
    step = max(align, tile - overlap - (align - 1))  # room to round starts down to the alignment
    count = 1 + math.ceil((length - tile) / step)
    starts = [((length - tile) * i // (count - 1)) // align * align for i in range(count)]
    starts[-1] = length - tile
    return sorted(set(starts))


def _fade_in(shared: int) -> torch.Tensor:
    """Weights across a region two tiles share (in output pixels), for the tile on its far side: 0 over
    the first quarter (right at that tile's edge, where zero padding distorts the model's output),
    a linear ramp across the middle half, 1 over the last quarter. The neighbour gets 1 minus this,
    so the two always sum to 1 and neither contributes its edge pixels."""
    margin = shared // 4
    band = shared - 2 * margin
    ramp = torch.zeros(shared)
    ramp[margin : margin + band] = (torch.arange(band) + 0.5) / band
    ramp[margin + band :] = 1.0
    return ramp


def _blend_ramp(starts: list[int], size: int, index: int, scale: int) -> torch.Tensor:
    """1-D weights of one tile's output: 1 inside, a cross-fade over each region it shares with a
    neighbour. Where more than two tiles overlap the weights need not sum to 1: the caller divides
    by the weight sum, and every output pixel has some tile's interior (weight > 0) over it."""
    ramp = torch.ones(size * scale)
    if index > 0:
        shared = (starts[index - 1] + size - starts[index]) * scale
        if shared > 0:
            ramp[:shared] = torch.minimum(ramp[:shared], _fade_in(shared))
    if index + 1 < len(starts):
        shared = (starts[index] + size - starts[index + 1]) * scale
        if shared > 0:
            ramp[-shared:] = torch.minimum(ramp[-shared:], _fade_in(shared).flip(0))
    return ramp


def balanced_tile(length: int, tile: int, overlap: int, align: int = 1) -> int:
    """The smallest tile (at most `tile`) that covers `length` with as many tiles as `tile` needs.

    A 1024-px side in 512-px tiles needs 3 tiles; at full size they would process 1.5x the side,
    at 363 px the same 3 tiles cover it with the same overlap (half the work for ESRGAN).
    """
    if length <= tile:
        return length
    count = len(tile_starts(length, tile, overlap, align))
    candidate = math.ceil(math.ceil((length + (count - 1) * overlap) / count) / align) * align
    while candidate < tile and len(tile_starts(length, candidate, overlap, align)) > count:
        candidate += align  # aligned starts need a little slack
    return min(tile, candidate)


def blend_tiles(
    x: torch.Tensor,
    tile: tuple[int, int],
    overlap: int,
    run: Callable[[torch.Tensor], torch.Tensor],
    scale: int = 1,
    align: int = 1,
    on_tile: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """`run` over overlapping (tile_h, tile_w) tiles of x (B, C, H, W), blended into (B, C', H*scale, W*scale)."""
    batch, _, height, width = x.shape
    tile_h, tile_w = balanced_tile(height, tile[0], overlap, align), balanced_tile(width, tile[1], overlap, align)
    ys, xs = tile_starts(height, tile_h, overlap, align), tile_starts(width, tile_w, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        result = run(x)
        if on_tile:
            on_tile()
        return result
    ramps_y = [_blend_ramp(ys, tile_h, i, scale) for i in range(len(ys))]
    ramps_x = [_blend_ramp(xs, tile_w, j, scale) for j in range(len(xs))]
    out, weight_sum = None, torch.zeros(1, 1, height * scale, width * scale)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            tile_out = run(x[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w]).float().cpu()
            if out is None:
                out = torch.zeros(batch, tile_out.shape[1], height * scale, width * scale)
            weight = ramps_y[i][:, None] * ramps_x[j][None, :]
            rows, cols = slice(y0 * scale, (y0 + tile_h) * scale), slice(x0 * scale, (x0 + tile_w) * scale)
            out[:, :, rows, cols] += tile_out * weight
            weight_sum[:, :, rows, cols] += weight
            if on_tile:
                on_tile()
    return out / weight_sum
