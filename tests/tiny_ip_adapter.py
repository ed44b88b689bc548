"""A tiny IP-Adapter for the tiny SDXL, saved in the published h94/IP-Adapter layout.

Layout (h94/IP-Adapter, sdxl_models/ip-adapter_sdxl_vit-h.safetensors): `image_proj.proj.{weight,bias}`
(num_tokens * cross_attention_dim x clip projection_dim), `image_proj.norm.{weight,bias}`, and
`ip_adapter.{k}.to_k_ip.weight` / `to_v_ip.weight` (inner dim x cross_attention_dim) for every
cross-attention layer, k = its index in `unet.attn_processors` order (odd: attn1, attn2 alternate).
The CLIP ViT-H image encoder sits in models/image_encoder as a CLIPVisionModelWithProjection.
"""

from __future__ import annotations

from pathlib import Path

import torch

NUM_TOKENS = 4


def build_tiny_image_encoder(seed: int = 20):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=24)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_ip_adapter_state_dict(unet, clip_dim: int, seed: int = 21) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(NUM_TOKENS * cross, clip_dim, generator=generator) * 0.2,
        "image_proj.proj.bias": torch.randn(NUM_TOKENS * cross, generator=generator) * 0.05,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=generator),
        "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=generator),
    }
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name[: -len(".processor")])
            inner = attention.to_k.out_features
            state[f"ip_adapter.{index}.to_k_ip.weight"] = torch.randn(inner, cross, generator=generator) * 0.3
            state[f"ip_adapter.{index}.to_v_ip.weight"] = torch.randn(inner, cross, generator=generator) * 0.3
    return state


def save_tiny_ip_adapter(unet, root: Path) -> Path:
    """root/sdxl_models/ip-adapter_sdxl_vit-h.safetensors + root/models/image_encoder, like the published repo."""
    from safetensors.torch import save_file

    encoder = build_tiny_image_encoder()
    encoder.save_pretrained(root / "models" / "image_encoder", safe_serialization=True)
    (root / "sdxl_models").mkdir(parents=True, exist_ok=True)
    state = tiny_ip_adapter_state_dict(unet, encoder.config.projection_dim)
    save_file(state, root / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors")
    return root


def tiny_ip_adapter_plus_state_dict(unet, clip_hidden: int, seed: int = 22, dim: int = 64, queries: int = 4) -> dict[str, torch.Tensor]:
    """The published ip-adapter-plus_sdxl_vit-h layout (tencent-ailab IP-Adapter's Resampler), shrunk.

    `image_proj.latents` (1, queries, dim), `proj_in`, `proj_out`, `norm_out`, and 4 layers of
    [PerceiverAttention: norm1, norm2, to_q, to_kv, to_out (64-wide heads, no biases),
     FeedForward: 0 = LayerNorm, 1 and 3 = Linear (no biases), 4x wide]; the ip_adapter.* keys as
    in the plain layout. Sizes of SDXL plus: dim 1280, 20 heads, 16 queries, CLIP hidden 1280, out 2048.
    """
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    state = {"image_proj.latents": rand(1, queries, dim, std=1.0)}
    state.update(resampler_state_dict("image_proj", rand, clip_hidden, width=dim, inner=dim, output=cross))
    plain = tiny_ip_adapter_state_dict(unet, clip_dim=1, seed=seed + 1)
    state.update({key: value for key, value in plain.items() if key.startswith("ip_adapter.")})
    return state


def resampler_state_dict(prefix: str, rand, clip_hidden: int, width: int, inner: int, output: int, depth: int = 4) -> dict:
    """IP-Adapter's Resampler (perceiver over CLIP hidden states) in its published key layout:
    proj_in, proj_out, norm_out and `depth` layers of [PerceiverAttention, FeedForward] with no biases
    on the attention and FF linears. Shared by the plus and FaceID-Plus-v2 builders."""
    state = {
        f"{prefix}.proj_in.weight": rand(width, clip_hidden), f"{prefix}.proj_in.bias": rand(width, std=0.05),
        f"{prefix}.proj_out.weight": rand(output, width), f"{prefix}.proj_out.bias": rand(output, std=0.05),
        f"{prefix}.norm_out.weight": 1 + rand(output, std=0.1), f"{prefix}.norm_out.bias": rand(output, std=0.1),
    }
    for layer in range(depth):
        block = f"{prefix}.layers.{layer}"
        for norm in ("norm1", "norm2"):
            state[f"{block}.0.{norm}.weight"] = 1 + rand(width, std=0.1)
            state[f"{block}.0.{norm}.bias"] = rand(width, std=0.1)
        state[f"{block}.0.to_q.weight"] = rand(inner, width)
        state[f"{block}.0.to_kv.weight"] = rand(2 * inner, width)
        state[f"{block}.0.to_out.weight"] = rand(width, inner)
        state[f"{block}.1.0.weight"] = 1 + rand(width, std=0.1)
        state[f"{block}.1.0.bias"] = rand(width, std=0.1)
        state[f"{block}.1.1.weight"] = rand(4 * width, width)
        state[f"{block}.1.3.weight"] = rand(width, 4 * width)
    return state


def save_tiny_ip_adapter_plus(unet, root: Path) -> Path:
    """Adds sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors beside the plain one (same image encoder)."""
    from safetensors.torch import save_file

    from transformers import CLIPVisionConfig

    hidden = CLIPVisionConfig.from_pretrained(root / "models" / "image_encoder").hidden_size
    save_file(tiny_ip_adapter_plus_state_dict(unet, hidden), root / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    return root


def fresh_pipe(model_dir):
    """diffusers' own SDXL pipeline on the tiny weights, with no adapter loaded yet."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_np(pipe, **kwargs):
    """A fixed 64x64, 2-step, seed-7 run of `pipe` (an adapter's effect is the only difference)."""
    return pipe("a portrait", negative_prompt="", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(7), **kwargs).images


def resampler_keys(prefix: str, depth: int) -> set[str]:
    """The key names of IP-Adapter's Resampler layout (without `latents`: FaceID's has none), for layout tests."""
    keys = {f"{prefix}.{m}.{p}" for m in ("proj_in", "proj_out", "norm_out") for p in ("weight", "bias")}
    for layer in range(depth):
        block = f"{prefix}.layers.{layer}"
        keys |= {f"{block}.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
        keys |= {f"{block}.0.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
        keys |= {f"{block}.1.0.weight", f"{block}.1.0.bias", f"{block}.1.1.weight", f"{block}.1.3.weight"}
    return keys
