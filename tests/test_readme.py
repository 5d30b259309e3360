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
              "augment": FinetuneJob.augment}
    assert set(table) == set(stated), "every FinetuneConfig field and the job's data settings are in the table"
    tune = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("finetune"))
    for name, (written, flag) in table.items():
        assert ast.literal_eval(written) == stated[name], name
        if flag.startswith("--") and " " not in flag:
            action = next(a for a in tune._actions if flag in a.option_strings)
            if action.nargs == 0:  # a switch turns the default off or on
                assert action.default is False
            else:
                assert action.default == stated[name], flag
