"""DeepCache (Ma et al. 2023), opt-in per request: reuse the UNet's deep features between steps.

Uniform schedule, branch at the outermost block: UNet call 0 and every k-th call after it run the whole UNet
and keep the deep features (the hidden states that enter `up_blocks[-1]`); the calls in between run only the
shallow path (time/added embeddings, `conv_in`, `down_blocks[0]`, `up_blocks[-1]` on the cached features and
the fresh skips, the output convolutions). In SDXL those outer blocks have no attention, so text and
IP-Adapter embeddings only enter through the cached features; ControlNet residuals of the outer skips are
added as diffusers' UNet forward adds them. Only the base pass is cached (a refine pass runs the whole UNet).

Both paths are our own decomposition of diffusers' UNet2DConditionModel.forward over the UNet's own blocks
(the UNet is not modified, no hook is registered on it): a forward hook inside a compiled UNet is not seen by
its graph, so capturing the deep features needs the full step in a module of ours. On a full step its output
is bit-identical to the plain UNet's (tests/test_deep_cache.py). Each path is a small nn.Module compiled once
per UNet like the UNet itself (engine/speed.py prepare_module); the per-generation state (call count, cached
features) lives in the wrapper a generation gets.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from engine.adapter import Context, Prepared
from engine.errors import RefgenError
from engine.request import GenerationRequest, ResolvedRequest
from engine.speed import Speed, prepare_module

# The UNet keywords the engine's loop and adapters pass (engine/sampling.py predict_noise).
SUPPORTED_KWARGS = frozenset({"encoder_hidden_states", "added_cond_kwargs", "down_block_additional_residuals",
                              "mid_block_additional_residual", "down_intrablock_additional_residuals"})


class DeepCacheError(RefgenError):
    """deep_cache cannot serve this UNet or this call (a structure or a keyword its decomposition does not cover)."""


class DeepCache:
    """DeepCache, an Adapter (engine/adapter.py). Keeps each UNet's two compiled paths for the engine's life."""

    def __init__(self, speed: Optional[Speed] = None):
        self._speed = speed or Speed()
        self._paths: dict[Any, tuple[FullPath, ShallowPath]] = {}  # by UNet; pruned to the engine's UNets

    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional["PreparedDeepCache"]:
        return None if request.deep_cache is None else self._prepared(request.deep_cache, ctx)

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional["PreparedDeepCache"]:
        return None if resolved.deep_cache is None else self._prepared(resolved.deep_cache, ctx)

    def _prepared(self, interval: int, ctx: Context) -> "PreparedDeepCache":
        unets = [u for u in (ctx.pipe.unet, ctx.inpaint_unet) if u is not None]
        for unet in unets:
            check_decomposable(unet)
        self._paths = {u: p for u, p in self._paths.items() if any(u is known for known in unets)}
        return PreparedDeepCache(interval, self._paths_for)

    def _paths_for(self, unet) -> tuple["FullPath", "ShallowPath"]:
        if unet not in self._paths:
            self._paths[unet] = (prepare_module(FullPath(unet), self._speed), prepare_module(ShallowPath(unet), self._speed))
        return self._paths[unet]


class PreparedDeepCache(Prepared):
    def __init__(self, interval: int, paths_for: Callable[[Any], tuple["FullPath", "ShallowPath"]]):
        self.interval, self._paths_for = interval, paths_for

    def record(self) -> dict:
        return {"deep_cache": self.interval}

    def unet(self, unet) -> "CachedUNet":
        check_decomposable(unet)
        return CachedUNet(unet, *self._paths_for(unet), self.interval)


def check_decomposable(unet) -> None:
    """Refuse a UNet whose outer blocks or embeddings are not what the decomposition reproduces exactly."""
    problems = []
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        problems.append("it has a single resolution level, so there are no deep features to cache")
    if getattr(unet.down_blocks[0], "has_cross_attention", False) or getattr(unet.up_blocks[-1], "has_cross_attention", False):
        problems.append("its outermost blocks have attention")
    if unet.up_blocks[-1].upsamplers is not None:
        problems.append("its last up block upsamples")
    if unet.class_embedding is not None or unet.config.center_input_sample or unet.config.addition_embed_type == "image_hint":
        problems.append("it uses class embeddings, input centring or an image hint")
    if problems:
        raise DeepCacheError(f"deep_cache cannot run this UNet: {'; '.join(problems)}. Generate without deep_cache.")


class CachedUNet:
    """The UNet of one generation with DeepCache: called like the UNet, full every `interval`-th call."""

    def __init__(self, unet, full: "FullPath", shallow: "ShallowPath", interval: int):
        self.config = unet.config  # what the start hooks read (an inpainting UNet's channel count)
        self._full, self._shallow, self.interval = full, shallow, interval
        self.calls = 0
        self._deep: Optional[torch.Tensor] = None

    def __call__(self, sample: torch.Tensor, timestep, return_dict: bool = False, **kwargs):
        inputs = unet_inputs(kwargs)
        call, self.calls = self.calls, self.calls + 1
        cached = self._cached_for(sample.shape[0])
        if call % self.interval == 0 or cached is None:
            noise, self._deep = self._full(sample, timestep, **inputs)
        else:
            noise = self._shallow(sample, timestep, cached, inputs["encoder_hidden_states"], inputs["added_cond_kwargs"],
                                  inputs["down_block_additional_residuals"], inputs["down_intrablock_additional_residuals"])
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def _cached_for(self, rows: int) -> Optional[torch.Tensor]:
        """The deep features for a call of `rows` rows: past the guidance cutoff a call takes the conditional half
        of the guided rows, whose features are the second half of the cached ones (rows are independent)."""
        if self._deep is None or self._deep.shape[0] not in (rows, 2 * rows):
            return None
        return self._deep if self._deep.shape[0] == rows else self._deep[rows:]


def unet_inputs(kwargs: dict) -> dict:
    """The UNet keywords, with diffusers' legacy form (T2I-Adapter residuals as down_block_additional_residuals
    without a mid residual) turned into the current one, as its forward does."""
    unknown = set(kwargs) - SUPPORTED_KWARGS
    if unknown:
        raise DeepCacheError(f"deep_cache does not support the UNet keyword(s) {', '.join(sorted(unknown))}")
    inputs = {key: kwargs.get(key) for key in sorted(SUPPORTED_KWARGS)}
    legacy = inputs["down_intrablock_additional_residuals"] is None and inputs["mid_block_additional_residual"] is None
    if legacy and inputs["down_block_additional_residuals"] is not None:
        inputs["down_intrablock_additional_residuals"] = inputs.pop("down_block_additional_residuals")
        inputs["down_block_additional_residuals"] = None
    return inputs


# -- the two paths: diffusers' UNet2DConditionModel.forward, step by step, over the UNet's own blocks ---------------


def embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
    """Time plus added (SDXL text_time) embedding, as the forward's step 1."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    return emb if unet.time_embed_act is None else unet.time_embed_act(emb)


def outer_down(unet, sample, emb, intrablock: list) -> tuple[torch.Tensor, tuple]:
    """conv_in and down_blocks[0]: (hidden states after them, every skip so far). A T2I-Adapter's first
    residual is added to the block's output, which diffusers does in place, so its last skip gets it too."""
    hidden = unet.conv_in(sample)
    out, skips = unet.down_blocks[0](hidden_states=hidden, temb=emb)
    if intrablock:
        out = out + intrablock.pop(0)
        skips = (*skips[:-1], out)
    return out, (hidden, *skips)


def with_control(skips: tuple, residuals) -> tuple:
    """ControlNet residuals added to the skips they belong to (in order: a shorter `skips` takes the first ones)."""
    return skips if residuals is None else tuple(skip + residual for skip, residual in zip(skips, residuals))


def outer_up(unet, deep, emb, skips: tuple) -> torch.Tensor:
    """up_blocks[-1] on the deep features and the first skips, then the output convolutions (forward steps 5-6)."""
    last = unet.up_blocks[-1]
    hidden = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips[: len(last.resnets)], upsample_size=None)
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class FullPath(torch.nn.Module):
    """The whole UNet, returning (noise, deep features)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, down_block_additional_residuals=None,
                mid_block_additional_residual=None, down_intrablock_additional_residuals=None):
        unet = self.unet
        emb = embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        intrablock = list(down_intrablock_additional_residuals or ())  # consumed here, the caller's list untouched
        hidden, skips = outer_down(unet, sample, emb, intrablock)
        hidden, skips = self._inner_down(hidden, skips, emb, context, intrablock)
        controlled = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        if controlled:
            skips = with_control(skips, down_block_additional_residuals)
        hidden = self._mid(hidden, emb, context, intrablock)
        if controlled:
            hidden = hidden + mid_block_additional_residual
        deep, skips = self._inner_up(hidden, skips, emb, context, sample.shape[-2:])
        return outer_up(unet, deep, emb, skips), deep

    def _inner_down(self, hidden, skips: tuple, emb, context, intrablock: list):
        for block in self.unet.down_blocks[1:]:
            if getattr(block, "has_cross_attention", False):
                extra = {"additional_residuals": intrablock.pop(0)} if intrablock else {}
                hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context, attention_mask=None,
                                    cross_attention_kwargs=None, encoder_attention_mask=None, **extra)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
                if intrablock:
                    hidden = hidden + intrablock.pop(0)
                    res = (*res[:-1], hidden)
            skips = skips + tuple(res)
        return hidden, skips

    def _mid(self, hidden, emb, context, intrablock: list):
        mid = self.unet.mid_block
        if mid is None:
            return hidden
        if getattr(mid, "has_cross_attention", False):
            hidden = mid(hidden, emb, encoder_hidden_states=context, attention_mask=None, cross_attention_kwargs=None,
                         encoder_attention_mask=None)
        else:
            hidden = mid(hidden, emb)
        if intrablock and hidden.shape == intrablock[0].shape:  # T2I-Adapter-XL's last feature
            hidden = hidden + intrablock.pop(0)
        return hidden

    def _inner_up(self, hidden, skips: tuple, emb, context, size):
        """Every up block but the last; returns (deep features, the skips the last block takes)."""
        uneven = any(dim % 2**self.unet.num_upsamplers != 0 for dim in size)  # forward the upsample size
        for block in self.unet.up_blocks[:-1]:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if uneven else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                               cross_attention_kwargs=None, upsample_size=upsample_size, attention_mask=None,
                               encoder_attention_mask=None)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        return hidden, skips


class ShallowPath(torch.nn.Module):
    """The outer blocks only, on cached deep features: returns the noise."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, deep, encoder_hidden_states, added_cond_kwargs, down_block_additional_residuals=None,
                down_intrablock_additional_residuals=None):
        unet = self.unet
        emb = embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        _, skips = outer_down(unet, sample, emb, list(down_intrablock_additional_residuals or ()))
        return outer_up(unet, deep, emb, with_control(skips, down_block_additional_residuals))
