"""When each run of a grading goes: its inputs first, ``workers`` at a time, kernels ahead.

A run's kernel (start plus ``import torch`` and torchvision: seconds of CPU) can be
started ahead of its turn, each in its own work dir and sandbox, for a run whose
inputs exist already or are being computed right now. Nothing passes between runs
except the input files the plan names. When a slot frees, the waiting run with the
longest chain of work behind it (its own cost plus that of the runs waiting for its
output) gets its inputs and goes.

How many kernels start ahead depends on where the runs compute. On the CPU the
start-up is CPU work like the runs themselves, so a kernel starts ahead only in a
slot no run uses (the tail of a chain); ahead of busy slots it would slow them
(docs/benchmarks.md). On a GPU the CPU is mostly idle while runs compute, and
``workers`` more kernels may start ahead.

With a run cache, kernels are not started ahead: a cached run needs no kernel, and
whether a run is cached is known only once its inputs exist.

On a machine with several GPUs, each kernel sees one of them (``CUDA_VISIBLE_DEVICES``),
the one with the fewest of this grading's kernels on it.
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from grader.execute import Failure, RunResult, RunSpec, executed_notebook_path, run_notebook
from grader.lab import KernelSetup, Profile
from grader.machine import cores
from grader.prepare import Submission
from grader.runcache import RunCache
from grader.sandbox import sandbox_available
from grader.untrusted import UntrustedFileError, copy_file

Execute = Callable[..., "RunResult | None"]  # (spec, admit=None), as grader.execute.run_notebook


@dataclass
class PlannedRun:
    run_id: str
    notebook: str
    parameters: dict
    inputs: dict[str, Path | Callable[[], Path]] = field(default_factory=dict)  # name in work dir -> source
    after: tuple[str, ...] = ()
    scale: dict[str, float] = field(default_factory=dict)
    expected: tuple[str, ...] = ()
    # Other places (relative to the work dir) where the notebook's own paths put an expected
    # artifact, e.g. {"model_best.pth": ("ckpt/model_best.pth.tar",)}.
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cost: float = 1.0  # relative duration (epochs), to run long chains first
    # The notebook file executed, when a lab runs a copy it derived from the hand-in's
    # (cells and their numbers kept); None: the hand-in's own ``notebook``.
    source: Path | None = None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as entries for CUDA_VISIBLE_DEVICES."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [part.strip() for part in listed.split(",") if part.strip()][:count]


def gpu_shares(gpus: list[str], workers: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each of ``workers`` gradings sharing ``gpus``."""
    if not gpus:
        return [None] * workers
    if len(gpus) >= workers:
        return [",".join(gpus[slot::workers]) for slot in range(workers)]
    return [gpus[slot % len(gpus)] for slot in range(workers)]


class _State(Enum):
    PENDING = "pending"  # no kernel yet
    WAITING = "waiting"  # kernel started ahead, waiting for its turn
    ACTIVE = "active"  # the student's cells run
    DONE = "done"


class _Gate:
    """Where a started kernel waits: ``open`` lets its run go on, ``close`` drops it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._admitted = False

    def open(self) -> None:
        self._admitted = True
        self._event.set()

    def close(self) -> None:
        self._event.set()

    def wait(self) -> bool:
        self._event.wait()
        return self._admitted


def execute_all(plan: list[PlannedRun], submission: Submission, work_root: Path, profile: Profile,
                data_root: Path | None, device: str, workers: int,
                on_done: Callable[[str], None] | None = None, cache: RunCache | None = None,
                execute: Execute = run_notebook, threads: int | None = None,
                ahead: int | None = None, kernel: KernelSetup | None = None
                ) -> dict[str, RunResult | None]:
    """Every planned run whose notebook exists and whose inputs were produced, ``workers`` at
    a time, each kernel with ``threads`` torch threads (default: the cores shared out).

    Kernels start ahead in idle slots and, beyond ``workers``, up to ``ahead`` more
    (default: ``workers`` on a GPU, none on the CPU); never with a ``cache``.
    The result holds every planned run, in plan order; None for a run that did not run.
    ``kernel`` is the lab's runtime for every kernel (None: the harness's shims only).
    """
    threads = threads or max(1, cores() // workers)
    if ahead is None:
        ahead = workers if device.startswith("cuda") else 0
    gpus = visible_gpus() if device == "cuda" else []
    return _Schedule(plan, submission, work_root, profile, data_root, device, workers, on_done,
                     cache, execute, threads, ahead, gpus if len(gpus) > 1 else [],
                     kernel or KernelSetup("grader.runtime")).run()


class _Schedule:
    def __init__(self, plan: list[PlannedRun], submission: Submission, work_root: Path,
                 profile: Profile, data_root: Path | None, device: str, workers: int,
                 on_done: Callable[[str], None] | None, cache: RunCache | None,
                 execute: Execute, threads: int, ahead: int, gpus: list[str],
                 kernel: KernelSetup) -> None:
        self.plan, self.submission, self.work_root, self.kernel = plan, submission, work_root, kernel
        self.profile, self.data_root, self.device = profile, data_root, device
        self.workers, self.threads, self.gpus = workers, threads, gpus
        self.most_kernels = workers + ahead  # kernels alive at once, those started ahead included
        self.on_done, self.cache, self.execute = on_done, cache, execute
        self.by_id = {run.run_id: run for run in plan}
        self.order = sorted(plan, key=self._priority())
        self.state = {run.run_id: _State.PENDING for run in plan}
        self.gates: dict[str, _Gate] = {}
        self.gpu_of: dict[str, str] = {}
        self.results: dict[str, RunResult | None] = {}
        self.finished: queue.Queue[tuple[str, RunResult | BaseException | None]] = queue.Queue()
        # A notebook that used up its time once would do so again: its later runs are dropped.
        self.timed_out: set[str] = set()

    def _priority(self) -> Callable[[PlannedRun], tuple[float, int]]:
        """Longest remaining chain of cost first, then plan order."""
        dependents: dict[str, list[str]] = {run.run_id: [] for run in self.plan}
        for run in self.plan:
            for dependency in run.after:
                dependents.setdefault(dependency, []).append(run.run_id)
        chain: dict[str, float] = {}

        def length(run_id: str) -> float:
            if run_id not in chain:
                chain[run_id] = self.by_id[run_id].cost + max(
                    (length(d) for d in dependents[run_id]), default=0.0)
            return chain[run_id]

        position = {run.run_id: i for i, run in enumerate(self.plan)}
        return lambda run: (-length(run.run_id), position[run.run_id])

    def run(self) -> dict[str, RunResult | None]:
        with ThreadPoolExecutor(max_workers=max(1, len(self.plan)),
                                thread_name_prefix="slimgrade-run") as pool:
            try:
                self._dispatch(pool)
                while len(self.results) < len(self.plan):
                    self._finish(*self.finished.get())
                    self._dispatch(pool)
            finally:
                for gate in self.gates.values():
                    gate.close()  # kernels still waiting shut down
        return {run.run_id: self.results[run.run_id] for run in self.plan}

    def _verdict(self, run: PlannedRun) -> bool | None:
        """True when its inputs exist, None when they never will (drop it), False to wait."""
        if self.submission.notebooks.get(run.notebook) is None or run.notebook in self.timed_out:
            return None
        for dependency in run.after:
            if dependency not in self.results:
                return False
            result = self.results[dependency]
            if result is None or not result.usable:
                return None
        return True

    def _inputs_underway(self, run: PlannedRun) -> bool:
        return all(d in self.results or self.state[d] is _State.ACTIVE for d in run.after)

    def _count(self, state: _State) -> int:
        return sum(1 for s in self.state.values() if s is state)

    def _dispatch(self, pool: ThreadPoolExecutor) -> None:
        """Drop what can no longer run, give free slots to ready runs, then start kernels ahead."""
        could_start_ahead = []
        for run in self.order:
            state = self.state[run.run_id]
            if state not in (_State.PENDING, _State.WAITING):
                continue
            verdict = self._verdict(run)
            if verdict is None:
                if state is _State.PENDING:
                    self.state[run.run_id] = _State.DONE
                    self.results[run.run_id] = None
                else:
                    self.gates[run.run_id].close()  # its thread reports None when the kernel is down
            elif verdict and self._count(_State.ACTIVE) < self.workers:
                if state is _State.PENDING:
                    self._start(run, pool)
                self.gates[run.run_id].open()
                self.state[run.run_id] = _State.ACTIVE
            elif state is _State.PENDING and (verdict or self._inputs_underway(run)):
                could_start_ahead.append(run)
        for run in could_start_ahead:
            kernels = self._count(_State.ACTIVE) + self._count(_State.WAITING)
            if self.cache is not None or kernels >= self.most_kernels:
                break
            self._start(run, pool)
            self.state[run.run_id] = _State.WAITING

    def _start(self, run: PlannedRun, pool: ThreadPoolExecutor) -> None:
        gate = self.gates[run.run_id] = _Gate()
        gpu = None
        if self.gpus:
            load = {g: 0 for g in self.gpus}
            for run_id, g in self.gpu_of.items():
                if self.state[run_id] in (_State.WAITING, _State.ACTIVE):
                    load[g] += 1
            gpu = self.gpu_of[run.run_id] = min(self.gpus, key=load.__getitem__)
        pool.submit(self._body, run, gate, gpu)

    def _body(self, run: PlannedRun, gate: _Gate, gpu: str | None) -> None:
        try:
            outcome = self._execute(run, gate, gpu)
        except BaseException as error:  # noqa: BLE001 - re-raised by the scheduling thread
            outcome = error
        self.finished.put((run.run_id, outcome))

    def _execute(self, run: PlannedRun, gate: _Gate, gpu: str | None) -> RunResult | None:
        work_dir = self.work_root / run.run_id
        work_dir.mkdir(parents=True, exist_ok=True)
        spec = RunSpec(
            run_id=run.run_id, notebook=run.source or self.submission.notebooks[run.notebook],
            work_dir=work_dir,
            parameters=run.parameters, scale=run.scale, profile=self.profile,
            data_root=self.data_root, device=self.device, threads=self.threads,
            expected_artifacts=list(run.expected),
            artifact_aliases={k: list(v) for k, v in run.aliases.items()}, visible_gpu=gpu,
            kernel=self.kernel)

        refused: list[str] = []

        def admit() -> bool:
            if not gate.wait():
                return False
            for name, source in run.inputs.items():
                source = source() if callable(source) else source
                # Another run's output comes from a hostile work dir: no link, FIFO, folder or
                # oversized file is followed or copied, at that name or on the way to it.
                producer = None if source.is_absolute() else self.work_root / source.parts[0]
                (work_dir / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    copy_file(self._source(source), work_dir / name,
                              self.profile.file_limit_mb * 1024 * 1024, producer)
                except UntrustedFileError as error:
                    refused.append(str(error))
                    return False
            return True

        if self.cache is None:
            result = self.execute(spec, admit)
        elif admit():
            result = self.cache.run(spec, sandbox_available(), self.execute)
        else:
            result = None
        if result is None and refused:
            notebook = spec.notebook.name
            failure = Failure(notebook, "missing-artifact",
                              f"{notebook} was not run, since its input could not be used: "
                              f"{refused[0]}", None, "")
            return RunResult(run.run_id, notebook, executed_notebook_path(work_dir, notebook),
                             failure, {}, "", [], 0.0, False, [], expected=list(run.expected))
        return result

    def _source(self, source: Path) -> Path:
        """An absolute input file; ``<run id>/<name>`` is where that run wrote ``name``."""
        if source.is_absolute():
            return source
        run_id, name = source.parts[0], "/".join(source.parts[1:])
        produced = self.results.get(run_id)
        found = produced.artifacts.get(name) if produced is not None else None
        return self.work_root / run_id / (found or name)

    def _finish(self, run_id: str, outcome: RunResult | BaseException | None) -> None:
        if isinstance(outcome, BaseException):
            raise outcome
        self.state[run_id] = _State.DONE
        self.results[run_id] = outcome
        if outcome is None:
            return
        if outcome.failure and outcome.failure.kind == "timeout":
            self.timed_out.add(self.by_id[run_id].notebook)
        if self.on_done:
            self.on_done(run_id)
