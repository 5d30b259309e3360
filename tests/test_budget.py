"""macs_ratio: every method solves its keep ratio for a share of the unpatched MACs."""

import pytest
import timm
import torch

import tokenpatch
from tokenpatch.errors import InvalidOptionError, UnreachableBudgetError
from tokenpatch.measure.budget import _bisect
from tokenpatch.measure.flops import count_macs

from conftest import images


def twelve_block_model():
    torch.manual_seed(0)  # depth 12 and 64 patches: enough steps for a 1 % budget
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=128, embed_dim=48, num_heads=3,
                             num_classes=10).eval()


@pytest.mark.parametrize("method", sorted(tokenpatch.available_methods()))
def test_macs_ratio_hits_the_unpatched_share_within_one_percent(method):
    model = twelve_block_model()
    x = images(model, batch=1)
    unpatched = count_macs(model, x).total
    tokenpatch.patch(model, method, macs_ratio=0.6, macs_input=x)
    assert count_macs(model, x).total / unpatched == pytest.approx(0.6, rel=0.01)
    assert 0 < tokenpatch.get_config(model).keep_ratio < 1


def test_set_macs_ratio_reports_the_fit_and_tome_r_is_refused():
    model = tokenpatch.patch(twelve_block_model(), "evit")
    fit = tokenpatch.set_macs_ratio(model, 0.7)
    assert fit.target == 0.7 and fit.macs_ratio == pytest.approx(0.7, rel=0.01)
    assert tokenpatch.get_config(model).keep_ratio == fit.keep_ratio
    tokenpatch.unpatch(model)
    tokenpatch.patch(model, "tome", r=4)
    with pytest.raises(InvalidOptionError, match="patch with r=None"):
        tokenpatch.set_macs_ratio(model, 0.6)


@pytest.mark.parametrize("bad, message", [(0.0, "macs_ratio must be a number in"), (1.5, "macs_ratio must be"),
                                          (0.01, "can't reach macs_ratio=0.01 within 1%: the nearest share")])
def test_unreachable_or_invalid_budgets_leave_the_model_unpatched(bad, message):
    model = twelve_block_model()
    with pytest.raises(InvalidOptionError, match=message):
        tokenpatch.patch(model, "evit", macs_ratio=bad)
    assert not tokenpatch.is_patched(model)


def test_keep_ratio_and_macs_ratio_together_are_refused():
    model = twelve_block_model()
    with pytest.raises(InvalidOptionError, match="keep_ratio or macs_ratio, not both"):
        tokenpatch.patch(model, "idle", keep_ratio=0.5, macs_ratio=0.6)
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize("target, counted", [(0.9, 2), (0.001, 1)])
def test_a_budget_beyond_either_end_is_known_unreachable_after_counting_the_ends_only(target, counted):
    """ats spends at most ~0.63 of the MACs below keep ratio 1 (its sampler drops tokens at any ratio): a budget
    above that is refused after counting the largest keep ratio, not after a bisection that cannot converge."""
    keep_ratios = []

    def share(keep):
        keep_ratios.append(keep)
        return 0.1 + 0.5 * keep

    tried = _bisect(share, target, 0.01)
    assert len(keep_ratios) == counted and tried == {k: 0.1 + 0.5 * k for k in keep_ratios}


def test_ats_tells_an_unreachable_budget_after_counting_two_keep_ratios():
    model = tokenpatch.patch(twelve_block_model(), "ats")
    x = images(model, batch=2)
    with pytest.raises(UnreachableBudgetError, match=r"can.t reach macs_ratio=0.99 .*\(keep_ratio=0.9990\)"):
        tokenpatch.set_macs_ratio(model, 0.99, x)
