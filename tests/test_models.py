"""Every supported timm architecture: exactness at keep 1, schedules, batching, training."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpatch
from tokenpatch.backends import find_backend
from tokenpatch.core.pieces import full_block

from conftest import METHOD_CASES, SMALL_MODELS, case_id, images, make_model, pads_batches

@pytest.mark.parametrize("key", SMALL_MODELS)
@pytest.mark.parametrize("variant", METHOD_CASES, ids=case_id)
def test_keep_ratio_one_reproduces_unpatched_logits(key, variant):
    method, options = variant
    if key == "avg_pool" and pads_batches(variant):
        pytest.skip("padding per-image counts is refused for average pooling (tested in test_methods.py)")
    model = make_model(key)
    x = images(model)
    reference = model(x)
    tokenpatch.patch(model, method, keep_ratio=1.0, **options)
    assert (model(x) - reference).abs().max() <= 1e-5
    tokenpatch.set_keep_ratio(model, 0.5)
    reduced = model(x)
    assert reduced.shape == reference.shape and torch.isfinite(reduced).all()
    assert not torch.allclose(reduced, reference, atol=1e-5)
    tokenpatch.unpatch(model)
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("key", SMALL_MODELS)
def test_engine_pieces_compose_to_the_original_block(key):
    model = make_model(key)
    backend = find_backend(model)
    x = torch.randn(2, 20, model.embed_dim)
    for block in model.blocks:
        assert torch.allclose(full_block(backend.view(block, {}), x), block(x), atol=1e-5)


def expected_idle_tokens(n_patches, prefix, depth, r, start, geometric):
    counts = [n_patches + prefix] * start
    reducing = depth - start
    for i in range(reducing):
        ratio = r ** (i * 3 // reducing + 1) if geometric else r
        counts.append(prefix + max(1, int(ratio * n_patches)))
    return counts


def expected_evit_tokens(n_patches, prefix, depth, r, blocks, fuse):
    counts, candidates = [], n_patches
    for i in range(depth):
        if i in blocks:
            keep = math.ceil(r * candidates)
            candidates = keep + (1 if fuse and keep < candidates else 0)
        counts.append(prefix + candidates)
    return counts


@pytest.mark.parametrize("key", ["deit_tiny", "deit_tiny_distilled", "vit_reg4"])
@pytest.mark.parametrize("geometric", [False, True])
@pytest.mark.parametrize("r", [0.3, 0.5, 0.9])
def test_idle_trace_matches_schedule(key, geometric, r):
    model = make_model(key, depth=6)
    x = images(model, batch=2)
    prefix, n = model.num_prefix_tokens, model.patch_embed.num_patches
    schedule = "geometric" if geometric else "constant"
    tokenpatch.patch(model, "idle", keep_ratio=r, schedule=schedule, start_block=2)
    with tokenpatch.trace(model) as t:
        out_tokens = model.forward_features(x).shape[1]
    assert t.tokens_per_block == expected_idle_tokens(n, prefix, 6, r, 2, geometric)
    assert t.attention_tokens_per_block == t.tokens_per_block
    assert out_tokens == n + prefix  # idle tokens stay in the sequence
    for record in t.records:
        assert record.positions.shape == (2, record.mlp_tokens)
        assert torch.equal(record.positions[:, :prefix], torch.arange(prefix).expand(2, -1))


@pytest.mark.parametrize("key", ["deit_tiny", "deit_tiny_distilled"])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("r", [0.25, 0.5, 0.7])
def test_evit_trace_matches_schedule(key, fuse, r):
    model = make_model(key, depth=6)
    prefix, n = model.num_prefix_tokens, model.patch_embed.num_patches
    tokenpatch.patch(model, "evit", keep_ratio=r, drop_blocks=(1, 3, 4), fuse=fuse, outputs="reduced")
    with tokenpatch.trace(model) as t:
        out_tokens = model.forward_features(images(model, batch=2)).shape[1]
    expected = expected_evit_tokens(n, prefix, 6, r, (1, 3, 4), fuse)
    assert t.tokens_per_block == expected
    assert out_tokens == expected[-1]
    dropping = t.records[1]
    assert dropping.attention_tokens == n + prefix and dropping.mlp_tokens == expected[1]
    if fuse:
        assert (dropping.positions[:, -1] == -1).all()


def test_default_schedules_for_twelve_blocks():
    model = make_model("deit_tiny", depth=12)  # 16 patches
    tokenpatch.patch(model, "idle", keep_ratio=0.5)
    with tokenpatch.trace(model) as t:
        model(images(model, batch=1))
    # the official inference schedule: blocks 3..11 keep int(r * 16), int(r**2 * 16), int(r**3 * 16)
    assert t.tokens_per_block == [17] * 3 + [1 + 8] * 3 + [1 + 4] * 3 + [1 + 2] * 3
    tokenpatch.unpatch(model)
    tokenpatch.patch(model, "evit", keep_ratio=0.5)
    with tokenpatch.trace(model) as t:
        model(images(model, batch=1))
    assert [i for i, r in enumerate(t.records) if r.attention_tokens != r.mlp_tokens] == [3, 6, 9]


@pytest.mark.parametrize("variant", METHOD_CASES, ids=case_id)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_a_sample_does_not_depend_on_its_batch(variant, data):
    method, options = variant
    model = tokenpatch.patch(make_model("deit_tiny_distilled"), method, keep_ratio=0.4, **options)
    batch = images(model, batch=6, seed=data.draw(st.integers(0, 1000)))
    members = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True))
    together = model(batch)
    alone = model(batch[members])
    assert torch.allclose(alone, together[members], atol=1e-5)


@pytest.mark.parametrize("key", ["deit_tiny", "deit3_layerscale", "qk_norm", "deit_tiny_distilled"])
@pytest.mark.parametrize("variant", METHOD_CASES, ids=case_id)
def test_train_mode_gradients_reach_every_used_parameter(key, variant):
    method, options = variant
    model = make_model(key, drop_path_rate=0.1)
    tokenpatch.patch(model, method, keep_ratio=0.5, **options).train()
    out = model(images(model, batch=4))
    per_sample = (out[0] if isinstance(out, tuple) else out).square().mean(dim=1)
    ctx = model._tokenpatch
    method_losses = [w * loss(model, per_sample) for w, loss in ctx.method.training_losses(ctx.config)]
    (per_sample.mean() + sum(method_losses)).backward()  # the method's own losses train its own modules
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dynamic_img_size_patches_other_resolutions():
    model = tokenpatch.patch(make_model("dynamic_img_size"), "idle", keep_ratio=0.5, schedule="constant")
    with tokenpatch.trace(model) as t:
        model(torch.randn(2, 3, 96, 80))
    patches = (96 // 16) * (80 // 16)
    assert t.tokens_per_block[0] == patches + 1
    assert t.tokens_per_block[-1] == 1 + patches // 2


FULL_SIZE = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_small_distilled_patch16_224", "vit_small_patch16_224", "deit3_small_patch16_224",
]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_models_patch_and_reproduce(name):
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
        tokenpatch.patch(model, "idle", keep_ratio=1.0)
        assert (model(x) - reference).abs().max() <= 1e-5
        tokenpatch.set_keep_ratio(model, 0.5)
        with tokenpatch.trace(model) as t:
            model(x)
    prefix = model.num_prefix_tokens
    assert t.tokens_per_block == [196 + prefix] * 3 + [98 + prefix] * 3 + [49 + prefix] * 3 + [24 + prefix] * 3
