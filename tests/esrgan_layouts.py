"""Tiny random ESRGAN checkpoints in the two published key layouts, and a reference forward pass.

Layouts (the tensor names and shapes a real checkpoint of each kind has; only the sizes shrink):

* Real-ESRGAN / BasicSR `RRDBNet` (xinntao/Real-ESRGAN, basicsr/archs/rrdbnet_arch.py), as in
  RealESRGAN_x4plus.pth / RealESRGAN_x2plus.pth (there nested under `params_ema`):
      conv_first                      (nf, in_ch * u*u, 3, 3)   u = 1 for x4, 2 for x2 (pixel-unshuffle)
      body.{i}.rdb{1,2,3}.conv{1..5}  conv1 nf->gc, conv2 nf+gc->gc, ..., conv5 nf+4gc->nf
      conv_body                       (nf, nf, 3, 3)
      conv_up1, conv_up2              (nf, nf, 3, 3)            always two x2 nearest upsamplings
      conv_hr                         (nf, nf, 3, 3)
      conv_last                       (3, nf, 3, 3)
  x2plus differs from x4plus only by the pixel-unshuffle in front: conv_first takes 12 channels.

* Original ESRGAN (xinntao/ESRGAN, the old `RRDB_ESRGAN_x4.pth` layout built from `B.sequential`):
      model.0                         first conv
      model.1.sub.{i}.RDB{1,2,3}.conv{1..5}.0   RRDB trunk (the `.0` is the conv inside a conv block)
      model.1.sub.{nb}                trunk conv (the shortcut block's last conv)
      x4: model.3, model.6 upconvs, model.8 HR conv, model.10 last conv
      x2: model.3 upconv,           model.5 HR conv, model.7 last conv

Grow channels are 32 in every published checkpoint, and spandrel builds RRDB with gc=32 only.
`realesrgan_state_dict` is engine/tiny.py's (the tiny model's upscaler stand-in uses it too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.tiny import ESRGAN_GROW as GROW  # noqa: F401
from engine.tiny import realesrgan_state_dict  # noqa: F401  (the tiny model's Real-ESRGAN stand-in)


def _conv(generator: torch.Generator, out_ch: int, in_ch: int, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    std = gain / math.sqrt(in_ch * 9)
    weight = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
    bias = torch.randn(out_ch, generator=generator) * 0.01
    return weight, bias


def to_original_esrgan_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under the original ESRGAN `model.N` names (x4 or x2 without unshuffle)."""
    nb = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("body."))
    x2 = "conv_up2.weight" not in sd
    tail = {"conv_up1": "model.3", "conv_hr": "model.5", "conv_last": "model.7"} if x2 else {
        "conv_up1": "model.3", "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", **tail}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        module, kind = key.rsplit(".", 1)
        if module.startswith("body."):
            _, i, rdb, conv = module.split(".")
            out[f"model.1.sub.{i}.RDB{rdb[3:]}.{conv}.0.{kind}"] = tensor
        else:
            out[f"{names[module]}.{kind}"] = tensor
    return out


def original_esrgan_x2_state_dict(nf: int = 8, nb: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """An old-layout x2 ESRGAN (one upconv, 3 input channels, no pixel-unshuffle)."""
    sd = realesrgan_state_dict(scale=4, nf=nf, nb=nb, seed=seed)
    del sd["conv_up2.weight"], sd["conv_up2.bias"]
    return to_original_esrgan_layout(sd)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """BasicSR's RRDBNet.forward written out with torch.nn.functional, for the Real-ESRGAN layout.

    x: (N, 3, H, W) in [0, 1]; returns the raw (unclamped) output.
    """
    def conv(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, 0.2)

    def rdb(prefix: str, t: torch.Tensor) -> torch.Tensor:
        feats = [t]
        for c in range(1, 5):
            feats.append(lrelu(conv(f"{prefix}.conv{c}", torch.cat(feats, 1))))
        return conv(f"{prefix}.conv5", torch.cat(feats, 1)) * 0.2 + t

    nb = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("body."))
    unshuffle = sd["conv_first.weight"].shape[1] // 3
    feat = F.pixel_unshuffle(x, int(math.isqrt(unshuffle))) if unshuffle > 1 else x
    feat = conv("conv_first", feat)
    body = feat
    for i in range(nb):
        block_in = body
        for r in (1, 2, 3):
            body = rdb(f"body.{i}.rdb{r}", body)
        body = body * 0.2 + block_in
    feat = feat + conv("conv_body", body)
    feat = lrelu(conv("conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(conv("conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def compact_state_dict(scale: int = 4, nf: int = 8, num_conv: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3 / realesr-animevideov3 layout):
    body.0 conv 3->nf, body.1 PReLU, then (conv nf->nf, PReLU) x num_conv, last conv nf->3*s*s."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    sd["body.0.weight"], sd["body.0.bias"] = _conv(g, nf, 3)
    sd["body.1.weight"] = torch.full((nf,), 0.25)
    index = 2
    for _ in range(num_conv):
        sd[f"body.{index}.weight"], sd[f"body.{index}.bias"] = _conv(g, nf, nf)
        sd[f"body.{index + 1}.weight"] = torch.full((nf,), 0.25)
        index += 2
    sd[f"body.{index}.weight"], sd[f"body.{index}.bias"] = _conv(g, 3 * scale * scale, nf, 0.3)
    return sd


def sdxl_unet_like_state_dict() -> dict[str, torch.Tensor]:
    """A few tensors named like an SDXL UNet (diffusers layout): certainly no upscaler."""
    return {
        "conv_in.weight": torch.zeros(4, 4, 3, 3),
        "conv_in.bias": torch.zeros(4),
        "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),
        "time_embedding.linear_1.weight": torch.zeros(8, 4),
        "conv_out.weight": torch.zeros(4, 4, 3, 3),
    }
