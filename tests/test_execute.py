"""grader.execute and grader.runtime: injection, budgets, failures, output cap, Colab shims.

Tests that run a notebook start one kernel each (about 5 s); they use the sandbox
when bubblewrap works on the machine, like the grader does.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import nbformat
import psutil
import pytest
import torch

import grader.execute as execute
import grader.runtime as runtime
import labs.slimming.runtime as slimming_runtime
from grader import sandbox
from grader.execute import (INJECTED_TAG, STATE_FILE, OutputCappedClient, RunResult, RunSpec,
                            assigned_names, parameters_source, plan_notebook, read_notebook,
                            with_overrides,
                            run_notebook, work_dir_usage)
from labs.slimming.kernel import KNOWN_PARAMETERS, kernel_setup
from reference.model import scaled_cfg
from reference.profiles import QUICK

PROFILE = replace(QUICK, cell_timeout_s=60, run_timeout_s=120, memory_limit_mb=3072)


def write_notebook(path: Path, cells: list[str | tuple[str, list[str]]]) -> Path:
    """A notebook of code cells; a (source, tags) pair gives the cell tags."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    for cell in cells:
        source, tags = cell if isinstance(cell, tuple) else (cell, [])
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    nbformat.write(nb, path)
    return path


def run(tmp_path: Path, cells: list, profile=PROFILE, admit=None, **kwargs) -> RunResult | None:
    notebook = write_notebook(tmp_path / "lab.ipynb", cells)
    spec = RunSpec(run_id="test", notebook=notebook, work_dir=tmp_path / "work",
                   parameters=kwargs.pop("parameters", {}), profile=profile,
                   kernel=kernel_setup(profile), **kwargs)
    return run_notebook(spec, admit)


# --- without a kernel -------------------------------------------------------------------

def test_assigned_names_sees_module_level_bindings_only():
    source = ("%matplotlib inline\n!ls\nLAMBDA = 1e-4\n"
              "if True:\n    EPOCHS, (SEED, *rest) = 1, (2, 3)\n"
              "for DEVICE in ['cpu']:\n    pass\ndef f():\n    PRUNE_PERCENT = 0.5\n"
              "MOMENTUM += 0.1\nfrom os import path as WEIGHT_PATH\nx.attr = 1\n")
    assert assigned_names(source) == {"LAMBDA", "EPOCHS", "SEED", "rest", "DEVICE", "f",
                                      "MOMENTUM", "WEIGHT_PATH"}
    assert assigned_names("%%time\nLAMBDA = 1") == {"LAMBDA"}
    assert assigned_names("files = !ls\nLAMBDA = 1") == set()  # unparsable: nothing seen


def test_parameters_source_keeps_literals_only():
    source = parameters_source({"LAMBDA": 0.005, "DEVICE": "cpu"})
    namespace: dict = {}
    exec(source, namespace)
    assert namespace["LAMBDA"] == 0.005 and namespace["DEVICE"] == "cpu"
    with pytest.raises(ValueError):
        parameters_source({"LAMBDA": object()})


def test_overrides_reach_loops_and_scale_each_binding_once():
    source = ("%cd /content\nLAMBDA = 1e-4\nfor LAMBDA in [0, 1e-3]:\n    train(LAMBDA)\n"
              "for lam in [2e-4]:\n    PRUNE_PERCENT = lam\n    prune(PRUNE_PERCENT)\n"
              "def f():\n    LAMBDA = 5\n")
    out = with_overrides(source, {"PRUNE_PERCENT": 0.9}, {"LAMBDA": 10.0})
    seen = []
    namespace = {"train": seen.append, "prune": seen.append}
    exec("\n".join(line for line in out.split("\n") if not line.startswith("%")), namespace)
    assert seen == [0, pytest.approx(1e-2), 0.9]  # every loop pass gets the profile's value
    assert namespace["LAMBDA"] == pytest.approx(1e-2)  # the top-level 1e-4 was scaled once
    assert out.count("LAMBDA * 10.0") == 2  # not inside the function
    unset = {"LAMBDA": None}
    exec(with_overrides("LAMBDA = None", {}, {"LAMBDA": 10.0}), unset)
    assert unset["LAMBDA"] is None  # a blank left unfilled stays unfilled


def test_plan_injects_after_tagged_cell_only(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", [
        "import torch", ("LAMBDA = 1e-4", ["parameters"]), "EPOCHS = 60", "print(EPOCHS)"])
    student = read_notebook(notebook)
    student.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="old\n")]
    plan = plan_notebook(student, "INSTALL", "DUMP", {"EPOCHS": 3}, {"LAMBDA": 10.0},
                         KNOWN_PARAMETERS)
    sources = [cell.source for cell in plan.nb.cells]
    assert sources[0] == "INSTALL" and sources[-1] == "DUMP"
    assert plan.origin == [None, 0, 1, None, 2, 3, None]
    assert "EPOCHS = 3" in sources[3] and "LAMBDA = LAMBDA * 10.0" in sources[2]
    assert plan.follows[3] == 1
    assert all(INJECTED_TAG in plan.nb.cells[i].metadata["tags"] for i in (0, 3, 6))
    assert plan.nb.cells[5].outputs == []  # the student's old outputs are not kept


def test_plan_injects_after_every_assigning_cell_and_scales_only_there(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", [
        "LAMBDA = 1e-4\nEPOCHS = 60", "x = 1", "EPOCHS = 100", "y = 2"])
    plan = plan_notebook(read_notebook(notebook), "I", "D", {"EPOCHS": 3}, {"LAMBDA": 10.0},
                         KNOWN_PARAMETERS)
    assert plan.origin == [None, 0, None, 1, 2, None, 3, None]
    assert "LAMBDA * 10.0" in plan.nb.cells[1].source  # right after the statement binding it
    assert "LAMBDA" not in plan.nb.cells[2].source + plan.nb.cells[5].source  # scaled once
    assert "EPOCHS = 3" in plan.nb.cells[5].source


def test_plan_without_any_assignment_defines_parameters_up_front(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", ["print(1)"])
    plan = plan_notebook(read_notebook(notebook), "I", "D", {"EPOCHS": 3}, {}, KNOWN_PARAMETERS)
    assert plan.origin == [None, None, 0, None]
    assert "EPOCHS = 3" in plan.nb.cells[1].source


def stream_msg(text: str, name: str = "stdout") -> dict:
    return {"msg_type": "stream", "content": {"name": name, "text": text},
            "parent_header": {"msg_id": "m"}, "header": {"msg_type": "stream"}}


def message(msg_type: str, content: dict) -> dict:
    return {"msg_type": msg_type, "content": content, "parent_header": {"msg_id": "m"},
            "header": {"msg_type": msg_type}, "metadata": {}, "buffers": []}


def test_output_cap_merges_streams_resolves_progress_bars_and_cuts_once():
    client = OutputCappedClient(nbformat.v4.new_notebook(), limit_bytes=100)
    outs: list = []
    for step in range(50):  # a progress bar redrawn 50 times costs what it finally shows
        client.output(outs, stream_msg(f"\rprogress {step:3d}%"), None, 0)
    client.output(outs, stream_msg("\n"), None, 0)
    assert len(outs) == 1 and outs[0].text == "progress  49%\n"
    assert not client.truncated
    client.output(outs, stream_msg("x" * 500), None, 0)
    client.output(outs, stream_msg("more\n"), None, 0)
    kept = "".join(out.text for out in outs)
    assert client.truncated
    assert kept.count("[slimgrade: output cut after 100 bytes]") == 1
    assert len(kept.replace("\n[slimgrade: output cut after 100 bytes]\n", "")) == 100
    error = {"msg_type": "error", "content": {"ename": "E", "evalue": "v", "traceback": []},
             "parent_header": {"msg_id": "m"}, "header": {"msg_type": "error"}}
    client.output(outs, error, None, 0)
    assert outs[-1].output_type == "error"  # errors are kept past the cap


def terminal(text: str) -> str:
    """What _resolve_control_characters should give, one character at a time."""
    lines, line, carriage_return = [], [], False
    for char in text:
        if char == "\n":
            lines.append("".join(line) + ("\r" if carriage_return else "") + "\n")
            line, carriage_return = [], False
        elif char == "\r":
            carriage_return = True
        else:
            if carriage_return:
                line, carriage_return = [], False
            if char != "\x08":
                line.append(char)
            elif line:
                line.pop()
    return "".join(lines) + "".join(line) + ("\r" if carriage_return else "")


def test_control_characters_resolve_like_a_terminal_on_the_new_text_only(monkeypatch):
    resolve = execute._resolve_control_characters
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("ab\r\x08\n") for _ in range(rng.randint(0, 24)))
        assert resolve(text) == terminal(text), repr(text)
        split = rng.randint(0, len(text))  # resolving chunk by chunk gives the same
        first = resolve(text[:split])
        start = first.rfind("\n") + 1
        assert first[:start] + resolve(first[start:] + text[split:]) == resolve(text)
    for big in ("a" * 2_000_000 + "\r", "a" * 2_000_000 + "\rb", "ab\x08" * 700_000 + "\r\n"):
        assert resolve(big) == terminal(big)  # the old regex took hours on the first one
    calls: list[int] = []
    monkeypatch.setattr(execute, "_resolve_control_characters",
                        lambda text: calls.append(len(text)) or resolve(text))
    client = OutputCappedClient(nbformat.v4.new_notebook(), limit_bytes=10_000_000)
    outs: list = []
    client.output(outs, stream_msg("line\r\n" * 200_000), None, 0)
    client.output(outs, stream_msg("a" * 2_000_000 + "\r"), None, 0)
    for step in range(1000):
        client.output(outs, stream_msg(f"\rstep {step:4d}"), None, 0)
    # Only the message's text and the output's current last line are resolved, never the rest.
    assert calls[:3] == [1_200_000, 2_000_001, 2_000_011]
    assert max(calls[3:]) <= 20
    assert outs[0].text == "line\r\n" * 200_000 + "step  999"
    assert client.kept_bytes == len(outs[0].text)


def test_errors_display_updates_and_comms_stay_within_the_limit():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x"), nbformat.v4.new_code_cell("y")]
    client = OutputCappedClient(nb, limit_bytes=50_000)
    cell, other = nb.cells
    huge = {"ename": "E" * 100_000, "evalue": "v" * 5_000_000,
            "traceback": ["frame\n" * 100_000] * 50 + ["ValueError: " + "v" * 5_000_000]}
    for _ in range(20):
        client.process_message(message("error", huge), cell, 0)
    errors = [out for out in cell.outputs if out.output_type == "error"]
    assert 1 <= len(errors) < 10 and client.truncated  # counted, then cut
    assert len(json.dumps(cell.outputs)) < 70_000
    assert errors[0].traceback[-1].startswith("ValueError: vvv")  # the last entry is kept
    client.process_message(message("error", huge), other, 1)
    assert [out.output_type for out in other.outputs] == ["error"]  # a cell's first error stays

    client = OutputCappedClient(nb, limit_bytes=50_000)
    cell.outputs, other.outputs = [], []
    shown = {"data": {"text/plain": "0%"}, "metadata": {}, "transient": {"display_id": "bar"}}
    client.process_message(message("display_data", shown), cell, 0)
    client.process_message(message("update_display_data", {**shown, "data": {
        "text/plain": "50%"}}), other, 1)
    assert cell.outputs[0].data["text/plain"] == "50%"
    client.process_message(message("update_display_data", {**shown, "metadata": {
        "x": "m" * 100_000}}), other, 1)
    assert cell.outputs[0].data["text/plain"] == "50%" and client.truncated
    assert len(json.dumps(nb)) < 60_000

    widget = {"comm_id": "w", "target_name": "jupyter.widget", "data": {"state": {
        "_model_module": "@jupyter-widgets/output", "_model_name": "OutputModel",
        "outputs": [], "value": "s" * 1_000_000}, "buffer_paths": []}}
    client.process_message(message("comm_open", widget), cell, 0)
    client.set_widgets_metadata()
    assert "widgets" not in nb.metadata and not client.comm_objects


def test_dump_state_converts_to_plain_json_and_skips_the_rest(tmp_path):
    import numpy as np

    state_file = tmp_path / "state.json"
    namespace = {
        "LAMBDA": np.float32(0.5), "EPOCHS": np.int64(3), "threshold": torch.tensor(0.25),
        "cfg": [4, "M", 2],
        "cfg_mask": [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([True, False])],
        "history": [{"epoch": 0, "prec1": torch.tensor(0.5)}], "PRUNE_PERCENT": float("nan"),
        "WEIGHT_PATH": Path("model_best.pth"), "model": torch.nn.Linear(2, 2),
    }
    slimming_runtime.dump_state(namespace, str(state_file))
    state = json.loads(state_file.read_text())
    assert state["LAMBDA"] == 0.5 and state["EPOCHS"] == 3 and isinstance(state["EPOCHS"], int)
    assert state["threshold"] == 0.25
    assert state["cfg"] == [4, "M", 2]
    assert state["cfg_mask"] == [[1, 0, 1], [1, 0]]
    assert state["history"] == [{"epoch": 0, "prec1": 0.5}]
    assert state["PRUNE_PERCENT"] == "nan"
    assert state["_skipped"] == {"WEIGHT_PATH": "PosixPath"}
    assert "model" not in state


def test_dump_state_never_raises(tmp_path, capsys):
    runtime.dump_state({"cfg": [1]}, str(tmp_path / "missing-folder" / "state.json"))
    assert "could not save" in capsys.readouterr().err


def test_drive_paths_map_to_the_work_dir_by_basename(monkeypatch, tmp_path):
    monkeypatch.setitem(runtime.settings, "work_dir", str(tmp_path))
    assert runtime.drive_path("/content/drive/MyDrive/lab4/model_best.pth") == \
        str(tmp_path / "model_best.pth")
    assert runtime.drive_path(Path("/content/x.pth")) == str(tmp_path / "x.pth")
    # An absolute path into a folder that exists only on the student's machine lands there too;
    # one into a folder that exists here is left alone.
    assert runtime.drive_path("/home/student/lab4/x.pth") == str(tmp_path / "x.pth")
    assert runtime.drive_path(str(tmp_path.parent / "x.pth")) == str(tmp_path.parent / "x.pth")
    assert runtime.drive_path("model_best.pth") == "model_best.pth"
    assert runtime.drive_path(3) == 3


def test_unreadable_notebook_is_the_submissions_failure(tmp_path):
    notebook = tmp_path / "sparsity_train.ipynb"
    notebook.write_text("{ this is not json")
    result = run_notebook(RunSpec("broken", notebook, tmp_path / "work", {}, PROFILE))
    assert result.failure is not None and result.failure.kind == "exception"
    assert result.failure.message.startswith("sparsity_train.ipynb could not be read as a notebook")
    assert result.executed_notebook.is_file() and result.state == {}


# --- with a kernel ----------------------------------------------------------------------

def test_untagged_parameters_follow_every_assignment_and_scale_once(tmp_path):
    result = run(tmp_path, [
        "LAMBDA = 1e-4\nEPOCHS = 60",
        "seen = [LAMBDA, EPOCHS]",
        "%matplotlib inline\nEPOCHS = 100  # assigned again",
        "history = seen + [EPOCHS, LAMBDA]",
    ], parameters={"EPOCHS": 12, "WEIGHT_PATH": "w.pth"}, scale={"LAMBDA": 100.0})
    assert result.failure is None
    assert result.state["history"] == pytest.approx([0.01, 12, 12, 0.01])
    assert result.state["WEIGHT_PATH"] == "w.pth"
    assert len(result.cell_seconds) == 4 and all(s > 0 for s in result.cell_seconds)
    executed = nbformat.read(result.executed_notebook, as_version=4)
    injected = [c for c in executed.cells if INJECTED_TAG in c.metadata.get("tags", [])]
    assert len(injected) == 4  # install, after cell 0, after cell 2, dump


def test_tagged_parameters_are_injected_once(tmp_path):
    result = run(tmp_path, [
        ("LAMBDA = 1e-4\nEPOCHS = 60", ["parameters"]),
        "EPOCHS = 100",
        "history = [LAMBDA, EPOCHS]",
    ], parameters={"EPOCHS": 12}, scale={"LAMBDA": 10.0})
    assert result.failure is None
    assert result.state["history"] == pytest.approx([1e-3, 100])


def test_exception_names_the_cell_and_state_is_still_dumped(tmp_path):
    result = run(tmp_path, [
        "import torch\ncfg = [4, 'M', 2]\ncfg_mask = [torch.tensor([1., 0., 1.])]\n"
        "threshold = torch.tensor(0.25)\nhistory = object()",
        "raise IndexError('too many indices for tensor of dimension 1')",
        "EPOCHS = 99",
    ])
    failure = result.failure
    assert failure is not None and failure.kind == "exception"
    assert failure.cell_index == 1
    assert failure.message == "lab.ipynb: cell 2 raised IndexError: too many indices for tensor " \
                              "of dimension 1."
    assert "IndexError" in failure.error_tail and "\x1b" not in failure.error_tail
    assert result.state["cfg_mask"] == [[1, 0, 1]]
    assert result.state["threshold"] == 0.25
    assert result.state["_skipped"] == {"history": "object"}
    assert result.state["EPOCHS"] == 99  # the cell after the failing one ran too
    assert result.cell_seconds[2] > 0.0


def test_sys_exit_is_an_exception(tmp_path):
    result = run(tmp_path, ["import sys\nsys.exit(1)", "EPOCHS = 1"])
    assert result.failure is not None and result.failure.kind == "exception"
    assert result.failure.cell_index == 0
    assert "SystemExit" in result.failure.message
    assert result.state["_skipped"] == {} and result.state["EPOCHS"] == 1  # later cells ran


def test_cell_timeout_interrupts_and_still_dumps_state(tmp_path):
    profile = replace(PROFILE, cell_timeout_s=3)
    result = run(tmp_path, ["EPOCHS = 5", "while True:\n    pass", "EPOCHS = 6"], profile=profile)
    assert result.failure is not None and result.failure.kind == "timeout"
    assert result.failure.cell_index == 1
    assert "cell 2 was still running after 3 s" in result.failure.message
    assert result.state["EPOCHS"] == 5
    assert result.cell_seconds[2:] == [0.0] * len(result.cell_seconds[2:])  # later cells never ran


def test_run_budget_stops_the_cell_that_exhausts_it(tmp_path):
    profile = replace(PROFILE, cell_timeout_s=30, run_timeout_s=3)
    # The second cell would block for good; the 3 s run budget, not the 30 s cell limit, stops it.
    result = run(tmp_path, ["import threading", "threading.Event().wait()", "x = 1"],
                 profile=profile)
    assert result.failure is not None and result.failure.kind == "timeout"
    assert result.failure.cell_index == 1
    assert "time budget of 3 s in cell 2" in result.failure.message


def test_memory_limit_kills_the_kernel(tmp_path):
    profile = replace(PROFILE, memory_limit_mb=500)
    result = run(tmp_path, ["x = 1", "big = bytearray(1_500_000_000)", "y = 2"], profile=profile)
    assert result.failure is not None and result.failure.kind == "out-of-memory"
    assert result.failure.cell_index == 1
    assert "more than 500 MB" in result.failure.message
    assert result.state == {}


def test_files_in_the_sandbox_tmpfs_count_as_memory(tmp_path):
    if not sandbox.sandbox_available():
        pytest.skip("the sandbox's own /dev/shm needs bubblewrap")
    # The kernel itself holds far less than 500 MB; the 800 MB it parks in /dev/shm (files no
    # process maps) are what passes the limit. Uncounted, the cell would wait for its timeout.
    profile = replace(PROFILE, memory_limit_mb=500, file_limit_mb=1024)
    fill = ("import threading\nchunk = b'x' * (100 * 1024 * 1024)\n"
            "for i in range(8):\n    with open(f'/dev/shm/fill-{i}', 'wb') as f:\n"
            "        f.write(chunk)\n"
            "del chunk\nthreading.Event().wait()")
    result = run(tmp_path, ["x = 1", fill], profile=profile)
    assert result.failure is not None and result.failure.kind == "out-of-memory", result.failure
    assert result.failure.cell_index == 1
    assert "more than 500 MB" in result.failure.message and "/dev/shm" in result.failure.message


def test_a_file_past_the_file_limit_cannot_be_written(tmp_path):
    if not sandbox.sandbox_available():
        pytest.skip("RLIMIT_FSIZE is set by the sandbox's launcher")
    profile = replace(PROFILE, file_limit_mb=8)
    result = run(tmp_path, ["open('big.bin', 'wb').write(b'x' * (10 * 1024 * 1024))"],
                 profile=profile)
    assert result.failure is not None and result.failure.kind == "exception", result.failure
    assert "File too large" in result.failure.message
    assert (tmp_path / "work" / "big.bin").stat().st_size <= 8 * 1024 * 1024


def test_a_work_dir_past_the_disk_limit_stops_the_kernel(tmp_path):
    profile = replace(PROFILE, file_limit_mb=8, disk_limit_mb=20)
    fill = ("import threading\nfor i in range(4):\n"
            "    open(f'part-{i}.bin', 'wb').write(b'x' * (7 * 1024 * 1024))\n"
            "threading.Event().wait()")
    result = run(tmp_path, ["x = 1", fill], profile=profile)
    assert result.failure is not None and result.failure.kind == "out-of-memory", result.failure
    assert result.failure.cell_index == 1
    assert "disk" in result.failure.message and "20 MB" in result.failure.message


def test_memfds_and_detached_shared_memory_count_as_memory(tmp_path):
    # 400 MB in memfds no process maps, 400 MB in System V segments attached, written and
    # detached again: each half alone stays under the limit with the kernel's own (~400 MB).
    profile = replace(PROFILE, memory_limit_mb=1000, file_limit_mb=1024, cell_timeout_s=40)
    hold = ("import ctypes, os, threading\nchunk = b'x' * (100 * 1024 * 1024)\n"
            "fds = [os.memfd_create(f'hold-{i}') for i in range(4)]\n"
            "for fd in fds:\n    os.write(fd, chunk)\n"
            "del chunk\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]\n"
            "libc.shmat.restype = ctypes.c_void_p\n"
            "libc.shmdt.argtypes = [ctypes.c_void_p]\n"
            "for i in range(4):\n"
            "    segment = libc.shmget(0, 100 * 1024 * 1024, 0o1600)\n"
            "    address = libc.shmat(segment, None, 0)\n"
            "    ctypes.memset(address, 1, 100 * 1024 * 1024)\n"
            "    libc.shmdt(address)\n"
            "threading.Event().wait()")
    result = run(tmp_path, ["x = 1", hold], profile=profile)
    assert result.failure is not None and result.failure.kind == "out-of-memory", result.failure
    assert result.failure.cell_index == 1
    assert "more than 1000 MB" in result.failure.message


def test_deleted_open_files_and_the_socket_folder_count_as_disk(tmp_path):
    # 14 MB in the socket folder and 14 MB in deleted files still open: 28 MB, past 20 MB.
    profile = replace(PROFILE, file_limit_mb=8, disk_limit_mb=20, cell_timeout_s=40)
    fill = ("import os, threading\nfrom ipykernel.connect import get_connection_file\n"
            "sockets = os.path.dirname(get_connection_file())\nheld = []\n"
            "for i in range(2):\n"
            "    with open(os.path.join(sockets, f'part-{i}.bin'), 'wb') as f:\n"
            "        f.write(b'x' * (7 * 1024 * 1024))\n"
            "    f = open(f'gone-{i}.bin', 'wb')\n    f.write(b'x' * (7 * 1024 * 1024))\n"
            "    f.flush()\n    os.unlink(f.name)\n    held.append(f)\n"
            "threading.Event().wait()")
    result = run(tmp_path, ["x = 1", fill], profile=profile)
    assert result.failure is not None and result.failure.kind == "out-of-memory", result.failure
    assert result.failure.cell_index == 1
    assert "disk" in result.failure.message and "20 MB" in result.failure.message


def test_huge_error_messages_keep_the_notebook_and_the_failure_small(tmp_path):
    profile = replace(PROFILE, output_limit_bytes=20_000)
    result = run(tmp_path, [
        "ip = get_ipython()\ntry:\n    raise ValueError('E' * 5_000_000)\n"
        "except ValueError:\n    for _ in range(10):\n        ip.showtraceback()",
        "raise RuntimeError('F' * 5_000_000)",
        "EPOCHS = 3",
    ], profile=profile)
    assert result.failure is not None and result.failure.kind == "exception"
    assert [error.cell_index for error in result.errors] == [0, 1]
    assert all(len(error.error_tail) < 20_000 and len(error.message) < 1_000
               for error in result.errors)
    assert "RuntimeError: FFF" in result.errors[1].error_tail
    assert result.state["EPOCHS"] == 3
    assert result.executed_notebook.stat().st_size < 100_000
    executed = nbformat.read(result.executed_notebook, as_version=4)
    kinds = [[out.output_type for out in cell.outputs] for cell in executed.cells]
    assert ["error"] in kinds  # the second cell's error, kept past the limit


def test_work_dir_usage_counts_each_file_once_and_follows_no_link(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data.bin").write_bytes(b"x" * 1_000_000)
    os.link(tmp_path / "a" / "data.bin", tmp_path / "hard.bin")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "huge.bin").write_bytes(b"y" * 3_000_000)
    (tmp_path / "link").symlink_to(outside)
    used, entries = work_dir_usage(tmp_path, 10**9)
    assert 1_000_000 <= used < 1_200_000
    assert entries == 4
    used, _ = work_dir_usage(tmp_path, 10)  # stops as soon as it is over
    assert used > 10


def test_killed_kernel_is_reported(tmp_path):
    result = run(tmp_path, ["x = 1", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"])
    assert result.failure is not None and result.failure.kind == "kernel-died"
    assert result.failure.cell_index == 1
    assert "signal 9" in result.failure.message
    assert result.state == {}


def test_clean_run_without_the_expected_checkpoint_is_a_missing_artifact(tmp_path):
    result = run(tmp_path, ["import torch\ntorch.save({}, 'model_prune.pth')"],
                 expected_artifacts=["model_prune.pth", "model_best.pth"])
    assert result.failure is not None and result.failure.kind == "missing-artifact"
    assert "model_best.pth" in result.failure.message
    assert "model_prune.pth" not in result.failure.message


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes below this one whose command line contains ``text``."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if text in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone, or a zombie: not running
            continue
    return found


def test_kernel_started_ahead_sees_inputs_placed_at_admission(tmp_path):
    seen_before = []

    def admit() -> bool:
        # The kernel is up and the grader's setup cell ran; the student's cells have not.
        seen_before.append((tmp_path / "work" / "marker.txt").exists())
        (tmp_path / "work" / "model_best.pth").write_text("placed at admission")
        return True

    result = run(tmp_path, ["open('marker.txt', 'w').write('ran')",
                            "print(open('model_best.pth').read())"], admit=admit)
    assert seen_before == [False]
    assert result is not None and result.failure is None
    assert "placed at admission" in result.stdout_text


def test_kernel_not_admitted_is_shut_down_without_running_a_cell(tmp_path):
    result = run(tmp_path, ["open('marker.txt', 'w').write('ran')"], admit=lambda: False)
    assert result is None
    assert not (tmp_path / "work" / "marker.txt").exists()
    assert not processes_mentioning(str(tmp_path))  # this run's kernel (and bwrap)


def test_output_flood_is_cut_and_the_notebook_stays_small(tmp_path):
    profile = replace(PROFILE, output_limit_bytes=200_000)
    result = run(tmp_path, [
        "for i in range(200_000):\n    print('y' * 99)",  # 20 MB
        "print('NEXT-CELL')\nEPOCHS = 7",
    ], profile=profile)
    assert result.failure is None
    assert result.output_truncated
    assert result.stdout_text.count("[slimgrade: output cut after 200000 bytes]") == 1
    assert 200_000 <= len(result.stdout_text) < 201_000
    assert "NEXT-CELL" not in result.stdout_text
    assert result.state["EPOCHS"] == 7
    assert result.executed_notebook.stat().st_size < 400_000


COLAB_CELLS = [
    "from google.colab import drive\ndrive.mount('/content/drive')",
    "%cd /content/drive/MyDrive/lab4",
    "import os, json\nimport torch\nimport numpy as np\nreport = {'cwd': os.getcwd()}\n"
    "WEIGHT_PATH = '/content/drive/MyDrive/lab4/model_best.pth'\n"
    "torch.save({'w': torch.arange(3.0)}, WEIGHT_PATH)\n"
    "report['exists'] = os.path.exists(WEIGHT_PATH)",
    "t = torch.ones(2).cuda()\nlayer = torch.nn.Linear(2, 2).cuda()\n"
    "report['devices'] = [str(t.device), str(next(layer.parameters()).device)]\n"
    "report['loaded'] = torch.load(WEIGHT_PATH)['w'].tolist()",
    "from torchvision import datasets, transforms\n"
    "train_set = datasets.CIFAR10('./data', train=True, download=True,\n"
    "                             transform=transforms.Compose([\n"
    "    transforms.Pad(4), transforms.RandomCrop(32), transforms.RandomHorizontalFlip(),\n"
    "    transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))\n"
    "test_set = datasets.CIFAR10('./data', train=False, download=True)\n"
    "loader = torch.utils.data.DataLoader(train_set, batch_size=100, shuffle=True, num_workers=2)\n"
    "x, y = next(iter(loader))\n"
    "report['batch'] = [list(x.shape), float(x.min()), float(x.max()), str(y.dtype)]\n"
    "report['sizes'] = [len(train_set), len(test_set), list(test_set.data.shape)]\n"
    "image, label = test_set[0]\n"
    "report['sample'] = [type(image).__name__, image.mode, type(label).__name__]\n"
    "report['downloaded'] = os.path.exists('data')",
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    "import sys\nfrom models import vgg\nreport['cfg'] = vgg().cfg\n"
    "report['models_file'] = sys.modules['models.vgg'].__file__\n"
    "report['threads'] = torch.get_num_threads()",
    "json.dump(report, open('/content/drive/MyDrive/lab4/report.json', 'w'))",
]


def test_colab_notebook_runs_unchanged(tmp_path):
    work_dir = tmp_path / "work"
    (work_dir / "models").mkdir(parents=True)
    (work_dir / "models" / "__init__.py").write_text("raise ImportError('student models')\n")
    (work_dir / "models" / "student_extra.py").write_text("")
    result = run(tmp_path, COLAB_CELLS, threads=2)
    assert result.failure is None, result.failure
    report = json.loads((work_dir / "report.json").read_text())
    assert report["cwd"] == str(work_dir.resolve())
    assert report["exists"] and (work_dir / "model_best.pth").is_file()
    assert report["devices"] == ["cpu", "cpu"]
    assert report["loaded"] == [0.0, 1.0, 2.0]
    assert report["batch"] == [[100, 3, 32, 32], -1.0, 1.0, "torch.int64"]
    assert report["sizes"] == [1438, 359, [359, 32, 32, 3]]
    assert report["sample"] == ["Image", "RGB", "int"]
    assert report["downloaded"] is False
    assert report["cfg"] == scaled_cfg(PROFILE.width_divisor)
    assert report["models_file"] == str(work_dir.resolve() / "models" / "vgg.py")
    assert not (work_dir / "models" / "student_extra.py").exists()
    assert report["threads"] == 2
    assert result.images == [5]
    assert "Mounted at /content/drive" in result.stdout_text
    assert (work_dir / STATE_FILE).is_file()
