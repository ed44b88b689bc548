"""Write a diffusers SDXL pipeline as ONE ``.safetensors`` file in the original SDXL key layout.

Test helper: model sites share SDXL checkpoints as a single file laid out like Stability's
``sd_xl_base_1.0.safetensors`` (the "SGM"/"ldm" layout of Stability-AI/generative-models),
and refgen loads them with ``StableDiffusionXLPipeline.from_single_file``. To test that path
offline we turn the random-weight tiny pipeline into such a file.

Where the layout comes from: it is the inverse of the forward (original -> diffusers)
conversion in diffusers' ``diffusers/loaders/single_file_utils.py`` (``DIFFUSERS_TO_LDM_MAPPING``,
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``) of diffusers 0.42, whose ``CHECKPOINT_KEY_NAMES`` also quote
keys of the published file; diffusers' ``scripts/convert_diffusers_to_original_sdxl.py`` does the
same inverse with hand-written tables. The parts:

* ``model.diffusion_model.``       the UNet (``openaimodel.UNetModel``): a flat list of
  ``input_blocks`` (0 = conv_in, then per level ``layers_per_block`` x [resnet, transformer]
  and one downsampler ``op``), ``middle_block`` (resnet, transformer, resnet) and
  ``output_blocks`` (per level ``layers_per_block + 1`` x [resnet, transformer, upsampler]).
* ``first_stage_model.``           the VAE (``ldm.modules.diffusionmodules.model``); the decoder's
  ``up`` list is indexed from the lowest resolution up, i.e. reversed w.r.t. diffusers'
  ``up_blocks``; the mid-block attention uses 1x1 convs, not linears.
* ``conditioner.embedders.0.transformer.``  CLIP ViT-L as a Hugging Face ``CLIPTextModel``
  (``text_model.`` keys, unchanged).
* ``conditioner.embedders.1.model.``        OpenCLIP ViT-bigG text tower: fused q/k/v
  ``in_proj``, ``c_fc``/``c_proj`` MLP, and ``text_projection`` stored as a (width, dim)
  matrix that is multiplied on the right, i.e. the transpose of HF's ``text_projection.weight``.

The structure (levels, resnets per level, transformer depth, VAE depth, text layers) is read
from the modules themselves, so the converter works for any SDXL-shaped config, tiny or full.
Every diffusers key must be mapped: an unknown key raises ``KeyError`` rather than being dropped.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D (UNet) -> ldm ResBlock sub-module names.
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D (VAE) -> ldm ResnetBlock: same names but the shortcut.
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# diffusers Attention (VAE mid block) -> ldm AttnBlock.
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# HF CLIPEncoderLayer -> OpenCLIP ResidualAttentionBlock (q/k/v handled apart: they are fused).
_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


class _PrefixMap:
    """Maps keys by their longest matching module prefix; ``renames`` rewrites the sub-module name."""

    def __init__(self) -> None:
        self._rules: list[tuple[str, str, dict[str, str]]] = []

    def add(self, diffusers_prefix: str, original_prefix: str, renames: dict[str, str] | None = None) -> None:
        self._rules.append((diffusers_prefix, original_prefix, renames or {}))

    def __call__(self, key: str) -> str:
        best = None
        for diffusers_prefix, original_prefix, renames in self._rules:
            if key == diffusers_prefix or key.startswith(diffusers_prefix + "."):
                if best is None or len(diffusers_prefix) > len(best[0]):
                    best = (diffusers_prefix, original_prefix, renames)
        if best is None:
            raise KeyError(f"no original-layout name known for diffusers key {key!r}")
        diffusers_prefix, original_prefix, renames = best
        rest = key[len(diffusers_prefix) + 1 :]
        # Longest sub-module name first ("to_out.0" before a hypothetical "to_out").
        for old in sorted(renames, key=len, reverse=True):
            if rest == old or rest.startswith(old + "."):
                rest = renames[old] + rest[len(old) :]
                break
        return f"{original_prefix}.{rest}" if rest else original_prefix


def _unet_key_map(unet) -> _PrefixMap:
    m = _PrefixMap()
    m.add("conv_in", "input_blocks.0.0")
    m.add("time_embedding.linear_1", "time_embed.0")
    m.add("time_embedding.linear_2", "time_embed.2")
    # SDXL's text_time conditioning ("adm"): label_emb is Sequential(Sequential(Linear, SiLU, Linear)).
    m.add("add_embedding.linear_1", "label_emb.0.0")
    m.add("add_embedding.linear_2", "label_emb.0.2")
    m.add("class_embedding.linear_1", "label_emb.0.0")
    m.add("class_embedding.linear_2", "label_emb.0.2")
    m.add("conv_norm_out", "out.0")
    m.add("conv_out", "out.2")

    index = 1  # input_blocks.0 is conv_in
    for level, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for layer in range(len(block.resnets)):
            m.add(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", _UNET_RESNET_NAMES)
            if attentions is not None:
                m.add(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1")
            index += 1
        if block.downsamplers is not None:
            m.add(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            index += 1

    mid = unet.mid_block
    if mid is not None:
        # middle_block interleaves: resnet 0, attention 0, resnet 1, attention 1, ...
        for r in range(len(mid.resnets)):
            m.add(f"mid_block.resnets.{r}", f"middle_block.{2 * r}", _UNET_RESNET_NAMES)
        for a in range(len(getattr(mid, "attentions", None) or [])):
            m.add(f"mid_block.attentions.{a}", f"middle_block.{2 * a + 1}")

    index = 0
    for level, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        n = len(block.resnets)
        for layer in range(n):
            m.add(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", _UNET_RESNET_NAMES)
            if attentions is not None:
                m.add(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1")
            if layer == n - 1 and block.upsamplers is not None:
                # The upsampler rides in the level's last output block, after the transformer if any.
                slot = 2 if attentions is not None else 1
                m.add(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv")
            index += 1
    return m


def _vae_key_map(vae) -> _PrefixMap:
    m = _PrefixMap()
    for part in ("encoder", "decoder"):
        m.add(f"{part}.conv_in", f"{part}.conv_in")
        m.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        m.add(f"{part}.conv_out", f"{part}.conv_out")
        mid = getattr(vae, part).mid_block
        for r in range(len(mid.resnets)):
            m.add(f"{part}.mid_block.resnets.{r}", f"{part}.mid.block_{r + 1}", _VAE_RESNET_NAMES)
        for a in range(len(mid.attentions)):
            m.add(f"{part}.mid_block.attentions.{a}", f"{part}.mid.attn_{a + 1}", _VAE_ATTENTION_NAMES)
    m.add("quant_conv", "quant_conv")
    m.add("post_quant_conv", "post_quant_conv")

    for level, block in enumerate(vae.encoder.down_blocks):
        for layer in range(len(block.resnets)):
            m.add(f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}", _VAE_RESNET_NAMES)
        if block.downsamplers is not None:
            m.add(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")

    up_blocks = vae.decoder.up_blocks
    for level, block in enumerate(up_blocks):
        original = len(up_blocks) - 1 - level  # ldm's decoder.up[0] is the lowest resolution
        for layer in range(len(block.resnets)):
            m.add(f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{original}.block.{layer}", _VAE_RESNET_NAMES)
        if block.upsamplers is not None:
            m.add(f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{original}.upsample.conv")
    return m


def _unet_state_dict(unet) -> dict[str, torch.Tensor]:
    key_map = _unet_key_map(unet)
    # proj_in/proj_out stay 2-D when use_linear_projection (SDXL), 4-D 1x1 convs otherwise: as in diffusers.
    return {UNET_PREFIX + key_map(k): v for k, v in unet.state_dict().items()}


def _vae_state_dict(vae) -> dict[str, torch.Tensor]:
    key_map = _vae_key_map(vae)
    out = {}
    for key, value in vae.state_dict().items():
        new = key_map(key)
        if ".mid.attn_" in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> Conv2d 1x1 (C, C, 1, 1)
        out[VAE_PREFIX + new] = value
    return out


def _clip_l_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the file keeps it.
    out = {}
    for key, value in text_encoder.state_dict().items():
        if not key.startswith("text_model."):
            key = "text_model." + key
        out[TE1_PREFIX + key] = value
    return out


def _open_clip_state_dict(text_encoder_2) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            # HF: y = x @ W.T with W (dim, width); OpenCLIP: y = x @ P with P (width, dim).
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, rest = key[len("encoder.layers.") :].split(".", 1)
            head = f"transformer.resblocks.{layer}"
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((int(layer), kind), {})[proj] = value
                continue
            for old, new in _OPEN_CLIP_LAYER_NAMES.items():
                if rest.startswith(old + "."):
                    out[f"{head}.{new}{rest[len(old):]}"] = value
                    break
            else:
                raise KeyError(f"no original-layout name known for text_encoder_2 key {key!r}")
        else:
            raise KeyError(f"no original-layout name known for text_encoder_2 key {key!r}")
    for (layer, kind), parts in sorted(qkv.items()):
        # nn.MultiheadAttention packs q, k, v along dim 0 (diffusers splits at width and 2*width).
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return {TE2_PREFIX + k: v for k, v in out.items()}


def to_original_sdxl_state_dict(
    pipe, *, dtype: torch.dtype | None = None, include_buffers: bool = False
) -> dict[str, torch.Tensor]:
    """The pipeline's unet, vae, text_encoder and text_encoder_2 in the original SDXL single-file layout.

    ``dtype`` casts floating-point tensors (the published file is float16). ``include_buffers``
    also writes two non-weight entries that the published ``sd_xl_base_1.0.safetensors`` is
    believed to carry (from the training code, not the models): CLIP-L's
    ``text_model.embeddings.position_ids`` and OpenCLIP's ``logit_scale``; loaders must ignore them.
    Without ``dtype`` most tensors share memory with the models' parameters (no copy).
    """
    state: dict[str, torch.Tensor] = {}
    parts = (
        _unet_state_dict(pipe.unet),
        _vae_state_dict(pipe.vae),
        _clip_l_state_dict(pipe.text_encoder),
        _open_clip_state_dict(pipe.text_encoder_2),
    )
    for part in parts:
        clash = state.keys() & part.keys()
        if clash:
            raise ValueError(f"two weights map to the same original key: {sorted(clash)[:5]}")
        state.update(part)

    if include_buffers:
        positions = pipe.text_encoder.config.max_position_embeddings
        state[TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
        state[TE2_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07))

    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()  # safetensors refuses views/non-contiguous tensors
    return out


def save_original_sdxl_checkpoint(pipe, path, **kwargs) -> Path:
    """Write :func:`to_original_sdxl_state_dict` to ``path`` as one ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_original_sdxl_state_dict(pipe, **kwargs)
    # save_file refuses tensors sharing storage; clone the (rare) ones that do.
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            state[key] = value.clone()
        seen.add(ident)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
