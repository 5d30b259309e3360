"""A patched transformers model's save_pretrained / tokenpatch.from_pretrained round trip: from a
folder and from a Hub cache offline, for every method; a plain from_pretrained loads it unpatched."""

from __future__ import annotations

import json
import logging

import huggingface_hub
import pytest
import torch
import transformers

import tokenpatch
from tokenpatch.core.sidecar import CONFIG_FILE, MODULES_FILE
from tokenpatch.errors import CheckpointError, CheckpointMismatchError

from conftest import METHOD_CASES, case_id
from test_model_sources import cache_repo

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
             patch_size=16, num_labels=5)
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _classifier() -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL)).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _patched(method: str, options: dict) -> torch.nn.Module:
    """A patched classifier whose method modules (if any) hold weights unlike a fresh patch's."""
    model = tokenpatch.patch(_classifier(), method, keep_ratio=0.5, **options)
    modules = model._modules.get("tokenpatch")
    if modules is not None:
        with torch.no_grad():
            for tensor in modules.parameters():
                tensor.add_(torch.randn_like(tensor) * 0.5)
    return model


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_save_pretrained_and_from_pretrained_give_the_patched_model_back(tmp_path, case):
    method, options = case
    model = _patched(method, options)
    model.save_pretrained(tmp_path)
    loaded = tokenpatch.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and tokenpatch.get_method_name(loaded) == method
    assert tokenpatch.get_config(loaded) == tokenpatch.get_config(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # the logits are transformers' own round trip's, patched (bit for bit), and the original's up to the
    # rounding of weights transformers maps from the file at another alignment (also so unpatched: ~3e-8)
    by_hand = tokenpatch.patch(transformers.ViTForImageClassification.from_pretrained(tmp_path), method, keep_ratio=0.5,
                               **options)
    if "tokenpatch" in model._modules:
        by_hand.tokenpatch.load_state_dict(model.tokenpatch.state_dict())
    assert torch.equal(_logits(loaded), _logits(by_hand))
    assert torch.allclose(_logits(loaded), _logits(model), rtol=0, atol=1e-5)


def test_dynamicvit_predictors_travel_beside_the_model_not_inside_it(tmp_path):
    model = _patched("dynamicvit", {})
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("tokenpatch")]
    with safe_open(str(tmp_path / MODULES_FILE), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert len(saved) == 30 and all(torch.equal(v, model.tokenpatch.state_dict()[k]) for k, v in saved.items())
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["method"] == "dynamicvit" and config["tokenpatch_version"] == tokenpatch.__version__


def test_a_plain_from_pretrained_loads_the_unpatched_model_without_complaint(tmp_path, caplog):
    original = _logits(_classifier())
    _patched("dynamicvit", {}).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        plain = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert not tokenpatch.is_patched(plain) and "tokenpatch" not in plain._modules
    assert torch.equal(_logits(plain), original)
    assert not [r for r in caplog.records if "tokenpatch" in r.getMessage() or "UNEXPECTED" in r.getMessage()]


def test_from_pretrained_reads_a_hub_repository_from_the_cache_offline(tmp_path, monkeypatch):
    model = _patched("dynamicvit", {})
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    cache = tmp_path / "hub"
    cache_repo(cache, "someone/patched-vit", {p.name: p for p in folder.iterdir()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = tokenpatch.from_pretrained("someone/patched-vit")
    assert torch.equal(_logits(loaded), _logits(tokenpatch.from_pretrained(folder)))
    with pytest.raises(CheckpointError, match="someone/elsewhere is not in the Hugging Face cache"):
        tokenpatch.from_pretrained("someone/elsewhere")


def test_from_pretrained_of_a_plain_folder_or_a_mismatched_one_is_one_line(tmp_path):
    _classifier().save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="has no tokenpatch_config.json: it is not a patched model"):
        tokenpatch.from_pretrained(tmp_path / "plain")
    _patched("dynamicvit", {}).save_pretrained(tmp_path / "dyn")
    (tmp_path / "dyn" / MODULES_FILE).unlink()
    with pytest.raises(CheckpointMismatchError, match=r"missing \['tokenpatch\."):
        tokenpatch.from_pretrained(tmp_path / "dyn")


def test_saving_again_unpatched_or_with_another_method_leaves_no_stale_files(tmp_path):
    model = _patched("dynamicvit", {})
    model.save_pretrained(tmp_path)
    tokenpatch.unpatch(model)
    assert model.save_pretrained.__func__ is transformers.PreTrainedModel.save_pretrained
    tokenpatch.patch(model, "tome")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / MODULES_FILE).exists()
    assert tokenpatch.get_method_name(tokenpatch.from_pretrained(tmp_path)) == "tome"
