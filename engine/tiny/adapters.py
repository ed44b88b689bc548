"""Tiny random IP-Adapter, InstantID and FaceID-Plus-v2 files for the tiny SDXL, in their published layouts.

Where the layouts come from:

* h94/IP-Adapter `sdxl_models/ip-adapter_sdxl_vit-h.safetensors`: `image_proj.proj.{weight,bias}`
  (num_tokens * cross_attention_dim x CLIP projection_dim), `image_proj.norm.{weight,bias}`, and
  `ip_adapter.{k}.to_k_ip.weight` / `to_v_ip.weight` (inner dim x cross_attention_dim) for every
  cross-attention layer, k = its index in `unet.attn_processors` order (odd: attn1, attn2 alternate).
  The CLIP ViT-H image encoder sits in models/image_encoder as a CLIPVisionModelWithProjection.
* `ip-adapter-plus_sdxl_vit-h`: `image_proj.latents` (1, queries, dim), then IP-Adapter's Resampler
  (`resampler_state_dict`), the ip_adapter.* keys as in the plain layout.
* InstantX/InstantID `ip-adapter.bin` (read in github.com/InstantID/InstantID at 2145b67): {"image_proj": Resampler(
  dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=cross), "ip_adapter": the
  to_k_ip / to_v_ip of every attn2}; written here flattened with `image_proj.` / `ip_adapter.` prefixes into
  ip-adapter.safetensors, the form `refgen weights convert instantid` writes. IdentityNet is a plain SDXL
  ControlNet in ControlNetModel/.
* h94/IP-Adapter-FaceID `ip-adapter-faceid-plusv2_sdxl.bin`: ProjPlusModel (`image_proj.proj.{0,2}`,
  `image_proj.norm`, `image_proj.perceiver_resampler.*`), to_k_ip / to_v_ip of every attn2, and LoRA keys
  `ip_adapter.{k}.to_{q,k,v,out}_lora.{down,up}.weight` for every attention layer (attn1 and attn2);
  flattened into ip-adapter-faceid-plusv2_sdxl.safetensors.

dim_head is fixed at 64 (diffusers infers heads = to_q rows // 64); sizes are shrunk, names and shape rules kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

IP_ADAPTER_FILES = (
    "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
    "models/image_encoder/config.json",
    "models/image_encoder/model.safetensors",
)
IP_NUM_TOKENS = 4
INSTANTID_WEIGHT_NAME = "ip-adapter.bin"
INSTANTID_SAFE_WEIGHT_NAME = "ip-adapter.safetensors"
IDENTITYNET_FOLDER = "ControlNetModel"
INSTANTID_FILES = (INSTANTID_SAFE_WEIGHT_NAME, f"{IDENTITYNET_FOLDER}/config.json",
                   f"{IDENTITYNET_FOLDER}/diffusion_pytorch_model.safetensors")
INSTANTID_QUERIES = 16
FACE_EMBEDDING_DIM = 512  # insightface's ArcFace embedding
RESAMPLER_DEPTH = 4
DIM_HEAD = 64
FACEID_WEIGHT_NAME = "ip-adapter-faceid-plusv2_sdxl.safetensors"
FACEID_NUM_TOKENS = 4


def _random(generator: torch.Generator):
    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    return rand


def _cross_attentions(unet):
    """(index in unet.attn_processors, attention module) of every attn2: the keys' k."""
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            yield index, unet.get_submodule(name[: -len(".processor")])


def _save(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


# ------------------------------------------------------------------------------------ IP-Adapter


def build_tiny_image_encoder(seed: int = 20):
    """A tiny CLIP ViT image encoder (CLIPVisionModelWithProjection, as ViT-H is)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=24)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_ip_adapter_state_dict(unet, clip_dim: int, seed: int = 21) -> dict[str, torch.Tensor]:
    rand = _random(torch.Generator().manual_seed(seed))
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": rand(IP_NUM_TOKENS * cross, clip_dim),
        "image_proj.proj.bias": rand(IP_NUM_TOKENS * cross, std=0.05),
        "image_proj.norm.weight": 1 + rand(cross, std=0.1),
        "image_proj.norm.bias": rand(cross, std=0.1),
    }
    for index, attention in _cross_attentions(unet):
        state[f"ip_adapter.{index}.to_k_ip.weight"] = rand(attention.to_k.out_features, cross, std=0.3)
        state[f"ip_adapter.{index}.to_v_ip.weight"] = rand(attention.to_v.out_features, cross, std=0.3)
    return state


def resampler_state_dict(prefix: str, rand, clip_hidden: int, width: int, inner: int, output: int,
                         depth: int = RESAMPLER_DEPTH) -> dict:
    """IP-Adapter's Resampler (perceiver over image features) in its published key layout: proj_in,
    proj_out, norm_out and `depth` layers of [PerceiverAttention, FeedForward], no biases on their linears."""
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


def tiny_ip_adapter_plus_state_dict(unet, clip_hidden: int, seed: int = 22, dim: int = 64,
                                    queries: int = 4) -> dict[str, torch.Tensor]:
    """ip-adapter-plus_sdxl_vit-h, shrunk (real: dim 1280, 20 heads, 16 queries, CLIP hidden 1280, out 2048)."""
    rand = _random(torch.Generator().manual_seed(seed))
    state = {"image_proj.latents": rand(1, queries, dim, std=1.0)}
    state.update(resampler_state_dict("image_proj", rand, clip_hidden, width=dim, inner=dim,
                                      output=unet.config.cross_attention_dim))
    plain = tiny_ip_adapter_state_dict(unet, clip_dim=1, seed=seed + 1)
    state.update({key: value for key, value in plain.items() if key.startswith("ip_adapter.")})
    return state


def save_tiny_ip_adapter(unet, root: Path) -> Path:
    """root/sdxl_models/ip-adapter_sdxl_vit-h.safetensors + root/models/image_encoder, as in the published repo."""
    encoder = build_tiny_image_encoder()
    encoder.save_pretrained(root / "models" / "image_encoder", safe_serialization=True)
    _save(tiny_ip_adapter_state_dict(unet, encoder.config.projection_dim), root / IP_ADAPTER_FILES[0])
    return root


def save_tiny_ip_adapter_plus(unet, root: Path) -> Path:
    """Adds sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors beside the plain one (same image encoder)."""
    from transformers import CLIPVisionConfig

    hidden = CLIPVisionConfig.from_pretrained(root / "models" / "image_encoder").hidden_size
    _save(tiny_ip_adapter_plus_state_dict(unet, hidden), root / IP_ADAPTER_FILES[1])
    return root


def save_tiny_ip_adapters(unet, root: Path) -> Path:
    """Every file of the `ip-adapter-sdxl` entry: both variants and the image encoder."""
    save_tiny_ip_adapter(unet, root)
    return save_tiny_ip_adapter_plus(unet, root)


# -------------------------------------------------------------------------------------- InstantID


def tiny_instantid_state_dict(unet, seed: int = 31, dim: int = 64) -> dict[str, torch.Tensor]:
    """Random weights in the published ip-adapter.bin layout, flattened with `image_proj.` / `ip_adapter.`."""
    rand = _random(torch.Generator().manual_seed(seed))
    cross = unet.config.cross_attention_dim
    inner = max(1, dim // DIM_HEAD) * DIM_HEAD  # heads = dim // 64, as InstantID's 1280 // 64 = 20
    state = {"image_proj.latents": rand(1, INSTANTID_QUERIES, dim, std=1.0)}
    state.update(resampler_state_dict("image_proj", rand, FACE_EMBEDDING_DIM, width=dim, inner=inner, output=cross))
    for index, attention in _cross_attentions(unet):
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
    """root/ip-adapter.safetensors (flat keys), or root/ip-adapter.bin (the nested pickle, as published)."""
    state = {key: value.contiguous() for key, value in tiny_instantid_state_dict(unet, seed=seed).items()}
    if not pickle:
        return _save(state, Path(root) / INSTANTID_SAFE_WEIGHT_NAME)
    Path(root).mkdir(parents=True, exist_ok=True)
    torch.save(nested(state), Path(root) / INSTANTID_WEIGHT_NAME)
    return Path(root) / INSTANTID_WEIGHT_NAME


def save_tiny_identitynet(unet, root: Path, seed: int = 32) -> Path:
    """root/ControlNetModel (config.json + diffusion_pytorch_model.safetensors); returns that folder."""
    from . import save_tiny_controlnet

    return save_tiny_controlnet(unet, Path(root) / IDENTITYNET_FOLDER, seed=seed)


def save_tiny_instantid_folder(unet, root: Path) -> Path:
    """Every file of the `instantid` entry: the face adapter and IdentityNet."""
    save_tiny_instantid(unet, root)
    save_tiny_identitynet(unet, root)
    return root


# ---------------------------------------------------------------------------------- FaceID-Plus-v2


def _faceid_lora(state: dict, rand, index: int, attention, rank: int) -> None:
    hidden = attention.to_q.out_features
    kv_in = attention.to_k.in_features  # cross for attn2, hidden for attn1
    shapes = {"to_q": (attention.to_q.in_features, hidden), "to_k": (kv_in, hidden), "to_v": (kv_in, hidden),
              "to_out": (hidden, attention.to_out[0].out_features)}
    for proj, (fan_in, fan_out) in shapes.items():
        state[f"ip_adapter.{index}.{proj}_lora.down.weight"] = rand(rank, fan_in, std=0.3)
        state[f"ip_adapter.{index}.{proj}_lora.up.weight"] = rand(fan_out, rank, std=0.3)


def tiny_faceid_plusv2_state_dict(unet, clip_hidden: int, id_dim: int = FACE_EMBEDDING_DIM, seed: int = 23,
                                  lora_rank: int | None = 4) -> dict[str, torch.Tensor]:
    """Random weights in the published FaceID-Plus-v2 SDXL layout (real: cross = 2048, 32 heads, LoRA rank 128).
    `lora_rank=None` leaves out the LoRA keys (an adapter-only file)."""
    rand = _random(torch.Generator().manual_seed(seed))
    cross = unet.config.cross_attention_dim  # ProjPlusModel's resampler works at dim = cross_attention_dim
    state = {
        "image_proj.proj.0.weight": rand(2 * id_dim, id_dim, std=0.05),
        "image_proj.proj.0.bias": rand(2 * id_dim, std=0.05),
        "image_proj.proj.2.weight": rand(FACEID_NUM_TOKENS * cross, 2 * id_dim, std=0.05),
        "image_proj.proj.2.bias": rand(FACEID_NUM_TOKENS * cross, std=0.05),
        "image_proj.norm.weight": 1 + rand(cross, std=0.1),
        "image_proj.norm.bias": rand(cross, std=0.1),
    }
    inner = max(1, cross // DIM_HEAD) * DIM_HEAD
    state.update(resampler_state_dict("image_proj.perceiver_resampler", rand, clip_hidden, width=cross, inner=inner,
                                      output=cross))
    for index, name in enumerate(unet.attn_processors):
        attention = unet.get_submodule(name[: -len(".processor")])
        if lora_rank:
            _faceid_lora(state, rand, index, attention, lora_rank)
        if name.endswith("attn2.processor"):
            state[f"ip_adapter.{index}.to_k_ip.weight"] = rand(attention.to_k.out_features, cross, std=0.3)
            state[f"ip_adapter.{index}.to_v_ip.weight"] = rand(attention.to_v.out_features, cross, std=0.3)
    return state


def save_tiny_faceid(unet, root: Path, clip_hidden: int = 32, lora_rank: int | None = 4,
                     weight_name: str = FACEID_WEIGHT_NAME) -> Path:
    """root/ip-adapter-faceid-plusv2_sdxl.safetensors. `clip_hidden`: the hidden size of the image encoder whose
    penultimate states FaceID gets (32: `build_tiny_image_encoder`)."""
    return _save(tiny_faceid_plusv2_state_dict(unet, clip_hidden, lora_rank=lora_rank), Path(root) / weight_name)


# ------------------------------------------------------------------------------------- T2I-Adapter

# TencentARC/t2i-adapter-*-sdxl-1.0: diffusers' T2IAdapter folders (config.json + diffusion_pytorch_model
# [.fp16].safetensors), config `adapter_type: full_adapter_xl`, in_channels 3, channels [320, 640, 1280, 1280],
# num_res_blocks 2, downscale_factor 16; keys `adapter.conv_in.*`, `adapter.body.{i}.[in_conv|resnets.{j}.block{1,2}].*`.
T2I_ADAPTER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
T2I_ADAPTER_NAMES = ("canny", "lineart", "sketch", "depth-midas", "openpose")  # t2i-adapter-{name}-sdxl
T2I_WEIGHT_GAIN = 3.0


def build_tiny_t2i_adapter(unet, seed: int = 40):
    """The same config family shrunk to the tiny UNet: one feature map per down block, each as wide as its block
    (channels = the UNet's block_out_channels), one res block each. Weights scaled up so the features visibly move
    the tiny model's image (a default-initialised adapter barely does, and would prove little)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                         downscale_factor=16, adapter_type="full_adapter_xl")
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.mul_(T2I_WEIGHT_GAIN)
    return adapter.eval()



def save_tiny_t2i_adapter(unet, folder: Path, seed: int = 40) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, as diffusers' save_pretrained writes the published ones."""
    build_tiny_t2i_adapter(unet, seed).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
