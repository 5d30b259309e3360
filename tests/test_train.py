"""Self-distillation fine-tuning of patched models."""

import pytest
import torch

import tokenpatch
from tokenpatch.training.losses import FeatureDistillationLoss
from tokenpatch.errors import TokenPatchError
from tokenpatch.training.finetune import (DistillationLoss, FinetuneConfig, finetune, frozen_teacher, head_features, mixed,
                              training_loss)

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


def test_mixup_blends_the_batch_with_itself_and_refuses_labels():
    batch = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = mixed(batch, alpha=1.0)
    assert torch.allclose(out.sum(dim=0), batch.sum(dim=0))  # a permutation's blend keeps the batch sum
    assert out.min() >= 0 and out.max() <= 3 and not torch.equal(out, batch)
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    with pytest.raises(TokenPatchError, match="mixup"):
        finetune(model, [images(model)], FinetuneConfig(steps=1, mixup=0.5, label_weight=1.0), progress=False)


@pytest.mark.parametrize("method", ["idle", "evit"])
def test_finetuning_reduces_the_loss_on_a_fixed_batch(method):
    model = tokenpatch.patch(make_model("deit_tiny", drop_path_rate=0.0), method, keep_ratio=0.3)
    x = images(model, batch=8)
    config = FinetuneConfig(steps=8, lr=3e-5, warmup_steps=1)
    teacher = frozen_teacher(model)
    before = training_loss(model, teacher, x, None, config, DistillationLoss()).item()
    history = finetune(model, [x], config, progress=False, teacher=teacher)
    after = training_loss(model, teacher, x, None, config, DistillationLoss()).item()
    assert len(history) == 8
    assert after < 0.7 * before


def test_labels_add_cross_entropy_and_evaluation_is_logged():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    x, y = images(model, batch=4), torch.tensor([0, 1, 2, 3])
    config = FinetuneConfig(steps=4, lr=1e-4, label_weight=1.0, eval_every=2)
    history = finetune(model, [(x, y)], config, evaluate=lambda m: {"score": 1.0}, progress=False)
    assert [h.get("score") for h in history] == [None, 1.0, None, 1.0]
    teacher = frozen_teacher(model)
    distill_only = training_loss(model, teacher, x, None, config, DistillationLoss())
    with_labels = training_loss(model, teacher, x, y, config, DistillationLoss())
    assert with_labels > distill_only


def test_image_dataset_reads_every_folder_layout(tmp_path):
    from PIL import Image

    from tokenpatch.data import image_dataset

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
    with pytest.raises(FileNotFoundError, match="no image folder"):
        image_dataset(tmp_path / "missing")


def test_augmented_training_split_is_random_and_validation_is_not(tmp_path):
    from PIL import Image

    from tokenpatch.jobs.finetune import split_dataset

    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    train, val = split_dataset("deit_tiny_patch16_224", str(tmp_path), None, 0.5, seed=0, augment=True)
    assert set(train.indices).isdisjoint(val.indices) and len(train) == len(val) == 2
    torch.manual_seed(1)
    assert not torch.equal(train[0][0], train[0][0])  # a new crop each read
    assert torch.equal(val[0][0], val[0][0]) and val[0][0].shape == (3, 224, 224)
    plain, _ = split_dataset("deit_tiny_patch16_224", str(tmp_path), None, 0.5, seed=0)
    assert torch.equal(plain[0][0], plain[0][0])
