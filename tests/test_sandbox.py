"""grader.sandbox: what a kernel inside bubblewrap can and cannot reach.

The same probing notebook runs inside the sandbox and, as a control that shows the
probes can succeed, without it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from grader import execute, sandbox
from grader.execute import HarnessError, RunSpec, run_notebook
from grader.sandbox import KernelPlace, bwrap_command, package_dirs, sandbox_available
from reference.profiles import QUICK

REPO = Path(__file__).resolve().parent.parent
needs_bwrap = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap does not work here")

PROBE = '''
import json, os, socket, threading
results = {{}}
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    results["network"] = "connected"
except OSError as error:
    results["network"] = type(error).__name__
for key, path in [("home_cache", {home_secret!r}), ("sibling", {sibling_secret!r})]:
    try:
        with open(path) as handle:
            results[key] = handle.read()
    except OSError as error:
        results[key] = type(error).__name__
try:
    with open({escape!r}, "w") as handle:
        handle.write("escaped")
    results["write_outside"] = "written"
except OSError as error:
    results["write_outside"] = type(error).__name__
results["repo_tests_visible"] = os.path.exists({repo_tests!r})
results["secret_env"] = os.environ.get("SLIMGRADE_TEST_SECRET")
results["uid"] = os.getuid()
results["visible_pids"] = sum(name.isdigit() for name in os.listdir("/proc"))
stop = threading.Event()
started = []
try:
    for _ in range(1500):
        thread = threading.Thread(target=stop.wait)
        thread.start()
        started.append(thread)
except RuntimeError:
    pass
stop.set()
results["threads"] = len(started)
with open("probe.json", "w") as handle:
    json.dump(results, handle)
'''


@pytest.fixture
def probe_run(tmp_path, monkeypatch):
    """Runs the probe notebook with ``sandbox=...`` and returns (results, paths)."""
    monkeypatch.setenv("SLIMGRADE_TEST_SECRET", "hunter2")
    home_secret = tmp_path / "home" / ".cache" / "slimgrade" / "reference" / "secret.txt"
    sibling_secret = tmp_path / "other-submission" / "secret.txt"
    for path in (home_secret, sibling_secret):
        path.parent.mkdir(parents=True)
        path.write_text("secret")
    escape = tmp_path / "escape.txt"
    server = socket.create_server(("127.0.0.1", 0))
    server.listen(8)
    source = PROBE.format(port=server.getsockname()[1], home_secret=str(home_secret),
                          sibling_secret=str(sibling_secret), escape=str(escape),
                          repo_tests=str(REPO / "tests"))
    notebook = tmp_path / "probe.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, notebook)

    def run(sandboxed: bool) -> tuple[dict, Path]:
        work_dir = tmp_path / "work"
        spec = RunSpec(run_id="probe", notebook=notebook, work_dir=work_dir, parameters={},
                       profile=replace(QUICK, cell_timeout_s=60), sandbox=sandboxed)
        result = run_notebook(spec)
        assert result.failure is None, result.failure
        return json.loads((work_dir / "probe.json").read_text()), escape

    yield run
    server.close()


@needs_bwrap
def test_kernel_in_the_sandbox_reaches_nothing_outside_its_work_dir(probe_run):
    results, escape = probe_run(True)
    assert results["network"] != "connected"
    assert results["home_cache"] == "FileNotFoundError"
    assert results["sibling"] == "FileNotFoundError"
    assert not escape.exists()  # the write fails, or lands in the sandbox's own tmpfs
    assert results["repo_tests_visible"] is False
    assert results["secret_env"] is None
    assert results["visible_pids"] <= 5  # bwrap's init and the kernel
    assert results["threads"] < sandbox.MAX_PROCESSES
    if os.geteuid() == 0:
        assert results["uid"] == sandbox.UNPRIVILEGED_ID


def test_the_same_probe_without_the_sandbox_reaches_everything(probe_run):
    results, escape = probe_run(False)
    assert results["network"] == "connected"
    assert results["home_cache"] == "secret"
    assert results["sibling"] == "secret"
    assert results["write_outside"] == "written" and escape.read_text() == "escaped"
    assert results["repo_tests_visible"] is True
    assert results["secret_env"] is None  # the kernel's environment is built, never inherited
    assert results["threads"] == 1500


@needs_bwrap
def test_package_folders_are_read_only_inside(tmp_path):
    marker = package_dirs()[0] / "sandbox-write-probe.txt"
    notebook = tmp_path / "write.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"open({str(marker)!r}, 'w').write('x')")]
    nbformat.write(nb, notebook)
    try:
        result = run_notebook(RunSpec("write", notebook, tmp_path / "work", {}, QUICK,
                                      sandbox=True))
        assert result.failure is not None and result.failure.kind == "exception"
        raised = result.failure.message.split(" raised ")[1]
        assert raised.startswith(("OSError: [Errno 30]", "PermissionError")), raised
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_bwrap_command_binds_only_what_the_kernel_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: "/usr/bin/bwrap")
    work_dir, data_root = tmp_path / "work", tmp_path / "data"
    place = KernelPlace(work_dir, work_dir / ".slimgrade", data_root, "cpu", True)
    args = bwrap_command(place, ["python", "-m", "ipykernel_launcher"])
    binds = {(args[i], args[i + 1]) for i, arg in enumerate(args)
             if arg in ("--bind", "--ro-bind", "--dev-bind")}
    sources = {Path(source) for _, source in binds}
    assert ("--bind", str(work_dir)) in binds
    assert ("--ro-bind", str(data_root)) in binds
    assert {("--ro-bind", str(folder)) for folder in package_dirs()} <= binds
    assert REPO not in sources
    assert not any(Path.home() / ".cache" in (s, *s.parents) for s in sources)
    assert [kind for kind, _ in binds if kind == "--bind"] == ["--bind"]  # only the work dir
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--new-session"):
        assert flag in args
    assert args[-3:] == ["python", "-m", "ipykernel_launcher"]


def test_sandbox_probe_is_cached():
    first = sandbox_available()
    assert sandbox_available() is first
    assert sandbox_available.cache_info().hits >= 1


def test_missing_sandbox_warns_once_and_runs_unsandboxed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: False)
    monkeypatch.setattr(sandbox, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="grader.sandbox"):
        assert execute.choose_sandbox(None) is False
        assert execute.choose_sandbox(None) is False
        assert execute.choose_sandbox(False) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "WITHOUT isolation" in warnings[0].getMessage()
    assert "bubblewrap" in warnings[0].getMessage()
    with pytest.raises(HarnessError):
        execute.choose_sandbox(True)
