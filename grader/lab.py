"""Labs are plug-ins: what a lab is to the harness, and how the harness finds one.

A lab is one object (``Lab`` below) registered under the entry-point group
``slimgrade.labs``, as papermill finds its engines, so a course can ship a lab in a
package of its own::

    [project.entry-points."slimgrade.labs"]
    slimming = "labs.slimming.lab:LAB"

The harness (every module of ``grader``) imports no lab: it finds one here by name, or
by the notebooks a hand-in holds, and calls only what ``Lab`` and ``LabGrading`` name.
A lab imports the harness, never the other way round (tests/test_layers.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: the stages below import this module
    from grader.bundles import Bundle
    from grader.diagnose import Diagnosis
    from grader.execute import RunResult
    from grader.prepare import Submission
    from grader.schedule import PlannedRun
    from grader.score import Checks

ENTRY_POINT_GROUP = "slimgrade.labs"
DEFAULT_LAB = "slimming"


class LabError(Exception):
    """No lab of that name; the message is one sentence."""


class Profile(Protocol):
    """What the harness reads of a lab's profile: its name, what shapes its expected
    bundle, and the budgets of one notebook run (grader/execute.py)."""

    name: str
    cell_timeout_s: int
    run_timeout_s: int
    memory_limit_mb: int
    output_limit_bytes: int
    file_limit_mb: int
    disk_limit_mb: int

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class KernelSetup:
    """What a lab adds to each kernel it runs.

    ``runtime`` is a module importable inside the sandbox with ``install(config)`` (run
    first) and ``dump_state(namespace, state_file)`` (run last; it writes plain JSON).
    ``files`` are trusted stand-ins written into the work dir before the run (relative
    path -> text). ``sees`` are the lab's files the sandbox shows the kernel, read-only,
    each with why; nothing else of the lab's package is there.
    """

    runtime: str
    config: dict[str, Any] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    # Names a notebook assigns near its parameters: the profile's values follow those cells
    # when no cell is tagged ``parameters``.
    known_parameters: tuple[str, ...] = ()
    sees: tuple[tuple[Path, str], ...] = ()
    # Whether the kernel sees the data root (read-only): a lab that trains in the notebook
    # needs it; one that measures on a test set must keep its labels out of the sandbox.
    sees_data: bool = True


@dataclass(frozen=True)
class GradingRequest:
    """One grading as the harness asks a lab for it."""

    submission: Submission
    work_root: Path  # the grading's private folder; each run has a folder in it
    profile: Any  # the lab's own profile
    bundle: Bundle  # the expected bundle, resolved and checked by its hash
    device: str
    data_root: Path | None


@dataclass
class Outcome:
    """What a lab concludes from the runs: the parts of result.json that are the lab's."""

    evaluation: dict  # facts the checks read
    diagnoses: list[Diagnosis]
    failures: list[dict]  # result.json's "failures" (the harness adds missing notebooks)
    profile_notes: list[dict]
    profile_changes: dict
    metrics: dict  # the facts as result.json shows them
    handed_in: dict  # what the notebooks printed as handed in


class LabGrading(Protocol):
    """One submission's grading, from the runs it plans to what they show."""

    kernel: KernelSetup

    def plan(self) -> list[PlannedRun]: ...

    def conclude(self, results: dict[str, RunResult | None]) -> Outcome: ...


class ReportSection(Protocol):
    """The lab's words and its part of report.html (an autoescaped fragment).

    Optional members, read when present: ``title`` (the page's heading), ``nav`` (links to
    the section's parts), ``profile_summary(changes)`` (one sentence on what the profile
    changed), ``printed_examples`` (what the notebooks' key lines are), and
    ``class_plot(results) -> data URI | None`` (the class at a glance in summary.html).
    """

    stages: tuple[str, ...]
    stage_titles: Mapping[str, str]
    glossary: str

    def run_label(self, run_id: object) -> str: ...

    # The lab's templates; its ``section.html.j2`` is included in report.html, rendered by
    # the page's own autoescaping environment with ``r`` bound to ``section_view(result)``.
    templates: Any  # a jinja2 loader

    def section_view(self, result: dict) -> dict: ...


class Lab(Protocol):
    name: str
    title: str
    notebooks: tuple[str, ...]  # the notebooks a hand-in holds, without .ipynb
    hand_in_skips: tuple[str, ...]  # files of a hand-in folder never copied (name suffixes)
    profiles: Mapping[str, Any]
    default_profile: str
    rubric: Path  # the default rubric.json
    checks: Checks  # the rubric's automatic items, by id
    report: ReportSection
    user_errors: tuple[type[Exception], ...]  # said in one sentence to the user, never a traceback

    def planned_runs(self, profile: Any) -> int: ...

    def data_problem(self, profile: Any, data_root: Path | None) -> str | None: ...

    def data_folder(self, profile: Any, data_root: Path | None) -> Path | None: ...

    def rubric_problem(self, rubric: dict) -> str: ...

    def resolve_bundle(self, profile: Any, bundle: Bundle | Path | str | None,
                       cache_root: Path | None) -> Bundle: ...

    def start(self, request: GradingRequest) -> LabGrading: ...

    def build_reference(self, profile: Any, out: Path, data_root: Path | None,
                        device: str | None) -> str: ...

    def verify_reference(self, profile: Any, baseline: Bundle, out: Path | None,
                         data_root: Path | None, device: str | None) -> tuple[str, bool]: ...


class imported:
    """A lab's attribute that is an object of one of its modules, imported when first read:
    ``checks = imported("labs.x.checks", "CHECKS")`` keeps the lab's own module cheap (a
    batch's process reads the notebooks and the rubric, never the checks)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, instance: object, owner: type) -> Any:
        value = getattr(import_module(self.module), self.name)
        if instance is not None:
            instance.__dict__[self.attribute] = value
        return value


def installed_labs() -> dict[str, Callable[[], Lab]]:
    """Every registered lab by name, loaded only when asked for."""
    return {point.name: point.load for point in entry_points(group=ENTRY_POINT_GROUP)}


def get_lab(name: str | None = None) -> Lab:
    """The lab of that name (default: ``DEFAULT_LAB``)."""
    name = name or DEFAULT_LAB
    labs = installed_labs()
    if name not in labs:
        known = ", ".join(sorted(labs)) or "none"
        raise LabError(f"No lab named {name!r} is installed (installed: {known}): pass "
                       f"--lab with one of those, or install the lab's package.")
    return labs[name]()


def lab_of(path: Path, several: bool = False) -> Lab:
    """The installed lab whose notebooks ``path`` holds the most of (a hand-in, or with
    ``several`` a class folder of hand-ins); the default lab when none fits better."""
    from grader.prepare import lab_notebooks_in

    labs = {name: load() for name, load in installed_labs().items()}
    entries = sorted(Path(path).iterdir())[:50] if several and Path(path).is_dir() else [Path(path)]

    def found(lab: Lab) -> int:
        total = 0
        for entry in entries:
            try:
                total += len(lab_notebooks_in(entry, lab.notebooks))
            except OSError:
                continue
        return total

    counts = {name: found(lab) for name, lab in labs.items()}
    best = max(counts.values(), default=0)
    if best == 0 or counts.get(DEFAULT_LAB) == best:
        return get_lab()
    return labs[min(name for name, count in counts.items() if count == best)]
