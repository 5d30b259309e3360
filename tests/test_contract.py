"""Contract fixes of the engine: strict option types, forward wrappers, model wrappers, MAC inputs,
per-thread overrides, and a layered package without cycles."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import tokenpatch
from tokenpatch import InvalidOptionError, UnsupportedModelError
from tokenpatch.cli import main
from tokenpatch.core.runner import overriding
from tokenpatch.measure.flops import count_macs
from tokenpatch.training import unpatched_behaviour

from conftest import images, make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method, option, value, message", [
    ("evit", "fuse", "no", "fuse must be True or False, got 'no'"),
    ("evit", "fuse", 0, "fuse must be True or False, got 0"),
    ("idle", "start_block", True, "start_block must be an integer or None, got True"),
    ("idle", "schedule", 1, "schedule must be one of 'constant', 'geometric', got 1"),
    ("evit", "drop_blocks", (1, True), r"drop_blocks must be a list of integers or None, got \(1, True\)"),
    ("sait", "mass", "0.9", "mass must be a number or None, got '0.9'"),
    ("tome", "r", 2.0, "r must be an integer or None, got 2.0"),
])
def test_options_take_only_their_declared_type(method, option, value, message):
    model = make_model("deit_tiny")
    with pytest.raises(InvalidOptionError, match=message):
        tokenpatch.patch(model, method, **{option: value})
    assert not tokenpatch.is_patched(model)
    tokenpatch.patch(model, method)
    before = tokenpatch.get_config(model)
    with pytest.raises(InvalidOptionError, match=message):
        tokenpatch.set_options(model, **{option: value})
    assert tokenpatch.get_config(model) == before


def test_lists_become_tuples_and_ints_become_floats():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=1, drop_blocks=[1, 2])
    config = tokenpatch.get_config(model)
    assert config.drop_blocks == (1, 2) and isinstance(config.keep_ratio, float)


@pytest.mark.parametrize("text, expected", [("false", False), ("True", True)])
def test_cli_options_are_read_by_their_type(text, expected, capsys):
    audit = ["audit", "deit_tiny_patch16_224", "--no-pretrained", "--img-size", "64", "--method", "evit"]
    argv = audit + ["--option", f"fuse={text}", "--batch-size", "1", "--repeats", "1", "--json"]
    assert main(argv) == 0
    assert '"method": "evit"' in capsys.readouterr().out
    args = audit + ["--option", "fuse=no"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tokenpatch: error: fuse must be True or False, got 'no'"


def test_cli_unknown_option_is_one_line(capsys):
    assert main(["audit", "deit_tiny_patch16_224", "--method", "idle", "--option", "fuse=true"]) == 2
    assert "unknown option 'fuse'; valid options:" in capsys.readouterr().err


def _accelerate_style_hook(module, calls):
    """Wrap ``module.forward`` the way accelerate's add_hook_to_module does (a partial calling _old_forward)."""
    module._old_forward = module.forward

    def new_forward(mod, *args, **kwargs):
        calls.append(type(mod).__name__)
        return mod._old_forward(*args, **kwargs)

    module.forward = functools.partial(new_forward, module)


def test_accelerate_style_forward_hooks_keep_running_and_unpatch_restores_them():
    model = make_model("deit_tiny")
    x = images(model)
    reference = model(x)
    calls = []
    for module in (model, *model.blocks):
        _accelerate_style_hook(module, calls)
    hooks = {id(m): (m.__dict__["forward"], m.__dict__["_old_forward"]) for m in (model, *model.blocks)}
    tokenpatch.patch(model, "evit", keep_ratio=0.5)
    calls.clear()
    reduced = model(x)
    assert calls == ["VisionTransformer"] + ["Block"] * 4  # every hook ran while patched
    assert not torch.allclose(reduced, reference, atol=1e-5)  # and the patch ran inside them
    tokenpatch.set_keep_ratio(model, 1.0)
    assert torch.equal(model(x), reference)
    tokenpatch.unpatch(model)
    assert all((m.__dict__["forward"], m.__dict__["_old_forward"]) == hooks[id(m)] for m in (model, *model.blocks))
    assert torch.equal(model(x), reference)


def test_other_instance_forward_wrappers_are_refused_naming_the_block():
    model = make_model("deit_tiny")
    block = model.blocks[2]
    original = block.forward
    block.forward = lambda *args, **kwargs: original(*args, **kwargs)
    with pytest.raises(UnsupportedModelError, match=r"block 2 \(Block\) has an instance-level forward wrapper"):
        tokenpatch.patch(model, "idle")
    assert not tokenpatch.is_patched(model)
    assert all("forward" not in b.__dict__ for i, b in enumerate(model.blocks) if i != 2)


@pytest.mark.parametrize("wrap, advice", [
    (torch.nn.DataParallel, r"tokenpatch.patch\(wrapper.module"),
    (torch.compile, r"patch wrapper._orig_mod"),
])
def test_wrapped_models_are_refused_with_what_to_patch_instead(wrap, advice):
    model = make_model("deit_tiny")
    with pytest.raises(UnsupportedModelError, match=advice):
        tokenpatch.patch(wrap(model), "idle")
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize("size, dynamic", [(96, False), (128, True)])
def test_count_macs_without_an_input_uses_the_models_own_size(size, dynamic):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size, dynamic_img_size=dynamic,
                              depth=2).eval()
    assert count_macs(model).total == count_macs(model, (1, 3, size, size)).total
    tokenpatch.patch(model, "evit", keep_ratio=0.5, drop_blocks=(1,))
    assert count_macs(model).tokens_per_block == [1 + (size // 16) ** 2, 1 + (size // 16) ** 2 // 2]


def test_an_override_applies_to_this_threads_passes_only():
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    x = images(model)
    reduced = model(x)
    with overriding(model, keep_ratio=1.0):
        dense = model(x)
        assert tokenpatch.get_config(model).keep_ratio == 0.5
        seen = []
        import threading

        other = threading.Thread(target=lambda: seen.append(model(x)))
        other.start()
        other.join()
        assert torch.equal(seen[0], reduced)
    with unpatched_behaviour(model):
        assert torch.equal(model(x), dense)
    assert torch.equal(model(x), reduced)


def test_structural_options_stay_fixed_even_in_an_override():
    model = tokenpatch.patch(make_model("deit_tiny"), "dynamicvit")
    with pytest.raises(InvalidOptionError, match=r"\['prune_blocks'\] of 'dynamicvit' are fixed at patch time"):
        with overriding(model, prune_blocks=(1,)):
            pass


def test_the_package_has_no_import_cycles_and_library_code_never_imports_the_cli():
    tool = ROOT.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/import_cycles.py is not beside this checkout")
    done = subprocess.run([sys.executable, str(tool), "tokenpatch"], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.startswith("0 import cycle"), done.stdout
    imports_cli = re.compile(r"^\s*(from\s+(\.+|tokenpatch\.)cli\b|import\s+tokenpatch\.cli\b)", re.MULTILINE)
    offenders = [p for p in (ROOT / "tokenpatch").rglob("*.py")
                 if "cli" not in p.relative_to(ROOT / "tokenpatch").parts and imports_cli.search(p.read_text())]
    assert offenders == []
