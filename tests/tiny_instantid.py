"""A tiny InstantID (face adapter + IdentityNet) for the tiny SDXL, in the published InstantX/InstantID layout.

Where the layout comes from (read in github.com/InstantID/InstantID at 2145b67, and diffusers 0.42 loaders/unet.py):

* `ip-adapter.bin`: a torch pickle of {"image_proj": {...}, "ip_adapter": {...}}.
  `pipeline_stable_diffusion_xl_instantid.py::set_image_proj_model` builds `ip_adapter/resampler.py::Resampler(
  dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=unet cross_attention_dim,
  ff_mult=4)` and `load_state_dict(state_dict["image_proj"])` (strict), so image_proj holds exactly its keys:

    latents                          (1, num_queries, dim)
    proj_in.{weight,bias}            Linear(embedding_dim, dim)      (ArcFace 512-d embedding -> dim)
    proj_out.{weight,bias}           Linear(dim, output_dim)
    norm_out.{weight,bias}           LayerNorm(output_dim)
    layers.{0..3}.0.{norm1,norm2}.{weight,bias}      LayerNorm(dim)  (PerceiverAttention)
    layers.{0..3}.0.to_q.weight      (heads*64, dim), no bias
    layers.{0..3}.0.to_kv.weight     (2*heads*64, dim), no bias
    layers.{0..3}.0.to_out.weight    (dim, heads*64), no bias
    layers.{0..3}.1.0.{weight,bias}  LayerNorm(dim)                  (FeedForward = Sequential(LN, Linear, GELU, Linear))
    layers.{0..3}.1.1.weight         (4*dim, dim), no bias
    layers.{0..3}.1.3.weight         (dim, 4*dim), no bias

  `set_ip_adapter` gives every attn2 an `ip_adapter/attention_processor.py::IPAttnProcessor` with
  `to_k_ip` / `to_v_ip = Linear(cross_attention_dim, hidden_size, bias=False)` (attn1 gets a parameterless one) and
  loads `state_dict["ip_adapter"]` into `ModuleList(unet.attn_processors.values())`, hence the keys
  `{k}.to_k_ip.weight` / `{k}.to_v_ip.weight`, k = the layer's index in `unet.attn_processors` order (odd: attn2).
  Real SDXL: dim 1280, 20 heads, 16 queries, output 2048; to_kv (2560, 1280), ff (5120, 1280), 70 K/V pairs.

  We write the same keys flattened with `image_proj.` / `ip_adapter.` prefixes into a .safetensors file (diffusers'
  `load_ip_adapter` splits them back the same way and, seeing `latents`, builds IPAdapterPlusImageProjection with
  heads = to_q rows // 64), or, with pickle=True, the nested dict with torch.save as the published .bin.

* `ControlNetModel/{config.json,diffusion_pytorch_model.safetensors}`: IdentityNet, loaded by the repo's infer.py
  with plain `diffusers.ControlNetModel.from_pretrained(".../ControlNetModel")`; its published config (mirrored in
  huggingface.co/krnl/InstantID, "cloned model") is a standard SDXL ControlNet: text_time addition embedding,
  block_out_channels [320, 640, 1280], cross_attention_dim 2048, conditioning_channels 3 (the face keypoint
  picture). The pipeline feeds it `encoder_hidden_states=prompt_image_emb` (the Resampler's face tokens), not the
  text. The tiny one is `ControlNetModel.from_unet(tiny unet)` with live output convs (tests/tiny_controlnet.py).

Tiny sizes: dim 64, heads 1 (dim_head is fixed at 64: diffusers infers heads from it), 16 queries, embedding 512,
output = unet.config.cross_attention_dim.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_controlnet import save_tiny_controlnet
from tiny_ip_adapter import resampler_state_dict

NUM_QUERIES = 16
EMBEDDING_DIM = 512  # insightface antelopev2 ArcFace embedding
DEPTH = 4
DIM_HEAD = 64
WEIGHT_NAME = "ip-adapter.bin"
SAFE_WEIGHT_NAME = "ip-adapter.safetensors"
CONTROLNET_FOLDER = "ControlNetModel"


def tiny_instantid_state_dict(unet, seed: int = 31, dim: int = 64) -> dict[str, torch.Tensor]:
    """Random weights in the published ip-adapter.bin layout, flattened with `image_proj.` / `ip_adapter.`."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    inner = max(1, dim // DIM_HEAD) * DIM_HEAD  # heads = dim // 64, as InstantID's 1280 // 64 = 20

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    state = {"image_proj.latents": rand(1, NUM_QUERIES, dim, std=1.0)}
    state.update(resampler_state_dict("image_proj", rand, EMBEDDING_DIM, width=dim, inner=inner, output=cross, depth=DEPTH))
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name[: -len(".processor")])
            state[f"ip_adapter.{index}.to_k_ip.weight"] = rand(attention.to_k.out_features, cross, std=0.3)
            state[f"ip_adapter.{index}.to_v_ip.weight"] = rand(attention.to_v.out_features, cross, std=0.3)
    return state


def nested(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The flat keys back as the published {"image_proj": {...}, "ip_adapter": {...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, rest = key.split(".", 1)
        out[group][rest] = value
    return out


def save_tiny_instantid(unet, root: Path, pickle: bool = False, seed: int = 31) -> Path:
    """Writes root/ip-adapter.safetensors (flat keys), or root/ip-adapter.bin (the nested pickle, as published)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in tiny_instantid_state_dict(unet, seed=seed).items()}
    if pickle:
        torch.save(nested(state), root / WEIGHT_NAME)
        return root / WEIGHT_NAME
    from safetensors.torch import save_file

    save_file(state, root / SAFE_WEIGHT_NAME)
    return root / SAFE_WEIGHT_NAME


def save_tiny_identitynet(unet, root: Path, seed: int = 32) -> Path:
    """Writes root/ControlNetModel (config.json + diffusion_pytorch_model.safetensors); returns that folder."""
    return save_tiny_controlnet(unet, Path(root) / CONTROLNET_FOLDER, seed=seed)
