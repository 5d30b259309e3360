"""Each method's default equals a small reference written from its official code's inference rule.

ToMe's and ATS's references live in ``test_tome_ats.py``. Each reference here runs one image at a
time with explicit attention, as the official code does, and keeps the official token order
(class token, then the kept patches by descending score), so it also checks that tokenpatch's
position-ordered gathers change nothing.
"""

import math

import pytest
import torch

import tokenpatch

from conftest import images, make_model
from test_tome_ats import reference_bipartite_merge


def explicit_attention(block, t, sizes=None):
    """Block ``block``'s attention output (before the residual) for (N, C) ``t``, with ToMe's
    ``log(size)`` bias when ``sizes`` is given; also the (H, N, D) queries, keys, (H, N, N)
    attention weights and (H, N, D) values."""
    attn, n = block.attn, t.shape[0]
    q, k, v = attn.qkv(block.norm1(t)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    weights = (logits if sizes is None else logits + sizes.log()).softmax(-1)
    return attn.proj((weights @ v).transpose(0, 1).reshape(n, -1)), q, k, weights, v


def mlp_residual(block, t):
    return t + block.ls2(block.mlp(block.norm2(t)))


def head(model, t):
    return model.forward_head(model.norm(t[None]))


def reference_idlevit_logits(model, x, idle_layers, keep_ratios):
    """IdleViT's official inference (``Ackesnal/IdleViT``, ``vit.py`` with ``test=True``): at an idle
    layer the class token's raw logits against every key, averaged over heads (no softmax), pick
    the top ``int(r * patches)`` patches; the class token and they attend among themselves, run
    the MLP and are written back; the others pass unchanged."""
    out = []
    for t in model._pos_embed(model.patch_embed(x)):
        patches = t.shape[0] - 1
        for i, block in enumerate(model.blocks):
            if i not in idle_layers:
                t = mlp_residual(block, t + block.ls1(explicit_attention(block, t)[0]))
                continue
            _, q, k, _, _ = explicit_attention(block, t)
            logits = (q[:, :1] @ k.transpose(-2, -1)).mean(0)[0, 1:]
            chosen = logits.argsort(descending=True)[: int(patches * keep_ratios[idle_layers.index(i)])]
            selected = torch.cat([torch.zeros(1, dtype=torch.long), chosen + 1])
            s = t[selected]
            s = mlp_residual(block, s + block.ls1(explicit_attention(block, s)[0]))
            t = t.index_copy(0, selected, s)
        out.append(head(model, t))
    return torch.cat(out)


def reference_evit_logits(model, x, blocks, keep_rate, fuse=False):
    """EViT's official inference (``youweiliang/evit``, ``evit.py``): at a reduction block, after the
    attention residual, keep the ``ceil(r * (N - 1))`` patches with the highest head-averaged
    class-token attention (softmax probabilities); with ``fuse``, add one token: the dropped
    patches summed with their attention as weights."""
    out = []
    for t in model._pos_embed(model.patch_embed(x)):
        for i, block in enumerate(model.blocks):
            attended, _, _, weights, _ = explicit_attention(block, t)
            t = t + block.ls1(attended)
            if i in blocks:
                scores = weights[:, 0, 1:].mean(0)
                order = scores.argsort(descending=True)
                kept, dropped = order[: math.ceil(keep_rate * (t.shape[0] - 1))], order[math.ceil(keep_rate * (t.shape[0] - 1)):]
                parts = [t[:1], t[1:][kept]]
                if fuse:
                    parts.append((t[1:][dropped] * scores[dropped, None]).sum(0, keepdim=True))
                t = torch.cat(parts)
            t = mlp_residual(block, t)
        out.append(head(model, t))
    return torch.cat(out)


def reference_dynamicvit_logits(model, x, prune_blocks, ratio, predictors=None):
    """DynamicViT's official inference (``raoyongming/DynamicViT``, ``models/dyvit.py``, eval branch):
    before prune block s, the predictor scores the current patches (policy all ones) and the top
    ``int(initial_patches * ratio ** s)`` by keep log-probability stay, in descending order.
    ``predictors`` (default: the patched model's) map (1, M, C) tokens and a (1, M) policy to (1, M, 2)."""
    predictors = predictors if predictors is not None else model.tokenpatch
    out = []
    for t in model._pos_embed(model.patch_embed(x)):
        initial = t.shape[0] - 1
        for i, block in enumerate(model.blocks):
            if i in prune_blocks:
                stage = prune_blocks.index(i)
                keep_log_prob = predictors[stage](t[None, 1:], torch.ones(1, t.shape[0] - 1))[0, :, 0]
                chosen = keep_log_prob.argsort(descending=True)[: int(initial * ratio ** (stage + 1))]
                t = torch.cat([t[:1], t[1:][chosen]])
            t = mlp_residual(block, t + block.ls1(explicit_attention(block, t)[0]))
        out.append(head(model, t))
    return torch.cat(out)


def patched_logits(model, method, x, **options):
    tokenpatch.patch(model, method, **options)
    with torch.no_grad():
        return model(x)


def sharp_model():
    model = make_model("deit_tiny", depth=8, img_size=80)  # 25 patches
    for block in model.blocks:
        block.attn.qkv.weight.data *= 2  # peaked attention, as trained models have
    return model


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_idle_official_inference_is_one_option_away(keep_ratio):
    model = sharp_model()
    x = images(model, batch=3)
    logits = patched_logits(model, "idle", x, keep_ratio=keep_ratio, idle_update="unchanged")
    ratios = [keep_ratio ** (third + 1) for third in range(3) for _ in range(2)]  # idle blocks 2..7 of 8
    with torch.no_grad():
        expected = reference_idlevit_logits(model, x, list(range(2, 8)), ratios)
    assert torch.allclose(logits, expected, atol=1e-4)
    tokenpatch.unpatch(model)
    assert not torch.allclose(patched_logits(model, "idle", x, keep_ratio=keep_ratio), expected, atol=1e-3)


def test_idle_softmax_ranking_is_not_the_official_one():
    model = sharp_model()
    x = images(model, batch=3)
    softmax = patched_logits(model, "idle", x, keep_ratio=0.5, ranking="softmax", idle_update="unchanged")
    with torch.no_grad():
        official = reference_idlevit_logits(model, x, list(range(2, 8)), [0.5 ** (t + 1) for t in range(3) for _ in range(2)])
    assert not torch.allclose(softmax, official, atol=1e-3)


@pytest.mark.parametrize("fuse", [False, True])
def test_evit_default_is_the_official_inference(fuse):
    model = sharp_model()
    x = images(model, batch=3)
    logits = patched_logits(model, "evit", x, keep_ratio=0.6, fuse=fuse)
    with torch.no_grad():
        expected = reference_evit_logits(model, x, (2, 4, 6), 0.6, fuse)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_dynamicvit_inference_is_the_official_inference():
    model = sharp_model()
    x = images(model, batch=3)
    logits = patched_logits(model, "dynamicvit", x, keep_ratio=0.7)
    with torch.no_grad():
        expected = reference_dynamicvit_logits(model, x, [2, 4, 6], 0.7)
    assert torch.allclose(logits, expected, atol=1e-4)


def reference_pitome_logits(model, x, keep_ratio, margin=0.75):
    """PiToMe's official vision inference (``hchautran/PiToMe``, ``pitome_vision`` with the DeiT patch):
    per block, energies ``mean ELU(cos - m_l)`` of the head-averaged keys of the patches order them;
    the first half of the blocks runs bipartite matching over that order, the rest merges the A
    half of the ``2r`` highest-energy patches into their best B partners; size-weighted means."""
    out, depth = [], len(model.blocks)
    for t in model._pos_embed(model.patch_embed(x)):
        sizes = torch.ones(t.shape[0])
        for i, block in enumerate(model.blocks):
            attended, _, k, _, _ = explicit_attention(block, t)
            t = t + block.ls1(attended)
            patches = t.shape[0] - 1
            r = min(math.floor(patches - patches * keep_ratio), patches // 2)
            if r > 0:
                unit = torch.nn.functional.normalize(k.mean(0)[1:], dim=-1)
                similarity = unit @ unit.T
                ranked = torch.nn.functional.elu(similarity - (margin - margin * i / depth)).mean(-1).argsort(descending=True)
                if i < math.ceil(depth / 2):
                    a, b = ranked[0::2], ranked[1::2]
                    best, partner = similarity[a][:, b].max(-1)
                    edges = best.argsort(descending=True)
                    merging, staying = a[edges[:r]], a[edges[r:]]
                    into = b[partner[edges[:r]]]
                else:
                    a, b, staying = ranked[: 2 * r : 2], ranked[1 : 2 * r : 2], ranked[2 * r :]
                    merging, into = a, b[similarity[a][:, b].argmax(-1)]
                kept, kept_sizes = [t[0]], [sizes[0]]
                for token in list(staying + 1) + list(b + 1):
                    members = [token] + [m + 1 for m, d in zip(merging, into) if d + 1 == token]
                    total = sum(sizes[m] for m in members)
                    kept.append(sum(t[m] * sizes[m] for m in members) / total)
                    kept_sizes.append(total)
                t, sizes = torch.stack(kept), torch.stack(kept_sizes)
            t = mlp_residual(block, t)
        out.append(head(model, t))
    return torch.cat(out)


@pytest.mark.parametrize("keep_ratio", [0.9, 0.7])
def test_pitome_default_is_the_official_inference(keep_ratio):
    model = sharp_model()
    x = images(model, batch=3)
    logits = patched_logits(model, "pitome", x, keep_ratio=keep_ratio)
    with torch.no_grad():
        expected = reference_pitome_logits(model, x, keep_ratio)
    assert torch.allclose(logits, expected, atol=1e-4)


def reference_ppt_logits(model, x, blocks, r, threshold):
    """PPT's official inference (``xjwu1024/PPT``, ``pp_block_adaptive``): at a PPT block, after the
    attention (proportional to the sizes), the ATS significance of the patches; an image whose
    significance variance is below the threshold pools ``r`` tokens with ToMe's merge, the others
    keep the class token and their most significant patches, in decreasing order."""
    out = []
    for t in model._pos_embed(model.patch_embed(x)):
        sizes = torch.ones(t.shape[0])
        for i, block in enumerate(model.blocks):
            attended, _, k, weights, v = explicit_attention(block, t, sizes)
            t = t + block.ls1(attended)
            removed = min(r, (t.shape[0] - 1) // 2)
            if i in blocks and removed > 0:
                score = weights[:, 0, 1:].sum(0) * v.transpose(0, 1).reshape(t.shape[0], -1)[1:].norm(dim=-1)
                score = score / score.sum()
                if score.var() < threshold:
                    t, sizes = reference_bipartite_merge(t, sizes, k.mean(0), removed, protected=1)
                else:
                    kept = torch.cat([torch.zeros(1, dtype=torch.long), score.argsort(descending=True)[:-removed] + 1])
                    t, sizes = t[kept], sizes[kept]
            t = mlp_residual(block, t)
        out.append(head(model, t))
    return torch.cat(out)


def test_ppt_default_is_the_official_inference_with_both_branches_in_one_batch():
    model = sharp_model()
    x = images(model, batch=6)
    tokenpatch.patch(model, "ppt", r=6)
    with tokenpatch.trace(model) as t, torch.no_grad():
        model(x)
    variances = t.scores[0].values.var(dim=1).sort().values
    threshold = float(variances[2:4].mean())  # half of the images pool at the first PPT block, half prune
    assert (variances < threshold).any() and (variances >= threshold).any()
    tokenpatch.set_options(model, threshold=threshold)
    with torch.no_grad():
        logits = model(x)
        expected = reference_ppt_logits(model, x, (2, 4, 6), 6, threshold)
    assert torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("method, options", [("evit", {"drop_blocks": (1,)}), ("ats", {"sample_blocks": (1,)}),
                                             ("sait", {"prune_block": 1}), ("sait", {"prune_block": 1, "mass": 0.5})])
def test_a_method_that_drops_after_the_attention_projects_only_the_rows_it_keeps(method, options):
    model = tokenpatch.patch(make_model("deit_tiny", depth=2, img_size=96), method, keep_ratio=0.5, **options)
    x = images(model, batch=1)
    with tokenpatch.trace(model) as t:
        model(x)
    projected = []
    hook = model.blocks[1].attn.proj.register_forward_hook(lambda module, inputs, output: projected.append(inputs[0].shape[1]))
    model(x)
    hook.remove()
    assert t.records[1].mlp_tokens < 37 and projected == [t.records[1].mlp_tokens]
