"""grader.untrusted: what a student's kernel leaves in its work dir is read as hostile.

Fast and kernel-free: every case builds the hostile file itself and checks that the grader
refuses it with one sentence (no traceback, no hang, no link followed, nothing inflated).
"""
from __future__ import annotations

import io
import json
import os
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
import torch

import grader.untrusted as untrusted
from labs.slimming.checkpoints import CHECKPOINT_LIMITS, CheckpointError, load_student_checkpoint
from grader.execute import Failure, RunResult, RunSpec, literal_assignments, run_notebook
from labs.slimming.grading import handed_in, student_lambda
from grader.prepare import Submission
from grader.runcache import RunCache
from grader.schedule import PlannedRun, execute_all
from grader.untrusted import (UntrustedFileError, copy_file, load_checkpoint_bytes, read_bytes,
                              read_json, read_notebook)
from reference.profiles import QUICK

SECRET = "slimgrade-test-secret-7f3a"


class Blocked(Exception):
    """Not an OSError, so that no ``except OSError`` of the code under test swallows it."""


@contextmanager
def returns_within(seconds: float) -> Iterator[None]:
    """Fails the test (instead of hanging it) when the block blocks, e.g. in open() of a FIFO."""
    def expired(signum, frame):
        raise Blocked(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file outside any work dir that a student's link points at."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def saved(obj: object, **options: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **options)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ files

def test_a_regular_file_is_read(work):
    (work / "model.pth").write_bytes(b"abc")
    assert read_bytes(work / "model.pth", 10) == b"abc"
    (work / "sub").mkdir()
    (work / "sub" / "m.pth").write_bytes(b"xyz")
    assert read_bytes(work / "sub" / "m.pth", 10, base=work) == b"xyz"


def test_a_symlink_to_a_host_file_is_not_followed(work, secret):
    (work / "model_best.pth").symlink_to(secret)
    with pytest.raises(UntrustedFileError, match="model_best.pth is a symbolic link"):
        read_bytes(work / "model_best.pth", 1 << 20)
    with pytest.raises(CheckpointError, match="symbolic link") as caught:
        load_student_checkpoint(work / "model_best.pth")
    assert SECRET not in str(caught.value)


def test_a_linked_folder_on_the_way_is_not_followed(work, secret):
    (work / "ckpt").symlink_to(secret.parent)
    with pytest.raises(UntrustedFileError, match="ckpt on its path is a symbolic link"):
        read_bytes(work / "ckpt" / "secret.txt", 1 << 20, base=work)
    with pytest.raises(UntrustedFileError, match="not a plain path"):
        read_bytes(Path("../outside/secret.txt"), 1 << 20, base=work)


def test_a_fifo_does_not_block(work):
    os.mkfifo(work / "model_prune.pth")
    with returns_within(5):
        with pytest.raises(UntrustedFileError, match="FIFO"):
            read_bytes(work / "model_prune.pth", 1 << 20)
        with pytest.raises(CheckpointError, match="FIFO"):
            load_student_checkpoint(work / "model_prune.pth")


def test_a_folder_is_refused(work):
    (work / "model_prune.pth").mkdir()
    with pytest.raises(CheckpointError, match="model_prune.pth is a folder"):
        load_student_checkpoint(work / "model_prune.pth")


def test_a_missing_file_says_it_was_not_written(work):
    with pytest.raises(CheckpointError, match="was not written"):
        load_student_checkpoint(work / "model_prune.pth")


def test_a_huge_file_is_refused_before_it_is_read(work):
    huge = work / "model_best.pth"
    with huge.open("wb") as handle:  # sparse: costs no disk
        handle.truncate(CHECKPOINT_LIMITS.max_file_bytes + 1)
    with returns_within(5):
        with pytest.raises(CheckpointError, match="more than"):
            load_student_checkpoint(huge)


# ------------------------------------------------------------------------------ copies

def test_copy_refuses_a_symlink_source(work, secret, tmp_path):
    (work / "model_best.pth").symlink_to(secret)
    target = tmp_path / "next"
    target.mkdir()
    with pytest.raises(UntrustedFileError, match="symbolic link"):
        copy_file(work / "model_best.pth", target / "model_best.pth", 1 << 20)
    assert not (target / "model_best.pth").exists()


def test_copy_never_writes_through_a_link_at_the_destination(work, secret, tmp_path):
    (work / "model_best.pth").write_bytes(b"weights")
    target = tmp_path / "next"
    target.mkdir()
    (target / "model_best.pth").symlink_to(secret)
    copy_file(work / "model_best.pth", target / "model_best.pth", 1 << 20)
    assert secret.read_text() == SECRET
    assert not (target / "model_best.pth").is_symlink()
    assert (target / "model_best.pth").read_bytes() == b"weights"


# ------------------------------------------------------------------------------ checkpoints

def test_an_honest_checkpoint_loads(work):
    (work / "m.pth").write_bytes(saved({"cfg": [4, "M"], "state_dict": {"w": torch.ones(3)}}))
    loaded = load_student_checkpoint(work / "m.pth", ("cfg", "state_dict"))
    assert loaded["cfg"] == [4, "M"] and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


def test_text_in_place_of_a_checkpoint_is_refused(work):
    (work / "model_prune.pth").write_text("cfg = [64, 'M']\nthis is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_student_checkpoint(work / "model_prune.pth")


@pytest.mark.parametrize("garbage", [b"PK\x03\x04" + b"\x00" * 100,
                                     b"PK\x03\x04" + bytes(range(256)) * 20])
def test_a_damaged_zip_is_refused(work, garbage):
    (work / "m.pth").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_student_checkpoint(work / "m.pth")


def test_garbage_inside_a_valid_zip_is_refused(work):
    honest = zipfile.ZipFile(io.BytesIO(saved({"w": torch.ones(2)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in honest.infolist():
            data = honest.read(info)
            archive.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data)
    (work / "m.pth").write_bytes(out.getvalue())
    with pytest.raises(CheckpointError, match="PyTorch checkpoint|Python objects"):
        load_student_checkpoint(work / "m.pth")


def test_the_legacy_pickle_format_is_refused(work):
    (work / "m.pth").write_bytes(saved({"w": torch.ones(2)}, _use_new_zipfile_serialization=False))
    with pytest.raises(CheckpointError, match="format torch.save writes"):
        load_student_checkpoint(work / "m.pth")


def test_a_deflate_bomb_is_refused_without_inflating(work, monkeypatch):
    honest = zipfile.ZipFile(io.BytesIO(saved({"state_dict": {"w": torch.ones(2)}})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for info in honest.infolist():
            archive.writestr(info.filename, honest.read(info))
        with archive.open("archive/data/1", "w", force_zip64=True) as entry:
            zeros = bytes(64 << 20)
            for _ in range(16):  # 1 GiB of zeros, a few MB deflated
                entry.write(zeros)
    bomb = out.getvalue()
    assert len(bomb) < 16 << 20
    (work / "model_best.pth").write_bytes(bomb)
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(zipfile.ZipExtFile, "read",
                        lambda *a, **k: pytest.fail("an entry was inflated"))
    with pytest.raises(CheckpointError, match="would unpack to 1024.0 MB"):
        load_student_checkpoint(work / "model_best.pth")
    assert loads == []


def test_a_stride_zero_view_of_huge_shape_is_refused(work):
    view = torch.zeros(1).expand(10**10)  # one float of storage, ten billion elements
    data = saved({"state_dict": {"features.0.weight": view}})
    assert len(data) < 10_000
    (work / "m.pth").write_bytes(data)
    with pytest.raises(CheckpointError, match="larger than any layer"):
        load_student_checkpoint(work / "m.pth")


def test_many_tensors_together_are_bounded(work):
    view = torch.zeros(1).expand(CHECKPOINT_LIMITS.max_tensor_numel)
    count = CHECKPOINT_LIMITS.max_total_numel // CHECKPOINT_LIMITS.max_tensor_numel + 1
    (work / "m.pth").write_bytes(saved({"state_dict": {f"t{i}": view[:] for i in range(count)}}))
    with pytest.raises(CheckpointError, match="tensor elements in all"):
        load_student_checkpoint(work / "m.pth")


class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_pickle_with_another_class_is_refused(work):
    (work / "model_prune.pth").write_bytes(saved({"cfg": [1], "extra": Payload()}))
    with pytest.raises(CheckpointError, match="Python objects"):
        load_student_checkpoint(work / "model_prune.pth")


def test_deep_and_cyclic_containers_are_refused():
    limits = CHECKPOINT_LIMITS
    deep: list = []
    for _ in range(limits.max_depth + 5):
        deep = [deep]
    with pytest.raises(UntrustedFileError, match="levels deep"):
        load_checkpoint_bytes(saved({"state_dict": {}, "deep": deep}), "m.pth", limits)
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(UntrustedFileError, match="contains itself"):
        load_checkpoint_bytes(saved({"state_dict": {}, "cycle": cycle}), "m.pth", limits)
    shared: list = [torch.ones(1)]
    for _ in range(40):  # shared, not copied: 2**40 paths, each visited once
        shared = [shared, shared]
    assert load_checkpoint_bytes(saved({"state_dict": {}, "shared": shared}), "m.pth", limits)


# ------------------------------------------------------------------------------ JSON state

def test_a_json_bomb_state_is_refused(work):
    (work / "slimgrade_state.json").write_text("[" * 200000)
    with pytest.raises(UntrustedFileError, match="too deeply|levels deep|not valid JSON"):
        read_json(work / "slimgrade_state.json", 1 << 20, work)
    (work / "slimgrade_state.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(UntrustedFileError, match="levels deep"):
        read_json(work / "slimgrade_state.json", 1 << 20, work)
    (work / "slimgrade_state.json").write_text('{"cfg": [1, 2]}')
    assert read_json(work / "slimgrade_state.json", 1 << 20, work) == {"cfg": [1, 2]}


def test_a_state_file_that_is_too_big_or_not_utf8_is_refused(work):
    (work / "s.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UntrustedFileError, match="not UTF-8"):
        read_json(work / "s.json", 1 << 20, work)
    (work / "s.json").write_text(json.dumps({"a": "x" * 2000}))
    with pytest.raises(UntrustedFileError, match="more than"):
        read_json(work / "s.json", 1000, work)


# ------------------------------------------------------------------------------ notebooks

NOT_UTF8 = json.dumps({"cells": [], "metadata": {}, "nbformat": 4,
                       "nbformat_minor": 5}).encode().replace(b"{}", b'{"a": "caf\xe9"}')


@pytest.mark.parametrize("content, reason", [
    (NOT_UTF8, "not UTF-8"),
    (b"{ this is not json", "not valid JSON"),
    (b"[" * 200000, "too deeply|not valid JSON"),
    (b'{"cells": "no", "nbformat": 4, "nbformat_minor": 5, "metadata": {}}', "not a valid notebook"),
    (b'[1, 2]', "not a notebook"),
])
def test_malformed_notebooks_are_refused_in_one_sentence(tmp_path, content, reason):
    path = tmp_path / "sparsity_train.ipynb"
    path.write_bytes(content)
    with pytest.raises(UntrustedFileError, match=reason):
        read_notebook(path)


def test_student_lambda_and_handed_in_survive_malformed_notebooks(tmp_path):
    root = tmp_path / "submission"
    root.mkdir()
    (root / "sparsity_train.ipynb").write_bytes(NOT_UTF8)
    (root / "vggprune.ipynb").write_bytes(b"{ not json")
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("LAMBDA = 1e-4")])
    nbformat.write(good, root / "train_prune_model.ipynb")
    notebooks = {name: root / f"{name}.ipynb"
                 for name in ("sparsity_train", "vggprune", "train_prune_model")}
    assert student_lambda(notebooks["sparsity_train"]) is None
    assert student_lambda(notebooks["vggprune"]) is None
    assert student_lambda(notebooks["train_prune_model"]) == pytest.approx(1e-4)
    summary = handed_in(Submission("student", root, notebooks))
    assert "not UTF-8" in summary["sparsity_train"]["unreadable"]
    assert "not valid JSON" in summary["vggprune"]["unreadable"]
    assert summary["train_prune_model"]["printed"] == []


@pytest.mark.parametrize("source", [
    "LAMBDA = 1" + "0" * 400,  # float() of it: OverflowError
    "LAMBDA = 1e400",  # a float literal for inf
    "LAMBDA = -1e400",
    "LAMBDA = 0x1" + "0" * 5000,  # past float's range, and no digit limit for hex
    "LAMBDA = 1e-4\nLAMBDA = 1" + "0" * 5000,  # past the int digit limit: the cell is skipped
])
def test_a_lambda_no_float_holds_is_no_lambda(tmp_path, source):
    path = tmp_path / "sparsity_train.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), path)
    assert student_lambda(path) is None


def test_literals_that_are_deep_huge_or_in_huge_cells_do_not_stop_the_grader():
    cells = [nbformat.v4.new_code_cell(source) for source in (
        "DEEP = " + "[" * 5000 + "]" * 5000,  # past the parser's nesting
        "NEG = " + "-" * 100_000 + "1",
        "BIG = (" + "1," * 1_000_000 + ")",  # 2 MB: ~4 s and ~1 GB to parse and build
        "EPOCHS = 3",
    )]
    with returns_within(5):
        values = literal_assignments(cells)
    assert values == {"EPOCHS": [3]}


def test_an_unreadable_notebook_fails_its_run_and_writes_nothing_into_the_work_dir(tmp_path):
    notebook = tmp_path / "sparsity_train.ipynb"
    notebook.write_bytes(NOT_UTF8)
    work = tmp_path / "work"
    result = run_notebook(RunSpec("broken", notebook, work, {}, QUICK))
    assert result.failure is not None and result.failure.kind == "exception"
    assert "not UTF-8" in result.failure.message
    assert result.executed_notebook.is_file()
    assert work.resolve() not in result.executed_notebook.resolve().parents
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------ between runs

def test_a_linked_output_is_not_passed_to_the_next_run(tmp_path, secret):
    """The chained run's input is another run's output: a link there becomes a named failure."""
    root = tmp_path / "submission"
    root.mkdir()
    notebooks = {}
    for name in ("train", "prune"):
        notebooks[name] = root / f"{name}.ipynb"
        notebooks[name].write_text("{}")

    def execute(spec: RunSpec, admit=None) -> RunResult | None:
        if admit is not None and not admit():
            return None
        if spec.run_id == "train":  # the student's kernel leaves a link as its checkpoint
            (spec.work_dir / "best.pth").symlink_to(secret)
        return RunResult(spec.run_id, spec.notebook.name, spec.work_dir / "x.ipynb", None, {}, "",
                         [], 0.0, False, [], expected=list(spec.expected_artifacts),
                         artifacts={name: name for name in spec.expected_artifacts})

    plan = [PlannedRun("train", "train", {}, expected=("best.pth",)),
            PlannedRun("chained", "prune", {}, {"best.pth": Path("train") / "best.pth"},
                       after=("train",), expected=("pruned.pth",))]
    work_root = tmp_path / "work"
    work_root.mkdir()
    results = execute_all(plan, Submission("student", root, notebooks), work_root, QUICK, None,
                          "cpu", 1, execute=execute, threads=1)
    failure = results["chained"].failure
    assert failure is not None and failure.kind == "missing-artifact"
    assert "symbolic link" in failure.message and SECRET not in failure.message
    assert not (work_root / "chained" / "best.pth").exists()


def test_the_run_cache_copies_no_link_and_skips_such_a_run(tmp_path, secret):
    notebook = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), notebook)
    cache, calls = RunCache(tmp_path / "cache"), []

    def execute(spec: RunSpec) -> RunResult:
        calls.append(spec.run_id)
        (spec.work_dir / "model_prune.pth").symlink_to(secret)
        return RunResult(spec.run_id, notebook.name, spec.work_dir / "x.ipynb", None, {}, "", [],
                         0.0, False, [])

    for run_id in ("a", "b"):
        work = tmp_path / run_id
        work.mkdir()
        cache.run(RunSpec(run_id, notebook, work, {}, QUICK), False, execute)
    assert calls == ["a", "b"]  # the first was not cached
    assert not any(SECRET in p.read_text(errors="replace")
                   for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_a_cached_run_restores_its_files_and_its_executed_notebook(tmp_path):
    notebook = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), notebook)
    cache, calls = RunCache(tmp_path / "cache"), []

    def execute(spec: RunSpec) -> RunResult:
        calls.append(spec.run_id)
        (spec.work_dir / "model_prune.pth").write_bytes(b"output")
        executed = tmp_path / f"{spec.run_id}-executed.ipynb"
        executed.write_text("executed")
        return RunResult(spec.run_id, notebook.name, executed, Failure("nb", "exception", "m", 0),
                         {"cfg": [1]}, "", [], 0.0, False, [])

    results = []
    for run_id in ("a", "b"):
        work = tmp_path / run_id
        work.mkdir()
        results.append(cache.run(RunSpec(run_id, notebook, work, {}, QUICK), False, execute))
    assert calls == ["a"]
    reused = results[1]
    assert (tmp_path / "b" / "model_prune.pth").read_bytes() == b"output"
    assert reused.executed_notebook.read_text() == "executed"
    assert (tmp_path / "b").resolve() not in reused.executed_notebook.resolve().parents
    assert reused.failure == results[0].failure and reused.state == {"cfg": [1]}


def test_every_refusal_is_one_sentence_naming_the_file(work, secret):
    (work / "model_best.pth").symlink_to(secret)
    os.mkfifo(work / "fifo.pth")
    (work / "dir.pth").mkdir()
    for name in ("model_best.pth", "fifo.pth", "dir.pth", "missing.pth"):
        with pytest.raises(UntrustedFileError) as caught:
            untrusted.read_bytes(work / name, 100)
        message = str(caught.value)
        assert message.startswith(name) and "\n" not in message and message.endswith(".")
