"""``diffrate`` against a reference written from DiffRate's official inference code
(``OpenGVLab/DiffRate``: ``DiffRate/patch/deit.py``, ``DiffRateBlock.forward`` outside training,
``DiffRateAttention.forward``; ``DiffRate/merge.py``, ``get_merge_func``), one image at a time with
the official token order (class token, then the patches by descending class attention)."""

import pytest
import torch

import tokenpatch
from tokenpatch.errors import InvalidOptionError
from tokenpatch.methods.diffrate import PUBLISHED, DiffRateConfig, published_schedule, scaled_schedule

from conftest import images, make_model
from test_official_parity import explicit_attention, head, mlp_residual, patched_logits, sharp_model


def reference_diffrate_logits(model, x, pruned, merged):
    """``pruned``/``merged``: per block, the token counts (class token included) the official code keeps."""
    out = []
    for t in model._pos_embed(model.patch_embed(x)):
        size = torch.ones(t.shape[0])
        for i, block in enumerate(model.blocks):
            attended, _, _, weights, _ = explicit_attention(block, t, size)
            t = t + block.ls1(attended)
            order = torch.cat([torch.zeros(1, dtype=torch.long), weights[:, 0, 1:].mean(0).argsort(descending=True) + 1])
            t, size = t[order][: pruned[i]], size[order][: pruned[i]]
            if merged[i] < t.shape[0]:
                metric = t / t.norm(dim=-1, keepdim=True)
                similarity = metric[merged[i]:] @ metric[: merged[i]].T
                similarity[:, 0] = float("-inf")
                best, into = similarity.max(dim=-1)
                size = size[: merged[i]].index_add(0, into, size[merged[i]:] * best)  # scatter_reduce "sum"
                counts = torch.ones(merged[i]).index_add(0, into, torch.ones(len(into)))
                t = t[: merged[i]].index_add(0, into, t[merged[i]:]) / counts[:, None]  # scatter_reduce "mean"
            t = mlp_residual(block, t)
        out.append(head(model, t))
    return torch.cat(out)


@pytest.mark.parametrize("pruned, merged", [
    ((26, 24, 20, 17, 15, 12, 9, 5), (26, 22, 18, 16, 13, 11, 7, 3)),
    ((26, 26, 26, 21, 21, 14, 14, 14), (26, 26, 23, 21, 17, 14, 10, 10)),  # blocks that only prune or only merge
])
def test_diffrate_is_the_official_inference(pruned, merged):
    model = sharp_model()  # 8 blocks, 25 patches
    x = images(model, batch=3)
    shares = {"pruned": tuple((c - 1) / 25 for c in pruned), "merged": tuple((c - 1) / 25 for c in merged)}
    logits = patched_logits(model, "diffrate", x, **shares)
    with torch.no_grad():
        expected = reference_diffrate_logits(model, x, pruned, merged)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_the_default_is_the_papers_deit_s_schedule_and_the_published_ones_keep_their_counts():
    pruned, merged = scaled_schedule(0.6054, 12)
    published_pruned, published_merged = PUBLISHED["deit_small", 2.9]
    assert [round(s * 196) + 1 for s in pruned] == list(published_pruned)
    assert [round(s * 196) + 1 for s in merged] == list(published_merged)
    assert DiffRateConfig().keep_ratio == 0.6054
    model = make_model("deit_tiny", depth=12, img_size=224, embed_dim=48, num_heads=2)
    tokenpatch.patch(model, "diffrate", **published_schedule("deit_tiny", 0.8))
    with tokenpatch.trace(model) as t:
        model(images(model, batch=2))
    assert t.tokens_per_block == list(PUBLISHED["deit_tiny", 0.8][1])  # each block's output


def test_keep_ratio_scales_the_schedule_and_a_given_schedule_refuses_a_budget():
    lower, higher = scaled_schedule(0.4, 12)[1], scaled_schedule(0.8, 12)[1]
    assert sum(lower) / 12 == pytest.approx(0.4, abs=1e-6) and sum(higher) / 12 == pytest.approx(0.8, abs=1e-6)
    assert all(a <= b for a, b in zip(lower, higher))
    assert len(scaled_schedule(0.6, 4)[0]) == 4
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "diffrate", **{"pruned": (1, 0.8, 0.6, 0.4),
                                                                              "merged": (1, 0.7, 0.5, 0.3)})
    with pytest.raises(InvalidOptionError, match="patch with pruned=None and merged=None"):
        tokenpatch.set_macs_ratio(model, 0.7)
    with pytest.raises(InvalidOptionError, match="give both or neither"):
        tokenpatch.patch(make_model("deit_tiny", depth=4), "diffrate", pruned=(1, 1, 1, 1))
    with pytest.raises(InvalidOptionError, match="published no schedule for deit_base"):
        published_schedule("deit_base", 8.7)


def test_a_template_names_a_published_schedule():
    assert scaled_schedule(0.5, 12, "deit_tiny_0.6") != scaled_schedule(0.5, 12, "deit_small_2.9")
    with pytest.raises(InvalidOptionError, match="template must be one of deit_tiny_0.6, .*got 'deit_huge'"):
        tokenpatch.patch(make_model("deit_tiny", depth=4), "diffrate", template="deit_huge")
