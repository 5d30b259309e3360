"""Deployment paths of a patched model at a fixed keep ratio: torch.compile, torch.export, ONNX."""

import pytest
import torch

import tokenpatch
from tokenpatch.errors import TokenPatchError

from conftest import METHOD_CASES, fixed_counts, images, make_model

EXPORTABLE = [case for case in METHOD_CASES if fixed_counts(case)]
PER_IMAGE = [case for case in METHOD_CASES if not fixed_counts(case)]


def patched(method, options, key="deit_tiny_distilled"):
    return tokenpatch.patch(make_model(key, img_size=96), method, keep_ratio=0.5, **options)


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=lambda v: str(v))
def test_torch_compile_gives_the_same_outputs(method, options):
    torch._dynamo.reset()  # a fresh compile cache: earlier tests' models would pile up guards on shared code
    model = patched(method, options)
    x = images(model, batch=2)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    assert torch.allclose(compiled(x), eager, atol=1e-5)
    assert torch.allclose(compiled(images(model, batch=2, seed=7)), model(images(model, batch=2, seed=7)), atol=1e-5)


@pytest.mark.parametrize("method, options", EXPORTABLE, ids=lambda v: str(v))
def test_torch_export_runs_the_reduced_forward(method, options):
    model = patched(method, options)
    x = images(model, batch=2)
    program = torch.export.export(model, (x,))
    assert torch.allclose(program.module()(x), model(x), atol=1e-5)
    other = images(model, batch=2, seed=5)  # data-dependent top-k/merges, not constants baked in
    assert torch.allclose(program.module()(other), model(other), atol=1e-5)


@pytest.mark.parametrize("method, options", PER_IMAGE, ids=lambda v: str(v))
def test_export_of_per_image_token_counts_is_a_clear_error(method, options):
    model = patched(method, options)
    with pytest.raises(TokenPatchError, match="per-image number of tokens.*cannot be exported"):
        torch.export.export(model, (images(model, batch=2),))


@pytest.mark.parametrize("method, options", EXPORTABLE, ids=lambda v: str(v))
def test_onnx_export_matches_onnxruntime(method, options, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install 'tokenpatch[export]')")
    onnxruntime = pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime")
    model = patched(method, options)
    x = images(model, batch=2)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, images(model, batch=2, seed=9)):
        (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        assert torch.allclose(torch.from_numpy(out), model(batch), atol=1e-4)
