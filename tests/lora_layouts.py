"""Write tiny SDXL LoRA files in the two layouts LoRAs are published in.

Test helper. One set of random LoRA factors (``random_lora``) can be written in either layout,
so a test can check that both files mean the same thing to a loader, not only that they load.
Both ``lora_down``/``lora_A`` AND ``lora_up``/``lora_B`` are random and non-zero: a trainer's
initial zero ``lora_up`` would make every LoRA a no-op and every test pass.

Targets (which layers carry a LoRA) are those of kohya's default ``networks.lora`` network,
which diffusers' training scripts also target in the attention layers:

* UNet: every ``nn.Linear`` inside a ``Transformer2DModel`` (kohya's
  ``UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]``): ``proj_in``, ``proj_out`` and, per
  transformer block, ``attn1``/``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0``,
  ``ff.net.0.proj`` and ``ff.net.2``.
* each CLIP text encoder: ``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1``/``mlp.fc2``
  (kohya's ``TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPMLP"]``).

Layout 1 -- diffusers / peft (``write_diffusers_lora``)
    What ``StableDiffusionXLPipeline.save_lora_weights`` writes for adapters made with peft (the
    way diffusers' own LoRA tests and ``pipe.save_lora_weights(unet_lora_layers=
    get_peft_model_state_dict(pipe.unet), ...)`` produce it): a peft ``LoraConfig`` adapter is added
    to the UNet and the text encoders, its factors are set, ``peft.get_peft_model_state_dict``
    collects them and ``save_lora_weights`` packs them under ``unet.`` / ``text_encoder.`` /
    ``text_encoder_2.``::

        unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
        unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
        text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
        text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight

    with each adapter's ``LoraConfig`` (r, lora_alpha, target_modules) in the safetensors header
    (``lora_adapter_metadata``), as save_lora_weights stores it when given
    ``*_lora_adapter_metadata``. transformers 5 dropped the ``text_model`` level of
    ``CLIPTextModel`` (not of ``CLIPTextModelWithProjection``); published files, written under
    transformers 4, spell text encoder 1's keys ``text_encoder.text_model.`` and that spelling is
    kept here (diffusers strips it when the module has no ``text_model``).

    Variant ``training_script=True``: what diffusers' ``examples/dreambooth/
    train_dreambooth_lora_sdxl.py`` saves (its ``save_model_hook``: ``convert_state_dict_to_diffusers(
    get_peft_model_state_dict(model))`` then ``save_lora_weights``, attention layers only, no
    metadata): ``unet.….attn1.to_q.lora.down.weight`` / ``.lora.up.weight`` and
    ``text_encoder.….q_proj.lora_linear_layer.down.weight`` / ``.up.weight``.

Layout 2 -- kohya-ss sd-scripts (``write_kohya_lora``)
    What sd-scripts' ``networks/lora.py`` saves for SDXL and what model sites publish. kohya
    trains SDXL on its own copy of Stability's original ("SGM") UNet
    (``library/sdxl_original_unet.py``), so UNet LoRA names are SGM module paths with dots
    turned into underscores (``LoRANetwork.LORA_PREFIX_UNET = "lora_unet"``); text encoders are
    ``lora_te1`` (CLIP ViT-L) and ``lora_te2`` (OpenCLIP bigG, as a HF CLIPTextModel)::

        lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight     (r, in)
        lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight       (out, r)
        lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha                0-dim
        lora_unet_middle_block_1_proj_in.lora_down.weight
        lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2.lora_up.weight
        lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
        lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha

    The applied delta is ``lora_up @ lora_down * alpha / rank``. Weights are usually saved in
    fp16 (``--save_precision fp16``) with ``ss_*`` training metadata in the header.

    SGM block numbering (``sgm_block_name``), derived from the UNet config: ``input_blocks.0`` is
    conv_in; then each down level contributes ``layers_per_block`` blocks ``[resnet(.0),
    transformer(.1)]`` plus one downsampler block (``.0.op``) except the last level;
    ``middle_block.{0,1,2}`` = resnet, transformer, resnet; each up level contributes
    ``layers_per_block + 1`` blocks ``[resnet(.0), transformer(.1), upsampler(.2, or .1 without
    transformer)]``. For the tiny UNet (levels DownBlock2D, CrossAttnDownBlock2D, 2 layers each):
    ``down_blocks.1.attentions.{0,1}`` -> ``input_blocks.{4,5}.1``, ``mid_block.attentions.0`` ->
    ``middle_block.1``, ``up_blocks.0.attentions.{0,1,2}`` -> ``output_blocks.{0,1,2}.1``.
    diffusers' ``loaders/lora_conversion_utils.py`` (``_maybe_map_sgm_blocks_to_diffusers``,
    ``_convert_non_diffusers_lora_to_diffusers``, ``_convert_unet_lora_key``) is the inverse it
    applies on load; the code here is written from the SGM model definition, not from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# What diffusers' train_dreambooth_lora_sdxl.py trains: attention projections only.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Factors:
    """One LoRA layer: delta W = up @ down * alpha / rank."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float


# component -> diffusers module name (relative to the component, text_model. spelled out) -> factors
LoraWeights = dict[str, dict[str, Factors]]


def target_modules(pipe) -> dict[str, dict[str, torch.nn.Linear]]:
    """The layers a kohya-default LoRA trains, per component, by diffusers module name.

    Text encoder names always start with ``text_model.`` (the published spelling)."""
    found: dict[str, dict[str, torch.nn.Linear]] = {}
    unet_layers = {}
    for block_name, block in pipe.unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(UNET_TARGETS):
                unet_layers[f"{block_name}.{name}"] = module
    found["unet"] = unet_layers
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component)
        layers = {}
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_TARGETS:
                layers[name if name.startswith("text_model.") else f"text_model.{name}"] = module
        found[component] = layers
    return found


def random_lora(
    pipe,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    strength: float = 1.0,
    components: tuple[str, ...] = COMPONENTS,
    only: tuple[str, ...] | None = None,
) -> LoraWeights:
    """Random non-zero factors for every target layer of `pipe`.

    Values are rounded to fp16 so an fp16 kohya file and an fp32 diffusers file hold the same
    numbers. `strength` scales the delta relative to the layer's own weights (~1 = a LoRA as
    strong as the layer), so the LoRA visibly changes the image without blowing it up.
    `only` keeps the layers whose names end with one of these (e.g. ATTENTION_TARGETS)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    weights: LoraWeights = {}
    for component, layers in target_modules(pipe).items():
        if component not in components:
            continue
        weights[component] = {}
        for name, layer in sorted(layers.items()):
            if only is not None and not name.endswith(tuple("." + suffix for suffix in only)):
                continue
            out_features, in_features = layer.weight.shape
            layer_std = float(layer.weight.detach().float().std())
            down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            # std(up @ down * alpha / rank) = strength * std(layer weight)
            up = torch.randn(out_features, rank, generator=generator) * (strength * layer_std * (rank * in_features) ** 0.5 / alpha)
            weights[component][name] = Factors(_fp16_exact(down), _fp16_exact(up), float(alpha))
    return weights


def _fp16_exact(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half().float()


# -- layout 1: diffusers / peft --------------------------------------------------------------


def write_diffusers_lora(pipe, weights: LoraWeights, path: Path, *, training_script: bool = False) -> Path:
    """Save `weights` in diffusers' layout (see module docstring).

    training_script=True writes what diffusers' ``train_dreambooth_lora_sdxl.py`` saves (and many
    diffusers-trained SDXL LoRAs on the Hub hold): the peft state dict passed through
    ``convert_state_dict_to_diffusers`` first (``….to_q.lora.down.weight``,
    ``….q_proj.lora_linear_layer.up.weight``), no adapter metadata (so alpha == rank: the
    alpha / rank scale is folded into the up factors). Use it with attention-only weights
    (``only=ATTENTION_TARGETS``), what that script trains.

    Works on throw-away copies of the components: `pipe` itself is left without adapters."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    layers, metadata = {}, {}
    for component, factors in weights.items():
        module = copy.deepcopy(getattr(pipe, component))
        module_names = {name: _module_name(module, name) for name in factors}
        ranks = {f.down.shape[0] for f in factors.values()}
        alphas = {f.alpha for f in factors.values()}
        assert len(ranks) == 1 and len(alphas) == 1, "one rank and alpha per component"
        rank, alpha = ranks.pop(), alphas.pop()
        # Short target names, as the training scripts write them (["to_q", "to_k", ...]).
        suffixes = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        targets = sorted({next(s for s in suffixes if name.endswith("." + s)) for name in factors})
        config = LoraConfig(r=rank, lora_alpha=rank if training_script else alpha, init_lora_weights=True, target_modules=targets)
        module.add_adapter(config)
        up_scale = alpha / rank if training_script else 1.0
        with torch.no_grad():
            for name, f in factors.items():
                lora_layer = module.get_submodule(module_names[name])
                lora_layer.lora_A["default"].weight.copy_(f.down)
                lora_layer.lora_B["default"].weight.copy_(f.up * up_scale)
        state = get_peft_model_state_dict(module)
        if training_script:
            state = convert_state_dict_to_diffusers(state)
        if component != "unet":  # the published spelling of text encoder 1 (see docstring)
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        layers[f"{component}_lora_layers"] = state
        if not training_script:
            metadata[f"{component}_lora_adapter_metadata"] = _jsonable_config(config)
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)
    return path


def _module_name(module: torch.nn.Module, name: str) -> str:
    """Our `text_model.`-prefixed name as the module spells it (transformers 5 CLIPTextModel has no text_model)."""
    if name.startswith("text_model.") and not hasattr(module, "text_model"):
        return name.removeprefix("text_model.")
    return name


def _jsonable_config(config) -> dict:
    data = config.to_dict()
    return json.loads(json.dumps(data, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


# -- layout 2: kohya-ss sd-scripts -----------------------------------------------------------

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def write_kohya_lora(pipe, weights: LoraWeights, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save `weights` as sd-scripts' networks/lora.py does for SDXL (see module docstring)."""
    from safetensors.torch import save_file

    tensors = {}
    for component, factors in weights.items():
        for name, f in factors.items():
            module_path = sgm_module_name(name, pipe.unet.config) if component == "unet" else name
            lora_name = f"{KOHYA_PREFIXES[component]}_{module_path.replace('.', '_')}"
            tensors[f"{lora_name}.lora_down.weight"] = f.down.to(dtype).contiguous()
            tensors[f"{lora_name}.lora_up.weight"] = f.up.to(dtype).contiguous()
            tensors[f"{lora_name}.alpha"] = torch.tensor(f.alpha, dtype=dtype)
    some = next(iter(next(iter(weights.values())).values()))
    header = {  # a subset of what sd-scripts writes (train_network.py: ss_* and modelspec.*)
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(some.down.shape[0]),
        "ss_network_alpha": str(some.alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }
    save_file(tensors, str(path), metadata=header)
    return Path(path)


def sgm_module_name(name: str, unet_config) -> str:
    """diffusers UNet module path -> the same module's path in Stability's original (SGM) UNet.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `input_blocks.4.1.transformer_blocks.0.attn1.to_q`. Inside a block the names are shared
    (transformer internals, proj_in/out); only the block prefix changes."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        prefix, rest = sgm_block_name(parts[0], None, parts[1], int(parts[2]), unet_config), parts[3:]
    else:
        prefix, rest = sgm_block_name(parts[0], int(parts[1]), parts[2], int(parts[3]), unet_config), parts[4:]
    return ".".join([prefix, *rest])


def sgm_block_name(blocks: str, level, kind: str, index: int, unet_config) -> str:
    """(down_blocks|mid_block|up_blocks, level, resnets|attentions|downsamplers|upsamplers, index)
    -> 'input_blocks.N.M' / 'middle_block.N' / 'output_blocks.N.M', counted from the config."""
    levels = len(unet_config.block_out_channels)
    per_level = unet_config.layers_per_block
    per_level = list(per_level) if isinstance(per_level, (list, tuple)) else [per_level] * levels
    if blocks == "down_blocks":
        first = 1 + sum(per_level[i] + 1 for i in range(level))  # input_blocks.0 is conv_in
        if kind == "downsamplers":
            return f"input_blocks.{first + per_level[level]}.0"
        return f"input_blocks.{first + index}.{ {'resnets': 0, 'attentions': 1}[kind] }"
    if blocks == "mid_block":
        return {("resnets", 0): "middle_block.0", ("attentions", 0): "middle_block.1", ("resnets", 1): "middle_block.2"}[(kind, index)]
    if blocks == "up_blocks":
        up_per_level = [n + 1 for n in reversed(per_level)]
        first = sum(up_per_level[i] for i in range(level))
        if kind == "upsamplers":
            has_attention = "CrossAttn" in unet_config.up_block_types[level]
            return f"output_blocks.{first + up_per_level[level] - 1}.{2 if has_attention else 1}"
        return f"output_blocks.{first + index}.{ {'resnets': 0, 'attentions': 1}[kind] }"
    raise KeyError(f"not a UNet block: {blocks}")
