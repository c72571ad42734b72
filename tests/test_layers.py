"""The layering of docs/design.md: the harness knows no lab; a lab stands on the harness.

Imports are read from the source (module level and inside functions alike), so a
lazy import that reaches back up is caught too; imports under ``if TYPE_CHECKING:``
are annotations only and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The harness, lowest first: a module may import only modules that stand before it (or itself).
HARNESS = ["grader.untrusted", "grader.files", "grader.machine", "grader.runtime",
           "grader.sandbox", "grader.prepare", "grader.lab", "grader.bundles", "grader.result",
           "grader.execute", "grader.runcache", "grader.schedule", "grader.diagnose", "grader.score",
           "grader.render", "grader.pipeline", "grader.progress", "grader.batch", "grader.cluster",
           "grader.cli"]
# Each lab, lowest first, on top of the whole harness. A lab's trusted reference code is
# its lowest layer and imports nothing of the harness.
LABS = {
    "slimming": ["reference", "labs.slimming.runtime", "labs.slimming.kernel",
                 "labs.slimming.checkpoints", "labs.slimming.evaluate", "labs.slimming.diagnoses",
                 "labs.slimming.checks", "labs.slimming.report", "labs.slimming.grading",
                 "labs.slimming.lab"],
    "lowcomplexity": ["labs.lowcomplexity.export", "labs.lowcomplexity.runtime",
                      "labs.lowcomplexity.profiles", "labs.lowcomplexity.data",
                      "labs.lowcomplexity.measure", "labs.lowcomplexity.reference_model",
                      "labs.lowcomplexity.bundle", "labs.lowcomplexity.diagnoses",
                      "labs.lowcomplexity.checks", "labs.lowcomplexity.report",
                      "labs.lowcomplexity.grading", "labs.lowcomplexity.lab"],
}
# Packages that hold only a docstring or the version; everything may read them.
SHARED = {"grader", "labs", "labs.slimming", "labs.lowcomplexity"}
PACKAGES = ("grader", "reference", "labs")


def within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def lab_of(module: str) -> str | None:
    return next((lab for lab, layers in LABS.items() if any(within(module, l) for l in layers)), None)


def rank(module: str) -> tuple[int, int] | None:
    """(0, layer) in the harness, (1, layer) in its lab; None: nowhere."""
    harness = [i for i, layer in enumerate(HARNESS) if within(module, layer)]
    if harness:
        return 0, max(harness)
    lab = lab_of(module)
    if lab is None:
        return None
    return 1, max(i for i, layer in enumerate(LABS[lab]) if within(module, layer))


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def resolved(imported: str, known: dict[str, Path]) -> str | None:
    """The module an import names (``from a.b import c`` names a.b.c or a.b); None: shared."""
    if imported in SHARED or imported not in known and imported.rsplit(".", 1)[0] in SHARED:
        return None  # `from grader import __version__`
    return imported if imported in known else imported.rsplit(".", 1)[0]


def test_every_module_has_a_layer():
    assert [name for name in modules() if name not in SHARED and rank(name) is None] == []


def test_the_harness_imports_no_lab():
    known = modules()
    reaching = [f"{name} imports {imported}" for name, path in known.items()
                if rank(name) is not None and rank(name)[0] == 0
                for imported in project_imports(path)
                if (target := resolved(imported, known)) and rank(target) and rank(target)[0] == 1]
    assert reaching == []


def test_no_module_imports_a_higher_layer_or_another_lab():
    known = modules()
    wrong = []
    for name, path in known.items():
        own = rank(name) if name not in SHARED else (-1, -1)
        for imported in project_imports(path):
            target = resolved(imported, known)
            if target is None or rank(target) is None:
                continue
            if rank(target)[0] == 1 and own[0] == 1 and lab_of(target) != lab_of(name):
                wrong.append(f"{name} imports {imported} of another lab")
            elif rank(target) > own and not (own[0] == 1 and rank(target)[0] == 0):
                wrong.append(f"{name} imports {imported}")
    # A lab's lowest layer (its reference) stands below the harness: it imports none of it.
    wrong += [f"{name} imports {imported}" for name, path in known.items() if name.startswith("reference")
              for imported in project_imports(path) if imported.split(".")[0] in ("grader", "labs")]
    assert wrong == []


def test_a_lab_that_imports_the_harness_upward_is_caught(tmp_path):
    """The rules themselves: a harness module importing a lab is reported."""
    fake = tmp_path / "fake.py"
    fake.write_text("from labs.slimming.lab import LAB\nif TYPE_CHECKING:\n    import labs.slimming.grading\n")
    assert project_imports(fake) == {"labs.slimming.lab", "labs.slimming.lab.LAB"}
    assert rank("labs.slimming.lab")[0] == 1 and rank("grader.pipeline")[0] == 0


def test_result_json_keys_come_in_the_contract_order():
    """One builder of result.json (grader.result): a grading's and a failed one's alike."""
    from grader.batch import failure_result
    from grader.result import GradeResult

    contract = ["slimgrade_version", "submission", "profile", "bundle", "graded_at", "duration_s",
                "score", "max_score", "manual_max_points", "checks", "diagnoses", "failures",
                "profile_notes", "profile_changes", "metrics", "handed_in", "environment"]
    graded = GradeResult(submission="s", profile="quick", bundle=None, graded_at="t",
                         duration_s=1.0, score=1.0, max_score=2.0,
                         checks=[{"status": "skip", "max_points": 40.0}], diagnoses=[],
                         failures=[], profile_notes=[], profile_changes={}, metrics={},
                         handed_in={}, environment={}).to_dict()
    assert list(graded) == contract and graded["manual_max_points"] == 40.0
    failed = failure_result("s", "quick", {"items": [{"id": "a", "points": 5}]}, "why", "", 0.0)
    assert list(failed) == contract and failed["score"] == 0.0 and failed["max_score"] == 5.0
