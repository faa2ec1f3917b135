"""The package's shape: six layers as subpackages, small modules, imports only downward (the
import contracts themselves run in `make lint` with import-linter)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "et_circuits"
LAYERS = ["core", "models", "methods", "tasks", "presentation", "pipeline"]  # bottom to top
MAX_LINES = 450


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts)


def test_the_package_holds_only_its_layers():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert top == sorted(["__init__.py", "__main__.py", *LAYERS])
    assert all((PACKAGE / layer / "__init__.py").exists() for layer in LAYERS)


def test_no_module_is_over_the_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _imported(path: Path) -> set[str]:
    """The et_circuits layers a module imports (absolute and relative imports)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                name = node.module or ""
        elif isinstance(node, ast.Import):
            name = node.names[0].name
        else:
            continue
        bits = name.split(".")
        if bits[0] == "et_circuits" and len(bits) > 1 and bits[1] in LAYERS:
            found.add(bits[1])
    return found


def test_every_import_goes_down_the_layers():
    """A plain re-check of the import-linter contract, so that `pytest` alone also catches an
    upward import (e.g. core importing methods)."""
    upward = {}
    for path in modules():
        rel = path.relative_to(PACKAGE).parts
        if len(rel) < 2:
            continue  # __init__ / __main__ re-export every layer
        layer = LAYERS.index(rel[0])
        bad = sorted(l for l in _imported(path) if LAYERS.index(l) > layer)
        if bad:
            upward[str(path.relative_to(PACKAGE))] = bad
    assert upward == {}
