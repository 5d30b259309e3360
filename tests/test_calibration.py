"""tokenpatch.calibrate: the method (and tome's merge schedule) chosen for a MAC budget, saved and loaded with the model."""

import pytest
import torch

import tokenpatch
from tokenpatch.errors import InvalidOptionError
from tokenpatch.jobs.calibration import schedule_family

from conftest import images, make_model


def test_the_schedule_family_starts_late_and_falls_to_its_final_share():
    shares = schedule_family(start=2, shape=1.0, final=0.4, depth=6)
    assert shares[:2] == (1.0, 1.0) and shares[-1] == pytest.approx(0.4)
    assert list(shares) == sorted(shares, reverse=True)
    front, back = schedule_family(0, 0.5, 0.4, 6), schedule_family(0, 2.0, 0.4, 6)
    assert front[1] < back[1]  # a shape below 1 merges early, above 1 late


def test_calibrate_patches_meets_the_budget_and_round_trips_through_save(tmp_path):
    model = make_model("deit_tiny", depth=4, img_size=96)
    x = images(model, batch=8)
    reference = model(x)
    result = tokenpatch.calibrate(model, x, macs_ratio=0.6, methods=["tome"], progress=False)
    assert tokenpatch.get_method_name(model) == result.method == "tome"
    assert tokenpatch.get_config(model).remaining == result.remaining and len(result.remaining) == 4
    assert result.macs_ratio == pytest.approx(0.6, rel=0.01)
    unpatched = tokenpatch.count_macs(make_model("deit_tiny", depth=4, img_size=96), x[:1]).total
    assert tokenpatch.count_macs(model, x[:1]).total / unpatched == pytest.approx(result.macs_ratio)
    assert result.candidates > 1 and 0 <= result.agreement <= 100
    outputs = model(x)
    assert not torch.allclose(outputs, reference, atol=1e-4)
    tokenpatch.save(model, tmp_path / "calibrated.safetensors")
    loaded = tokenpatch.load(make_model("deit_tiny", depth=4, img_size=96), tmp_path / "calibrated.safetensors")
    assert tokenpatch.get_config(loaded).remaining == result.remaining
    assert torch.allclose(loaded(x), outputs, atol=1e-6)


def test_calibrate_chooses_the_method_closest_to_the_unpatched_model_at_the_budget():
    model = make_model("deit_tiny", depth=4, img_size=96)
    x = images(model, batch=8)
    result = tokenpatch.calibrate(model, x, macs_ratio=0.65, methods=["evit", "idle", "tome", "ats"], progress=False)
    scored = [c for c in result.compared if c.options]
    assert [c.method for c in result.compared][: len(scored)] == sorted((c.method for c in scored),
                                                                        key=lambda m: next(c.kl for c in scored if c.method == m))
    assert result.method == result.compared[0].method == tokenpatch.get_method_name(model)
    assert result.kl == min(c.kl for c in scored)
    assert all(c.macs_ratio == pytest.approx(0.65, rel=0.011) for c in scored)
    assert all(c.note and not c.options for c in result.compared if c not in scored)  # unreachable: said why
    assert {c.method for c in result.compared} == {"evit", "idle", "tome", "ats"}
    unpatched = make_model("deit_tiny", depth=4, img_size=96)
    reference = unpatched(x).log_softmax(-1)
    again = torch.nn.functional.kl_div(model(x).log_softmax(-1), reference, log_target=True, reduction="batchmean")
    assert again.item() == pytest.approx(result.kl, rel=1e-4, abs=1e-7)  # the model runs what was scored


def test_calibrate_searches_a_patched_models_own_method_keeping_its_options():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4, img_size=96), "evit", fuse=True)
    result = tokenpatch.calibrate(model, images(model, batch=4), 0.7, progress=False)
    assert [c.method for c in result.compared] == ["evit"] and result.remaining is None and result.candidates == 0
    assert tokenpatch.get_config(model).fuse and tokenpatch.get_config(model).keep_ratio < 1.0


def test_calibrate_refuses_bad_requests_and_leaves_the_model_as_it_came():
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "evit", keep_ratio=0.6)
    with pytest.raises(InvalidOptionError, match="patched with 'evit', which is not among \\['tome'\\]"):
        tokenpatch.calibrate(model, images(model), 0.6, methods=["tome"], progress=False)
    with pytest.raises(InvalidOptionError, match="'dynamicvit' learns its policy"):
        tokenpatch.calibrate(model, images(model), 0.6, methods=["dynamicvit", "evit"], progress=False)
    with pytest.raises(InvalidOptionError, match="no method reaches macs_ratio=0.05"):
        tokenpatch.calibrate(model, images(model), 0.05, progress=False)
    assert tokenpatch.get_method_name(model) == "evit" and tokenpatch.get_config(model).keep_ratio == 0.6
    unpatched = make_model("deit_tiny", depth=2)
    with pytest.raises(InvalidOptionError, match="macs_ratio must be a number in"):
        tokenpatch.calibrate(unpatched, images(model), 1.5, progress=False)
    with pytest.raises(tokenpatch.InputShapeError):
        tokenpatch.calibrate(unpatched, torch.randn(2, 3, 64), 0.6, progress=False)
    assert not tokenpatch.is_patched(unpatched)  # a failed calibration leaves the model as it came


def test_a_remaining_schedule_sets_the_tokens_per_block_and_refuses_a_budget():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4, img_size=96), "tome", remaining=(1.0, 0.75, 0.5, 0.5))
    with tokenpatch.trace(model) as t:
        model(images(model, batch=1))
    assert t.tokens_per_block == [37, 1 + 27, 1 + 18, 1 + 18]
    with pytest.raises(InvalidOptionError, match="remaining must give a share in \\(0, 1\\] for each of the 4 blocks"):
        tokenpatch.set_options(model, remaining=(1.0, 0.5))
    with pytest.raises(InvalidOptionError, match="patch with r=None and remaining=None"):
        tokenpatch.set_macs_ratio(model, 0.7)


def test_calibrate_tries_every_option_set_a_method_offers_and_keeps_the_best():
    from tokenpatch.methods.diffrate import TEMPLATES

    model = make_model("deit_tiny", depth=4, img_size=96)
    x = images(model, batch=4)
    result = tokenpatch.calibrate(model, x, 0.6, methods=["diffrate"], progress=False)
    (chosen,) = result.compared
    assert chosen.options["template"] in TEMPLATES and tokenpatch.get_config(model).template == chosen.options["template"]
    scores = {}
    for template in TEMPLATES:  # each template fitted alone: the chosen one is the closest to the unpatched model
        single = tokenpatch.patch(make_model("deit_tiny", depth=4, img_size=96), "diffrate", template=template)
        tokenpatch.set_macs_ratio(single, 0.6, x[:8])
        reference = make_model("deit_tiny", depth=4, img_size=96)(x).log_softmax(-1)
        scores[template] = torch.nn.functional.kl_div(single(x).log_softmax(-1), reference, log_target=True,
                                                      reduction="batchmean").item()
    assert chosen.kl == pytest.approx(min(scores.values()), rel=1e-4, abs=1e-7)
