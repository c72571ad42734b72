"""Runs of byte-identical inputs are reused; load-dependent failures are not."""
from __future__ import annotations

import nbformat

from grader.execute import Failure, RunResult, RunSpec
from grader.runcache import RunCache
from reference.profiles import QUICK


def make_spec(tmp_path, name: str, notebook_source: str = "x = 1", lam: float = 0.1) -> RunSpec:
    notebook = tmp_path / f"{abs(hash(notebook_source))}.ipynb"
    if not notebook.exists():
        cell = nbformat.v4.new_code_cell(notebook_source, id="only-cell")
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), notebook)
    work = tmp_path / f"work-{name}"
    work.mkdir()
    (work / "model_best.pth").write_bytes(b"input")
    return RunSpec(run_id=name, notebook=notebook, work_dir=work, parameters={"LAMBDA": lam},
                   profile=QUICK)


def fake_execute(calls: list, kind: str | None = None):
    def execute(spec: RunSpec) -> RunResult:
        calls.append(spec.run_id)
        (spec.work_dir / "model_prune.pth").write_bytes(b"output")
        failure = Failure(spec.notebook.name, kind, "stopped", 3) if kind else None
        return RunResult(spec.run_id, spec.notebook.name, spec.work_dir / "executed.ipynb", failure,
                         {"cfg": [1]}, "printed", [2], 1.5, False, [0.5])
    return execute


def test_identical_inputs_run_once_and_outputs_are_restored(tmp_path):
    cache, calls = RunCache(tmp_path / "cache"), []
    first = cache.run(make_spec(tmp_path, "a"), False, fake_execute(calls))
    second_spec = make_spec(tmp_path, "b")
    second = cache.run(second_spec, False, fake_execute(calls))
    assert calls == ["a"]
    assert (second_spec.work_dir / "model_prune.pth").read_bytes() == b"output"
    assert second.run_id == "b" and second.state == first.state and second.images == [2]


def test_different_parameters_or_notebook_run_again(tmp_path):
    cache, calls = RunCache(tmp_path / "cache"), []
    cache.run(make_spec(tmp_path, "a"), False, fake_execute(calls))
    cache.run(make_spec(tmp_path, "b", lam=0.2), False, fake_execute(calls))
    cache.run(make_spec(tmp_path, "c", notebook_source="x = 2"), False, fake_execute(calls))
    assert calls == ["a", "b", "c"]


def test_a_timeout_is_not_reused_but_an_exception_is(tmp_path):
    cache, calls = RunCache(tmp_path / "cache"), []
    cache.run(make_spec(tmp_path, "a"), False, fake_execute(calls, "timeout"))
    cache.run(make_spec(tmp_path, "b"), False, fake_execute(calls, "timeout"))
    assert calls == ["a", "b"]
    cache.run(make_spec(tmp_path, "c", lam=0.3), False, fake_execute(calls, "exception"))
    reused = cache.run(make_spec(tmp_path, "d", lam=0.3), False, fake_execute(calls, "exception"))
    assert calls == ["a", "b", "c"] and reused.failure.kind == "exception"
