"""The one builder of result.json: every grading, and every hand-in that could not be graded.

Cheap to import (no torch): a batch's own process writes the result of a grading that
failed.
"""
from __future__ import annotations

from datetime import datetime, timezone

from grader import __version__


def result_fields(*, submission: str, profile: str, bundle: dict | None, graded_at: str,
                  duration_s: float, score: float, max_score: float, checks: list[dict],
                  diagnoses: list[dict], failures: list[dict], profile_notes: list[dict],
                  profile_changes: dict, metrics: dict, handed_in: dict,
                  environment: dict) -> dict:
    """result.json, in the order of its contract (docs/contracts.md)."""
    return {
        "slimgrade_version": __version__, "submission": submission, "profile": profile,
        "bundle": bundle, "graded_at": graded_at, "duration_s": duration_s,
        "score": score, "max_score": max_score,
        "manual_max_points": sum(c["max_points"] for c in checks if c["status"] == "skip"),
        "checks": checks, "diagnoses": diagnoses, "failures": failures,
        "profile_notes": profile_notes, "profile_changes": profile_changes,
        "metrics": metrics, "handed_in": handed_in, "environment": environment,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


