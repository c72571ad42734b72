"""Grading one submission against plain nbclient execution of the same runs.

Both sides run the grading's planned runs (the same injected notebooks, inputs,
order and two runs at a time); the plain side uses a bare NotebookClient with no
sandbox, budgets, output cap, evaluation, diagnosis or report, and starts each
kernel when the run's turn comes. The ratio shows what the grader's own work
costs on top of the students' cells. The grader's runs alone are also timed
three ways, side by side: each kernel started at its run's turn; the default
(``grader.schedule``: on the CPU, kernels start ahead only in idle slots); and
``--workers`` more kernels started ahead, as on a GPU.

    .venv/bin/python bench/grade.py [SUBMISSION] [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from nbclient import NotebookClient

from grader.execute import (STATE_FILE, RunResult, RunSpec, plan_notebook, read_notebook,
                            run_notebook, write_kernel_files)
from grader.pipeline import grade
from grader.schedule import execute_all
from grader.prepare import prepare
from labs.slimming.grading import own_paths, plan_runs, student_lambda
from labs.slimming.kernel import kernel_setup
from labs.slimming.lab import LAB, NOTEBOOKS
from reference.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]


def plain_run(spec: RunSpec, admit: Callable[[], bool] | None = None) -> RunResult | None:
    """The run's notebook, injected as the grader injects it, executed by a bare client."""
    if admit is not None and not admit():
        return None
    write_kernel_files(spec.work_dir, dict(spec.kernel.files))
    config = {"work_dir": str(spec.work_dir), "device": spec.device, "data_root": None,
              "state_file": STATE_FILE, "threads": spec.threads, **spec.kernel.config}
    install = f"import {spec.kernel.runtime} as _slimgrade\n_slimgrade.install({config!r})\n"
    dump = f"import {spec.kernel.runtime} as _slimgrade\n_slimgrade.dump_state(globals(), {STATE_FILE!r})\n"
    plan = plan_notebook(read_notebook(spec.notebook), install, dump, spec.parameters, spec.scale,
                         spec.kernel.known_parameters)
    started = time.monotonic()
    NotebookClient(plan.nb, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": str(spec.work_dir)}}).execute(stderr=subprocess.DEVNULL)
    return RunResult(spec.run_id, spec.notebook.name, spec.work_dir / "plain.ipynb", None, {}, "", [],
                     time.monotonic() - started, False, [])


def in_turn(spec: RunSpec, admit: Callable[[], bool] | None = None) -> RunResult | None:
    """The grader's run with its kernel started only once its turn has come."""
    if admit is not None and not admit():
        return None
    return run_notebook(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path, nargs="?", default=ROOT / "fixtures" / "solution")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the three schedulings, in rotating order; medians printed")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    profile = get_profile(args.profile)
    bundle = LAB.resolve_bundle(profile).path
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        submission = prepare(args.submission, work / "submission", NOTEBOOKS)

        def sparse() -> Path:  # the probes' inputs cost what the reference checkpoint costs
            return bundle / "sparse.pth"

        plan = plan_runs(profile, bundle, "cpu", sparse, sparse,
                         student_lambda(submission.notebooks["sparsity_train"]),
                         {name: own_paths(path, name) for name, path in submission.notebooks.items()})

        def timed_runs(label: str, **options: object) -> float:
            started = time.monotonic()
            results = execute_all(plan, submission, work / label, profile, None, "cpu",
                                  args.workers, kernel=kernel_setup(profile), **options)
            seconds = time.monotonic() - started
            if any(result is None or not result.usable for result in results.values()):
                raise SystemExit(f"{label}: a run failed or did not run; the timing means nothing")
            shutil.rmtree(work / label)
            return seconds

        plain_s = timed_runs("plain", execute=plain_run)
        schedulings = {"in turn": {"execute": in_turn}, "default": {"execute": run_notebook},
                       "ahead": {"execute": run_notebook, "ahead": args.workers}}
        times: dict[str, list[float]] = {name: [] for name in schedulings}
        for round_ in range(args.repeats):
            names = list(schedulings)
            for name in names[round_ % 3:] + names[:round_ % 3]:
                times[name].append(timed_runs(name.replace(" ", "-"), **schedulings[name]))
        in_turn_s, default_s, ahead_s = (statistics.median(times[name]) for name in schedulings)
        started = time.monotonic()
        result = grade(args.submission, work / "graded", profile, workers=args.workers)
        grade_s = time.monotonic() - started
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
          f"{sys.version.split()[0]}, sandbox {result['environment']['sandbox']}")
    print(f"{args.submission.name}: {len(plan)} runs, {args.workers} at a time; "
          f"schedulings: median of {args.repeats}, all: " +
          "; ".join(f"{name} {' '.join(f'{t:.1f}' for t in ts)}" for name, ts in times.items()))
    print(f"plain nbclient execution of the same runs:      {plain_s:7.1f} s")
    print(f"the grader's runs, each kernel started in turn: {in_turn_s:7.1f} s")
    print(f"the grader's runs, default scheduling:          {default_s:7.1f} s")
    print(f"the grader's runs, {args.workers} more kernels started ahead:  {ahead_s:7.1f} s")
    print(f"slimgrade grade (score {result['score']:g}/{result['max_score']:g}):           {grade_s:7.1f} s")
    print(f"ratio default / in turn: {default_s / in_turn_s:.2f}; "
          f"{args.workers} ahead / in turn: {ahead_s / in_turn_s:.2f}")
    print(f"ratio grade / plain: {grade_s / plain_s:.2f} (the grader's own work: "
          f"{max(0.0, grade_s - plain_s):.1f} s, {max(0.0, 1 - plain_s / grade_s):.0%} of the grade)")

if __name__ == "__main__":
    main()
