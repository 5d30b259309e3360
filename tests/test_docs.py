"""The README and the documentation pages hold what is true: every Python block runs and prints
what its ``# -> ...`` comments state, tables match the code and the committed results, the
README stays a landing page, and the site builds with warnings as errors."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: a print whose output the text states: ``print(...)  # -> EXPECTED`` (``...`` in EXPECTED: any text)
STATED = re.compile(r"^(\s*)print\((.*)\)\s+# -> (.*)$")


def _blocks() -> list[tuple[str, str]]:
    """(page and block number, code) of every Python block that imports something."""
    found = []
    for page in PAGES:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
        found += [(f"{page.relative_to(ROOT)}#{i}", code) for i, code in enumerate(blocks) if "import" in code]
    return found


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def _checked(code: str) -> str:
    """``code`` with each ``print(...)  # -> EXPECTED`` turned into a print that asserts its line."""
    def check(match: re.Match) -> str:
        indent, arguments, expected = match.groups()
        return f"{indent}_said({arguments}, _expected={expected.strip()!r})"
    return "\n".join(STATED.sub(check, line) for line in code.splitlines())


def _said(*values, _expected: str, sep: str = " ") -> None:
    line = sep.join(map(str, values))
    print(line)
    pattern = ".*".join(map(re.escape, _expected.split("...")))
    assert re.fullmatch(pattern, line), f"printed {line!r}, the text says {_expected!r}"


def test_quick_start_is_the_example_script():
    example = (ROOT / "examples" / "quickstart.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", _page("docs/getting-started.md"), flags=re.S)
    assert any(block.strip() in example and len(block) > 500 for block in blocks)


@pytest.mark.parametrize("where, code", _blocks(), ids=[where for where, _ in _blocks()])
def test_every_python_block_runs_and_prints_what_the_text_states(where, code, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(_checked(code), where, "exec"), {"__name__": "docs", "_said": _said})
    assert capsys.readouterr().out


def test_stated_outputs_are_checked():
    """The check fails on a wrong statement (so a passing block proves its comments)."""
    with pytest.raises(AssertionError, match="printed '4', the text says '5'"):
        exec(compile(_checked("print(2 + 2)  # -> 5"), "t", "exec"), {"_said": _said})
    exec(compile(_checked("print([1, 2, 3])  # -> [1, ..., 3]"), "t", "exec"), {"_said": _said})


def test_the_readme_is_a_landing_page():
    readme = _page("README.md")
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert all((ROOT / link).exists() for link in links if "://" not in link), "every README link resolves"


def test_the_readmes_method_table_is_the_committed_leaderboard():
    """Each top-1 the README's 'Which method' table states is the leaderboard file's figure."""
    rows = json.loads((ROOT / "benchmarks/results/leaderboard.json").read_text())["rows"]
    top1 = {(row["method"], round(row["budget"], 2)): row["top1"] for row in rows}
    table = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([\d.–]+) \| ([\d.–]+) \|$", _page("README.md"), flags=re.M)
    assert len(table) >= 8
    for method, at65, at50 in table:
        for budget, written in ((0.65, at65), (0.5, at50)):
            assert (written == "–") == ((method, budget) not in top1), (method, budget)
            if written != "–":
                assert float(written) == round(top1[method, budget], 1), (method, budget)


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="the docs build needs the docs extra: pip install -e '.[docs]'")
def test_the_documentation_builds_with_warnings_as_errors(tmp_path):
    """Broken links, anchors, docstrings the API reference cannot read: each is a warning, and a failure."""
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={"NO_MKDOCS_2_WARNING": "1",
                                                                           "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokenpatch finetune" in (tmp_path / "site/reference/cli/index.html").read_text()


def _finetune_defaults_table() -> dict[str, tuple[str, str]]:
    """The fine-tuning guide's table of defaults: setting -> (default as written, CLI flag)."""
    text = _page("docs/guides/finetune.md")
    section = text[text.index("| setting | default | `tokenpatch finetune` flag |"):]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| (`--[\w-]+[^`]*`|–) \|", section[: section.index("\n\n")], flags=re.M)
    return {name: (default, flag.strip("`")) for name, default, flag in rows}


def test_the_guide_states_the_fine_tuning_defaults_the_code_has():
    import dataclasses

    from tokenpatch.cli import build_parser
    from tokenpatch.jobs.finetune import FinetuneJob
    from tokenpatch.training import FinetuneConfig

    table = _finetune_defaults_table()
    config = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    stated = {**config, "batch_size": FinetuneJob.batch_size, "val_fraction": FinetuneJob.val_fraction,
              "augment": FinetuneJob.augment, "ema_decay": FinetuneJob.ema_decay}
    assert set(table) == set(stated), "every FinetuneConfig field and the job's data settings are in the table"
    tune = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("finetune"))
    for name, (written, flag) in table.items():
        assert ast.literal_eval(written) == stated[name], name
        if flag.startswith("--") and " " not in flag:
            action = next(a for a in tune._actions if flag in a.option_strings)
            if action.nargs == 0:  # a switch turns the default off or on
                assert action.default is False
            elif action.default is None and action.help and "(default " in action.help:  # a --recipe may set it
                shown = re.search(r"\(default ([^;)]+)", action.help).group(1)
                assert ast.literal_eval(shown) == stated[name], flag
            else:
                assert action.default == stated[name], flag


def test_the_guide_has_every_recipe_value_and_its_source():
    from tokenpatch.training.recipes import recipe_table

    assert recipe_table() in _page("docs/guides/finetune.md")


def _subcommands() -> dict:
    from tokenpatch.cli import build_parser

    return dict(build_parser()._subparsers._group_actions[0].choices)


def _synopses() -> dict[str, str]:
    """The guides' ``tokenpatch COMMAND ...`` usage blocks, by command."""
    text = "".join(page.read_text() for page in PAGES if "guides" in page.parts)
    blocks = re.findall(r"```text\n(tokenpatch (\w+) .*?)```", text, flags=re.S)
    return {command: text for text, command in blocks}


def test_the_guide_has_a_synopsis_of_every_command_with_exactly_its_options():
    commands = _subcommands()
    synopses = _synopses()
    assert set(synopses) == set(commands)
    for name, parser in commands.items():
        options = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        written = set(re.findall(r"(--[a-z][\w-]*)", synopses[name]))
        assert written == options, f"{name}: the guide lacks {sorted(options - written)}, has extra {sorted(written - options)}"
        for action in (a for a in parser._actions if a.option_strings):
            flag = re.escape(action.option_strings[-1])
            for default in re.findall(rf"\[{flag} ([\d.e-]+)[\] ]", synopses[name]):  # a number written is the default
                assert float(default) == action.default, (name, flag, default)
            for spelled in re.findall(rf"{flag} (\w+(?:\|\w+)+)", synopses[name]) if action.choices else []:
                assert set(spelled.split("|")) == set(action.choices), (name, flag)  # every choice, spelled out


def _supported_table() -> list[dict[str, str]]:
    text = _page("docs/models.md")
    section = text[text.index("| library | test_model | model_class | backend | exact | refused | failed |"):]
    lines = section[: section.index("\n\n")].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_the_supported_models_table_covers_every_test_model_and_method_and_its_refusals_hold():
    """Each row names every registered method once, as accepted or refused, and says what
    ``patch`` does: refused methods raise a one-line error, accepted ones patch (the outputs are
    checked by ``benchmarks/supported_families.py``, which generates the table, and the family tests)."""
    import tokenpatch
    from model_zoo import supported_model_builds

    rows = {(row["library"], row["test_model"]): row for row in _supported_table()}
    builds = supported_model_builds()
    assert set(rows) == {(library, key) for library, key, _ in builds}
    methods = set(tokenpatch.available_methods())
    for library, key, build in builds:
        row, model = rows[library, key], build()
        assert row["model_class"] == type(model).__name__ and row["failed"] == "-", key
        exact, refused = ({m for m in row[c].split(", ") if m != "-"} for c in ("exact", "refused"))
        assert exact | refused == methods and not exact & refused, key
        for method in sorted(methods):
            if method in refused:
                with pytest.raises(tokenpatch.TokenPatchError):  # UnsupportedModelError, or InvalidOptionError
                    tokenpatch.patch(model, method)
                assert not tokenpatch.is_patched(model)
            else:
                tokenpatch.unpatch(tokenpatch.patch(model, method))


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_the_readme_set_up_commands_are_what_ci_runs():
    """CI installs and tests exactly as the README's two set-up commands say."""
    blocks = _bash_blocks(_page("README.md"))
    install = next(b for b in blocks if "python3 -m venv" in b)
    test = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    pip = re.search(r"pip install -c \S+ -e \S+", install).group(0)
    assert pip.replace("pip install", "pip install -q") in ci
    assert test.strip() in ci.splitlines()

