"""grader.sandbox: what a kernel inside bubblewrap can and cannot reach.

The same probing notebook runs inside the sandbox and, as a control that shows the
probes can succeed, without it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import threading
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from grader import execute, sandbox
from grader.execute import HarnessError, RunSpec, run_notebook
from grader.sandbox import (KernelPlace, bwrap_command, kernel_files, package_dirs,
                            sandbox_available)
from labs.slimming.kernel import kernel_setup
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
                       profile=replace(QUICK, cell_timeout_s=60), sandbox=sandboxed,
                       kernel=kernel_setup(QUICK))
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
        assert sandbox.SANDBOX_ID_BASE <= results["uid"] \
            < sandbox.SANDBOX_ID_BASE + sandbox.SANDBOX_ID_COUNT


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
    sees = tuple(path for path, _ in kernel_setup(QUICK).sees)
    place = KernelPlace(work_dir, work_dir / ".slimgrade", data_root, "cpu", True,
                        (1_900_000_123, 1_900_000_123), 256 * 1024 * 1024, sees)
    args = bwrap_command(place, ["python", "-m", "ipykernel_launcher"])
    binds = {(args[i], args[i + 1]) for i, arg in enumerate(args)
             if arg in ("--bind", "--ro-bind", "--dev-bind")}
    sources = {Path(source) for _, source in binds}
    assert ("--bind", str(work_dir)) in binds
    assert ("--ro-bind", str(data_root)) in binds
    # Of the packages, exactly KERNEL_SEES and the lab's, over an empty read-only tmpfs each.
    assert {("--ro-bind", str(path)) for path in kernel_files(sees)} <= binds
    assert {p for p in sources if any(f in p.parents or f == p for f in package_dirs(sees))} \
        == set(kernel_files(sees))
    assert {folder.name for folder in package_dirs(sees)} == {"grader", "labs", "reference"}
    for folder in package_dirs(sees):
        assert ("--tmpfs", str(folder)) in set(zip(args, args[1:]))
        assert ("--remount-ro", str(folder)) in set(zip(args, args[1:]))
    assert REPO not in sources
    launcher = args[args.index("--") + 1:]
    assert launcher[launcher.index("--user") + 1] == "1900000123:1900000123"
    assert launcher[launcher.index("--max-file-bytes") + 1] == str(256 * 1024 * 1024)
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


# ---------------------------------------------------------------- the answer key, uids

HIDDEN_MODULES = ("reference.prune", "reference.train", "reference.bundle", "reference.profiles",
                  "reference.drift", "reference.metrics", "reference.plots",
                  "labs.slimming.evaluate", "labs.slimming.grading", "labs.slimming.diagnoses",
                  "labs.slimming.checks", "labs.slimming.lab", "labs.slimming.kernel",
                  "labs.slimming.checkpoints", "grader.pipeline", "grader.bundles",
                  "grader.execute", "grader.sandbox", "grader.diagnose", "grader.score")

IMPORTS = '''
import importlib, json, os
results = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
        results[name] = "imported"
    except Exception as error:
        results[name] = type(error).__name__
from models import vgg
results["vgg"] = type(vgg()).__name__
import grader, reference
results["seen"] = sorted(os.listdir(os.path.dirname(reference.__file__))
                         + os.listdir(os.path.dirname(grader.__file__)))
with open("imports.json", "w") as handle:
    json.dump(results, handle)
'''


def notebook(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)
    return path


@needs_bwrap
@pytest.mark.parametrize("installed", [False, True], ids=["editable", "in-site-packages"])
def test_the_answer_key_cannot_be_imported_in_the_kernel(tmp_path, monkeypatch, installed):
    if installed:  # as a non-editable install: the packages inside a bound python root
        roots = sandbox.python_roots()
        monkeypatch.setattr(sandbox, "python_roots", lambda: sorted({*roots, REPO}))
    source = IMPORTS.format(modules=HIDDEN_MODULES)
    result = run_notebook(RunSpec("imports", notebook(tmp_path, "imports", source),
                                  tmp_path / "work", {}, replace(QUICK, cell_timeout_s=60),
                                  sandbox=True, kernel=kernel_setup(QUICK)))
    assert result.failure is None, result.failure
    results = json.loads((tmp_path / "work" / "imports.json").read_text())
    for name in HIDDEN_MODULES:
        assert results[name] == "ModuleNotFoundError", name
    assert results["vgg"] == "vgg"  # the trusted models/vgg.py still imports reference.model
    assert results["seen"] == ["__init__.py", "__init__.py", "data.py", "model.py", "runtime"]


def test_each_lease_is_a_uid_of_its_own_until_released(monkeypatch):
    if os.geteuid() != 0:
        assert sandbox.lease_user() is None  # the kernel runs as the grader's own user
        return
    monkeypatch.setattr(sandbox.secrets, "randbelow", lambda n: n - 1)  # all start at the end
    first, second = sandbox.lease_user(), sandbox.lease_user()
    try:
        assert first.uid != second.uid
        assert first.gid == first.uid and second.gid == second.uid
        for lease in (first, second):
            assert sandbox.SANDBOX_ID_BASE <= lease.uid \
                < sandbox.SANDBOX_ID_BASE + sandbox.SANDBOX_ID_COUNT
        first.release()
        third = sandbox.lease_user()  # a released uid is free again
        assert third.uid == first.uid
        third.release()
    finally:
        first.release()
        second.release()


BOMB = '''
import json, os
r, w = os.pipe()
children, error = [], None
while len(children) < 5000:
    try:
        pid = os.fork()
    except OSError as exc:
        error = exc.errno
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # until the parent lets go
        os._exit(0)
    children.append(pid)
with open({bombed!r}, "w") as handle:  # tells the test: the process table is full
    handle.write(str(len(children)))
with open({release!r}) as handle:  # until the test has started the other kernel
    handle.read()
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
with open("bomb.json", "w") as handle:
    json.dump({{"uid": os.getuid(), "children": len(children), "errno": error}}, handle)
'''

OTHER = '''
import json, os
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
with open("other.json", "w") as handle:
    json.dump({"uid": os.getuid()}, handle)
'''


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per kernel needs a grader running as root")
def test_a_fork_bomb_exhausts_only_its_own_kernels_process_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_PROCESSES", 64)  # a small bomb
    shared = tmp_path / "shared"  # bound into both sandboxes (as the data root): two FIFOs
    shared.mkdir(mode=0o755)
    bombed, release = shared / "bombed", shared / "release"
    for fifo in (bombed, release):
        os.mkfifo(fifo)
        os.chmod(fifo, 0o666)
    profile = replace(QUICK, cell_timeout_s=120)
    bomb_spec = RunSpec("bomb", notebook(tmp_path, "bomb", BOMB.format(bombed=str(bombed),
                                                                       release=str(release))),
                        tmp_path / "bomb", {}, profile, data_root=shared, sandbox=True)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_notebook(bomb_spec)))
    reader = os.open(bombed, os.O_RDONLY | os.O_NONBLOCK)
    thread.start()
    try:
        ready, _, _ = select.select([reader], [], [], 180)
        assert ready, "the fork bomb never filled its process table"
        assert int(os.read(reader, 64)) < 64
        other = run_notebook(RunSpec("other", notebook(tmp_path, "other", OTHER),
                                     tmp_path / "other", {}, profile, sandbox=True))
        assert other.failure is None, other.failure  # it started, and it could fork
    finally:
        os.close(reader)
        try:
            writer = os.open(release, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"go")
            os.close(writer)
        except OSError:
            pass  # the bomb's kernel is gone already
        thread.join(180)
    assert outcome["result"].failure is None, outcome["result"].failure
    bomb = json.loads((tmp_path / "bomb" / "bomb.json").read_text())
    other_uid = json.loads((tmp_path / "other" / "other.json").read_text())["uid"]
    assert bomb["errno"] == errno.EAGAIN
    assert bomb["uid"] != other_uid
