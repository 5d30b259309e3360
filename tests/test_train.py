"""Self-distillation fine-tuning of patched models."""


import pytest
import torch

import tokenpatch
from tokenpatch.training.losses import FeatureDistillationLoss
from tokenpatch.backends import find_backend
from tokenpatch.core.registry import get_method
from tokenpatch.data import preprocessing_of
from tokenpatch.errors import TokenPatchError
from tokenpatch.training.finetune import (DistillationLoss, FinetuneConfig, finetune, frozen_teacher, head_features,
                                         lr_factor, mixed, prefix_parameters, training_loss)

from conftest import images, make_model


def test_teacher_is_a_frozen_unpatched_copy_that_training_does_not_move():
    model = make_model("deit_tiny")
    x = images(model)
    reference = model(x)
    tokenpatch.patch(model, "idle", keep_ratio=0.5)
    teacher = frozen_teacher(model)
    assert not tokenpatch.is_patched(teacher) and tokenpatch.is_patched(model)
    assert torch.equal(teacher(x), reference)
    assert all(not p.requires_grad for p in teacher.parameters())
    finetune(model, [x], FinetuneConfig(steps=3, lr=1e-2), progress=False, teacher=teacher)
    assert torch.equal(teacher(x), reference)
    assert not torch.allclose(model(x), reference, atol=1e-3)


def test_distillation_loss_is_zero_only_for_equal_distributions():
    logits = torch.randn(4, 10)
    loss = DistillationLoss(temperature=2.0)
    assert loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(logits, torch.randn(4, 10)).item() > 0


def test_feature_distillation_loss_is_the_mean_squared_feature_difference():
    teacher = torch.zeros(2, 4)
    student = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    assert FeatureDistillationLoss()(student, teacher).item() == pytest.approx(5 / 8)
    assert FeatureDistillationLoss()(teacher, teacher).item() == 0.0


@pytest.mark.parametrize("key", ["deit_tiny", "avg_pool"])
def test_head_features_are_what_the_classifier_reads_patched_or_not(key):
    model = make_model(key)
    x = images(model, batch=2)
    for patched in (False, True):
        if patched:
            tokenpatch.patch(model, "evit", keep_ratio=0.5)
        with head_features(model) as seen:
            logits = model(x)
        assert len(seen) == 1 and seen[0].shape == (2, model.embed_dim)
        assert torch.allclose(model.head(seen[0]), logits)
    assert model.head._forward_pre_hooks == {}  # the hook is gone after the context


def test_mixup_blends_the_batch_with_itself():
    batch = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = mixed(batch, alpha=1.0)
    assert torch.allclose(out.sum(dim=0), batch.sum(dim=0))  # a permutation's blend keeps the batch sum
    assert out.min() >= 0 and out.max() <= 3 and not torch.equal(out, batch)


def test_labelled_batches_mix_into_soft_targets_scored_as_timm_scores_them():
    from timm.loss import SoftTargetCrossEntropy

    from tokenpatch.training.finetune import student_loss, teacher_targets

    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    x, y = images(model, batch=4), torch.tensor([0, 1, 2, 3])
    config = FinetuneConfig(steps=2, mixup=0.8, cutmix=1.0, label_smoothing=0.1, label_weight=1.0, distill_weight=0.0)
    history = finetune(model, [(x, y)], config, progress=False)
    assert all(r["loss"] > 0 for r in history)
    soft = torch.softmax(torch.randn(4, model.num_classes), dim=-1)
    loss = student_loss(model, teacher_targets(model, x, config), x, soft, config, DistillationLoss())
    with torch.no_grad():
        assert loss.item() == pytest.approx(SoftTargetCrossEntropy()(model(x), soft).item(), rel=1e-5)
    with pytest.raises(TokenPatchError, match="even batch size, got 3"):
        finetune(model, [(x[:3], y[:3])], config, progress=False)


@pytest.mark.parametrize("method", ["idle", "evit"])
def test_finetuning_reduces_the_loss_on_a_fixed_batch(method):
    model = tokenpatch.patch(make_model("deit_tiny", drop_path_rate=0.0), method, keep_ratio=0.3)
    x = images(model, batch=8)
    config = FinetuneConfig(steps=8, lr=3e-5, warmup_steps=1, mixup=0.0)
    teacher = frozen_teacher(model)
    before = training_loss(model, teacher, x, None, config, DistillationLoss()).item()
    history = finetune(model, [x], config, progress=False, teacher=teacher)
    after = training_loss(model, teacher, x, None, config, DistillationLoss()).item()
    assert len(history) == 8
    assert after < 0.7 * before


def test_labels_add_cross_entropy_and_evaluation_is_logged():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    x, y = images(model, batch=4), torch.tensor([0, 1, 2, 3])
    config = FinetuneConfig(steps=4, lr=1e-4, label_weight=1.0, eval_every=2, mixup=0.0)
    history = finetune(model, [(x, y)], config, evaluate=lambda m: {"score": 1.0}, progress=False)
    assert [h.get("score") for h in history] == [None, 1.0, None, 1.0]
    teacher = frozen_teacher(model)
    distill_only = training_loss(model, teacher, x, None, config, DistillationLoss())
    with_labels = training_loss(model, teacher, x, y, config, DistillationLoss())
    assert with_labels > distill_only


def test_image_dataset_reads_every_folder_layout(tmp_path):
    from PIL import Image

    from tokenpatch.data import image_dataset
    from tokenpatch.errors import DataError

    flat, nested = tmp_path / "flat", tmp_path / "nested"
    for folder in (flat, nested / "cat", nested / "dog"):
        folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / f"{i}.png")
        Image.new("RGB", (8, 8)).save(nested / ("cat" if i < 2 else "dog") / f"{i}.png")
    assert [image_dataset(flat)[i][1] for i in range(3)] == [-1, -1, -1]
    (flat / "labels.csv").write_text("file,class_index\n0.png,5\n1.png,7\n2.png,9\n")
    assert [image_dataset(flat)[i][1] for i in range(3)] == [5, 7, 9]
    assert sorted(image_dataset(nested)[i][1] for i in range(3)) == [0, 0, 1]
    with pytest.raises(DataError, match="no image folder"):
        image_dataset(tmp_path / "missing")


def test_augmented_training_split_is_random_and_validation_is_not(tmp_path):
    from PIL import Image

    from tokenpatch.jobs.finetune import split_dataset

    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    train, val = split_dataset(preprocessing_of(make_model("deit_tiny")), str(tmp_path), None, 0.5, seed=0, augment=True)
    assert set(train.indices).isdisjoint(val.indices) and len(train) == len(val) == 2
    torch.manual_seed(1)
    assert not torch.equal(train[0][0], train[0][0])  # a new crop each read
    assert torch.equal(val[0][0], val[0][0]) and val[0][0].shape == (3, 64, 64)  # the model's input size
    plain, _ = split_dataset(preprocessing_of(make_model("deit_tiny")), str(tmp_path), None, 0.5, seed=0)
    assert torch.equal(plain[0][0], plain[0][0])


def test_learning_rate_warms_up_then_decays_by_cosine_to_its_floor():
    config = FinetuneConfig(warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(config, step, 0.0) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(config, 10, 0.0) == 1.0
    assert lr_factor(config, 10, 0.5) == pytest.approx(0.55)
    assert lr_factor(config, 10, 1.0) == lr_factor(config, 10, 7.0) == pytest.approx(0.1)


class _Clock:
    """A ``time`` stand-in whose ``perf_counter`` advances 10 ms per reading: a time budget then
    spans the same steps on a fast or a loaded machine (the CLI test runs on the real clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.01
        return self.now


def test_a_time_budget_stops_the_loop_in_time_with_the_schedule_over_time(monkeypatch):
    monkeypatch.setattr("tokenpatch.training.loop.time", _Clock())
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "idle", keep_ratio=0.5)
    budget = 0.02 * 60
    history = finetune(model, [images(model, batch=2)], FinetuneConfig(minutes=0.02, lr=1e-4, warmup_steps=1),
                       progress=False)
    steps = len(history)
    assert steps > 3 and history[-1]["step"] == steps
    step_time = history[-1]["seconds"] / steps
    assert budget <= history[-1]["seconds"] < budget + step_time + 0.05  # stops at the first step past the budget
    assert history[-1]["lr"] < 0.25 * 1e-4 < history[1]["lr"]  # the cosine follows the time spent


def test_the_loop_reports_its_throughput_by_phase():
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "evit", keep_ratio=0.5)
    history = finetune(model, [images(model, batch=2)], FinetuneConfig(steps=3), progress=False)
    rates = {k: history[-1][k] for k in ("data_img_s", "teacher_img_s", "student_img_s", "loop_img_s")}
    assert all(v > 0 for v in rates.values())
    assert rates["loop_img_s"] < min(rates["data_img_s"], rates["teacher_img_s"], rates["student_img_s"])
    assert 6 / history[-1]["seconds"] <= rates["loop_img_s"] * 1.001


def test_empty_training_data_is_a_clear_error_not_an_endless_loop():
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "idle", keep_ratio=0.5)
    with pytest.raises(TokenPatchError, match="no training batches"):
        finetune(model, [], FinetuneConfig(steps=2), progress=False)
    with pytest.raises(TokenPatchError, match="no training batches"):
        finetune(model, iter([images(model)]), FinetuneConfig(steps=2), progress=False)


@pytest.mark.parametrize("method, frozen_blocks", [("idle", 1), ("evit", 1), ("tome", 0)])
def test_the_prefix_before_the_first_reducing_block_is_frozen_when_asked(method, frozen_blocks):
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), method, keep_ratio=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    prefix = {names[id(p)] for p in prefix_parameters(model)}
    blocks = {f"blocks.{i}." for i in range(frozen_blocks)}
    assert prefix == {n for n in names.values() if n.startswith(("cls_token", "pos_embed", "patch_embed", *blocks))}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = images(model, batch=4)
    for freeze in (True, False):
        finetune(model, [x], FinetuneConfig(steps=2, lr=1e-3, warmup_steps=1, freeze_prefix=freeze), progress=False)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
        assert moved.isdisjoint(prefix) if freeze else prefix <= moved
        assert "head.weight" in moved and all(p.requires_grad for p in model.parameters())


def test_the_prefix_of_a_transformers_vit_is_its_embeddings_and_early_layers():
    import transformers

    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                    image_size=64, patch_size=16, num_labels=5)
    model = tokenpatch.patch(transformers.ViTForImageClassification(config).eval(), "idle", keep_ratio=0.5)
    first_block = {id(p) for p in find_backend(model).blocks(model)[0].parameters()}
    prefix = {id(p) for p in prefix_parameters(model)}
    embeddings = {id(p) for p in model.vit.embeddings.parameters()}
    assert prefix == embeddings | first_block


def test_folds_swap_the_halves_and_are_checked(tmp_path):
    from PIL import Image

    from tokenpatch.jobs.finetune import split_dataset

    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    train0, val0 = split_dataset(preprocessing_of(make_model("deit_tiny")), str(tmp_path), None, 0.5, seed=3, fold=0)
    train1, val1 = split_dataset(preprocessing_of(make_model("deit_tiny")), str(tmp_path), None, 0.5, seed=3, fold=1)
    assert sorted(train0.indices) == sorted(val1.indices) and sorted(train1.indices) == sorted(val0.indices)
    assert sorted(val0.indices + val1.indices) == list(range(6))
    with pytest.raises(ValueError, match="--fold 2 out of range"):
        split_dataset(preprocessing_of(make_model("deit_tiny")), str(tmp_path), None, 0.5, seed=3, fold=2)


def test_each_pass_over_a_sharding_loader_is_a_new_epoch():
    """``finetune`` cycles its batches; a ``DistributedSampler`` is told each pass's epoch (a new
    shuffle each epoch, the same in every process), as torch's own training loops do."""
    from torch.utils.data import DataLoader, DistributedSampler

    from tokenpatch.training.finetune import _repeat

    data = list(range(6))
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    batches = _repeat(DataLoader(data, batch_size=3, sampler=sampler))
    passes = [next(batches).tolist() for _ in range(4)]  # one batch of 3 per pass on this rank
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert passes == orders and len({tuple(p) for p in passes}) > 1


def test_final_tokens_are_the_normed_patch_tokens_of_forward_features():
    from tokenpatch.training.finetune import final_tokens

    model = make_model("deit_tiny")
    x = images(model)
    with final_tokens(model) as seen:
        model(x)
    assert torch.equal(seen[0], model.forward_features(x)[:, 1:])


def test_token_distillation_is_the_squared_error_over_kept_tokens_and_channels():
    from tokenpatch.training.losses import TokenDistillationLoss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 2, 5, 3, generator=g)
    kept = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    # DynamicViT's losses.py: tokens whose mask exceeds 0.5, squared error averaged over them and the channels
    total = sum(((student[b, n] - teacher[b, n]) ** 2).sum() for b, n in [(0, 0), (0, 2), (1, 3)])
    assert TokenDistillationLoss()(student, teacher, kept).item() == pytest.approx(total.item() / (3 * 3))
    assert TokenDistillationLoss()(student, teacher, torch.zeros(2, 5)).item() == 0.0


def test_dynamicvit_token_distillation_compares_the_final_tokens_it_kept_with_the_teachers():
    from tokenpatch.training.finetune import student_loss, teacher_targets
    from tokenpatch.training.losses import TokenDistillationLoss

    model = tokenpatch.patch(make_model("deit_tiny"), "dynamicvit", keep_ratio=0.5, ratio_weight=0.0)
    teacher, x = frozen_teacher(model), images(model, batch=4)
    config = FinetuneConfig(distill_weight=0.0, token_distill_weight=1.0)
    model.train()
    torch.manual_seed(5)  # the same Gumbel draws in both passes
    with torch.no_grad():
        tokens = model.forward_features(x)[:, 1:]
    kept = get_method("dynamicvit").kept_token_mask(model)
    assert kept.shape == tokens.shape[:2] and 0 < kept.sum() < kept.numel()
    expected = TokenDistillationLoss()(tokens, teacher.forward_features(x)[:, 1:], kept)
    torch.manual_seed(5)
    loss = student_loss(model, teacher_targets(teacher, x, config), x, None, config, DistillationLoss())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0


def test_token_distillation_is_refused_where_tokens_do_not_line_up():
    from tokenpatch.errors import InvalidOptionError

    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.5)
    with pytest.raises(InvalidOptionError, match="evit removes tokens in training"):
        finetune(model, [images(model)], FinetuneConfig(steps=1, token_distill_weight=0.5), progress=False)
