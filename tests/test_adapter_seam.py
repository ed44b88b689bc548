"""The adapter seam (engine/adapter.py) without models: how patches of several adapters are grouped, ordered and
undone, and how the loop folds contributions it has never heard of."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from engine.adapter import Frame, Prepared, patched
from engine.sampling import _merge

FRAME = Frame(64, 64, batch=1, guided=True)


class Model:
    """A shared model that logs what is applied to it and when it is restored."""

    def __init__(self, name: str, order: int, log: list):
        self.name, self.order, self.log = name, order, log

    @contextmanager
    def applied(self, patches: list):
        self.log.append((self.name, "on", tuple(patches)))
        try:
            yield (f"{self.name}-guidance",)
        finally:
            self.log.append((self.name, "off"))


class Patching(Prepared):
    def __init__(self, *pairs):
        self.pairs = list(pairs)

    def patches(self, frame: Frame) -> list:
        return self.pairs


def test_patches_of_one_model_are_applied_together_in_order_and_undone_when_the_generation_raises():
    log: list = []
    ip, loras = Model("ip", 0, log), Model("loras", 1, log)
    character, references = Patching((ip, "face"), (loras, "faceid lora")), Patching((ip, "style"), (ip, "content"))
    with pytest.raises(RuntimeError):
        with patched([character, references], FRAME, (loras, "request loras")) as guidance:
            assert guidance == ("ip-guidance", "loras-guidance")
            raise RuntimeError("half-way")
    assert log == [("ip", "on", ("face", "style", "content")), ("loras", "on", ("request loras", "faceid lora")),
                   ("loras", "off"), ("ip", "off")]


def test_residuals_the_loop_does_not_know_are_summed_too():
    """A T2I-Adapter's down_intrablock_additional_residuals add up like ControlNet residuals."""
    kwargs = {"added_cond_kwargs": {"text_embeds": 0}}
    one, two = [torch.ones(1), torch.ones(2)], [torch.full((1,), 2.0), torch.full((2,), 3.0)]
    _merge(kwargs, {"down_intrablock_additional_residuals": one, "added_cond_kwargs": {"image_embeds": [1]}})
    _merge(kwargs, {"down_intrablock_additional_residuals": two, "mid_block_additional_residual": torch.ones(1)})
    assert [t.tolist() for t in kwargs["down_intrablock_additional_residuals"]] == [[3.0], [4.0, 4.0]]
    assert kwargs["added_cond_kwargs"] == {"text_embeds": 0, "image_embeds": [1]}
    assert kwargs["mid_block_additional_residual"].tolist() == [1.0]
