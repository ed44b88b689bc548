"""A tiny IP-Adapter FaceID-Plus-v2 for the tiny SDXL, in the published h94/IP-Adapter-FaceID layout.

Layout of h94/IP-Adapter-FaceID `ip-adapter-faceid-plusv2_sdxl.bin` (a torch pickle holding the nested dict
{"image_proj": {...}, "ip_adapter": {...}}; we write the same keys flattened with the `image_proj.` /
`ip_adapter.` prefixes into a .safetensors file, which diffusers' `load_ip_adapter` splits back the same way).
The projection is tencent-ailab IP-Adapter's `ProjPlusModel(cross_attention_dim, id_embeddings_dim=512,
clip_embeddings_dim=<CLIP hidden size>, num_tokens=4)`:

  image_proj.proj.0.{weight,bias}   Linear(id_dim, 2*id_dim)           (ID-embedding MLP, GELU between)
  image_proj.proj.2.{weight,bias}   Linear(2*id_dim, 4*cross)          (4 ID tokens)
  image_proj.norm.{weight,bias}     LayerNorm(cross)
  image_proj.perceiver_resampler.proj_in.{weight,bias}   Linear(clip_hidden, cross)
  image_proj.perceiver_resampler.proj_out.{weight,bias}  Linear(cross, cross)
  image_proj.perceiver_resampler.norm_out.{weight,bias}  LayerNorm(cross)
  image_proj.perceiver_resampler.layers.{0..3}.0.{norm1,norm2}.{weight,bias}   (PerceiverAttention)
  image_proj.perceiver_resampler.layers.{0..3}.0.to_q.weight    (heads*64, cross), no bias
  image_proj.perceiver_resampler.layers.{0..3}.0.to_kv.weight   (2*heads*64, cross), no bias
  image_proj.perceiver_resampler.layers.{0..3}.0.to_out.weight  (cross, heads*64), no bias
  image_proj.perceiver_resampler.layers.{0..3}.1.0.{weight,bias}  LayerNorm(cross)      (FeedForward)
  image_proj.perceiver_resampler.layers.{0..3}.1.1.weight          (4*cross, cross), no bias
  image_proj.perceiver_resampler.layers.{0..3}.1.3.weight          (cross, 4*cross), no bias
  ip_adapter.{k}.to_k_ip.weight / to_v_ip.weight   (attn2 inner dim, cross)   k odd: the attn2 layers
  ip_adapter.{k}.to_{q,k,v,out}_lora.{down,up}.weight  for EVERY attention layer k (attn1 and attn2), LoRA
      rank r: down (r, in), up (out, r); in = cross for to_k/to_v of attn2, else the layer's hidden size.

k is the layer's index in `unet.attn_processors` order. Real SDXL sizes: cross = embed = 2048, heads =
2048 // 64 = 32 (dim_head 64 is fixed: diffusers infers heads = to_q rows // 64), depth 4, clip_hidden = 1280
(CLIP ViT-H penultimate hidden states of the 224px face crop, 257 tokens), id_dim = 512 (insightface ArcFace),
LoRA rank 128; so proj.0 (1024, 512), proj.2 (8192, 1024), to_kv (4096, 2048), ff (8192, 2048).

Here cross = unet.config.cross_attention_dim (80 for engine/tiny.py), heads = max(1, cross // 64) = 1,
id_dim 512, LoRA rank 4. Diffusers loads this as IPAdapterFaceIDPlusImageProjection (loaders/unet.py,
`perceiver_resampler.proj_in.weight` branch) and turns the `*_lora` keys into a peft adapter "faceid_0"
(`_load_ip_adapter_loras`), which needs peft.

The separate `ip-adapter-faceid-plusv2_sdxl_lora.safetensors` (the same LoRA converted for WebUI/ComfyUI) is
NOT built: its exact key layout could not be confirmed offline (reports show kohya-style
`lora_unet_<diffusers module path with _>.lora_{down,up}.weight` names, but also an older "messy" variant).
The author states the .bin "includes the adapter and lora", so the LoRA here lives inside the main file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_ip_adapter import resampler_state_dict

NUM_TOKENS = 4
DEPTH = 4
DIM_HEAD = 64
WEIGHT_NAME = "ip-adapter-faceid-plusv2_sdxl.safetensors"


def _attention(unet, processor_name: str):
    return unet.get_submodule(processor_name[: -len(".processor")])


def tiny_faceid_plusv2_state_dict(unet, clip_hidden: int, id_dim: int = 512, seed: int = 23,
                                  lora_rank: int | None = 4) -> dict[str, torch.Tensor]:
    """Random weights in the published FaceID-Plus-v2 SDXL layout (see the module docstring).

    `lora_rank=None` leaves out the LoRA keys (adapter-only file: scale 0 then equals the plain pipeline)."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    embed = cross  # ProjPlusModel's resampler works at dim = cross_attention_dim
    inner = max(1, cross // DIM_HEAD) * DIM_HEAD

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    state = {
        "image_proj.proj.0.weight": rand(2 * id_dim, id_dim, std=0.05),
        "image_proj.proj.0.bias": rand(2 * id_dim, std=0.05),
        "image_proj.proj.2.weight": rand(NUM_TOKENS * embed, 2 * id_dim, std=0.05),
        "image_proj.proj.2.bias": rand(NUM_TOKENS * embed, std=0.05),
        "image_proj.norm.weight": 1 + rand(embed, std=0.1),
        "image_proj.norm.bias": rand(embed, std=0.1),
    }
    state.update(resampler_state_dict("image_proj.perceiver_resampler", rand, clip_hidden, width=embed, inner=inner,
                                      output=cross, depth=DEPTH))

    for index, name in enumerate(unet.attn_processors):
        attention = _attention(unet, name)
        hidden = attention.to_q.out_features
        is_cross = name.endswith("attn2.processor")
        if lora_rank:
            kv_in = attention.to_k.in_features  # cross for attn2, hidden for attn1
            for proj, (fan_in, fan_out) in {"to_q": (attention.to_q.in_features, hidden), "to_k": (kv_in, hidden),
                                            "to_v": (kv_in, hidden), "to_out": (hidden, attention.to_out[0].out_features)}.items():
                state[f"ip_adapter.{index}.{proj}_lora.down.weight"] = rand(lora_rank, fan_in, std=0.3)
                state[f"ip_adapter.{index}.{proj}_lora.up.weight"] = rand(fan_out, lora_rank, std=0.3)
        if is_cross:
            state[f"ip_adapter.{index}.to_k_ip.weight"] = rand(attention.to_k.out_features, cross, std=0.3)
            state[f"ip_adapter.{index}.to_v_ip.weight"] = rand(attention.to_v.out_features, cross, std=0.3)
    return state


def save_tiny_faceid(unet, root: Path, clip_hidden: int = 32, lora_rank: int | None = 4,
                     weight_name: str = WEIGHT_NAME) -> Path:
    """Writes root/ip-adapter-faceid-plusv2_sdxl.safetensors; returns the file's path.

    `clip_hidden` must be the hidden size of the CLIP vision model whose penultimate hidden states are set as
    `clip_embeds` (32 for tests/tiny_ip_adapter.build_tiny_image_encoder)."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = tiny_faceid_plusv2_state_dict(unet, clip_hidden, lora_rank=lora_rank)
    save_file({key: value.contiguous() for key, value in state.items()}, root / weight_name)
    return root / weight_name
