"""The README's Python examples run, and its quick start is the example script."""

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
