"""Saving a patched model and loading it back into a fresh one."""

import pytest
import torch

import tokenpatch
from tokenpatch import TokenPatchError

from conftest import images, make_model


@pytest.mark.parametrize(
    "method, options",
    [("idle", {"schedule": "geometric", "start_block": 1}), ("evit", {"drop_blocks": (1, 2), "fuse": True})],
)
def test_save_then_load_reproduces_outputs_exactly(tmp_path, method, options):
    model = tokenpatch.patch(make_model("deit_tiny_distilled"), method, keep_ratio=0.4, **options)
    with torch.no_grad():
        for p in model.parameters():  # make the weights differ from a fresh model's
            p.add_(0.01 * torch.randn_like(p))
    x = images(model)
    expected = model(x)
    tokenpatch.save(model, tmp_path / "patched.safetensors")

    fresh = make_model("deit_tiny_distilled")
    loaded = tokenpatch.load(fresh, tmp_path / "patched.safetensors")
    assert loaded is fresh and tokenpatch.get_method_name(loaded) == method
    assert tokenpatch.get_config(loaded) == tokenpatch.get_config(model)
    assert torch.equal(loaded(x), expected)


def test_config_round_trips_through_json(tmp_path):
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.6, drop_blocks=(1, 3))
    tokenpatch.save_config(model, tmp_path / "config.json")
    assert tokenpatch.load_config(tmp_path / "config.json") == {
        "method": "evit", "options": {"keep_ratio": 0.6, "scorer": "auto", "drop_blocks": [1, 3], "fuse": False}}


def test_load_refuses_plain_files_and_patched_models(tmp_path):
    from safetensors.torch import save_file

    plain = make_model("deit_tiny")
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(TokenPatchError, match="not a tokenpatch checkpoint"):
        tokenpatch.load(make_model("deit_tiny"), tmp_path / "plain.safetensors")
    patched = tokenpatch.patch(make_model("deit_tiny"), "idle")
    tokenpatch.save(patched, tmp_path / "patched.safetensors")
    with pytest.raises(TokenPatchError, match="expects an unpatched model"):
        tokenpatch.load(patched, tmp_path / "patched.safetensors")
