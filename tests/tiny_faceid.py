"""A tiny IP-Adapter FaceID-Plus-v2 for the tiny SDXL, in the published h94/IP-Adapter-FaceID layout: the
product's builders (engine/tiny/adapters.py; the tiny model's FaceID stand-in is built the same way).

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

from engine.tiny.adapters import DIM_HEAD  # noqa: F401
from engine.tiny.adapters import FACEID_NUM_TOKENS as NUM_TOKENS  # noqa: F401
from engine.tiny.adapters import FACEID_WEIGHT_NAME as WEIGHT_NAME  # noqa: F401
from engine.tiny.adapters import RESAMPLER_DEPTH as DEPTH  # noqa: F401
from engine.tiny.adapters import save_tiny_faceid, tiny_faceid_plusv2_state_dict  # noqa: F401
