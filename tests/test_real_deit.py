"""Accuracy relations on the real DeiT-Tiny and 500 ImageNet images (skipped without the data)."""

import pytest
import torch

import tokenpatch
from tokenpatch.core.registry import METHODS
from tokenpatch.data import IMAGENET_SAMPLE, LabelledImages, eval_transform, load_deit_tiny, load_images
from tokenpatch.measure.evaluate import accuracy, predict


@pytest.fixture(scope="module")
def deit_and_images(shared_data):
    model = load_deit_tiny(shared_data)
    dataset = LabelledImages(shared_data / IMAGENET_SAMPLE, transform=eval_transform(model))
    x, y = load_images(dataset)
    return model, x, y, predict(model, x)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_keep_ratio_one_reproduces_unpatched_top1(deit_and_images, method):
    model, x, y, reference = deit_and_images
    tokenpatch.patch(model, method, keep_ratio=1.0)
    try:
        logits = predict(model, x)
    finally:
        tokenpatch.unpatch(model)
    assert (logits - reference).abs().max() <= 1e-5
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    assert accuracy(logits, y).top1 == accuracy(reference, y).top1


@pytest.mark.parametrize("method", ["idle", "evit"])
def test_top1_falls_as_keep_ratio_falls(deit_and_images, method):
    model, x, y, reference = deit_and_images
    tokenpatch.patch(model, method, keep_ratio=1.0)
    results = {}
    try:
        for r in (1.0, 0.7, 0.3):
            tokenpatch.set_keep_ratio(model, r)
            results[r] = accuracy(predict(model, x), y, reference)
    finally:
        tokenpatch.unpatch(model)
    assert results[1.0].top1 >= results[0.7].top1 > results[0.3].top1
    assert results[1.0].agreement == 100.0 > results[0.7].agreement > results[0.3].agreement
    assert results[0.3].top1 < results[1.0].top1 - 5.0


@pytest.mark.parametrize("method, ratio", [("idle", 0.5), ("evit", 0.7)])
def test_real_weights_agree_across_timm_and_transformers(deit_and_images, method, ratio):
    from hf_convert import compare_patched, hf_twin

    model, x, _, _ = deit_and_images
    same_tokens, max_diff = compare_patched(model, hf_twin(model), x[:50], method, ratio)
    assert same_tokens
    assert max_diff <= 1e-4


def test_sait_counts_follow_real_images_and_a_batch_equals_its_images_alone(deit_and_images):
    model, x, y, reference = deit_and_images
    tokenpatch.patch(model, "sait", keep_ratio=0.9, mass=0.7)
    try:
        with tokenpatch.trace(model) as t:
            together = model(x[:16])
        counts = t.records[-1].counts
        alone = torch.cat([model(x[i : i + 1]) for i in range(16)])
        adaptive = accuracy(predict(model, x), y, reference)
    finally:
        tokenpatch.unpatch(model)
    assert int(counts.max()) - int(counts.min()) >= 10  # per-image counts spread widely
    assert (alone - together).abs().max() <= 1e-4
    assert adaptive.agreement > 80.0  # the kept mass holds most of the prediction


def test_ats_counts_follow_real_images_and_tome_merges_cheaply(deit_and_images):
    model, x, y, reference = deit_and_images
    unpatched = accuracy(reference, y)
    tokenpatch.patch(model, "ats", keep_ratio=0.7)
    try:
        with tokenpatch.trace(model) as t:
            together = model(x[:16])
        alone = torch.cat([model(x[i : i + 1]) for i in range(16)])
    finally:
        tokenpatch.unpatch(model)
    counts = t.records[3].counts
    assert int(counts.max()) - int(counts.min()) >= 10 and int(counts.max()) <= 1 + 138  # 138 = ceil(0.7 * 196)
    assert (alone - together).abs().max() <= 1e-4
    tokenpatch.patch(model, "tome", keep_ratio=0.6)
    try:
        merged = accuracy(predict(model, x), y, reference)
    finally:
        tokenpatch.unpatch(model)
    assert merged.top1 >= unpatched.top1 - 2.0 and merged.agreement > 90.0  # ToMe is strong without training


def test_idle_holds_at_65_percent_of_the_macs_where_the_official_rule_collapses(deit_and_images):
    model, x, y, reference = deit_and_images
    unpatched = accuracy(reference, y)
    results = {}
    for rule in ("merged", "unchanged"):
        tokenpatch.patch(model, "idle", idle_update=rule)
        try:
            tokenpatch.set_macs_ratio(model, 0.65, x[:8])
            results[rule] = accuracy(predict(model, x), y, reference)
        finally:
            tokenpatch.unpatch(model)
    assert results["merged"].top1 >= unpatched.top1 - 2.0  # the default holds on pretrained weights
    assert results["unchanged"].top1 < results["merged"].top1 - 10.0  # the official rule wants fine-tuned ones


@pytest.mark.parametrize("metric", ["deletion", "insertion"])
def test_attention_explains_real_images_better_than_a_random_order(deit_and_images, metric):
    from tokenpatch.interpret.explanation import (attention_rollout, cls_attention_map, curve_auc, deletion_curve,
                                                  insertion_curve)

    model, x, _, _ = deit_and_images
    images = x[:24]
    random_order = torch.rand(24, 14, 14, generator=torch.Generator().manual_seed(0))
    curve = deletion_curve if metric == "deletion" else insertion_curve
    areas = {name: curve_auc(curve(model, images, importance, steps=7)).mean().item()
             for name, importance in [("attention", cls_attention_map(model, images)),
                                      ("rollout", attention_rollout(model, images)), ("random", random_order)]}
    better = (lambda a, b: a < b) if metric == "deletion" else (lambda a, b: a > b)  # insertion: higher is better
    assert better(areas["attention"], areas["random"]) and better(areas["rollout"], areas["random"])
