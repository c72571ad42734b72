"""The grading machine's settings, decided here and nowhere else in the harness.

* ``cores()``: the CPUs this process may use: ``SLIMGRADE_WORKER_CORES`` when it is set (a
  cluster worker's share, exported by the Slurm job script and by grader.cluster's local
  cluster), else the CPUs this process may run on (its affinity: taskset, a cgroup's
  cpuset), else ``os.cpu_count()``.
* ``default_device()``: "cuda" when torch sees a GPU, else "cpu".
* ``RUNS_AT_ONCE``: notebook runs at once on one machine: of one grading (``slimgrade
  grade``'s default ``--workers``; at most, on a cluster worker) and of a local batch's
  gradings together.

Cheap to import (a batch's own process reads it): torch is imported only when
``default_device`` is called.
"""
from __future__ import annotations

import os

WORKER_CORES_ENV = "SLIMGRADE_WORKER_CORES"
RUNS_AT_ONCE = 2


def cores() -> int:
    """The CPUs this process may use (at least 1)."""
    try:
        return max(1, int(os.environ.get(WORKER_CORES_ENV, "")))
    except ValueError:
        pass
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_device() -> str:
    """The device a grading uses when none is given: "cuda" if torch sees a GPU, else "cpu"."""
    import torch  # here: importing this module stays cheap

    return "cuda" if torch.cuda.is_available() else "cpu"
