"""engine/quantize.py: int8 / fp8 UNet Linear layers through torchao, on the tiny UNet (fp32, CPU).

Each test loads its own UNet from the tiny model's folder: quantizing is in place, and the session's engine
must keep its fp32 weights.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.testing import CompileCounter

from engine.quantize import QUANTIZATIONS, QuantizeError, quantize_unet

CPU = torch.device("cpu")
# Relative L2 error of the int8 weight-only UNet output vs fp32: measured 3.6e-3 (per-row int8 weights).
INT8_RELATIVE_ERROR = 1.1e-2
# Max abs difference, inductor-compiled (freezing) int8 UNet vs eager int8 UNet: measured 1.7e-6.
INDUCTOR_TOLERANCE = 1e-4


@pytest.fixture
def unet(tiny_model_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval().requires_grad_(False)


@pytest.fixture
def fresh_dynamo():
    """No graphs from other tests, and none left behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def unet_inputs(unet: UNet2DConditionModel, seed: int, batch: int = 2, latent: int = 16) -> dict:
    """Random SDXL-shaped UNet inputs for this UNet's config."""
    config, generator = unet.config, torch.Generator().manual_seed(seed)
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, config.in_channels, latent, latent, generator=generator),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, text_embeds, generator=generator),
                              "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)},
    }


@torch.no_grad()
def run(unet: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def linears(unet: UNet2DConditionModel) -> list[torch.nn.Linear]:
    return [module for module in unet.modules() if isinstance(module, torch.nn.Linear)]


def test_int8_stores_every_linear_weight_quantized_and_stays_close_to_fp32(unet):
    inputs = unet_inputs(unet, seed=0)
    reference = run(unet, inputs)
    quantize_unet(unet, "int8", CPU)
    weights = [layer.weight for layer in linears(unet)]
    assert weights and all(type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor
                           and type(weight).__module__.startswith("torchao") for weight in weights)
    assert relative_error(run(unet, inputs), reference) < INT8_RELATIVE_ERROR


def test_an_int8_unet_compiles_to_one_graph_and_recompiles_for_nothing_of_the_same_shape(unet, fresh_dynamo):
    quantize_unet(unet, "int8", CPU)
    counter = CompileCounter()
    unet.compile(backend=counter, fullgraph=True, dynamic=False)  # fullgraph: a graph break would raise
    run(unet, unet_inputs(unet, seed=1))
    assert counter.frame_count == 1
    run(unet, unet_inputs(unet, seed=2))
    assert counter.frame_count == 1


def test_inductor_compiles_an_int8_unet_on_the_cpu_and_matches_eager(unet, fresh_dynamo):
    quantize_unet(unet, "int8", CPU)
    inputs = unet_inputs(unet, seed=3)
    eager = run(unet, inputs)
    unet.compile(fullgraph=True, dynamic=False, options={"freezing": True})
    assert (run(unet, inputs) - eager).abs().max().item() <= INDUCTOR_TOLERANCE


def test_fp8_on_a_cpu_is_refused_with_the_hardware_it_needs_and_int8_as_the_way_out(unet):
    with pytest.raises(QuantizeError, match=r"compute capability 8\.9.*int8"):
        quantize_unet(unet, "fp8", CPU)
    assert all(type(layer.weight) is torch.nn.Parameter for layer in linears(unet))  # nothing half-done


@pytest.mark.parametrize("kind", ["int4", "fp16", ""])
def test_an_unknown_quantization_is_refused(unet, kind):
    assert kind not in QUANTIZATIONS
    with pytest.raises(QuantizeError, match="int8, fp8"):
        quantize_unet(unet, kind, CPU)
