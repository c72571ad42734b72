"""The layering of docs/design.md: reference under grader, each stage above the ones it uses.

Imports are read from the source (module level and inside functions alike), so a
lazy import that reaches back up is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import only modules that stand before it (or itself).
LAYERS = ["reference", "grader.untrusted", "grader.runtime", "grader.sandbox", "grader.prepare",
          "grader.checkpoints",
          "grader.execute", "grader.runcache", "grader.schedule", "grader.evaluate",
          "grader.diagnose", "grader.score", "grader.render", "grader.pipeline", "grader.progress",
          "grader.batch", "grader.cluster", "grader.cli"]
# The package itself holds only the version; everything may read it.
SHARED = {"grader"}


def layer_of(module: str) -> int | None:
    matches = [i for i, layer in enumerate(LAYERS)
               if module == layer or module.startswith(layer + ".")]
    return max(matches) if matches else None


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name.split(".")[0] in ("grader", "reference")}
    return found


def modules() -> dict[str, Path]:
    found = {}
    for package in ("grader", "reference"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def test_every_module_has_a_layer():
    assert [name for name in modules() if name not in SHARED and layer_of(name) is None] == []


def test_no_module_imports_a_higher_layer():
    known = modules()
    upward = []
    for name, path in known.items():
        own = layer_of(name) if name not in SHARED else -1
        for imported in project_imports(path):
            if imported in SHARED or imported not in known and imported.rsplit(".", 1)[0] in SHARED:
                continue  # `from grader import __version__`
            target = layer_of(imported)
            if target is not None and target > own:
                upward.append(f"{name} imports {imported}")
    assert upward == []
