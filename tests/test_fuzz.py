"""Fuzzing the two doors bad input comes through: the command line and the checkpoint reader.

Whatever the arguments, the parser and the option reader either accept them or refuse them with
a usage exit (2) or an ``InvalidOptionError``; whatever the file, ``tokenpatch.load`` either loads it
or raises a ``CheckpointError`` and leaves the model unpatched. Nothing else escapes.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tokenpatch
from tokenpatch.checkpoint import METADATA_KEY, is_checkpoint, saved_config
from tokenpatch.cli import build_parser
from tokenpatch.core.options import parse_options
from tokenpatch.core.registry import METHODS
from tokenpatch.errors import CheckpointError, InvalidOptionError

from conftest import make_model

FLAGS = ["--method", "--methods", "--keep-ratio", "--macs-ratio", "--option", "--batch-size", "--img-size", "--repeats",
         "--steps", "--lr", "--data", "--checkpoint", "--json", "--device", "--amp", "-j", "--limit", "--calibration"]
COMMANDS = ["audit", "eval", "finetune", "explain", "bogus"]
WORDS = st.one_of(st.sampled_from(FLAGS), st.text(max_size=12), st.integers().map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(str), st.sampled_from(["all", "tome", "idle:x=1"]))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4),
                           max_leaves=20)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: one small model for every example: a refused patch or load leaves it as it was, an accepted one is undone
MODEL = make_model("deit_tiny", depth=2, img_size=32)


@FAST
@given(command=st.sampled_from(COMMANDS), words=st.lists(WORDS, max_size=8))
def test_the_parser_accepts_or_exits_2(command, words):
    try:
        build_parser().parse_args([command, "deit_tiny_patch16_224", *words])
    except SystemExit as exited:
        assert exited.code == 2


@FAST
@given(method=st.sampled_from(sorted(METHODS)), key=st.text(max_size=12),
       value=st.one_of(st.text(max_size=30), JSON_VALUES.map(json.dumps),
                       st.sampled_from(["1" * 5000, "[" * 2000 + "]" * 2000, "1e999", "-1e999", "nan", "None"])))
def test_an_option_value_is_read_or_refused_in_one_line(method, key, value):
    config_class = METHODS[method].config_class
    key = key if key.isidentifier() else "keep_ratio"
    try:
        options = parse_options(config_class, [(key, value)])
        tokenpatch.patch(MODEL, method, **options)
    except InvalidOptionError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        assert not tokenpatch.is_patched(MODEL)
    else:
        tokenpatch.unpatch(MODEL)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metadata=st.one_of(JSON_VALUES.map(json.dumps), st.text(max_size=50),
                          st.fixed_dictionaries({"method": st.sampled_from(sorted(METHODS) + ["x"]),
                                                 "options": st.dictionaries(st.sampled_from(
                                                     ["keep_ratio", "r", "heads", "pruned", "fuse", "score", "x"]),
                                                     JSON_VALUES, max_size=3)}).map(json.dumps)))
def test_any_metadata_loads_or_is_a_checkpoint_error(metadata):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.safetensors"
        save_file(MODEL.state_dict(), str(path), metadata={METADATA_KEY: metadata})
        _load_or_refuse(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), header=st.booleans())
def test_any_bytes_load_or_are_a_checkpoint_error(data, header):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.safetensors"
        # half the time a plausible safetensors length prefix, so the parser gets past the first check
        path.write_bytes((len(data).to_bytes(8, "little") if header else b"") + data)
        _load_or_refuse(path)


def _load_or_refuse(path: Path) -> None:
    """``load`` (and the header readers) succeed or raise a ``CheckpointError``, the model left unpatched."""
    model = MODEL
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        saved_config(path)
        is_checkpoint(path)
        with warnings.catch_warnings():  # a generated idle file without idle_update says how it loads: expected
            warnings.filterwarnings("ignore", "idle file saved before", UserWarning)
            tokenpatch.load(model, path)
    except CheckpointError as exc:
        assert "\n" not in str(exc).strip()
        assert not tokenpatch.is_patched(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    else:
        assert tokenpatch.is_patched(model)
        tokenpatch.unpatch(model)
