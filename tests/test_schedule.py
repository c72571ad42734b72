"""grader.schedule: inputs first, ``workers`` at a time, kernels started ahead, GPUs shared.

The runs here are fakes that follow run_notebook's protocol (start a "kernel", wait
for admit(), run) and record what happened in order; no kernel is started.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

import grader.schedule as schedule
from grader.execute import Failure, HarnessError, RunResult, RunSpec
from grader.prepare import Submission
from grader.runcache import RunCache
from grader.schedule import PlannedRun, execute_all, gpu_shares, visible_gpus
from reference.profiles import QUICK

WAIT_S = 10  # only reached when the scheduler is wrong


class FakeRuns:
    """run_notebook's protocol, recording kernel starts, admissions and ends."""

    def __init__(self, failures: dict[str, str] | None = None, hold_until_alive: int = 0,
                 error: str | None = None) -> None:
        self.failures = failures or {}
        self.error = error
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.alive = self.active = self.most_alive = self.most_active = 0
        self.specs: dict[str, RunSpec] = {}
        self.inputs_at_admission: dict[str, list[str]] = {}
        # Admitted runs wait (at most WAIT_S) until this many kernels were alive at once.
        self.hold_until_alive = hold_until_alive
        self.enough_alive = threading.Event()
        if hold_until_alive == 0:
            self.enough_alive.set()

    def _note(self, run_id: str, what: str, alive: int = 0, active: int = 0) -> None:
        with self.lock:
            self.events.append((run_id, what))
            self.alive += alive
            self.active += active
            self.most_alive = max(self.most_alive, self.alive)
            self.most_active = max(self.most_active, self.active)
            if self.alive >= self.hold_until_alive:
                self.enough_alive.set()

    def __call__(self, spec: RunSpec, admit=None) -> RunResult | None:
        self.specs[spec.run_id] = spec
        self._note(spec.run_id, "kernel", alive=1)
        try:
            if spec.run_id == self.error:
                raise HarnessError(f"no kernel for {spec.run_id}")
            if admit is not None and not admit():
                self._note(spec.run_id, "dropped")
                return None
            self._note(spec.run_id, "admitted", active=1)
            self.inputs_at_admission[spec.run_id] = sorted(p.name for p in spec.work_dir.iterdir())
            self.enough_alive.wait(WAIT_S)
            kind = self.failures.get(spec.run_id)
            failure = Failure(spec.notebook.name, kind, f"{kind} in {spec.run_id}", 0) if kind else None
            if failure is None:
                for name in spec.expected_artifacts:
                    (spec.work_dir / name).write_text(f"written by {spec.run_id}")
            self._note(spec.run_id, "ended", active=-1)
            written = {} if failure else {name: name for name in spec.expected_artifacts}
            return RunResult(spec.run_id, spec.notebook.name, spec.work_dir / "executed.ipynb",
                             failure, {}, "", [], 0.0, False, [],
                             expected=list(spec.expected_artifacts), artifacts=written)
        finally:
            self._note(spec.run_id, "kernel down", alive=-1)

    def order(self, what: str) -> list[str]:
        return [run_id for run_id, event in self.events if event == what]


def submission(tmp_path: Path, *names: str) -> Submission:
    notebooks: dict[str, Path | None] = {}
    for name in ("train", "prune", "tune"):
        path = tmp_path / f"{name}.ipynb"
        path.write_text("{}")
        notebooks[name] = path if name in names else None
    return Submission(name="student", root=tmp_path, notebooks=notebooks)


def lab_plan(tmp_path: Path) -> list[PlannedRun]:
    """The shape of a grading: two trainings, prunings of a reference file, a chain."""
    reference = tmp_path / "reference.pth"
    reference.write_text("reference")
    return [
        PlannedRun("train-a", "train", {}, expected=("best.pth",), cost=12),
        PlannedRun("train-b", "train", {}, expected=("best.pth",), cost=12),
        *[PlannedRun(f"prune-{i}", "prune", {}, {"best.pth": reference}, expected=("pruned.pth",))
          for i in range(3)],
        PlannedRun("chained-prune", "prune", {}, {"best.pth": Path("train-b") / "best.pth"},
                   after=("train-b",), expected=("pruned.pth",)),
        PlannedRun("chained-tune", "tune", {}, {"pruned.pth": Path("chained-prune") / "pruned.pth"},
                   after=("chained-prune",), expected=("tuned.pth",), cost=6),
    ]


def run_all(tmp_path: Path, plan: list[PlannedRun], runs: FakeRuns, workers: int = 2,
            names: tuple[str, ...] = ("train", "prune", "tune"), work: str = "work",
            **options) -> dict:
    work_root = tmp_path / work
    work_root.mkdir()
    return execute_all(plan, submission(tmp_path, *names), work_root, QUICK, None, "cpu", workers,
                       execute=runs, threads=1, **options)


def test_kernels_start_ahead_but_cells_run_workers_at_a_time(tmp_path):
    runs = FakeRuns(hold_until_alive=4)
    results = run_all(tmp_path, lab_plan(tmp_path), runs, workers=2, ahead=2)
    assert all(r is not None and r.failure is None for r in results.values())
    assert runs.most_active == 2
    assert runs.most_alive == 4  # two kernels waited while two runs computed
    assert list(results) == [run.run_id for run in lab_plan(tmp_path)]


def test_on_the_cpu_a_kernel_starts_ahead_only_in_an_idle_slot(tmp_path):
    plan = lab_plan(tmp_path)
    plan = [plan[1], plan[5], plan[6]]  # train-b -> chained-prune -> chained-tune
    runs = FakeRuns(hold_until_alive=2)
    run_all(tmp_path, plan, runs, workers=2, names=("train", "prune", "tune"))
    events = runs.events
    assert events.index(("chained-prune", "kernel")) < events.index(("train-b", "ended"))
    assert runs.most_active == 1 and runs.most_alive == 2
    busy = FakeRuns()
    run_all(tmp_path, lab_plan(tmp_path), busy, workers=2, work="busy")
    assert busy.most_alive <= 2  # never a kernel beyond the two slots


def test_dependent_gets_its_input_only_once_produced(tmp_path):
    runs = FakeRuns()
    run_all(tmp_path, lab_plan(tmp_path), runs, workers=2)
    ended, admitted = runs.order("ended"), runs.order("admitted")
    assert ended.index("train-b") < admitted.index("chained-prune")
    assert ended.index("chained-prune") < admitted.index("chained-tune")
    assert runs.inputs_at_admission["chained-prune"] == ["best.pth"]
    chained_input = tmp_path / "work" / "chained-prune" / "best.pth"
    assert chained_input.read_text() == "written by train-b"


def test_longest_chain_goes_first(tmp_path):
    runs = FakeRuns()
    run_all(tmp_path, lab_plan(tmp_path), runs, workers=1, ahead=0)
    # train-b (12 + 1 + 6 behind it) before train-a (12); the chain before the loose prunings.
    assert runs.order("admitted") == ["train-b", "train-a", "chained-prune", "chained-tune",
                                      "prune-0", "prune-1", "prune-2"]
    assert runs.most_alive == 1  # nothing started ahead


def test_failed_input_drops_its_dependents_even_when_their_kernel_waits(tmp_path):
    runs = FakeRuns(failures={"train-b": "exception"})
    results = run_all(tmp_path, lab_plan(tmp_path), runs, workers=1, ahead=2)
    assert results["chained-prune"] is None and results["chained-tune"] is None
    assert "chained-prune" in runs.order("dropped")  # started ahead, then shut down
    assert "chained-prune" not in runs.order("admitted")
    assert results["train-a"].failure is None and results["prune-2"].failure is None


def test_a_timed_out_notebook_is_not_run_again(tmp_path):
    runs = FakeRuns(failures={"train-b": "timeout"})
    results = run_all(tmp_path, lab_plan(tmp_path), runs, workers=1, ahead=0)
    assert "train-a" not in runs.order("kernel")  # train-b ran first and used up its time
    assert results["train-a"] is None
    assert results["prune-0"].failure is None


def test_missing_notebook_starts_no_kernel(tmp_path):
    runs = FakeRuns()
    results = run_all(tmp_path, lab_plan(tmp_path), runs, names=("train", "prune"))
    assert results["chained-tune"] is None
    assert "chained-tune" not in runs.order("kernel")
    assert results["chained-prune"].failure is None


def test_with_a_run_cache_no_kernel_starts_ahead_and_a_rerun_starts_none(tmp_path):
    cache = RunCache(tmp_path / "cache")
    first = FakeRuns()
    run_all(tmp_path, lab_plan(tmp_path), first, workers=2, cache=cache)
    assert first.most_alive <= 2
    again = FakeRuns()
    results = run_all(tmp_path, lab_plan(tmp_path), again, workers=2, cache=cache, work="again")
    assert again.events == []
    assert results["chained-tune"].failure is None


def test_harness_error_is_raised_and_waiting_kernels_are_released(tmp_path):
    runs = FakeRuns(error="train-b")
    with pytest.raises(HarnessError, match="train-b"):
        run_all(tmp_path, lab_plan(tmp_path), runs, workers=1, ahead=2)
    assert len(runs.order("kernel")) == len(runs.order("kernel down"))


def test_each_kernel_sees_the_least_busy_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule, "visible_gpus", lambda: ["2", "5"])
    runs = FakeRuns(hold_until_alive=2)
    work_root = tmp_path / "work"
    work_root.mkdir()
    plan = lab_plan(tmp_path)[:2]
    execute_all(plan, submission(tmp_path, "train"), work_root, QUICK, None, "cuda", 2,
                execute=runs, threads=1, ahead=0)
    assert sorted(spec.visible_gpu for spec in runs.specs.values()) == ["2", "5"]
    assert all(spec.device == "cuda" for spec in runs.specs.values())


def test_gpu_shares_and_visible_gpus(monkeypatch):
    assert gpu_shares([], 2) == [None, None]
    assert gpu_shares(["0", "1", "2", "3"], 2) == ["0,2", "1,3"]
    assert gpu_shares(["0", "1"], 3) == ["0", "1", "0"]
    monkeypatch.setattr(schedule.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 7")
    assert visible_gpus() == ["3", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
