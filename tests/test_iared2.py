"""iared2: interpreters per group, REINFORCE training, thresholded inference."""

import pytest
import torch

import tokenpatch
from tokenpatch.errors import InvalidOptionError
from tokenpatch.methods import iared2
from tokenpatch.methods.iared2 import PolicyGradientLoss
from tokenpatch.training.losses import DistillationLoss
from tokenpatch.training.finetune import FinetuneConfig, finetune, frozen_teacher, training_loss

from conftest import images, make_model


def _mean_first_group_probability(model, x):
    """Mean keep probability the first interpreter (before block 0) gives the patches of ``x``."""
    with torch.no_grad(), tokenpatch.trace(model) as t:
        model.eval()(x)
    first = t.scores[0]
    assert first.block == 0 and first.name == "keep_probability"
    return first.values.mean().item()


@pytest.mark.parametrize("penalty, direction", [(0.0, +1), (50.0, -1)])
def test_reinforce_keeps_tokens_without_penalty_and_drops_them_with_a_large_one(penalty, direction):
    torch.manual_seed(0)
    model = tokenpatch.patch(make_model("deit_tiny", drop_path_rate=0.0), "iared2", keep_ratio=0.9, kept_penalty=penalty)
    for interpreter in model.tokenpatch.values():  # start undecided: p = 0.5 everywhere
        torch.nn.init.zeros_(interpreter.heads.bias)
    x = images(model, batch=16)
    before = _mean_first_group_probability(model, x)
    config = FinetuneConfig(steps=10, module_lr=3e-2, warmup_steps=1, train_backbone=False, mixup=0.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("tokenpatch.")}
    finetune(model, [x], config, progress=False)
    after = _mean_first_group_probability(model, x)
    assert direction * (after - before) > 0.05
    frozen = {k: v for k, v in model.state_dict().items() if not k.startswith("tokenpatch.")}
    assert all(torch.equal(weights[k], frozen[k]) for k in weights)  # train_backbone=False


def test_training_samples_decisions_and_gradients_reach_every_interpreter():
    model = tokenpatch.patch(make_model("deit_tiny"), "iared2", keep_ratio=0.5)
    x = images(model, batch=6)
    config = FinetuneConfig()
    model.train()
    torch.manual_seed(3)
    loss = training_loss(model, frozen_teacher(model), x, None, config, DistillationLoss())
    groups = model._tokenpatch.local.aux["policy"]
    assert len(groups) == 4  # one per group of the depth-4 model
    log_prob, kept = groups[0]
    assert log_prob.shape == kept.shape == (6,) and (log_prob < 0).all()
    loss.backward()
    grads = {name: p.grad for name, p in model.tokenpatch.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[f"{start}.heads.weight"].abs().sum() > 0 for start in ("0", "1", "2", "3"))


def test_policy_gradient_loss_is_advantage_weighted_log_probability():
    model = tokenpatch.patch(make_model("deit_tiny"), "iared2", keep_ratio=0.5)
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    model._tokenpatch.local.aux = {"policy": [(log_prob, torch.tensor([1.0, 0.5]))]}
    task_loss = torch.tensor([0.2, 0.4])
    # rewards: -0.2 - 1.0 = -1.2 and -0.4 - 0.5 = -0.9; baseline -1.05; advantages -0.15, +0.15
    loss = PolicyGradientLoss(penalty=1.0)(model, task_loss)
    assert loss.item() == pytest.approx(-((-0.15 * -1.0) + (0.15 * -2.0)) / 2)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([0.075, -0.075])


def test_inference_thresholds_per_image_and_caps_at_keep_ratio():
    model = tokenpatch.patch(make_model("deit_tiny"), "iared2", keep_ratio=0.75, threshold=0.88)
    x = images(model, batch=8)
    with tokenpatch.trace(model) as t:
        out = model(x)
    first = t.records[0]
    probabilities = t.scores[0].values
    expected = ((probabilities >= 0.88).sum(dim=1).clamp(1, 12) + 1)  # cap: ceil(0.75 * 16) = 12 patches
    assert torch.equal(first.counts, expected)
    assert len(set(first.counts.tolist())) > 1  # images keep different numbers
    for i in range(8):
        assert torch.allclose(model(x[i:i + 1]), out[i:i + 1], atol=1e-5)
    tokenpatch.set_options(model, threshold=None)
    with tokenpatch.trace(model) as t:
        model(x)
    assert t.records[0].counts.tolist() == [13] * 8


def test_expected_count_keeps_the_rounded_probability_sum_of_the_most_probable_patches():
    torch.manual_seed(0)
    model = tokenpatch.patch(make_model("deit_tiny"), "iared2", keep_ratio=0.99, expected_count=True)
    for interpreter in model.tokenpatch.values():  # probabilities spread around 0.5, not near the 0.88 start
        torch.nn.init.zeros_(interpreter.heads.bias)
        torch.nn.init.normal_(interpreter.heads.weight, std=2.0)
    x = images(model, batch=8)
    with tokenpatch.trace(model) as t:
        out = model(x)
    first, scores = t.records[0], t.scores[0]
    expected = scores.values.sum(dim=1).round().long()
    assert torch.equal(first.counts, expected + 1)  # and the class token
    assert len(set(first.counts.tolist())) > 1  # images keep different numbers
    for i in range(8):  # the most probable patches, whatever the threshold says
        count = int(expected[i])
        top = scores.positions[i, scores.values[i].argsort(descending=True)[:count]]
        assert set(first.positions[i, 1:count + 1].tolist()) == set(top.tolist())
        assert torch.allclose(model(x[i:i + 1]), out[i:i + 1], atol=1e-5)
    tokenpatch.set_options(model, keep_ratio=0.25)  # the cap still bounds the count: ceil(0.25 * 16) = 4
    with tokenpatch.trace(model) as t:
        model(x)
    assert torch.equal(t.records[0].counts, expected.clamp(max=4) + 1)


def test_groups_place_interpreters_and_bad_options_are_named():
    model = make_model("deit_tiny", depth=12)
    tokenpatch.patch(model, "iared2", keep_ratio=0.7, groups=3)
    assert sorted({k.split(".")[1] for k in model.state_dict() if k.startswith("tokenpatch.")}) == ["0", "4", "8"]
    with pytest.raises(InvalidOptionError, match="fixed at patch time"):
        tokenpatch.set_options(model, groups=2)
    with pytest.raises(InvalidOptionError, match="threshold"):
        tokenpatch.set_options(model, threshold=1.5)
    tokenpatch.unpatch(model)
    with pytest.raises(InvalidOptionError, match="groups must be at most"):
        tokenpatch.patch(model, "iared2", groups=13)
    with pytest.raises(InvalidOptionError, match="pools over all tokens"):
        tokenpatch.patch(make_model("avg_pool"), "iared2")


@pytest.mark.parametrize("target", [0.0, 1.5, -0.2])
def test_kept_target_outside_zero_one_is_refused(target):
    with pytest.raises(InvalidOptionError, match="kept_target must be None or a share in"):
        tokenpatch.patch(make_model("deit_tiny"), "iared2", kept_target=target)


def test_kept_target_prices_by_the_offset_and_moves_it_towards_the_target():
    model = tokenpatch.patch(make_model("deit_tiny"), "iared2", keep_ratio=0.5)
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    model._tokenpatch.local.aux = {"policy": [(log_prob, torch.tensor([1.0, 0.5]))]}
    task_loss = torch.tensor([0.2, 0.4])
    loss_with = PolicyGradientLoss(penalty=0.5, target=0.25)
    model.tokenpatch.price_offset.fill_(0.5)  # price 0.5 + 0.5 = 1.0: the advantages of the fixed-price test
    assert loss_with(model, task_loss).item() == pytest.approx(-((-0.15 * -1.0) + (0.15 * -2.0)) / 2)
    # mean kept 0.75 is 0.5 above the target: the offset rises by PRICE_RATE * 0.5
    assert model.tokenpatch.price_offset.item() == pytest.approx(0.5 + iared2.PRICE_RATE * 0.5)
    loss_with.target = 1.0
    for _ in range(100):  # below the target the price falls, and stops at 0 (offset -penalty)
        loss_with(model, task_loss)
    assert model.tokenpatch.price_offset.item() == pytest.approx(-0.5)
    assert "price_offset" not in model.state_dict() and "tokenpatch.price_offset" not in model.state_dict()


def _sampled_kept_fraction(model, x):
    """Mean kept fraction (over images and groups) of one training-mode pass's sampled decisions on ``x``."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.train()(x)
    return torch.stack([fraction for _, fraction in model._tokenpatch.local.aux["policy"]]).mean().item()


@pytest.mark.parametrize("target, direction", [(1.0, +1), (0.05, -1)])
def test_training_towards_a_kept_target_moves_the_kept_fraction_towards_it(target, direction, monkeypatch):
    monkeypatch.setattr(iared2, "PRICE_RATE", 1.0)  # a price that follows within the 15 steps
    torch.manual_seed(0)
    model = tokenpatch.patch(make_model("deit_tiny", drop_path_rate=0.0), "iared2", keep_ratio=0.9, kept_penalty=1.0,
                             kept_target=target)
    for interpreter in model.tokenpatch.values():  # start undecided: p = 0.5 everywhere
        torch.nn.init.zeros_(interpreter.heads.bias)
    x = images(model, batch=16)
    before = _sampled_kept_fraction(model, x)
    config = FinetuneConfig(steps=15, module_lr=3e-2, warmup_steps=1, train_backbone=False, mixup=0.0)
    finetune(model, [x], config, progress=False)
    assert direction * (_sampled_kept_fraction(model, x) - before) > 0.05
    # the price (1.0 + offset) rose when too much was kept, and fell to 0 when too little
    offset = model.tokenpatch.price_offset.item()
    assert offset == pytest.approx(-1.0) if direction > 0 else offset > 0


def _price_offset_after_one_step(rank: int, store: str, offsets) -> None:
    """One kept_target loss call in process ``rank`` of two: rank 0 kept everything, rank 1 half."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tokenpatch.patch(make_model("deit_tiny"), "iared2", keep_ratio=0.5)
        kept = torch.full((2,), 1.0 if rank == 0 else 0.5)
        model._tokenpatch.local.aux = {"policy": [(torch.zeros(2, requires_grad=True), kept)]}
        PolicyGradientLoss(penalty=0.5, target=0.25)(model, torch.zeros(2))
        offsets[rank] = model.tokenpatch.price_offset.item()
    finally:
        torch.distributed.destroy_process_group()


def test_kept_target_moves_every_process_by_the_mean_over_all_their_batches(tmp_path):
    offsets = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_price_offset_after_one_step, args=(str(tmp_path / "store"), offsets), nprocs=2)
    # the mean kept fraction over both batches is 0.75, 0.5 above the target, on both processes
    assert offsets[0] == offsets[1] == pytest.approx(iared2.PRICE_RATE * 0.5)
