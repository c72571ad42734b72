"""A rubric (a data file) turned into checks and points.

Every automatic rubric item has one check function, registered by its lab in a
``Checks``, returning the fraction earned and a message. A check depends on named
runs: when all of them failed (timeout, out-of-memory, dead kernel, exception,
missing artifact) the check is an ``error`` worth nothing, and every other check
still counts. This module knows no lab.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from grader.diagnose import Diagnosis
from grader.lab import get_lab


@dataclass
class Check:
    id: str
    stage: str
    title: str
    status: str  # pass | fail | error | skip
    points: float
    max_points: float
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_rubric(path: str | Path | None, lab: str | None = None) -> dict:
    """The rubric JSON at ``path``; without one, the default rubric of the lab named ``lab``
    (grader.lab.get_lab). The one reader of a rubric file; cheap: it imports no torch."""
    return json.loads(Path(path or get_lab(lab).rubric).read_text(encoding="utf-8"))


Outcome = tuple[float | None, str]  # fraction earned (0..1; None: left to the TA), message
CheckFunction = Callable[[dict, list[Diagnosis], dict], Outcome]


class Checks(Mapping[str, tuple[tuple[str, ...], CheckFunction]]):
    """A lab's check functions by rubric item id, each with the runs it reads."""

    def __init__(self) -> None:
        self._checks: dict[str, tuple[tuple[str, ...], CheckFunction]] = {}

    def check(self, id: str, runs: tuple[str, ...]) -> Callable[[CheckFunction], CheckFunction]:
        def register(function: CheckFunction) -> CheckFunction:
            self._checks[id] = (runs, function)
            return function
        return register

    def __getitem__(self, id: str) -> tuple[tuple[str, ...], CheckFunction]:
        return self._checks[id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._checks)

    def __len__(self) -> int:
        return len(self._checks)


def score(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict,
          checks: Checks) -> tuple[list[Check], float, float]:
    graded = []
    for item in rubric["items"]:
        title, points = item["title"], float(item["points"])
        if item.get("manual"):
            graded.append(Check(item["id"], item["stage"], title, "skip", 0.0, points,
                                "Graded by hand from the report."))
            continue
        runs, function = checks[item["id"]]
        ran = [evaluation["runs"][r] for r in runs if r in evaluation["runs"]]
        # A check is not graded only when what it reads was not produced; a cell that raised
        # elsewhere in the notebook costs nothing here (every cell runs).
        if runs and not any(run.get("usable") for run in ran):
            graded.append(Check(item["id"], item["stage"], title, "error", 0.0, points,
                                f"Not graded: {_why_not_produced(ran)}"))
            continue
        fraction, message = function(evaluation, diagnoses, rubric)
        if fraction is None:  # the evidence is for a person to judge: left to the TA
            graded.append(Check(item["id"], item["stage"], title, "skip", 0.0, points, message))
            continue
        status = "pass" if fraction >= 1.0 else "fail"
        graded.append(Check(item["id"], item["stage"], title, status, round(points * fraction, 2),
                            points, message))
    automatic = [c for c in graded if c.status != "skip"]
    return graded, round(sum(c.points for c in automatic), 2), sum(c.max_points for c in automatic)


def _why_not_produced(ran: list[dict]) -> str:
    for run in ran:
        failure, missing = run.get("failure"), run.get("missing")
        if failure:
            # The cause first, then what it left unwritten.
            return failure["message"] if not missing or failure["kind"] == "missing-artifact" \
                else f"{failure['message'].rstrip('.')}, so {', '.join(missing)} was not written."
    return "the notebook for this stage was not found"
