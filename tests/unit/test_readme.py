"""The user guide names only files that exist, and lists every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PATH = re.compile(
    r"(?<![\w./<-])((?:osmd_ray|configs|docs|tests|benchmarks|jobs|cluster)/[\w./-]*\w)"
)


def test_readme_names_only_files_that_exist():
    # Placeholders of the "Adding a method" recipe are not files.
    paths = {p for p in PATH.findall(README) if "mymethod" not in p}
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_layout_lists_every_module():
    # Package __init__ files are the folder's entry; method modules stand as <name>.py.
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "osmd_ray").rglob("*.py")
        if p.name not in {"__init__.py", "__main__.py"} and p.parent.name != "methods"
    }
    modules |= {"osmd_ray/__init__.py", "osmd_ray/cli/__init__.py"}
    modules |= {"osmd_ray/methods/__init__.py", "osmd_ray/methods/interface.py"}
    layout = README[README.index("## Layout") :]
    unlisted = sorted(m for m in modules if m not in layout)
    assert not unlisted, f"README.md's Layout does not list {unlisted}"
