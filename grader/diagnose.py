"""Diagnoses: named findings about a submission, and the catalogue a lab keeps of them.

A lab declares one small unit per diagnosis id with ``Catalogue.diagnosis``: the unit
reads the lab's evaluation (plain facts) and either finds nothing or returns a message
and its evidence; its id, stage, severity and hint for the student are declared with
it. ``error`` means a mistake of the student's; ``warning`` is worth fixing but costs
nothing under the lab's rubric (a rubric may weigh it); ``info`` is worth knowing and
not the student's doing. This module knows no lab.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Diagnosis:
    id: str
    stage: str
    severity: str
    message: str
    evidence: list
    hint: str

    def to_dict(self) -> dict:
        return asdict(self)


Finding = tuple[str, list]  # message, evidence
Detector = Callable[[dict], Finding | None]


@dataclass(frozen=True)
class Entry:
    id: str
    stage: str
    severity: str
    hint: str
    detect: Detector


class Catalogue:
    """A lab's diagnoses, run in the order they were registered."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def diagnosis(self, id: str, stage: str, hint: str,
                  severity: str = "error") -> Callable[[Detector], Detector]:
        def register(detect: Detector) -> Detector:
            self.entries.append(Entry(id, stage, severity, hint, detect))
            return detect
        return register

    def run(self, evaluation: dict) -> list[Diagnosis]:
        found = []
        for entry in self.entries:
            result = entry.detect(evaluation)
            if result:
                message, evidence = result
                found.append(Diagnosis(entry.id, entry.stage, entry.severity, message, evidence,
                                       entry.hint))
        return found


def finding(message: str, evidence: list) -> Finding | None:
    """The finding, or nothing when there is no evidence for it."""
    return (message, evidence) if evidence else None
