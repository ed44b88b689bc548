"""The published SDXL base 1.0 architecture (configs of stabilityai/stable-diffusion-xl-base-1.0).

Used to check shapes on the meta device and to build full-size random-weight models for GPU
benchmarks: random weights cost exactly the FLOPs of real ones.
"""

from __future__ import annotations

SDXL_UNET_PARAMETERS = 2_567_463_684

SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def build_sdxl_unet_on_meta():
    """The full SDXL UNet with no memory behind its weights (for shape and parameter checks)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


# -- the rest of SDXL base 1.0 (vae/, text_encoder/, text_encoder_2/, scheduler/ config.json) --------

SDXL_VAE_PARAMETERS = 83_653_863
SDXL_TEXT_ENCODER_PARAMETERS = 123_060_480
SDXL_TEXT_ENCODER_2_PARAMETERS = 694_659_840

SDXL_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text tower (text_encoder/config.json, a CLIPTextModel).
SDXL_TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14 text tower (text_encoder_2/config.json, a CLIPTextModelWithProjection).
SDXL_TEXT_ENCODER_2_CONFIG = {
    **SDXL_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# scheduler/scheduler_config.json (EulerDiscreteScheduler); the tiny model samples with it too.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}


def _text_encoder_config(config: dict, tokenizer=None):
    """A CLIPTextConfig from one of the dicts above; special token ids follow `tokenizer` when given
    (the real ids 0/1/2 assume the real 49408-token vocabulary)."""
    from transformers import CLIPTextConfig

    values = dict(config)
    if tokenizer is not None:
        values["bos_token_id"] = tokenizer.bos_token_id
        values["eos_token_id"] = tokenizer.eos_token_id
        values["pad_token_id"] = tokenizer.pad_token_id
    return CLIPTextConfig(**values)


def build_sdxl_modules_on_meta(tokenizer=None) -> dict:
    """unet, vae, text_encoder, text_encoder_2 at full size on the meta device (no memory, instant)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(_text_encoder_config(SDXL_TEXT_ENCODER_CONFIG, tokenizer)),
            "text_encoder_2": CLIPTextModelWithProjection(_text_encoder_config(SDXL_TEXT_ENCODER_2_CONFIG, tokenizer)),
        }


def _materialize(module, device, dtype, generator):
    """Give a meta-device module real storage on `device` in `dtype` and random weights, in place.

    The init keeps activations O(1) through the whole network so that fp16 stays finite:
    weights ~ N(0, 1/fan_in) (variance preserving; the last UNet/VAE convs follow group norms),
    embeddings N(0, 0.02^2), biases 0, norm scales 1. Random weights cost the same FLOPs as real ones.
    """
    import math

    import torch
    from torch import nn

    module.to(dtype=dtype)  # on meta: free, and the storage is then allocated once, in `dtype`
    module.to_empty(device=device)
    with torch.no_grad():
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            bias = getattr(sub, "bias", None)
            if isinstance(sub, (nn.LayerNorm, nn.GroupNorm)):
                if weight is not None:
                    weight.fill_(1.0)
                if bias is not None:
                    bias.zero_()
            elif isinstance(sub, nn.Embedding):
                weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(sub, (nn.Linear, nn.Conv2d)):
                fan_in = weight[0].numel()
                weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
                if bias is not None:
                    bias.zero_()
            elif list(sub.parameters(recurse=False)):
                raise TypeError(f"no init rule for {type(sub).__name__}")
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):  # CLIP's non-persistent arange buffer
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
            else:
                raise TypeError(f"no init rule for buffer {name}")
    return module.eval().requires_grad_(False)


def build_random_sdxl_pipeline(device="cuda", dtype=None, seed: int = 0):
    """A StableDiffusionXLPipeline with SDXL base 1.0's full-size architecture and random weights.

    Built on the meta device and materialised directly on `device` in `dtype` (fp16 on CUDA by
    default): the 2.6 B-parameter UNet is never initialised in fp32 on the CPU. The tokenizer is
    engine/tiny.py's byte-level one (ids < 514 < 49408): the compute per image is SDXL's. With
    device="meta" nothing is allocated (shape and parameter checks).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from .tiny.tokenizer import build_tiny_tokenizer

    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    tokenizer = build_tiny_tokenizer()
    modules = build_sdxl_modules_on_meta(tokenizer)
    if device.type != "meta":
        generator = torch.Generator(device).manual_seed(seed)
        for module in modules.values():
            _materialize(module, device, dtype, generator)
    return StableDiffusionXLPipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
