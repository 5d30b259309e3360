"""tokenpatch.calibrate: a tome merge schedule searched for a MAC budget, saved and loaded with the model."""

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
    result = tokenpatch.calibrate(model, x, macs_ratio=0.6, progress=False)
    assert tokenpatch.get_method_name(model) == "tome"
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


def test_calibrate_refuses_another_method_and_a_bad_budget():
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "evit")
    with pytest.raises(InvalidOptionError, match="calibrate searches tome's merge schedule.*'evit'"):
        tokenpatch.calibrate(model, images(model), 0.6, progress=False)
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
