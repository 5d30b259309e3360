"""The contract every registered method keeps, as one reusable test class.

A test module subclasses :class:`MethodContract` and provides a ``case`` fixture giving
``(method name, options)``; every test below then runs on it. ``test_method_contract.py`` does
so for each registered method and each of its ``variants``, ``test_toy_method.py`` for a method
defined in the test itself: a method is tested by registering it.
"""

from __future__ import annotations

import copy
import io
import threading
import time
import typing

import pytest
import torch

import tokenpatch
from tokenpatch.core.ops import gather_tokens
from tokenpatch.core.registry import get_method
from tokenpatch.errors import InvalidOptionError, TokenPatchError

from conftest import images, make_model

#: calls each thread makes in the thread test, and the threads
CALLS_PER_THREAD = 50
THREADS = 4


def patched(case, keep_ratio=0.5, **extra):
    name, options = case
    return tokenpatch.patch(make_model("deit_tiny"), name, keep_ratio=keep_ratio, **{**options, **extra})


def _run_threads(worker, count: int = THREADS) -> list:
    """Run ``worker(i)`` in ``count`` threads; return their results, re-raising the first error."""
    results, errors = [None] * count, []

    def target(i):
        try:
            with torch.no_grad():
                results[i] = worker(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class MethodContract:
    """Generic suites: override the ``case`` fixture to run them on a method."""

    @pytest.fixture
    def case(self):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def test_keep_ratio_one_is_the_unpatched_model_exactly(self, case):
        model = make_model("deit_tiny")
        x = images(model)
        reference = model(x)
        tokenpatch.patch(model, case[0], keep_ratio=1.0, **case[1])
        assert torch.equal(model(x), reference)

    def test_a_reduced_pass_differs_and_unpatch_restores_exactly(self, case):
        model = make_model("deit_tiny")
        keys = set(model.state_dict())
        x = images(model)
        reference = model(x)
        tokenpatch.patch(model, case[0], keep_ratio=0.5, **case[1])
        reduced = model(x)
        assert reduced.shape == reference.shape and torch.isfinite(reduced).all()
        assert not torch.allclose(reduced, reference, atol=1e-5)
        tokenpatch.unpatch(model)
        assert torch.equal(model(x), reference)
        assert set(model.state_dict()) == keys and not tokenpatch.is_patched(model)
        assert not {"forward", "forward_intermediates"} & set(model.__dict__)
        assert all("forward" not in b.__dict__ for b in model.blocks)

    def test_a_sample_gives_the_same_output_alone_and_in_a_batch(self, case):
        model = patched(case)
        x = images(model, batch=4)
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        assert torch.allclose(together, alone, atol=1e-5)

    def test_gradients_reach_the_weights_in_training_mode(self, case):
        model = patched(case).train()
        model(images(model, batch=2)).square().mean().backward()
        grad = model.patch_embed.proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    def test_trace_records_every_block_once(self, case):
        model = patched(case)
        with tokenpatch.trace(model) as t:
            model(images(model))
        assert [r.block for r in t.records] == list(range(len(model.blocks)))
        assert t.input_tokens == 17

    def test_save_and_load_give_the_same_outputs(self, case, tmp_path):
        model = patched(case)
        x = images(model)
        path = tmp_path / "model.safetensors"
        tokenpatch.save(model, path)
        restored = tokenpatch.load(make_model("deit_tiny"), path)
        assert tokenpatch.get_method_name(restored) == case[0]
        assert tokenpatch.get_config(restored) == tokenpatch.get_config(model)
        assert torch.equal(restored(x), model(x))

    def test_the_whole_module_pickles_and_deep_copies(self, case):
        model = patched(case)
        x = images(model)
        expected = model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            assert tokenpatch.is_patched(clone) and torch.equal(clone(x), expected)
            tokenpatch.set_keep_ratio(clone, 1.0)  # the clone's options are its own
            assert tokenpatch.get_config(model).keep_ratio == 0.5
            tokenpatch.unpatch(clone)
            assert torch.equal(clone(x), make_model("deit_tiny")(x))

    def test_export_works_for_fixed_counts_and_is_refused_clearly_otherwise(self, case):
        model = patched(case)
        x = images(model, batch=2)
        method = get_method(case[0])
        if method.fixed_token_counts(tokenpatch.get_config(model)):
            program = torch.export.export(model, (x,))
            other = images(model, batch=2, seed=5)  # data-dependent selections, not constants baked in
            for batch in (x, other):
                assert torch.allclose(program.module()(batch), model(batch), atol=1e-5)
        else:
            with pytest.raises(TokenPatchError, match="per-image number of tokens.*cannot be exported"):
                torch.export.export(model, (x,))

    def test_threads_sharing_the_model_get_the_sequential_outputs(self, case):
        model = patched(case)
        batches = [images(model, batch=b, seed=b) for b in (1, 2, 3, 4)]
        with torch.no_grad():
            expected = [model(b) for b in batches]

        def worker(i):
            wrong = 0
            for call in range(CALLS_PER_THREAD):
                k = (i + call) % len(batches)
                wrong += not torch.equal(model(batches[k]), expected[k])
            return wrong

        assert _run_threads(worker) == [0] * THREADS

    def test_changing_the_keep_ratio_never_mixes_ratios_within_a_pass(self, case):
        model = patched(case)
        x = images(model, batch=2)
        with torch.no_grad():
            outputs = {}
            for ratio in (0.5, 0.25):
                tokenpatch.set_keep_ratio(model, ratio)
                outputs[ratio] = model(x)
        stop = threading.Event()

        def toggle():
            while not stop.is_set():
                for ratio in (0.5, 0.25):
                    tokenpatch.set_keep_ratio(model, ratio)
                    time.sleep(1e-4)  # hand the GIL to the forwards between changes

        toggler = threading.Thread(target=toggle)
        toggler.start()
        try:
            seen = _run_threads(lambda i: [model(x) for _ in range(CALLS_PER_THREAD // 2)], count=2)
        finally:
            stop.set()
            toggler.join()
        for out in (o for thread in seen for o in thread):
            assert any(torch.equal(out, reference) for reference in outputs.values())

    def test_trace_records_only_its_own_threads_passes(self, case):
        model = patched(case)
        small, large = images(model, batch=1), images(model, batch=3)
        with tokenpatch.trace(model) as mine:
            model(small)
            _run_threads(lambda i: model(large), count=2)
        assert mine.records and all(r.positions.shape[0] == 1 for r in mine.records)

    def test_options_are_checked_against_their_declared_types(self, case):
        config_class = get_method(case[0]).config_class
        model = make_model("deit_tiny")
        for name, kind in typing.get_type_hints(config_class).items():
            bad = {bool: [0, "no", "False"], int: [True, 1.5, "3"], float: [True, "0.5"]}.get(kind, [])
            for value in bad:
                with pytest.raises(InvalidOptionError, match=f"{name} must be"):
                    tokenpatch.patch(model, case[0], **{**case[1], name: value})
                assert not tokenpatch.is_patched(model)

    def test_dense_outputs_are_the_full_grid_and_change_nothing_downstream(self, case):
        model = make_model("deit_tiny", depth=6)
        x = images(model, batch=2)
        final_ref, intermediates_ref = model.forward_intermediates(x, indices=[1, 3, 5])
        tokenpatch.patch(model, case[0], keep_ratio=0.5, **case[1])
        final, intermediates = model.forward_intermediates(x, indices=[1, 3, 5])
        assert final.shape == final_ref.shape == model.forward_features(x).shape
        assert [t.shape for t in intermediates] == [t.shape for t in intermediates_ref]
        # every block returned the grid here; the blocks after it went on from the reduced tokens
        assert torch.allclose(final, model.forward_features(x), atol=1e-5)
        assert torch.allclose(model.forward_head(final), model(x), atol=1e-5)
        layers = model.get_intermediate_layers(x, n=2, reshape=True)
        assert [tuple(t.shape) for t in layers] == [(2, 192, 4, 4)] * 2
        assert not torch.allclose(final, final_ref, atol=1e-4)  # it did reduce

    def test_the_grid_holds_each_output_token_at_its_original_position(self, case):
        x = images(make_model("deit_tiny"), batch=2)
        reduced = patched(case, outputs="reduced")
        tokens = reduced.forward_features(x)
        positions = tokenpatch.output_positions(reduced)
        assert positions.shape == tokens.shape[:2]
        grid = patched(case).forward_features(x)
        assert grid.shape[1] == 17
        known = positions >= 0
        assert known[:, 0].all()  # the class token
        assert torch.allclose(gather_tokens(grid, positions.clamp(min=0))[known], tokens[known], atol=1e-5)
