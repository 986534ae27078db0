"""The declared dependencies are the third-party packages the package imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]

IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow"}
"""Import names that differ from the name on PyPI."""
OPTIONAL = {"timm", "torchvision"}
"""Imported by name at run time (model.image_encoder=timm:/torchvision:), extra 'backbones'."""
NOT_IMPORTED = {"aiohttp"}
"""Needed at run time without an import of ours: fsspec's HTTP filesystem, which Ray Data's
file listing threads import."""


def imported_packages() -> set[str]:
    found = set()
    for path in (ROOT / "osmd_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    standard = set(sys.stdlib_module_names) | {"__future__", "osmd_ray"}
    return {IMPORT_TO_DISTRIBUTION.get(name, name) for name in found - standard}


def declared(group: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower() for spec in group}


def test_dependencies_match_the_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = declared(project["dependencies"])
    imported = {name.lower() for name in imported_packages()}
    assert imported - OPTIONAL - required == set(), "imported but not declared"
    assert required - imported - NOT_IMPORTED == set(), "declared but never imported"
    assert OPTIONAL <= declared(project["optional-dependencies"]["backbones"])
