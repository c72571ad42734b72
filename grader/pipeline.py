"""One grading: prepare -> execute -> evaluate -> diagnose -> score -> render, for any lab.

The lab (grader/lab.py) plans the runs and concludes from them; the harness prepares
the hand-in, runs the notebooks (``grader.schedule``: two at a time on two cores by
default), scores the lab's facts against the rubric and writes result.json and
report.html. The shape of result.json is built in one place (``grader.result.GradeResult``).
"""
from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from grader.bundles import Bundle
from grader.result import GradeResult, now
from grader.execute import STOPPING, Failure, RunResult
from grader.lab import GradingRequest, Lab, Outcome, get_lab
from grader.machine import RUNS_AT_ONCE, default_device
from grader.prepare import Submission, prepare
from grader.render import render
from grader.runcache import RunCache
from grader.sandbox import sandbox_available
from grader.schedule import execute_all
from grader.score import load_rubric, score
from grader.untrusted import remove_tree


class Excuse(NamedTuple):
    """Why a run's failure is a note, not the student's failure (``split_failures``)."""

    cause: str  # "probe" or "chained" (result.json's profile_notes[].cause)
    explanation: str


def split_failures(results: dict[str, RunResult | None],
                   excused: dict[str, Excuse]) -> tuple[list[dict], list[dict]]:
    """The failures a student's own full-scale run would have had too, and notes on the rest:
    cells that failed only on a number the profile changed, and exceptions in ``excused``
    runs unless a run on the reference input met the same failure. A run cut short by its
    budget is a failure wherever it happened."""
    failures: dict[tuple, dict] = {}
    notes: dict[tuple, dict] = {}
    for run_id, result in results.items():
        if result is None:
            continue
        for error in result.errors:
            if error.profile_cause:
                notes.setdefault((error.notebook, error.cell_index), {
                    **failure_fields(run_id, error), "cause": "profile",
                    "explanation": f"{error.profile_cause}. The checkpoints the notebook wrote are "
                                   "graded as usual; this costs nothing."})
        f = result.failure
        if f is None:
            continue
        entry = failure_fields(run_id, f)
        if run_id in excused and f.kind not in STOPPING:
            notes.setdefault((f.notebook, f.kind, f.message),
                             {**entry, "cause": excused[run_id].cause,
                              "explanation": excused[run_id].explanation})
        else:
            failures.setdefault((f.notebook, f.kind, f.message), entry)
    # A failure the reference input met too did not happen "only" on the probe or chain.
    return list(failures.values()), [n for key, n in notes.items() if key not in failures]


def failure_fields(run_id: str, f: Failure) -> dict:
    return {"notebook": f.notebook, "run": run_id, "kind": f.kind, "message": f.message,
            "cell_index": f.cell_index, "error_tail": f.error_tail}


def missing_notebook_failures(submission: Submission) -> list[dict]:
    return [{"notebook": f"{name}.ipynb", "run": None, "kind": "missing-artifact",
             "message": f"{name}.ipynb was not found in the submission: hand it in.",
             "cell_index": None, "error_tail": ""} for name in submission.missing]


def environment(device: str) -> dict:
    """The machine that graded, as result.json records it."""
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.cuda.is_available(),
            "cpu_threads": torch.get_num_threads(), "device": device,
            "sandbox": sandbox_available()}


def grade(submission_path: Path, out_dir: Path, profile: object, data_root: Path | None = None,
          device: str | None = None, workers: int = RUNS_AT_ONCE, rubric_path: Path | None = None,
          cache_root: Path | None = None, keep_work: bool = False,
          on_progress: Callable[[str], None] | None = None, run_cache: Path | None = None,
          threads: int | None = None, bundle: Bundle | Path | str | None = None,
          lab: Lab | None = None) -> dict:
    """Grade one submission of ``lab`` (default: grader.lab.DEFAULT_LAB) and write
    result.json, report.html and the executed notebooks.

    ``profile`` is one of the lab's profiles. ``bundle`` is the expected bundle (a folder,
    an archive, a Bundle resolved before; None: the one the lab ships for the profile). It
    is checked by its content hash, never built here, and named in result.json.

    ``threads`` is each kernel's torch thread count; pass it when several gradings share
    the machine (by default the cores are shared among this grading's ``workers``).
    """
    started = time.monotonic()
    lab = lab or get_lab()
    device = device or default_device()
    out_dir.mkdir(parents=True, exist_ok=True)
    work_root = Path(tempfile.mkdtemp(prefix="slimgrade-"))
    try:
        submission = prepare(Path(submission_path), work_root, lab.notebooks, lab.hand_in_skips)
        found = lab.resolve_bundle(profile, bundle, cache_root)
        grading = lab.start(GradingRequest(submission, work_root, profile, found, device, data_root))
        plan = grading.plan()
        kernel_data = data_root if grading.kernel.sees_data else None
        results = execute_all(plan, submission, work_root, profile, kernel_data, device, workers,
                              on_progress, RunCache(run_cache) if run_cache else None,
                              threads=threads, kernel=grading.kernel)
        outcome: Outcome = grading.conclude(results)
        checks, total, max_total = score(outcome.evaluation, outcome.diagnoses,
                                         load_rubric(rubric_path or lab.rubric), lab.checks)
        notebooks_dir = out_dir / "notebooks"
        notebooks_dir.mkdir(exist_ok=True)
        for run_id, result in results.items():
            if result is not None and result.executed_notebook.exists():
                shutil.copyfile(result.executed_notebook, notebooks_dir / f"{run_id}.ipynb")
        result = GradeResult(
            submission=submission.name, profile=profile.name, bundle=found.to_dict(),
            graded_at=now(), duration_s=round(time.monotonic() - started, 1),
            score=total, max_score=max_total, checks=[c.to_dict() for c in checks],
            diagnoses=[d.to_dict() for d in outcome.diagnoses],
            failures=outcome.failures + missing_notebook_failures(submission),
            profile_notes=outcome.profile_notes, profile_changes=outcome.profile_changes,
            metrics=outcome.metrics, handed_in=outcome.handed_in,
            environment=environment(device)).to_dict()
        render(result, out_dir, lab.report)
        return result
    finally:
        if not keep_work:
            remove_tree(work_root)  # a kernel may have nested folders thousands deep
