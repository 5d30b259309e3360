"""Deployment paths of a patched model at a fixed keep ratio: torch.compile and ONNX (torch.export, or its
clear refusal, is part of every method's contract: tests/method_contract.py)."""

import pytest
import torch

import tokenpatch

from conftest import METHOD_CASES, fixed_counts, images, make_model

EXPORTABLE = [case for case in METHOD_CASES if fixed_counts(case)]


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
