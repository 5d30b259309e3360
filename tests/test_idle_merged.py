"""``idle``'s default rule for pretrained weights (``idle_update="merged"``) against a reference
written from its definition, and the official rule where a file or a recipe asks for it."""

import warnings

import pytest
import torch
from safetensors.torch import safe_open, save_file

import tokenpatch
from tokenpatch.checkpoint import METADATA_KEY, load_official
from tokenpatch.methods.idle import IdleConfig, score_rule

from conftest import images
from test_official_parity import explicit_attention, head, mlp_residual, patched_logits, sharp_model


def reference_merged_idle_logits(model, x, idle_layers, keep_ratios, fixed=True):
    """One image at a time: an idle layer ranks the patches by the class token's raw logits
    (head mean; the first idle layer's ranking kept when ``fixed``) and selects the top
    ``int(r * patches)`` in descending order; every idle patch joins the selected patch with the
    most similar head-mean key (cosine); the selected tokens run the block on the mean of
    themselves and the patches they took, with a log(size) logit bias; the block's change to each
    mean is added to its selected token and to the patches it took."""
    out = []
    for t in model._pos_embed(model.patch_embed(x)):
        patches, ranking = t.shape[0] - 1, None
        for i, block in enumerate(model.blocks):
            if i not in idle_layers:
                t = mlp_residual(block, t + block.ls1(explicit_attention(block, t)[0]))
                continue
            _, q, k, _, _ = explicit_attention(block, t)
            if ranking is None or not fixed:
                ranking = (q[:, :1] @ k.transpose(-2, -1)).mean(0)[0, 1:]
            chosen = ranking.argsort(descending=True)[: int(patches * keep_ratios[idle_layers.index(i)])] + 1
            selected = torch.cat([torch.zeros(1, dtype=torch.long), chosen])
            idle = torch.tensor(sorted(set(range(t.shape[0])) - set(selected.tolist())), dtype=torch.long)
            metric = torch.nn.functional.normalize(k.mean(0), dim=-1)
            similarity = metric[idle] @ metric[selected].T
            similarity[:, 0] = float("-inf")  # the class token takes no idle token
            taker = similarity.argmax(1)
            sizes = torch.ones(len(selected)).index_add(0, taker, torch.ones(len(idle)))
            means = t[selected].index_add(0, taker, t[idle]) / sizes[:, None]
            change = mlp_residual(block, means + block.ls1(explicit_attention(block, means, sizes)[0])) - means
            t = t.clone()
            t[selected] += change
            t[idle] += change[taker]
        out.append(head(model, t))
    return torch.cat(out)


@pytest.mark.parametrize("keep_ratio, score", [(0.7, None), (0.5, None), (0.5, "fresh")])
def test_merged_idle_tokens_match_the_reference(keep_ratio, score):
    model = sharp_model()
    x = images(model, batch=3)
    logits = patched_logits(model, "idle", x, keep_ratio=keep_ratio, score=score)
    ratios = [keep_ratio ** (third + 1) for third in range(3) for _ in range(2)]  # idle blocks 2..7 of 8
    with torch.no_grad():
        expected = reference_merged_idle_logits(model, x, list(range(2, 8)), ratios, fixed=score is None)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_the_ranking_is_kept_with_merged_idle_tokens_and_fresh_with_the_official_rule():
    assert score_rule(IdleConfig()) == "fixed"
    assert score_rule(IdleConfig(idle_update="unchanged")) == "fresh"
    assert score_rule(IdleConfig(idle_update="unchanged", score="fixed")) == "fixed"


def test_merged_idle_tokens_are_updated_and_differ_from_the_official_rule():
    model = sharp_model()
    x = images(model, batch=2)
    merged = patched_logits(model, "idle", x, keep_ratio=0.5)
    tokenpatch.unpatch(model)
    official = patched_logits(model, "idle", x, keep_ratio=0.5, idle_update="unchanged")
    assert not torch.allclose(merged, official, atol=1e-3)
    with torch.no_grad():
        grid = model.forward_features(x)  # all tokens come back: idle ones in place
    tokenpatch.unpatch(model)
    with torch.no_grad():
        dense = model.forward_features(x)
    assert grid.shape == dense.shape


def _without_option(path, name):
    """Rewrite a save file as one written before option ``name`` existed."""
    import json
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata[METADATA_KEY])
    del config["options"][name]
    metadata = {k: v for k, v in metadata.items() if k == METADATA_KEY}
    metadata[METADATA_KEY] = json.dumps(config)
    save_file(tensors, str(path), metadata=metadata)


def test_a_file_saved_before_idle_update_existed_loads_with_the_official_rule_and_says_so(tmp_path):
    model = sharp_model()
    tokenpatch.patch(model, "idle", keep_ratio=0.5, idle_update="unchanged", score="fresh")
    path = tmp_path / "old.safetensors"
    tokenpatch.save(model, path)
    _without_option(path, "idle_update")
    tokenpatch.unpatch(model)
    with pytest.warns(UserWarning, match="idle file saved before idle_update existed: .*idle_update='unchanged'") as caught:
        tokenpatch.load(model, path)
    assert len(caught) == 1
    assert tokenpatch.get_config(model).idle_update == "unchanged"


def test_a_file_that_records_the_rule_loads_it_without_a_warning(tmp_path):
    model = sharp_model()
    tokenpatch.patch(model, "idle", keep_ratio=0.5)
    path = tmp_path / "new.safetensors"
    tokenpatch.save(model, path)
    tokenpatch.unpatch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenpatch.load(model, path)
    assert tokenpatch.get_config(model).idle_update == "merged"


@pytest.mark.parametrize("given, expected", [({}, "unchanged"), ({"idle_update": "merged"}, "merged")])
def test_the_authors_checkpoints_load_with_the_official_rule_unless_told(tmp_path, given, expected):
    model = sharp_model()
    path = tmp_path / "idlevit.pth"
    torch.save({"model": model.state_dict()}, path)
    load_official(model, path, "idle", keep_ratio=0.7, **given)
    assert tokenpatch.get_config(model).idle_update == expected
