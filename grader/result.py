"""The one builder of result.json: every grading, and every hand-in that could not be graded.

Cheap to import (no torch): a batch's own process writes the result of a grading that
failed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

from grader import __version__


@dataclass(frozen=True)
class GradeResult:
    """A grading's result; its fields are result.json's keys, in the contract's order
    (docs/contracts.md). ``manual_max_points`` follows from the checks left to the TA."""

    submission: str
    profile: str
    bundle: dict | None
    graded_at: str
    duration_s: float
    score: float
    max_score: float
    checks: list[dict]  # grader.score.Check.to_dict() each
    diagnoses: list[dict]  # grader.diagnose.Diagnosis.to_dict() each
    failures: list[dict]
    profile_notes: list[dict]
    profile_changes: dict
    metrics: dict  # the lab's facts
    handed_in: dict
    environment: dict
    slimgrade_version: str = field(default=__version__)

    @property
    def manual_max_points(self) -> float:
        return sum(c["max_points"] for c in self.checks if c["status"] == "skip")

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"slimgrade_version": self.slimgrade_version,
                **{k: values[k] for k in ("submission", "profile", "bundle", "graded_at",
                                          "duration_s", "score", "max_score")},
                "manual_max_points": self.manual_max_points,
                **{k: values[k] for k in ("checks", "diagnoses", "failures", "profile_notes",
                                          "profile_changes", "metrics", "handed_in",
                                          "environment")}}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
