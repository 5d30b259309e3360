"""The public API: arguments, errors, in-place patching and restoring."""

import copy

import pytest
import timm
import torch

import tokenpatch
from tokenpatch import (
    AlreadyPatchedError,
    InputShapeError,
    InvalidOptionError,
    NotPatchedError,
    UnknownMethodError,
    UnsupportedModelError,
)

from conftest import images, make_model


def test_patch_is_in_place_and_unpatch_restores_exactly():
    model = make_model("deit_tiny")
    x = images(model)
    before = model(x)
    assert tokenpatch.patch(model, "idle", keep_ratio=0.5) is model
    assert tokenpatch.is_patched(model)
    assert not torch.allclose(model(x), before)
    assert tokenpatch.unpatch(model) is model
    assert not tokenpatch.is_patched(model)
    assert torch.equal(model(x), before)
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in model.blocks)


@pytest.mark.parametrize("method", ["idle", "evit"])
def test_state_dict_keys_and_values_unchanged(method):
    model = make_model("deit_tiny_distilled")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenpatch.patch(model, method, keep_ratio=0.5)
    model(images(model))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert type(model) is timm.models.deit.VisionTransformerDistilled


def test_patched_model_loads_an_unpatched_checkpoint():
    source, target = make_model("deit_tiny"), make_model("deit_tiny", )
    torch.nn.init.normal_(source.head.weight)
    tokenpatch.patch(target, "evit", keep_ratio=1.0)
    target.load_state_dict(source.state_dict())
    x = images(source)
    assert torch.equal(target(x), source(x))


def test_unknown_method_is_a_clear_error():
    model = make_model("deit_tiny")
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'.*evit.*idle"):
        tokenpatch.patch(model, "nope")
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, 2, float("nan"), "0.5", None, True])
def test_keep_ratio_out_of_range_is_a_clear_error(bad):
    model = make_model("deit_tiny")
    if bad is None:  # None means "method default", which is valid
        tokenpatch.patch(model, "idle", keep_ratio=bad)
        return
    with pytest.raises(InvalidOptionError, match="keep_ratio"):
        tokenpatch.patch(model, "idle", keep_ratio=bad)
    assert not tokenpatch.is_patched(model)


def test_unknown_option_names_the_valid_ones():
    model = make_model("deit_tiny")
    with pytest.raises(InvalidOptionError, match=r"unknown option\(s\) \['fuse'\].*schedule"):
        tokenpatch.patch(model, "idle", fuse=True)
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("idle", {"schedule": "linear"}, "schedule must be one of"),
        ("idle", {"score": "magic"}, "score must be one of"),
        ("idle", {"start_block": 4}, r"start_block must be in \[0, 4\)"),
        ("evit", {"drop_blocks": (1, 9)}, r"drop_blocks must be block indices in \[0, 4\)"),
    ],
)
def test_bad_option_values_leave_the_model_unpatched(method, options, match):
    model = make_model("deit_tiny")
    x = images(model)
    before = model(x)
    with pytest.raises(InvalidOptionError, match=match):
        tokenpatch.patch(model, method, keep_ratio=0.5, **options)
    assert not tokenpatch.is_patched(model)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10), "cannot patch ResNet"),
        (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1)),
         "cannot patch SwinTransformer"),
        (lambda: timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64,
                                   block_fn=timm.models.vision_transformer.ResPostBlock),
         r"blocks\[0\] is ResPostBlock"),
        (lambda: torch.nn.Linear(3, 3), "cannot patch Linear"),
    ],
)
def test_unsupported_model_is_left_untouched(build, match):
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=match):
        tokenpatch.patch(model, "idle", keep_ratio=0.5)
    assert not tokenpatch.is_patched(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_patching_twice_is_a_clear_error():
    model = make_model("deit_tiny")
    tokenpatch.patch(model, "idle", keep_ratio=0.5)
    with pytest.raises(AlreadyPatchedError, match="already patched with 'idle'.*unpatch"):
        tokenpatch.patch(model, "evit", keep_ratio=0.5)
    assert tokenpatch.get_method_name(model) == "idle"


def test_calls_that_need_a_patched_model():
    model = make_model("deit_tiny")
    for call in (tokenpatch.unpatch, tokenpatch.get_config, lambda m: tokenpatch.set_keep_ratio(m, 0.5)):
        with pytest.raises(NotPatchedError, match="not patched"):
            call(model)


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64), (2, 17, 64)])
def test_non_4d_input_is_a_clear_error(shape):
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    with pytest.raises(InputShapeError, match=r"expected images of shape \(B, C, H, W\)"):
        model(torch.randn(*shape))


def test_set_keep_ratio_changes_sparsity_without_repatching():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    x = images(model)
    at_half = model(x)
    tokenpatch.set_keep_ratio(model, 1.0)
    reference = tokenpatch.unpatch(copy.deepcopy(model))(x)
    assert torch.allclose(model(x), reference, atol=1e-5)
    tokenpatch.set_keep_ratio(model, 0.5)
    assert torch.equal(model(x), at_half)
    assert tokenpatch.get_config(model).keep_ratio == 0.5
    with pytest.raises(InvalidOptionError, match="keep_ratio"):
        tokenpatch.set_keep_ratio(model, 1.5)
    assert tokenpatch.get_config(model).keep_ratio == 0.5


def test_deepcopy_of_a_patched_model_is_independent():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.5)
    clone = copy.deepcopy(model)
    x = images(model)
    assert torch.equal(clone(x), model(x))
    tokenpatch.unpatch(clone)
    assert tokenpatch.is_patched(model) and not tokenpatch.is_patched(clone)
    with tokenpatch.trace(model) as t:
        model(x)
    assert t.tokens_per_block[-1] < t.tokens_per_block[0]


def test_available_methods_lists_idle_and_evit():
    methods = tokenpatch.available_methods()
    assert {"idle", "evit"} <= set(methods)
    assert all(isinstance(s, str) and s for s in methods.values())


def test_config_serialises_to_json_ready_dict():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.6, drop_blocks=(1, 2), fuse=True)
    assert tokenpatch.get_config(model).to_dict() == {"keep_ratio": 0.6, "scorer": "auto", "drop_blocks": [1, 2], "fuse": True}


def test_block_masks_are_refused_on_a_patched_model():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    mask = torch.ones(17, 17, dtype=torch.bool)
    with pytest.raises(tokenpatch.TokenPatchError, match="attn_mask"):
        model(images(model), attn_mask=mask)
