"""iared2: interpreters per group, REINFORCE training, thresholded inference."""

import pytest
import torch

import tokenpatch
from tokenpatch.errors import InvalidOptionError
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
