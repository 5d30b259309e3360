"""What a user meets before any model: the command's top level (fast, without torch), the
version, the type stub of the lazy public API, and silencing progress bars."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tokenpatch
from tokenpatch.cli import main
from tokenpatch.cli.parser import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _imports_after(argv: list[str]) -> tuple[int, str, set[str]]:
    """(exit status, stdout, heavy modules imported) of ``tokenpatch argv`` in a fresh interpreter."""
    probe = ("import sys\nfrom tokenpatch.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nheavy = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]\n"
             "print('HEAVY', ','.join(heavy))\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    out, _, heavy = done.stdout.rpartition("HEAVY ")
    return done.returncode, out, set(filter(None, heavy.strip().split(",")))


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--version"]])
def test_the_top_level_answers_without_importing_torch(argv):
    code, out, heavy = _imports_after(argv)
    assert code == 0 and heavy == set()
    if argv == ["--version"]:
        assert out.strip() == f"tokenpatch {tokenpatch.__version__}"
    else:
        assert all(name in out and summary.split()[0] in out for name, summary in COMMANDS.items())


def test_import_tokenpatch_imports_torch_only_when_the_api_is_used():
    probe = ("import sys, tokenpatch\nbefore = 'torch' in sys.modules\ntokenpatch.patch\n"
             "print(before, 'torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120).stdout.split() == ["False", "True"]


def test_a_command_still_needs_its_arguments(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "required: COMMAND" in capsys.readouterr().err


def test_the_type_stub_names_exactly_the_lazily_imported_api():
    """tokenpatch/__init__.pyi (what type checkers read) and __init__.py's lazy table list the same
    names from the same modules, and every one of them imports."""
    stub = ast.parse((ROOT / "tokenpatch" / "__init__.pyi").read_text())
    stubbed = {alias.name: "." * node.level + node.module for node in stub.body if isinstance(node, ast.ImportFrom)
               for alias in node.names}
    assert stubbed == tokenpatch._EXPORTS
    assert all(getattr(tokenpatch, name) is not None for name in tokenpatch.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        tokenpatch.nothing


def test_the_version_is_the_packages():
    from importlib.metadata import version

    assert version("tokenpatch") == tokenpatch.__version__


def test_the_changelog_and_the_citation_name_the_version():
    root = Path(__file__).resolve().parents[1]
    newest = re.search(r"^## \[([^\]]+)\] - (\S+)", (root / "CHANGELOG.md").read_text(), flags=re.M)
    assert newest is not None and newest.group(1) == tokenpatch.__version__
    citation = (root / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(tokenpatch.__version__)}$", citation, flags=re.M)
    if newest.group(2) != "unreleased":  # a released version: dated the same in both
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", newest.group(2))
        assert re.search(rf"^date-released: {newest.group(2)}$", citation, flags=re.M)


@pytest.mark.parametrize("quiet", [["--quiet"], ["-q"], "env"])
def test_quiet_and_tqdm_disable_silence_every_progress_bar(capsys, monkeypatch, quiet):
    argv = ["audit", "deit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--batch-size", "1",
            "--repeats", "2", "--json"]
    if quiet == "env":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(argv + ([] if quiet == "env" else quiet)) == 0
    assert "timing batch" not in capsys.readouterr().err
    assert main(argv) == 0 and ("timing batch" in capsys.readouterr().err) == (quiet != "env")


def test_help_states_every_default():
    """Each option with a default (not None, False or empty) says ``default X`` in its --help, X its value."""
    import argparse
    import re

    from tokenpatch.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS, "==SUPPRESS=="):
                continue
            stated = re.search(r"default:? ([^;),]+)", action.help or "")
            assert stated, f"{name} {action.option_strings[-1]}: no default in its help"
            written = stated.group(1).split()[0]
            assert written == str(action.default) or written == f"{action.default}%", (name, action.option_strings[-1])
