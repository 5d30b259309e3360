"""The learned and adaptive methods: dynamicvit (predictors, masks, ratio loss) and sait (counts, padding)."""

import pytest
import torch

import tokenpatch
from tokenpatch.errors import InvalidOptionError, TokenPatchError
from tokenpatch.methods.dynamicvit import RatioLoss
from tokenpatch.methods.idle import TokenCutLoss
from tokenpatch.training.losses import DistillationLoss
from tokenpatch.methods.sait import SaiT, SaiTConfig, mass_counts, padded_top_positions
from tokenpatch.core.runner import collecting
from tokenpatch.training.finetune import FinetuneConfig, finetune, frozen_teacher, step_options, training_loss

from conftest import images, make_model


def _seeded_loss(model, teacher, x, config):
    torch.manual_seed(123)  # the same Gumbel noise before and after the step
    model.train()
    return training_loss(model, teacher, x, None, config, DistillationLoss()).item()


@pytest.mark.parametrize("method, options", [("idle", {}), ("idle", {"cut": 1.0}), ("idle", {"feature": 1.0}),
                                             ("evit", {}), ("dynamicvit", {}), ("sait", {}), ("sait", {"mass": 0.8})])
def test_one_optimisation_step_reduces_the_loss_on_a_fixed_batch(method, options):
    cut, feature = options.pop("cut", 0.0), options.pop("feature", 0.0)
    if cut:
        options["cut_weight"] = cut
    model = tokenpatch.patch(make_model("deit_tiny", drop_path_rate=0.0), method, keep_ratio=0.4, **options)
    x = images(model, batch=8)
    config = FinetuneConfig(steps=1, lr=1e-5, warmup_steps=1, module_lr=1e-4, feature_weight=feature, mixup=0.0)
    teacher = frozen_teacher(model)
    with collecting(model, frozenset({"attention"}) if cut else frozenset()):
        before = _seeded_loss(model, teacher, x, config)
        torch.manual_seed(123)
        finetune(model, [x], config, progress=False, teacher=teacher)
        after = _seeded_loss(model, teacher, x, config)
    assert after < before


def test_dynamicvit_predictors_are_model_parameters_under_a_clear_prefix():
    model = make_model("deit_tiny")
    keys = set(model.state_dict())
    tokenpatch.patch(model, "dynamicvit", keep_ratio=0.7)
    added = set(model.state_dict()) - keys
    assert added and all(k.startswith("tokenpatch.") for k in added)
    assert {k.split(".")[1] for k in added} == {"0", "1", "2"}  # one predictor per prune block (1, 2, 3)
    assert tokenpatch.get_config(model).prune_blocks == (1, 2, 3)
    tokenpatch.unpatch(model)
    assert set(model.state_dict()) == keys


def test_dynamicvit_training_masks_instead_of_removing_and_gradients_reach_the_predictors():
    model = tokenpatch.patch(make_model("deit_tiny"), "dynamicvit", keep_ratio=0.5).train()
    x = images(model, batch=4)
    with tokenpatch.trace(model) as t:
        out = model(x)
    assert t.tokens_per_block == [17] * 4  # training keeps every token (16 patches + class), masked
    (out.square().mean() + RatioLoss()(model)).backward()
    predictor_grads = [p.grad for p in model.tokenpatch.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in predictor_grads)
    assert any(g.abs().sum() > 0 for g in predictor_grads)
    fractions = model._tokenpatch.local.aux["keep_fraction"]
    assert [target for _, target in fractions] == pytest.approx([0.5, 0.25, 0.125])
    assert all(((f > 0) & (f <= 1)).all() for f, _ in fractions)
    assert all((b <= a + 1e-6).all() for (a, _), (b, _) in zip(fractions, fractions[1:]))  # dropped stays dropped


def test_dynamicvit_eval_keeps_rho_powers_of_the_original_patches():
    model = tokenpatch.patch(make_model("deit_tiny", depth=8), "dynamicvit", keep_ratio=0.7)
    with tokenpatch.trace(model) as t:
        model(images(model, batch=2))
    assert t.tokens_per_block == [17, 17, 1 + 11, 1 + 11, 1 + 7, 1 + 7, 1 + 5, 1 + 5]  # int(16 * 0.7 ** s)


def test_ratio_loss_is_the_squared_gap_to_each_stage_target():
    model = tokenpatch.patch(make_model("deit_tiny"), "dynamicvit", keep_ratio=0.5)
    ctx = model._tokenpatch
    ctx.local.aux = {"keep_fraction": [(torch.tensor([0.5, 0.5]), 0.5), (torch.tensor([0.25, 0.25]), 0.25)]}
    assert RatioLoss()(model).item() == pytest.approx(0.0)
    ctx.local.aux = {"keep_fraction": [(torch.tensor([1.0, 0.5]), 0.5)]}
    assert RatioLoss()(model).item() == pytest.approx(0.125)
    ctx.local.aux = {}
    with pytest.raises(TokenPatchError, match="training-mode pass"):
        RatioLoss()(model)


def test_ratio_loss_trains_the_predictors_towards_the_target_fraction():
    model = tokenpatch.patch(make_model("deit_tiny"), "dynamicvit", keep_ratio=0.3, ratio_weight=10.0)
    x = images(model, batch=8)
    torch.manual_seed(0)
    gaps = []
    for _ in range(2):
        model.train()
        model(x)
        gaps.append(RatioLoss()(model).item())
        finetune(model, [x], FinetuneConfig(steps=15, lr=0.0, module_lr=3e-3, warmup_steps=1, mixup=0.0),
                 progress=False)
    assert gaps[1] < 0.5 * gaps[0]


def test_token_cut_loss_is_zero_when_attention_stays_within_each_set():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    selected = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    same_set = selected.T @ selected + (1 - selected).T @ (1 - selected)
    model._tokenpatch.local.aux = {"token_cut": [(torch.where(same_set > 0, 0.0, -1e4).unsqueeze(0), selected)]}
    assert TokenCutLoss()(model).item() == pytest.approx(0.0, abs=1e-6)
    model._tokenpatch.local.aux = {"token_cut": [(torch.zeros(1, 5, 5), selected)]}  # uniform attention crosses the cut
    assert TokenCutLoss()(model).item() > 0.1


def test_idle_leaves_token_cut_inputs_only_when_asked():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5).train()
    x = images(model, batch=2)
    model(x)
    assert "token_cut" not in model._tokenpatch.local.aux
    with collecting(model, frozenset({"attention"})):
        model(x)
    logits, selected = model._tokenpatch.local.aux["token_cut"][0]
    assert len(model._tokenpatch.local.aux["token_cut"]) == 3  # blocks 1..3 reduce
    assert logits.shape == (2, 17, 17) and selected.shape == (2, 17)
    assert selected.sum(1).tolist() == [1 + 8, 1 + 8]
    assert TokenCutLoss()(model).requires_grad


def test_mass_counts_and_padded_positions():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert mass_counts(scores, 0.6).tolist() == [1, 3]
    assert mass_counts(scores, 1.0).tolist() == [4, 4]
    positions = padded_top_positions(torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.1, 0.3, 0.2]]), torch.tensor([2, 1]))
    assert positions[0].tolist() == [1, 2]
    assert positions[1].tolist() == [0, 2]  # its one real patch first, then the next best as padding


def _content_images(size):
    """Images of very different content: flat grey, one bright square, noise."""
    flat = torch.zeros(3, size, size)
    square = torch.zeros(3, size, size)
    square[:, : size // 4, : size // 4] = 3.0
    noise = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.stack([flat, square, noise])


def test_sait_counts_follow_the_image_and_the_batch_equals_each_image_alone():
    model = make_model("deit_tiny", img_size=128)
    model.blocks[1].attn.qkv.weight.data *= 3  # sharper attention, as trained models have
    tokenpatch.patch(model, "sait", keep_ratio=1.0)
    tokenpatch.set_options(model, keep_ratio=0.9, mass=0.5)
    x = _content_images(128)
    with tokenpatch.trace(model) as t:
        together = model(x)
    counts = t.records[-1].counts
    assert counts is not None and len(set(counts.tolist())) > 1
    assert t.records[-1].mlp_tokens == int(counts.max())
    for i in range(len(x)):
        with tokenpatch.trace(model) as alone_trace:
            alone = model(x[i : i + 1])
        assert alone_trace.records[-1].mlp_tokens == int(counts[i])
        assert torch.allclose(alone, together[i : i + 1], atol=1e-5)


def test_sait_options_change_at_run_time_and_keep_ratio_one_is_dense():
    model = make_model("deit_tiny")
    x = images(model)
    reference = model(x)
    tokenpatch.patch(model, "sait", keep_ratio=0.5, mass=0.3)
    with tokenpatch.trace(model) as t:
        model(x)
    low = t.records[-1].counts
    tokenpatch.set_options(model, mass=0.95)
    with tokenpatch.trace(model) as t:
        model(x)
    assert (t.records[-1].counts >= low).all() and tokenpatch.get_config(model).mass == 0.95
    tokenpatch.set_keep_ratio(model, 1.0)
    assert (model(x) - reference).abs().max() <= 1e-5


def test_sait_fine_tuning_alternates_dense_and_sparse_steps():
    model = tokenpatch.patch(make_model("deit_tiny"), "sait", keep_ratio=0.5, dense_every=2)
    assert SaiT().training_overrides(SaiTConfig(dense_every=2), 1) == {}
    seen = []
    x = images(model, batch=1)
    for step in (1, 2, 3, 4):
        with step_options(model, step), tokenpatch.trace(model) as t:
            model(x)
        seen.append(t.tokens_per_block[-1])
    assert seen == [9, 17, 9, 17]  # 8 of 16 patches (+ class token) on sparse steps, all on dense ones
    assert tokenpatch.get_config(model).keep_ratio == 0.5


def test_sait_adaptive_counts_are_refused_for_average_pooling_models():
    model = make_model("avg_pool")
    with pytest.raises(InvalidOptionError, match="pools over all tokens"):
        tokenpatch.patch(model, "sait", keep_ratio=0.5, mass=0.9)
    assert not tokenpatch.is_patched(model)
    tokenpatch.patch(model, "sait", keep_ratio=0.5)
    with pytest.raises(InvalidOptionError, match="pools over all tokens"):
        tokenpatch.set_options(model, mass=0.9)
    assert tokenpatch.get_config(model).mass is None


@pytest.mark.parametrize("method, options, bad", [
    ("sait", {}, {"mass": 1.5}), ("sait", {}, {"dense_every": -1}), ("dynamicvit", {}, {"temperature": 0}),
    ("dynamicvit", {}, {"prune_blocks": (0, 2)}), ("idle", {}, {"nonsense": 1}),
])
def test_bad_options_are_named_and_leave_the_config_alone(method, options, bad):
    model = tokenpatch.patch(make_model("deit_tiny"), method, keep_ratio=0.5, **options)
    before = tokenpatch.get_config(model)
    with pytest.raises(InvalidOptionError, match=next(iter(bad))):
        tokenpatch.set_options(model, **bad)
    assert tokenpatch.get_config(model) == before


@pytest.mark.parametrize("method", ["dynamicvit", "iared2"])
def test_save_load_reproduces_outputs_with_trained_method_modules(tmp_path, method):
    model = tokenpatch.patch(make_model("deit_tiny"), method, keep_ratio=0.6)
    x = images(model, batch=4)
    finetune(model, [x], FinetuneConfig(steps=3, lr=1e-3, module_lr=1e-2), progress=False)
    expected = model.eval()(x)
    tokenpatch.save(model, tmp_path / "dyn.safetensors")
    fresh = make_model("deit_tiny")
    loaded = tokenpatch.load(fresh, tmp_path / "dyn.safetensors")
    assert tokenpatch.get_method_name(loaded) == method
    assert torch.equal(loaded(x), expected)
    wrong = make_model("deit_small")
    with pytest.raises(TokenPatchError, match="does not fit"):
        tokenpatch.load(wrong, tmp_path / "dyn.safetensors")
    assert not tokenpatch.is_patched(wrong) and not hasattr(wrong, "tokenpatch")
