"""The README's Python examples run, and its quick start is the example script."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_start_is_the_example_script():
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert any(block.strip() in example and len(block) > 500 for block in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if "import" in b], ids=lambda b: b.splitlines()[0][:40])
def test_readme_python_block_runs(block, capsys):
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out


def _finetune_defaults_table() -> dict[str, tuple[str, str]]:
    """The README's table of fine-tuning defaults: setting -> (default as written, CLI flag)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("| setting | default | `tokenpatch finetune` flag |"):]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| (`--[\w-]+[^`]*`|–) \|", section[: section.index("\n\n")], flags=re.M)
    return {name: (default, flag.strip("`")) for name, default, flag in rows}


def test_the_readme_states_the_fine_tuning_defaults_the_code_has():
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


def test_the_readme_has_every_recipe_value_and_its_source():
    from tokenpatch.training.recipes import recipe_table

    assert recipe_table() in (ROOT / "README.md").read_text()


def _subcommands() -> dict:
    from tokenpatch.cli import build_parser

    return dict(build_parser()._subparsers._group_actions[0].choices)


def _synopses() -> dict[str, str]:
    """The README's ``tokenpatch COMMAND ...`` usage blocks, by command."""
    blocks = re.findall(r"```text\n(tokenpatch (\w+) .*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return {command: text for text, command in blocks}


def test_the_readme_has_a_synopsis_of_every_command_with_exactly_its_options():
    commands = _subcommands()
    synopses = _synopses()
    assert set(synopses) == set(commands)
    for name, parser in commands.items():
        options = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        written = set(re.findall(r"(--[a-z][\w-]*)", synopses[name]))
        assert written == options, f"{name}: README lacks {sorted(options - written)}, has extra {sorted(written - options)}"
        for action in (a for a in parser._actions if a.option_strings):
            flag = re.escape(action.option_strings[-1])
            for default in re.findall(rf"\[{flag} ([\d.e-]+)[\] ]", synopses[name]):  # a number written is the default
                assert float(default) == action.default, (name, flag, default)
            for spelled in re.findall(rf"{flag} (\w+(?:\|\w+)+)", synopses[name]) if action.choices else []:
                assert set(spelled.split("|")) == set(action.choices), (name, flag)  # every choice, spelled out


def _supported_table() -> list[dict[str, str]]:
    text = (ROOT / "README.md").read_text()
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
    install, test = _bash_blocks((ROOT / "README.md").read_text())[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    pip = re.search(r"pip install -c \S+ -e \S+", install).group(0)
    assert pip.replace("pip install", "pip install -q") in ci
    assert test.strip() in ci.splitlines()

