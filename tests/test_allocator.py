"""The streamed passes hand the heap's free pages back to the system after every batch, so their
resident memory does not grow with the images read (glibc keeps freed batches otherwise)."""

import ctypes
import sys
from pathlib import Path

import pytest
import torch

from tokenpatch.cli import main
from tokenpatch.measure import allocator
from tokenpatch.measure.evaluate import streamed_top1
from tokenpatch.training import FinetuneConfig, finetune

from conftest import images, make_model, random_folder_and_weights


def _resident_mb() -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator._malloc_trim() is None,
                    reason="needs Linux's /proc and glibc's malloc_trim")
def test_trim_heap_returns_the_pages_of_freed_heap_blocks():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    blocks = [libc.malloc(100_000) for _ in range(500)]  # below glibc's mmap threshold: from the heap
    for block in blocks:
        ctypes.memset(block, 1, 100_000)
    for block in blocks[:-1]:  # the last one pins the heap's top, so free() alone gives nothing back
        libc.free(block)
    held = _resident_mb()
    allocator.trim_heap()
    assert _resident_mb() < held - 30  # about 50 MB were freed
    libc.free(blocks[-1])


@pytest.fixture
def trims(monkeypatch):
    counted = []
    monkeypatch.setattr(allocator, "trim_heap", lambda: counted.append(1))
    return counted


def test_a_streamed_scoring_pass_trims_after_every_batch(trims):
    model = make_model("deit_tiny", depth=2)
    batches = [(images(model, 2, seed), torch.zeros(2, dtype=torch.long)) for seed in range(3)]
    streamed_top1(model, batches)
    assert len(trims) == 3


def test_the_training_loop_trims_after_every_batch(trims):
    import tokenpatch

    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "idle", keep_ratio=0.7)
    batches = [(images(model, 2, seed), None) for seed in range(2)]
    finetune(model, batches, FinetuneConfig(steps=4))
    assert len(trims) == 3  # after each step's batch but the last, when the loop asks for the next one


def test_the_eval_command_trims_after_every_batch(trims, tmp_path):
    data, weights = random_folder_and_weights(tmp_path, 6)
    argv = ["eval", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights), "--methods", "idle",
            "--batch-size", "2", "--calibration", "2"]
    assert main(argv) == 0
    assert len(trims) >= 3
