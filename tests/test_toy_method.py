"""A method defined here, outside the package, registers and passes the whole contract.

``toy_norm`` keeps, from ``start_block`` on, the patches whose features have the largest norm
(a stand-in for a user's own scoring rule) and drops the rest once. Nothing in ``tokenpatch/``
knows about it: registering it is all it takes for patch, unpatch, set_keep_ratio, save/load,
trace, MAC counting and budgets, fine-tuning, explanation, pickling and threads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from torch import Tensor

import tokenpatch
from tokenpatch.core.blocks import BlockView
from tokenpatch.core.method import check_block
from tokenpatch.core.ops import top_k_positions
from tokenpatch.core.pieces import full_block, keep_tokens
from tokenpatch.core.state import PassState
from tokenpatch.measure.flops import count_macs
from tokenpatch.training import FinetuneConfig, finetune

from conftest import case_id, images, make_model
from method_contract import MethodContract


@dataclasses.dataclass
class NormConfig(tokenpatch.MethodConfig):
    """Options of the toy: keep ``keep_ratio`` of the patches, once, at ``start_block``."""

    keep_ratio: float = 0.5
    start_block: int = 1

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_block("start_block", self.start_block, depth)


@dataclasses.dataclass
class NormState:
    """Per pass: whether the toy has dropped its tokens yet."""

    dropped: bool = False


class NormPrune(tokenpatch.Method[NormConfig, NormState]):
    name = "toy_norm"
    summary = "toy: keep the patches with the largest feature norm"
    config_class = NormConfig
    variants = {"late": {"start_block": 2}}

    def schedule(self, config: NormConfig, depth: int) -> list[Optional[float]]:
        return [None] * config.start_block + [config.keep_ratio] * (depth - config.start_block)

    def start_pass(self, config: NormConfig) -> NormState:
        return NormState()

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[NormState], block: int, ratio: float,
                     config: NormConfig) -> Tensor:
        if not state.own.dropped:
            p = state.num_prefix
            keep = max(1, math.ceil(ratio * (x.shape[1] - p)))
            kept, index = keep_tokens(x, state, top_k_positions(x[:, p:].norm(dim=-1), keep))
            state.select(index, x)
            x = kept
            state.own.dropped = True
        state.record(block, x.shape[1], x.shape[1])
        return full_block(view, x, state.positions)


@pytest.fixture(scope="module", autouse=True)
def registered():
    tokenpatch.register_method(NormPrune)
    yield
    tokenpatch.unregister_method("toy_norm")


class TestToyMethod(MethodContract):
    @pytest.fixture(params=[("toy_norm", {}), ("toy_norm", NormPrune.variants["late"])], ids=case_id)
    def case(self, request):
        return request.param


def test_the_toy_is_listed_while_registered_and_the_tools_accept_it():
    assert "toy_norm" in tokenpatch.available_methods()
    model = tokenpatch.patch(make_model("deit_tiny"), "toy_norm", keep_ratio=0.5)
    assert count_macs(model).total < count_macs(make_model("deit_tiny")).total
    fit = tokenpatch.set_macs_ratio(model, 0.8)
    assert abs(fit.macs_ratio - 0.8) <= 0.01 * 0.8
    history = finetune(model, [images(model, batch=4)], FinetuneConfig(steps=2), progress=False)
    assert len(history) >= 1 and math.isfinite(history[-1]["loss"])
    explanation = tokenpatch.explain(model, images(model, batch=2))
    assert explanation.computed.shape == (2, 4, 4, 4)
    assert explanation.computed[:, 0].all() and not explanation.computed[:, 1].all()


def test_registering_checks_the_class_and_refuses_a_taken_name():
    class Nameless(NormPrune):
        name = "not an identifier"

    class Impostor(NormPrune):
        name = "idle"

    for bad, message in ((Nameless, "must be an identifier"), (Impostor, "already registered"),
                         (dict, "expects a Method subclass")):
        with pytest.raises(tokenpatch.InvalidOptionError, match=message):
            tokenpatch.register_method(bad)
    assert type(tokenpatch.core.registry.get_method("idle")).__name__ == "Idle"


def test_torch_flags_the_toys_reduced_pass_as_cheaper_per_block():
    model = tokenpatch.patch(make_model("deit_tiny"), "toy_norm", keep_ratio=0.25)
    with tokenpatch.trace(model) as t, torch.no_grad():
        model(images(model))
    assert t.tokens_per_block == [17, 5, 5, 5]  # 4 of 16 patches plus the class token from block 1 on
