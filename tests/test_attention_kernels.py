"""Which attention kernel a patched model's blocks run.

On the GPU the fast attention is the flash kernel, and it refuses any mask. These tests guard on
the CPU what decides it there: every block's attention goes through the fused SDPA kernel the
dense model uses (the profiler names the kernel), no method builds an N x N attention map at
inference, and no method hands SDPA a mask unless its batch is padded to per-image token counts
(a batch of one image never is). Proportional attention's log-size bias is folded into the heads
on the devices of ``FOLD_KEY_BIAS_ON`` (CUDA), which the tests turn on for the CPU.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import tokenpatch
from tokenpatch.core import pieces

from conftest import METHOD_CASES, case_id, images, make_model, pads_batches

FUSED, MATH = "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"


def _forward_profile(model: torch.nn.Module, x: torch.Tensor) -> list:
    """The profiler's events of one inference forward of ``model`` on ``x``."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as recorded:
        model(x)
    return list(recorded.events())


def _masks_handed_to_sdpa(model: torch.nn.Module, x: torch.Tensor, monkeypatch) -> list:
    """The ``attn_mask`` of every SDPA call of one inference forward (None where there was none)."""
    masks, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return masks


def test_the_dense_model_runs_the_fused_kernel_in_every_block():
    model = make_model("deit_tiny", depth=4)
    kernels = Counter(event.name for event in _forward_profile(model, images(model, batch=2)))
    assert kernels[FUSED] == 4 and kernels[MATH] == 0


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_every_patched_block_attends_through_the_fused_kernel_without_an_n_by_n_map(case):
    name, options = case
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), name, keep_ratio=0.5, **options)
    events = _forward_profile(model, images(model, batch=2))
    kernels = Counter(event.name for event in events)
    assert kernels[FUSED] == kernels["aten::scaled_dot_product_attention"] >= 4 and kernels[MATH] == 0
    square_maps = [event.input_shapes[0] for event in events if event.name == "aten::softmax"
                   and len(event.input_shapes[0]) >= 2 and event.input_shapes[0][-1] == event.input_shapes[0][-2] > 1]
    assert not square_maps, f"{name} builds an attention map of shape {square_maps[0]}"


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_only_padded_batches_hand_the_attention_a_mask(case, monkeypatch):
    name, options = case
    monkeypatch.setattr(pieces, "FOLD_KEY_BIAS_ON", frozenset({"cpu"}))  # as on CUDA
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), name, keep_ratio=0.5, **options)
    assert all(mask is None for mask in _masks_handed_to_sdpa(model, images(model, batch=1), monkeypatch))
    masks = [mask for mask in _masks_handed_to_sdpa(model, images(model, batch=2), monkeypatch) if mask is not None]
    assert not masks or (pads_batches(case) and all(mask.dtype == torch.bool for mask in masks)), name


@pytest.mark.parametrize("name", ["tome", "ppt"])
def test_a_key_bias_folded_into_the_heads_gives_the_masked_attention(name, monkeypatch):
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), name, keep_ratio=0.5)
    x = images(model, batch=2)
    masked = [mask for mask in _masks_handed_to_sdpa(model, x, monkeypatch) if mask is not None]
    assert masked and all(mask.is_floating_point() for mask in masked)  # the log-size bias, as a mask
    with torch.no_grad():
        reference = model(x)
        monkeypatch.setattr(pieces, "FOLD_KEY_BIAS_ON", frozenset({"cpu"}))
        folded = model(x)
    assert torch.allclose(folded, reference, atol=1e-5)


def test_fold_key_bias_adds_the_bias_to_every_querys_logits():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    bias, scale = torch.randn(2, 7, generator=g, dtype=torch.float64), 0.25
    weights = (scale * q @ k.transpose(-1, -2) + bias[:, None, None, :]).softmax(dim=-1)
    folded = F.scaled_dot_product_attention(*pieces.fold_key_bias(q, k, v, bias, scale), scale=scale)
    assert folded.shape[-1] == 24 and torch.equal(folded[..., 16:], torch.zeros_like(folded[..., 16:]))
    assert torch.allclose(folded[..., :16], weights @ v, atol=1e-12)
