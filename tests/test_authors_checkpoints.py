"""The fine-tuned checkpoints the IdleViT, EViT and DynamicViT repositories release load into the
matching timm model and method. No download: each test writes a file the way the official training
script saves it (``torch.save`` of a dict with the weights under ``model``, beside the optimizer,
the epoch and the ``argparse`` arguments) with the official key names and shapes and random values,
loads it through tokenpatch, and compares logits with a reference of the official inference."""

import argparse
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tokenpatch
from tokenpatch.backends.build import build_timm_model
from tokenpatch.checkpoint import load_official
from tokenpatch.cli import main
from tokenpatch.errors import CheckpointError, CheckpointMismatchError
from tokenpatch.jobs.models import load_model

from conftest import images
from test_official_parity import (reference_dynamicvit_logits, reference_evit_logits, reference_idlevit_logits,
                                  sharp_model)


def official_file(path, model, extra=None, wrapper="model"):
    """``model``'s weights (timm's names are the official backbone names) plus ``extra`` tensors,
    saved as the official scripts save a checkpoint."""
    state = {**model.state_dict(), **(extra or {})}
    torch.save({wrapper: state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 29,
                "args": argparse.Namespace(base_rate=0.7, lr=1e-5, output_dir="logs/output")}, path)
    return path


def official_predictors(width, stages, seed=0):
    """Random weights of ``stages`` official DynamicViT predictors (``PredictorLG`` in models/dyvit.py):
    ``in_conv`` = LayerNorm, Linear(C, C), GELU; ``out_conv`` = Linear(C, C/2), GELU, Linear(C/2, C/4),
    GELU, Linear(C/4, 2), LogSoftmax."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"in_conv.0.weight": (width,), "in_conv.0.bias": (width,), "in_conv.1.weight": (width, width),
              "in_conv.1.bias": (width,), "out_conv.0.weight": (width // 2, width), "out_conv.0.bias": (width // 2,),
              "out_conv.2.weight": (width // 4, width // 2), "out_conv.2.bias": (width // 4,),
              "out_conv.4.weight": (2, width // 4), "out_conv.4.bias": (2,)}
    # scaled by 1/sqrt(fan-in) so that the keep log-probabilities stay apart (no saturated ties)
    return {f"score_predictor.{s}.{name}": torch.randn(shape, generator=g) / shape[-1] ** 0.5
            + (1.0 if name == "in_conv.0.weight" else 0.0) for s in range(stages) for name, shape in shapes.items()}


def official_predictor(state, stage, tokens, policy):
    """The official predictor's forward (written from models/dyvit.py's description): (1, M, C) -> (1, M, 2)."""
    w = lambda name: state[f"score_predictor.{stage}.{name}"]  # noqa: E731
    h = F.gelu(F.linear(F.layer_norm(tokens, (tokens.shape[-1],), w("in_conv.0.weight"), w("in_conv.0.bias"), 1e-5),
                        w("in_conv.1.weight"), w("in_conv.1.bias")))
    half = h.shape[-1] // 2
    weights = policy.unsqueeze(-1)
    context = (h[..., half:] * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
    h = torch.cat([h[..., :half], context.expand(-1, h.shape[1], -1)], dim=-1)
    h = F.gelu(F.linear(h, w("out_conv.0.weight"), w("out_conv.0.bias")))
    h = F.gelu(F.linear(h, w("out_conv.2.weight"), w("out_conv.2.bias")))
    return F.linear(h, w("out_conv.4.weight"), w("out_conv.4.bias")).log_softmax(dim=-1)


def test_a_dynamicvit_release_loads_with_its_predictors_and_runs_the_official_inference(tmp_path):
    source = sharp_model()  # depth 8: predictors before blocks 2, 4, 6
    predictors = official_predictors(source.embed_dim, 3)
    path = official_file(tmp_path / "dynamicvit_70.pth", source, predictors)
    model = load_official(sharp_model(), path, keep_ratio=0.7)  # the method is found from the predictor names
    assert tokenpatch.get_method_name(model) == "dynamicvit"
    x = images(model, batch=3)
    with torch.no_grad():
        logits = model(x)
        official = [partial(official_predictor, predictors, stage) for stage in range(3)]
        expected = reference_dynamicvit_logits(source, x, [2, 4, 6], 0.7, official)
    assert torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("method, options, reference", [
    ("idle", {"keep_ratio": 0.7},  # IdleViT: blocks 2..7 of 8 idle at 0.7, 0.7^2, 0.7^3 (main.py's rule, scaled)
     lambda m, x: reference_idlevit_logits(m, x, list(range(2, 8)), [0.7 ** (t + 1) for t in range(3) for _ in range(2)])),
    ("evit", {"keep_ratio": 0.7, "fuse": True},  # EViT with token fusion, the released models' setting
     lambda m, x: reference_evit_logits(m, x, (2, 4, 6), 0.7, True)),
])
def test_an_idlevit_or_evit_release_loads_as_plain_weights_for_the_method(tmp_path, method, options, reference):
    source = sharp_model()
    path = official_file(tmp_path / f"{method}.pth", source)
    model = load_official(sharp_model(), path, method, **options)
    x = images(model, batch=3)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(source, x), atol=1e-4)
    state_dict_file = official_file(tmp_path / "wrapped.pth", source, wrapper="state_dict")
    assert tokenpatch.get_method_name(load_official(sharp_model(), state_dict_file, method, **options)) == method


def test_a_file_that_does_not_fit_leaves_the_model_untouched(tmp_path):
    path = official_file(tmp_path / "dynamicvit.pth", sharp_model(), official_predictors(sharp_model().embed_dim, 2))
    model = sharp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="missing"):  # 2 predictors for a model that needs 3
        load_official(model, path)
    assert not tokenpatch.is_patched(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="no method's own module weights"):
        load_official(model, official_file(tmp_path / "plain.pth", sharp_model()))


def test_the_command_line_evaluates_a_release_with_its_predictors(tmp_path, capsys):
    source = build_timm_model("deit_tiny_patch16_224", img_size=80)
    predictors = official_predictors(source.embed_dim, 3, seed=1)
    path = official_file(tmp_path / "dynamicvit_deit_tiny_70.pth", source, predictors)
    loaded = load_model("deit_tiny_patch16_224", str(path), img_size=80)  # what --checkpoint does
    kept = loaded.saved.tokenpatch.state_dict()
    assert torch.equal(kept["0.embed.1.weight"], predictors["score_predictor.0.in_conv.1.weight"])
    assert torch.equal(kept["2.head.4.bias"], predictors["score_predictor.2.out_conv.4.bias"])
    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        Image.fromarray((torch.rand(48, 48, 3) * 255).to(torch.uint8).numpy()).save(data / f"{i}.png")
    assert main(["eval", "deit_tiny_patch16_224", "--img-size", "80", "--checkpoint", str(path), "--data", str(data),
                 "--methods", "dynamicvit:keep_ratio=0.7", "-j", "0", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["dynamicvit:keep_ratio=0.7"]["keep_ratio"] == 0.7
