"""A tiny stand-in for `jonathandinu/face-parsing` (the character mask's parser, adapters/face_parsing.py): a
random-weight SegFormer with the published config's layout (same depths, attention heads, reduction ratios, patch
sizes and strides, so the same state-dict keys; only the widths are tiny) and the published classes, saved with
save_pretrained (safetensors) beside a SegformerImageProcessor: the files of the manifest's `face-parsing` entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# jonathandinu/face-parsing config.json, as published (the architecture and label fields).
PUBLISHED_CONFIG = {
    "architectures": ["SegformerForSemanticSegmentation"],
    "depths": [3, 6, 40, 3],
    "hidden_sizes": [64, 128, 320, 512],
    "decoder_hidden_size": 768,
    "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": [8, 4, 2, 1],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
    "image_size": 224,
    "semantic_loss_ignore_index": 255,
    "reshape_last_stage": True,
    "id2label": {
        "0": "background", "1": "skin", "2": "nose", "3": "eye_g", "4": "l_eye", "5": "r_eye", "6": "l_brow",
        "7": "r_brow", "8": "l_ear", "9": "r_ear", "10": "mouth", "11": "u_lip", "12": "l_lip", "13": "hair",
        "14": "hat", "15": "ear_r", "16": "neck_l", "17": "neck", "18": "cloth",
    },
}
# Only the widths differ (hidden sizes divisible by the published head counts): same keys, tiny tensors.
TINY_WIDTHS = {"hidden_sizes": [8, 8, 10, 8], "decoder_hidden_size": 8}
# The published preprocessor: 512x512 bilinear resize, rescale, ImageNet mean/std, labels not reduced.
PROCESSOR_SETTINGS = {
    "do_resize": True, "size": {"height": 512, "width": 512}, "resample": 2, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_reduce_labels": False,
}


def _config_kwargs(widths: Optional[dict] = None) -> dict:
    kwargs = {key: value for key, value in PUBLISHED_CONFIG.items() if key != "id2label"}
    id2label = {int(k): v for k, v in PUBLISHED_CONFIG["id2label"].items()}
    kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))
    kwargs.update(widths or {})
    return kwargs


def full_config():
    """The published architecture (mit-b5 encoder, 768-wide decoder, 19 classes)."""
    from transformers import SegformerConfig

    return SegformerConfig(**_config_kwargs())


def tiny_config():
    from transformers import SegformerConfig

    return SegformerConfig(**_config_kwargs(TINY_WIDTHS))


def save_tiny_face_parser(folder: Path, seed: int = 0, constant_class: Optional[int] = None) -> Path:
    """config.json, model.safetensors and preprocessor_config.json in `folder`. `constant_class`: zero the
    classifier and bias it to that class, so every pixel parses as it (tests)."""
    import torch
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(tiny_config()).eval()
    if constant_class is not None:
        with torch.no_grad():
            model.decode_head.classifier.weight.zero_()
            model.decode_head.classifier.bias.zero_()
            model.decode_head.classifier.bias[constant_class] = 10.0
    model.save_pretrained(folder, safe_serialization=True)
    SegformerImageProcessor(**PROCESSOR_SETTINGS).save_pretrained(folder)
    return Path(folder)
