"""The paths that skip work give the outputs of the paths that do it all.

``idle`` with ``score="fixed"`` keeps its nested selections gathered from block to block and
writes the idle tokens back once; the token-cut loss's training signal still selects from the
whole sequence and writes back in every block, so asking for it runs the long path on the same
weights. Merging methods compute where each patch went only when a trace or a dense output
reads it. Fixed-count methods compile into one graph, so no value leaves the device mid-forward.
"""

import pytest
import torch

import tokenpatch
from tokenpatch.core.runner import collecting

from conftest import METHOD_CASES, case_id, fixed_counts, images, make_family_model, make_model

FAMILIES = {"deit_tiny": lambda: make_model("deit_tiny", depth=6), "avg_pool": lambda: make_model("avg_pool"),
            "registers": lambda: make_model("vit_reg4"), "rope": lambda: make_family_model("rope"),
            "relpos": lambda: make_family_model("relpos")}


def _idle(family: str, **options) -> torch.nn.Module:
    return tokenpatch.patch(FAMILIES[family](), "idle", keep_ratio=0.6, score="fixed", start_block=1, **options)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", ["geometric", "constant"])
def test_idle_working_set_gives_the_outputs_of_writing_back_every_block(family, schedule):
    model = _idle(family, schedule=schedule)
    x = images(model, batch=3)
    with torch.no_grad(), tokenpatch.trace(model) as short:
        fast, fast_grid = model(x), model.forward_features(x)
        model(x)
    with torch.no_grad(), collecting(model, frozenset({"attention"})), tokenpatch.trace(model) as long:
        slow, slow_grid = model(x), model.forward_features(x)
        model(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(fast_grid, slow_grid, atol=1e-5)
    assert [(r.attention_tokens, r.mlp_tokens, r.output_tokens) for r in short.records] == [
        (r.attention_tokens, r.mlp_tokens, r.output_tokens) for r in long.records]
    assert all(torch.equal(a.positions.sort(dim=1).values, b.positions.sort(dim=1).values)
               for a, b in zip(short.records, long.records))


def test_idle_working_set_returns_every_token_after_the_last_block():
    model = _idle("deit_tiny")
    x = images(model, batch=2)
    with torch.no_grad():
        _, intermediates = model.forward_intermediates(x, indices=[2, 4, 5], output_fmt="NLC")
        with collecting(model, frozenset({"attention"})):
            _, reference = model.forward_intermediates(x, indices=[2, 4, 5], output_fmt="NLC")
    assert [t.shape[1] for t in intermediates] == [16, 16, 16]  # every patch (the prefix left out by timm)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(intermediates, reference))


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_a_traced_pass_gives_the_outputs_of_a_plain_one(case):
    name, options = case
    model = tokenpatch.patch(make_model("deit_tiny"), name, keep_ratio=0.5, **options)
    x = images(model, batch=2)
    with torch.no_grad():
        plain = model(x)
        with tokenpatch.trace(model):
            traced = model(x)
    assert torch.allclose(plain, traced, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in METHOD_CASES if fixed_counts(c)], ids=case_id)
def test_a_fixed_count_method_compiles_into_one_graph(case):
    # fullgraph refuses any graph break, such as reading a tensor's value on the host (.item(), int())
    torch._dynamo.reset()
    name, options = case
    model = tokenpatch.patch(make_model("deit_tiny"), name, keep_ratio=0.5, **options)
    x = images(model, batch=2)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, backend="eager", fullgraph=True)(x), model(x), atol=1e-6)
