"""Check built distributions: the sdist carries every file the README and docs link to, the
wheel carries py.typed and an SPDX license. Usage: python .ci/check_package.py DIST_FOLDER"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def linked_files() -> set[str]:
    """Repository paths the README and the docs pages link to (relative links only)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    targets = set()
    for page in pages:
        for link in LINK.findall(page.read_text()):
            if "://" not in link and not link.startswith("mailto:"):
                targets.add((page.parent / link).resolve().relative_to(ROOT).as_posix())
    return targets


def main(dist: Path) -> int:
    sdist, = dist.glob("*.tar.gz")
    wheel, = dist.glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = sorted(t for t in linked_files() if t not in names)
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        typed = "tokenpatch/py.typed" in archive.namelist()
    problems = ([f"the sdist lacks linked files: {missing}"] if missing else []) + (
        [] if typed else ["the wheel lacks tokenpatch/py.typed"]) + (
        [] if "License-Expression: Apache-2.0" in metadata else ["the wheel's metadata has no SPDX license"])
    for problem in problems:
        print(f"check_package: {problem}", file=sys.stderr)
    print(f"check_package: {sdist.name}, {wheel.name}: {'ok' if not problems else 'FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
