"""Run one student notebook: injected cells, time and memory budgets, output cap, failures.

A run executes a copy of the student's notebook in a fresh kernel (sandboxed by
``grader.sandbox`` when bubblewrap works here), cell by cell, so that it knows which
cell failed and can still dump the kernel's state after a failure. Cells the grader
adds are tagged ``slimgrade-injected``:

1. first, the lab's runtime ``install(config)`` (``grader.lab.KernelSetup``): Colab shims, device, data;
2. the profile's parameters as literals, after the cell tagged ``parameters``, or,
   when no cell has that tag, after every code cell that assigns one of
   the lab's ``KernelSetup.known_parameters`` (a cell that assigns one twice is followed once); when no cell
   assigns any, right after the first injected cell;
3. last, the lab runtime's ``dump_state(globals(), ...)``, run even after a failing cell.

Starting a kernel and importing torch costs seconds. ``run_notebook`` can take an
``admit`` callback: the kernel starts and runs the first injected cell at once, then
waits for ``admit()`` to say the run's turn has come (its inputs placed meanwhile) or
that it is no longer wanted. The caller uses that to start a run's kernel while other
runs still compute; the kernel is still this run's own, fresh and sandboxed.

Budgets: a cell may run ``profile.cell_timeout_s`` and the student's cells together
``profile.run_timeout_s`` (the grader's own cells and the kernel start are not
counted); the kernel's process tree may use ``profile.memory_limit_mb`` (what the
sandbox's /tmp and /dev/shm hold included), its work dir ``profile.disk_limit_mb`` and
each file it writes ``profile.file_limit_mb`` (RLIMIT_FSIZE, set in the sandbox); the
executed notebook keeps at most ``profile.output_limit_bytes`` of output.

In ``Failure`` and ``RunResult``, cell indices are 0-based positions in the *student's*
notebook (markdown cells included); failure messages count cells from 1, as a reader does.
"""
from __future__ import annotations

import ast
import asyncio
import ctypes
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat import NotebookNode

from grader import sandbox
from grader.lab import KernelSetup, Profile
from grader.runtime import SAVED_KEY
from grader.runtime.launch import MAX_OPEN_FILES
from grader.sandbox import KernelPlace, StudentKernelManager
from grader.untrusted import UntrustedFileError, read_json
from grader.untrusted import read_notebook as read_notebook  # the one reader of student notebooks

log = logging.getLogger(__name__)

INJECTED_TAG = "slimgrade-injected"
PARAMETERS_TAG = "parameters"
STATE_FILE = "slimgrade_state.json"
PRIVATE_DIR = ".slimgrade"  # inside the work dir: the kernel's HOME and its sockets
KERNEL_LOG = "kernel.log"  # in the grader's folder of the run (``grader_dir``)
# The work dir is the kernel's: anything in it may be a link, a FIFO or a folder by the time
# the grader looks. What the grader writes for a run (executed notebook, kernel log) goes to
# a sibling folder no kernel can reach, and what it reads back goes through grader.untrusted.
GRADER_DIR_SUFFIX = ".grader"
# The kernel's state dump: masks and short lists, each value capped at 4 MB by the runtime.
MAX_STATE_BYTES = 16 * 1024 * 1024
FAILURE_KINDS = ("timeout", "out-of-memory", "kernel-died", "exception", "missing-artifact")
# Failures that end a run; after an exception the following cells still run.
STOPPING = ("timeout", "out-of-memory", "kernel-died")
# The grader's own cells: importing torch and reading CIFAR-10 can take a while on a
# loaded machine; dumping the state takes well under a second, unless the kernel is
# still stuck in a cell that ignored the interrupt.
INSTALL_TIMEOUT_S = 300
DUMP_TIMEOUT_S = 20
KERNEL_START_TIMEOUT_S = 120
WATCH_INTERVAL_S = 0.2
PROPORTIONAL_INTERVAL_S = 1.0
DISK_INTERVAL_S = 1.0  # how often the watch sums up the work dir
# A work dir with more entries than this counts as over its disk limit (the walk stops there).
MAX_WORK_DIR_ENTRIES = 100_000
# The sandbox's own tmpfs mounts: their pages are memory the kernel holds.
SANDBOX_TMPFS = ("/tmp", "/dev/shm")
KERNEL_USER_NAME = "student"
ERROR_TAIL_LINES = 15
MESSAGE_VALUE_CHARS = 300
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\))")
# Output: an error output keeps its ename and evalue, and each line of its traceback, to
# ERROR_FIELD_CHARS, its traceback to ERROR_CHARS in all; stream text received, before
# carriage returns and backspaces are resolved, may total RAW_STREAM_FACTOR times the limit.
ERROR_FIELD_CHARS = 1000
ERROR_CHARS = 8000
RAW_STREAM_FACTOR = 32
# A failure's error_tail: each line cut to this many characters, the whole to ERROR_TAIL_CHARS.
ERROR_TAIL_LINE_CHARS = 300
ERROR_TAIL_CHARS = 12_000
# Open files no path reaches (memfds, deleted files), looked at once a second, at most
# MAX_FDS_PER_PROCESS descriptors of each process; files on these file systems are memory.
FILES_INTERVAL_S = 1.0
MAX_FDS_PER_PROCESS = MAX_OPEN_FILES  # the sandbox's RLIMIT_NOFILE: none goes unseen
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "hugetlbfs")
CLONE_NEWIPC = 0x08000000

class HarnessError(RuntimeError):
    """The grader could not run a notebook for a reason that is not the student's."""


@dataclass
class RunSpec:
    run_id: str  # "sparsity", "prune-0.5", "chained-vggprune", ...
    notebook: Path  # the student's notebook file, read only
    work_dir: Path  # private folder of this run; the caller has placed input checkpoints in it
    parameters: dict[str, object]  # injected as literals, e.g. {"LAMBDA": 0.005, "EPOCHS": 12}
    profile: Profile
    data_root: Path | None = None
    # Injected as ``NAME = NAME * factor`` when NAME holds a number, after the cells that
    # assign NAME: the student's own LAMBDA in chained runs.
    scale: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    threads: int = 1
    expected_artifacts: list[str] = field(default_factory=list)  # relative to work_dir
    # Other places, relative to work_dir, where the notebook's own paths put an expected
    # artifact (the grader injects no path): looked at when the expected name is absent.
    artifact_aliases: dict[str, list[str]] = field(default_factory=dict)
    sandbox: bool | None = None  # None: bubblewrap when available
    # The one GPU the kernel sees (an entry of CUDA_VISIBLE_DEVICES); None: what the grader sees.
    visible_gpu: str | None = None
    # The lab's runtime module, files and parameter names (None: the harness's shims only).
    kernel: KernelSetup = field(default_factory=lambda: KernelSetup("grader.runtime"))


@dataclass
class Failure:
    notebook: str
    kind: str  # one of FAILURE_KINDS
    message: str  # one sentence for the student
    cell_index: int | None  # 0-based, in the student's notebook
    error_tail: str = ""  # last lines of the traceback, without colour codes
    # Set when the failing cell hard-codes a value the grading profile changed (e.g. the
    # notebook's own EPOCHS = 120 as range(120) while the profile runs 12 epochs): says so.
    profile_cause: str | None = None


@dataclass
class RunResult:
    run_id: str
    notebook: str
    executed_notebook: Path  # grader_dir(work_dir) / "executed_<name>": outputs kept, injected cells tagged
    failure: Failure | None
    state: dict  # what dump_state wrote; {} when it did not complete
    stdout_text: str  # all stream output of the student's cells, within the output cap
    images: list[int]  # student cells that displayed an image/png
    duration_s: float
    output_truncated: bool
    cell_seconds: list[float]  # one per cell of the student's notebook; 0.0 when not run
    # Every cell that raised, the first one (``failure``) included: cells run past errors.
    errors: list[Failure] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)  # the artifacts the run should write
    # Expected artifact -> where the run wrote it (relative to the work dir); absent when not.
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [name for name in self.expected if name not in self.artifacts]

    @property
    def usable(self) -> bool:
        """Its artifacts exist and it was not cut short: a cell that raised does not spoil it."""
        return not self.missing and (self.failure is None or self.failure.kind not in STOPPING)


def run_notebook(spec: RunSpec, admit: Callable[[], bool] | None = None) -> RunResult | None:
    """Execute ``spec.notebook`` once; student problems come back as ``RunResult.failure``.

    With ``admit``, the kernel is started first and the student's cells wait until
    ``admit()`` (called from another thread, it may block) returns: True runs them, False
    shuts the kernel down and returns None. The run's budgets and ``duration_s`` count from
    the admission. Raises ``HarnessError`` only when the grader itself cannot run the
    notebook (no kernel, the runtime's install cell failing, a sandbox that was required but
    is missing). Must not be called from a running event loop.
    """
    started = time.monotonic()
    name = spec.notebook.name
    work_dir = spec.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    executed_path = executed_notebook_path(work_dir, name)
    try:
        student_nb = read_notebook(spec.notebook)
    except Exception as error:  # any unreadable file is the submission's problem
        nbformat.write(nbformat.v4.new_notebook(), executed_path)
        reason = (_first_line(str(error)) or type(error).__name__).rstrip(".")
        failure = Failure(name, "exception", f"{name} could not be read as a notebook: {reason}.",
                          None, "")
        return RunResult(spec.run_id, name, executed_path, failure, {}, "", [],
                         time.monotonic() - started, False, [],
                         expected=list(spec.expected_artifacts))
    run = _Run(spec, student_nb, choose_sandbox(spec.sandbox), admit)
    try:
        run.prepare()
        asyncio.run(run.execute())
    finally:
        run.cleanup()
    if run.admitted_at is None:
        return None
    nbformat.write(run.plan.nb, executed_path)
    return run.result(executed_path, time.monotonic() - run.admitted_at)


def grader_dir(work_dir: Path) -> Path:
    """The grader's own folder of a run, beside its work dir (made here, and only here).

    The kernel never sees it (the sandbox binds only the work dir), so a link or FIFO a
    student leaves in the work dir under some name cannot redirect what is written here.
    """
    work_dir = Path(work_dir).resolve()
    folder = work_dir.parent / f"{work_dir.name}{GRADER_DIR_SUFFIX}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or not folder.is_dir():
        raise HarnessError(f"{folder} is not a folder of the grader's own.")
    return folder


def executed_notebook_path(work_dir: Path, notebook_name: str) -> Path:
    """Where a run's executed notebook is written: in ``grader_dir``, never the work dir."""
    return grader_dir(work_dir) / f"executed_{notebook_name}"


def write_kernel_files(work_dir: Path, files: dict[str, str]) -> None:
    """The lab's trusted stand-ins (``KernelSetup.files``), replacing whatever the submission
    brought under their top-level names (a link there is removed, never followed)."""
    for top in {Path(relative).parts[0] for relative in files}:
        target = work_dir / top
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    for relative, text in files.items():
        (work_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (work_dir / relative).write_text(text)


def assigned_names(source: str) -> set[str]:
    """Names a cell binds at module level (inside if/for/with/try too, not in def/class).

    Lines starting with % or ! (IPython magics, shell commands) are dropped before
    parsing; a cell that still does not parse binds nothing we can see.
    """
    tree = parse_cell(source)
    if tree is None:
        return set()
    names: set[str] = set()
    _collect_bindings(tree.body, names)
    return names


def parse_cell(source: str) -> ast.Module | None:
    """The cell's syntax tree, IPython magics and shell lines blanked (line numbers kept)."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.split("\n"))
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


# literal_assignments reads a notebook's settings (short cells of a few KB); parsing and
# evaluating a literal costs ~2 s and ~500 MB per MB of source (a tuple of a million
# numbers), so it skips cells larger than this and stops after this much source in all.
MAX_LITERAL_CELL_CHARS = 100_000
MAX_LITERAL_TOTAL_CHARS = 1_000_000


def literal_assignments(cells: Iterable[NotebookNode]) -> dict[str, list[object]]:
    """Every plain literal a notebook assigns to a name, in order: ``{"EPOCHS": [120]}``.

    Literals that cannot be built (an int past Python's digit limit, nesting past the
    parser's) are skipped, as are cells past the size caps above.
    """
    values: dict[str, list[object]] = {}
    parsed = 0
    for cell in cells:
        source = cell.source if cell.cell_type == "code" and isinstance(cell.source, str) else ""
        if len(source) > MAX_LITERAL_CELL_CHARS or parsed + len(source) > MAX_LITERAL_TOTAL_CHARS:
            continue
        parsed += len(source)
        tree = parse_cell(source) if source else None
        for node in ast.walk(tree) if tree is not None else ():
            if not isinstance(node, ast.Assign):
                continue
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError,
                    OverflowError):
                continue
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, []).append(value)
    return values


def numeric_literals(source: str) -> set[object]:
    """The numbers written in a cell (booleans aside)."""
    tree = parse_cell(source)
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)} \
        if tree is not None else set()


def _collect_bindings(statements: Iterable[ast.stmt], names: set[str]) -> None:
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names |= _target_names(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)):
            names |= _target_names(node.target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        for block in ("body", "orelse", "finalbody"):
            _collect_bindings(getattr(node, block, []), names)
        for handler in getattr(node, "handlers", []):
            _collect_bindings(handler.body, names)
        for case in getattr(node, "cases", []):
            _collect_bindings(case.body, names)


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(element) for element in target.elts))
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return set()


def parameters_source(parameters: dict[str, object]) -> str:
    """The code of one injected parameters cell; every value must survive repr -> literal_eval."""
    lines = ["# Injected by slimgrade: the grading profile's parameters."]
    for name, value in parameters.items():
        if not name.isidentifier():
            raise ValueError(f"parameter name {name!r} is not a Python identifier")
        text = repr(value)
        try:
            same = ast.literal_eval(text) == value
        except (ValueError, SyntaxError):
            same = False
        if not same:
            raise ValueError(f"parameter {name}={value!r} is not a plain literal")
        lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"


OVERRIDE_NOTE = "  # slimgrade: the grading profile's value"


def with_overrides(source: str, parameters: dict[str, object], scale: dict[str, float]) -> str:
    """``source`` with the profile's value set again right after statements that bind an
    injected name where a cell-level injection cannot reach: inside a loop or a branch
    (``for LAMBDA in [0, 1e-4, 1e-3]:`` trains three times in one cell), and, for a scaled
    name, after every binding (scaling is not idempotent, so it happens once per binding)."""
    tree = parse_cell(source)
    if tree is None or not (parameters or scale):
        return source
    lines = source.split("\n")
    inserts: list[tuple[int, str]] = []

    def add(anchor: ast.stmt, position: int, names: set[str], nested: bool) -> None:
        code = [_scale_line(name, scale[name]) if name in scale else f"{name} = {parameters[name]!r}"
                for name in sorted(names) if name in scale or (nested and name in parameters)]
        indent = lines[anchor.lineno - 1][:anchor.col_offset]
        if code and (not indent or indent.isspace()):
            inserts.append((position, indent + "; ".join(code) + OVERRIDE_NOTE))

    def visit(statements: list[ast.stmt], nested: bool) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, (ast.For, ast.AsyncFor)) and node.body[0].lineno > node.lineno:
                add(node.body[0], node.body[0].lineno - 1, _target_names(node.target), True)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                add(node, node.end_lineno or node.lineno,
                    set().union(*(_target_names(t) for t in targets)), nested)
            for block in ("body", "orelse", "finalbody"):
                visit(getattr(node, block, []), True)
            for handler in getattr(node, "handlers", []):
                visit(handler.body, True)
            for case in getattr(node, "cases", []):
                visit(case.body, True)

    visit(tree.body, False)
    for position, text in sorted(inserts, reverse=True):
        lines.insert(position, text)
    return "\n".join(lines)


def _scale_line(name: str, factor: float) -> str:
    if not name.isidentifier():
        raise ValueError(f"scaled name {name!r} is not a Python identifier")
    # A blank left unfilled (None) or a flag stays as it is.
    return (f"{name} = {name} * {float(factor)!r} if isinstance({name}, (int, float)) "
            f"and not isinstance({name}, bool) else {name}")


@dataclass
class Plan:
    """The notebook to execute and, for each of its cells, where it came from."""

    nb: NotebookNode
    origin: list[int | None]  # position in the student's notebook; None for injected cells
    follows: list[int | None]  # for injected parameter cells: the student cell they follow
    install_position: int
    dump_position: int


def plan_notebook(student_nb: NotebookNode, install_code: str, dump_code: str,
                  parameters: dict[str, object], scale: dict[str, float],
                  known_parameters: tuple[str, ...] = ()) -> Plan:
    """The student's cells (outputs cleared) with the grader's cells around and between them."""
    nb = nbformat.from_dict(student_nb)
    student_cells = nb.cells
    tagged = [i for i, cell in enumerate(student_cells)
              if cell.cell_type == "code" and PARAMETERS_TAG in cell.metadata.get("tags", [])]
    # Scaled names are scaled after each statement that binds them (with_overrides); the
    # parameters cell only sets literals, which may safely be set twice.
    inject_after: set[int] = set()
    if tagged:
        inject_after.add(tagged[0])
    else:
        for i, cell in enumerate(student_cells):
            if cell.cell_type == "code" and assigned_names(cell.source) & set(known_parameters):
                inject_after.add(i)
    wants_parameters = bool(parameters or scale)
    cells = [_injected_cell(install_code)]
    origin: list[int | None] = [None]
    follows: list[int | None] = [None]
    if wants_parameters and not inject_after:
        cells.append(_injected_cell(parameters_source(parameters)))
        origin.append(None)
        follows.append(None)
    for i, cell in enumerate(student_cells):
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.source = with_overrides(cell.source, parameters, scale)
        cells.append(cell)
        origin.append(i)
        follows.append(None)
        if wants_parameters and i in inject_after:
            cells.append(_injected_cell(parameters_source(parameters)))
            origin.append(None)
            follows.append(i)
    cells.append(_injected_cell(dump_code))
    origin.append(None)
    follows.append(None)
    nb.cells = cells
    return Plan(nb, origin, follows, 0, len(cells) - 1)


def _injected_cell(source: str) -> NotebookNode:
    return nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})


def choose_sandbox(requested: bool | None) -> bool:
    """Whether to sandbox: as requested, or when unspecified, whenever bubblewrap works here."""
    if requested is False:
        return False
    if sandbox.sandbox_available():
        return True
    if requested:
        raise HarnessError(f"This run requires the bubblewrap sandbox, which does not work here: "
                           f"{sandbox.INSTALL_HINT}.")
    sandbox.warn_unsandboxed_once()
    return False


class OutputCappedClient(NotebookClient):
    """NotebookClient that keeps at most ``limit_bytes`` of output in the notebook.

    Stream text is merged into the cell's previous stream output as it arrives and
    carriage returns and backspaces are resolved there, so progress bars cost only what
    they finally show. Each message's text is clipped to the room left before anything
    else, and only it and the output's current last line are resolved, in linear time
    (``_resolve_control_characters``); the stream text received may total
    ``RAW_STREAM_FACTOR`` times the limit. Display data counts with its metadata, and so do
    display updates (``update_display_data``, a ``display_id`` shown again), by what they
    add. Error outputs are clipped to a few KB (``_clipped_error``) and count too; past the
    limit only a cell's first error is still kept, so that its failure stays readable.
    Past the limit, other outputs are dropped and one line says so. Comm messages
    (widgets) are ignored: nbclient would keep their state, unbounded, in the notebook's
    metadata. Cells that display an image/png are recorded even when the image itself
    is dropped.

    No limit is set on the size of one message (``zmq.MAXMSGSIZE``): libzmq takes a
    larger frame as a protocol error and drops the connection for good, without
    reconnecting; the shell channel's next request then blocks the grader forever, and
    iopub loses every later output. One message is bounded by the kernel's memory limit.
    """

    def __init__(self, nb: NotebookNode, limit_bytes: int, **kwargs: object) -> None:
        super().__init__(nb, **kwargs)
        self.limit_bytes = limit_bytes
        self.kept_bytes = 0
        self.raw_stream_bytes = 0  # stream text received, before resolution
        self.truncated = False
        self.image_positions: set[int] = set()
        self.clear_before_next_output = False  # nbclient sets it per cell; defined before any
        self.store_widget_state = False

    def output(self, outs: list[NotebookNode], msg: dict, display_id: str | None,
               cell_index: int) -> NotebookNode | None:
        msg_type = msg["msg_type"]
        content = msg["content"]
        data = content.get("data")
        if msg_type in ("display_data", "execute_result") and isinstance(data, dict) \
                and "image/png" in data:
            self.image_positions.add(cell_index)
        if msg_type == "error":
            return self._keep_error(outs, msg, display_id, cell_index)
        if self.truncated:
            return None
        if msg_type == "stream":
            if self.clear_before_next_output:  # clear_output(wait=True), as nbclient does it
                outs[:] = []
                self.clear_display_id_mapping(cell_index)
                self.clear_before_next_output = False
            text = content.get("text", "")
            return self._keep_stream(outs, content.get("name", "stdout"),
                                     text if isinstance(text, str) else "")
        size = _display_size(content)
        if self.kept_bytes + size > self.limit_bytes:
            self._cut(outs)
            return None
        self.kept_bytes += size
        return super().output(outs, msg, display_id, cell_index)

    def _keep_error(self, outs: list[NotebookNode], msg: dict, display_id: str | None,
                    cell_index: int) -> NotebookNode | None:
        first = not any(out.get("output_type") == "error" for out in outs)
        if self.truncated and not first:
            return None
        content = _clipped_error(msg["content"])
        size = len(json.dumps(content))
        if not first and self.kept_bytes + size > self.limit_bytes:
            self._cut(outs)
            return None
        self.kept_bytes += size
        return super().output(outs, {**msg, "content": content}, display_id, cell_index)

    def _keep_stream(self, outs: list[NotebookNode], name: str, text: str) -> NotebookNode | None:
        self.raw_stream_bytes += len(text)
        room = max(self.limit_bytes - self.kept_bytes, 0)
        cut = len(text) > room  # a character is at least a byte: clip before encoding
        text = text[:room]
        encoded = text.encode("utf-8", "replace")
        if len(encoded) > room:
            cut = True
            text = encoded[:room].decode("utf-8", "ignore")
        last = outs[-1] if outs else None
        if last is not None and last.get("output_type") == "stream" and last.get("name") == name:
            out = last
            start = out.text.rfind("\n") + 1  # earlier lines are resolved for good
            tail = out.text[start:]
            resolved = _resolve_control_characters(tail + text)
            out.text = out.text[:start] + resolved
            self.kept_bytes += len(resolved.encode("utf-8", "replace")) \
                - len(tail.encode("utf-8", "replace"))
        else:
            out = nbformat.v4.new_output("stream", name=name,
                                         text=_resolve_control_characters(text))
            outs.append(out)
            self.kept_bytes += len(out.text.encode("utf-8", "replace"))
        if cut or self.raw_stream_bytes > RAW_STREAM_FACTOR * self.limit_bytes:
            self._cut(outs)
        return out

    def _update_display_id(self, display_id: str, msg: dict) -> None:
        """nbclient's, within the limit: the update replaces the data of every output shown
        with ``display_id``; what that adds counts, and past the limit the update is dropped."""
        if self.truncated or display_id not in self._display_id_map:
            return
        size = _display_size(msg["content"])
        grown, last_cell = 0, None
        for cell_index, positions in self._display_id_map[display_id].items():
            outputs = self.nb.cells[cell_index].outputs
            for position in positions:
                if position < len(outputs):
                    grown += size - _display_size(outputs[position])
                    last_cell = outputs
        if last_cell is None:
            return
        if self.kept_bytes + grown > self.limit_bytes:
            self._cut(last_cell)
            return
        self.kept_bytes += grown
        super()._update_display_id(display_id, msg)

    def handle_comm_msg(self, outs: list[NotebookNode], msg: dict, cell_index: int) -> None:
        """Comm messages are ignored: no widget state in the notebook, no Output widget mimic."""
        return None

    def _cut(self, outs: list[NotebookNode]) -> None:
        self.truncated = True
        last = outs[-1] if outs else None
        newline = "\n" if last is not None and last.get("output_type") == "stream" \
            and last.text and not last.text.endswith("\n") else ""
        outs.append(nbformat.v4.new_output(
            "stream", name="stderr",
            text=f"{newline}[slimgrade: output cut after {self.limit_bytes} bytes]\n"))


def _display_size(content: dict) -> int:
    """What a display output costs: its data and metadata as JSON."""
    return len(json.dumps({"data": content.get("data", {}),
                           "metadata": content.get("metadata", {})}))


def _clipped_error(content: dict) -> dict:
    """An error message's ename, evalue and traceback cut to a few KB.

    ename and evalue keep ``ERROR_FIELD_CHARS`` each, every line of the traceback as
    much; of the traceback's entries, the first ones and the last ones that fit in half of
    ``ERROR_CHARS`` each (at least one of each), one entry saying how many were left out.
    """
    def clip(value: object, limit: int) -> str:
        text = value if isinstance(value, str) else str(value)
        return text if len(text) <= limit else text[:limit] + "..."

    def entry(value: object) -> str:
        return "\n".join(clip(line, ERROR_FIELD_CHARS)
                         for line in clip(value, ERROR_CHARS // 2).split("\n"))

    traceback = content.get("traceback")
    entries = traceback if isinstance(traceback, list) else []

    def fit(indices: Iterable[int]) -> list[str]:
        kept: list[str] = []
        used = 0
        for index in indices:
            text = entry(entries[index])
            if kept and used + len(text) > ERROR_CHARS // 2:
                break
            kept.append(text)
            used += len(text)
        return kept

    head = fit(range(len(entries)))
    tail = fit(range(len(entries) - 1, len(head) - 1, -1))[::-1]
    left_out = len(entries) - len(head) - len(tail)
    middle = [f"[... {left_out} traceback entries left out ...]"] if left_out else []
    return {"ename": clip(content.get("ename", ""), ERROR_FIELD_CHARS),
            "evalue": clip(content.get("evalue", ""), ERROR_FIELD_CHARS),
            "traceback": head + middle + tail}


def _resolve_control_characters(text: str) -> str:
    """``text`` as a terminal leaves it, line by line, in time linear in its length.

    On each line, a carriage return followed by more of the line drops what came before
    it (a run of them ending the line is kept as one: the line may go on in the next
    chunk), and a backspace the character before it (at the line's start, nothing).
    Resolving a text, then its last line with what follows, equals resolving it all.
    """
    if "\r" not in text and "\x08" not in text:
        return text
    return "\n".join(_resolve_line(line) for line in text.split("\n"))


def _resolve_line(line: str) -> str:
    if "\r" not in line and "\x08" not in line:
        return line
    body = line.rstrip("\r")
    ending = "\r" if len(body) < len(line) else ""
    body = body[body.rfind("\r") + 1:]
    if "\x08" in body:
        # From the right: each backspace deletes the nearest character left of it that no
        # later backspace took (what a terminal's cursor does, without the quadratic cost).
        parts = body.split("\x08")
        pieces: list[str] = []
        pending = 0
        for index in range(len(parts) - 1, -1, -1):
            part = parts[index]
            if pending < len(part):
                pieces.append(part[:len(part) - pending])
                pending = 0
            else:
                pending -= len(part)
            if index:
                pending += 1
        body = "".join(reversed(pieces))
    return body + ending


class MemoryWatch(threading.Thread):
    """Kills the kernel's process tree once it holds more than ``limit_bytes`` of memory,
    or its work dir more than ``disk_limit_bytes`` of disk (``reason`` says which).

    What counts is the tree's anonymous and shared-memory pages (the heap, tensors,
    mapped /dev/shm), not the mapped libraries: torch's libraries alone are half a gigabyte
    of file-backed pages shared with every other kernel and the grader. Pages a forked
    DataLoader worker still shares copy-on-write with the kernel count once: the cheap
    per-process sum (``quick_memory``) counts them in every process, so when it says
    "over", the proportional count (``proportional_memory``, which walks page tables and
    costs milliseconds) decides, at most once a second. To both is added what the
    sandbox's own tmpfs mounts hold (``tmpfs_usage``: files in its /tmp and /dev/shm are
    memory even when no process maps them), so a kernel cannot park memory there; a
    mapped tmpfs page counts twice, which honest kernels (a few DataLoader batches) never
    notice. Also added, looked at once a second: memory in files the tree holds open that
    no path reaches (``open_file_usage``: memfds, deleted files on another tmpfs), and the
    System V shared memory segments of the kernel's IPC namespace (``sysv_shm_usage``,
    attached or not), which this thread joins to see them (``join_ipc_namespace``); only
    those of ``kernel_uid`` count when it is given.

    The work dir and the socket folder (``socket_dir``, bound read-write into the
    sandbox) are summed up at most once a second (``work_dir_usage``), from outside, with
    the deleted files the tree still holds open on disk: RLIMIT_FSIZE bounds each file,
    this bounds how many there are.

    Once ``abort_kernels`` was called (the grader is being stopped), every watch kills
    its kernel within ``WATCH_INTERVAL_S``, so that no run waits out its budget.
    """

    def __init__(self, root: psutil.Process, limit_bytes: int, work_dir: Path | None = None,
                 disk_limit_bytes: int | None = None,
                 tmpfs: dict[str, int] | None = None, socket_dir: Path | None = None,
                 kernel_uid: int | None = None) -> None:
        super().__init__(name="slimgrade-memory-watch", daemon=True)
        self.root = root
        self.limit_bytes = limit_bytes
        self.work_dir = work_dir
        self.socket_dir = socket_dir
        self.disk_limit_bytes = disk_limit_bytes
        self.tmpfs = dict(tmpfs or {})  # sandbox mount point -> its size (as bwrap made it)
        self.kernel_uid = kernel_uid
        self.exceeded = False  # a limit was passed and the kernel killed
        self.reason: str | None = None  # "memory", "disk", or "aborted" (not a limit)
        self._stop_event = threading.Event()
        self._next_proportional = 0.0
        self._next_disk = 0.0
        self._next_files = 0.0
        self._files_memory = 0  # open_file_usage and sysv_shm_usage, as last looked at
        self._files_disk = 0
        self._filesystems: dict[int, str] = {}  # device -> file system type
        self._in_kernel_ipc = False  # this thread joined the kernel's IPC namespace

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._stop_event.wait(WATCH_INTERVAL_S):
            processes = process_tree(self.root)
            if not processes:
                return
            if _ABORT.is_set():
                self.reason = "aborted"
                kill_processes(processes)
                return
            now = time.monotonic()
            if now >= self._next_files:
                self._next_files = now + FILES_INTERVAL_S
                self._files_memory, self._files_disk = self._open_files(processes)
            if self.work_dir is not None and self.disk_limit_bytes is not None \
                    and now >= self._next_disk:
                self._next_disk = now + DISK_INTERVAL_S
                folders = [self.socket_dir] if self.socket_dir is not None else []
                used, entries = work_dir_usage(self.work_dir, self.disk_limit_bytes, folders)
                if used + self._files_disk > self.disk_limit_bytes \
                        or entries > MAX_WORK_DIR_ENTRIES:
                    self._kill("disk", processes)
                    return
            held = tmpfs_usage(processes, self.tmpfs) + self._files_memory
            if quick_memory(processes) + held <= self.limit_bytes:
                continue
            if now < self._next_proportional:
                continue
            self._next_proportional = now + PROPORTIONAL_INTERVAL_S
            if proportional_memory(processes) + held > self.limit_bytes:
                self._kill("memory", processes)
                return

    def _open_files(self, processes: list[psutil.Process]) -> tuple[int, int]:
        """(memory, disk) in open files no path reaches and in System V shared memory."""
        skip = sandbox_tmpfs_devices(processes, self.tmpfs)
        memory, disk = open_file_usage(processes, skip, self._filesystems)
        if not self._in_kernel_ipc:
            self._in_kernel_ipc = join_ipc_namespace(processes)
        if self._in_kernel_ipc or self.kernel_uid is not None:
            memory += sysv_shm_usage(self.kernel_uid)
        return memory, disk

    def _kill(self, reason: str, processes: list[psutil.Process]) -> None:
        self.reason = reason
        self.exceeded = True
        kill_processes(processes)


# Set once the grader is being stopped (SIGTERM, Ctrl-C): every kernel of this process dies.
_ABORT = threading.Event()


def abort_kernels() -> None:
    """Make every memory watch of this process kill its kernel, now and from now on.

    Safe in a signal handler (it only sets an event). The runs then end as their kernels
    die, instead of running out their budgets while the grader waits to clean up.
    """
    _ABORT.set()


def work_dir_usage(folder: Path, limit_bytes: int,
                   also: Iterable[Path] = ()) -> tuple[int, int]:
    """(bytes allocated, entries) under ``folder`` and the folders ``also`` names (the
    socket folder), links never followed, each inode once.

    Stops counting once either passes its limit (``limit_bytes``, ``MAX_WORK_DIR_ENTRIES``):
    a hostile work dir costs at most that much walking.
    """
    total, entries = 0, 0
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(folder), *(os.fspath(other) for other in also)]
    while pending:
        try:
            scanner = os.scandir(pending.pop())
        except OSError:
            continue
        with scanner:
            for entry in scanner:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
                if total > limit_bytes or entries > MAX_WORK_DIR_ENTRIES:
                    return total, entries
    return total, entries


def tmpfs_usage(processes: list[psutil.Process], mounts: dict[str, int]) -> int:
    """Bytes the sandbox's tmpfs ``mounts`` (mount point -> size) hold, seen from outside.

    They are read through ``/proc/<pid>/root`` of a process of the tree that lives in
    another mount namespace than the grader (the sandbox's), and counted only when the
    file system there has exactly the size bwrap gave it; 0 when none can be read.
    """
    if not mounts:
        return 0
    try:
        own = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return 0
    for process in processes:
        try:
            if os.readlink(f"/proc/{process.pid}/ns/mnt") == own:
                continue
            total = 0
            for mount, size in mounts.items():
                info = os.statvfs(f"/proc/{process.pid}/root{mount}")
                if info.f_blocks * info.f_frsize != size:
                    raise OSError(f"{mount} is not the sandbox's tmpfs yet")
                total += (info.f_blocks - info.f_bfree) * info.f_frsize
            return total
        except OSError:
            continue
    return 0


def sandbox_tmpfs_devices(processes: list[psutil.Process], mounts: dict[str, int]) -> set[int]:
    """The devices of the sandbox's tmpfs ``mounts``, found as ``tmpfs_usage`` finds them
    (whose count of them includes their deleted files); empty when it would count nothing."""
    if not mounts:
        return set()
    try:
        own = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return set()
    for process in processes:
        try:
            if os.readlink(f"/proc/{process.pid}/ns/mnt") == own:
                continue
            devices = set()
            for mount, size in mounts.items():
                path = f"/proc/{process.pid}/root{mount}"
                info = os.statvfs(path)
                if info.f_blocks * info.f_frsize != size:
                    raise OSError(f"{mount} is not the sandbox's tmpfs yet")
                devices.add(os.stat(path).st_dev)
            return devices
        except OSError:
            continue
    return set()


def open_file_usage(processes: list[psutil.Process], skip_devices: set[int],
                    filesystems: dict[int, str]) -> tuple[int, int]:
    """(memory, disk): bytes allocated to files the ``processes`` hold open that no path
    reaches, each file (device and inode) once.

    Memory: memfds (``/proc/<pid>/fd/*`` links to "/memfd:...") and deleted files (no link
    left) on a tmpfs; disk: deleted regular files anywhere else. Deleted files on
    ``skip_devices`` (the sandbox's own tmpfs, which ``tmpfs_usage`` counts whole) are left
    out. At most ``MAX_FDS_PER_PROCESS`` descriptors of each process are looked at. File
    system types come from the processes' mountinfo, cached in ``filesystems``
    (device -> type); a device none lists counts as disk.
    """
    memory, disk = 0, 0
    seen: set[tuple[int, int]] = set()
    read_mounts: set[int] = set()
    for process in processes:
        pid = process.pid
        try:
            scanner = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue
        with scanner:
            for count, entry in enumerate(scanner):
                if count >= MAX_FDS_PER_PROCESS:
                    break
                try:
                    target = os.readlink(entry.path)
                    memfd = target.startswith("/memfd:")
                    if not memfd and not target.endswith(" (deleted)"):
                        continue
                    info = os.stat(entry.path)
                except OSError:
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_nlink:
                    continue
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                size = info.st_blocks * 512
                if memfd:
                    memory += size
                    continue
                if info.st_dev in skip_devices:
                    continue
                if info.st_dev not in filesystems and pid not in read_mounts:
                    read_mounts.add(pid)
                    filesystems.update(_mount_types(pid))
                if filesystems.get(info.st_dev) in MEMORY_FILESYSTEMS:
                    memory += size
                else:
                    disk += size
    return memory, disk


def _mount_types(pid: int, max_lines: int = 10_000) -> dict[int, str]:
    """Device -> file system type of the mounts /proc/<pid>/mountinfo lists."""
    types: dict[int, str] = {}
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as handle:
            for _, line in zip(range(max_lines), handle):
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) > 2 and rest.split():
                    major, _, minor = parts[2].partition(":")
                    types[os.makedev(int(major), int(minor))] = rest.split()[0]
    except (OSError, ValueError):
        pass
    return types


def join_ipc_namespace(processes: list[psutil.Process]) -> bool:
    """Move the calling thread (only it: setns(2)) into the IPC namespace of the first of
    ``processes`` whose namespace is not the thread's own (the sandbox's, --unshare-ipc),
    so that /proc/sysvipc/shm lists the kernel's segments; True once it moved."""
    try:
        own = os.readlink("/proc/thread-self/ns/ipc")
    except OSError:
        return False
    for process in processes:
        path = f"/proc/{process.pid}/ns/ipc"
        try:
            if os.readlink(path) == own:
                continue
            handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            _setns(handle, CLONE_NEWIPC)
            return True
        except OSError:
            continue
        finally:
            os.close(handle)
    return False


def _setns(handle: int, kind: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12
    if setns is not None:
        setns(handle, kind)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(handle, kind) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def sysv_shm_usage(uid: int | None) -> int:
    """Bytes (resident and swapped) of the System V shared memory segments in the calling
    thread's IPC namespace (/proc/sysvipc/shm), attached or not; only ``uid``'s if given."""
    total = 0
    try:
        with open("/proc/sysvipc/shm", encoding="ascii", errors="replace") as handle:
            header = handle.readline().split()
            column = {name: k for k, name in enumerate(header)}
            for line in handle:
                row = line.split()
                if uid is not None and int(row[column["uid"]]) != uid:
                    continue
                if "rss" in column and "swap" in column:
                    total += int(row[column["rss"]]) + int(row[column["swap"]])
                else:
                    total += int(row[column["size"]])
    except (OSError, ValueError, IndexError, KeyError):
        return total
    return total


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def quick_memory(processes: list[psutil.Process]) -> int:
    """Sum of RssAnon + RssShmem (from /proc/<pid>/status); an upper bound of the real use."""
    total = 0
    for process in processes:
        fields = _proc_kib(process.pid, "status", ("RssAnon", "RssShmem"))
        if fields is None:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        else:
            total += sum(fields.values()) * 1024
    return total


def proportional_memory(processes: list[psutil.Process]) -> int:
    """Sum of Pss_Anon + Pss_Shmem (from /proc/<pid>/smaps_rollup): shared pages split fairly."""
    total = 0
    for process in processes:
        fields = _proc_kib(process.pid, "smaps_rollup", ("Pss_Anon", "Pss_Shmem"))
        total += sum(fields.values()) * 1024 if fields is not None \
            else quick_memory([process])
    return total


def _proc_kib(pid: int, name: str, keys: tuple[str, ...]) -> dict[str, int] | None:
    """The ``keys`` of /proc/<pid>/<name> in KiB; None where the file or a key is missing."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/{name}", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in keys:
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return values if len(values) == len(keys) else None


def kill_processes(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            continue


class _Run:
    """The state of one notebook run, from preparing the work dir to the RunResult."""

    def __init__(self, spec: RunSpec, student_nb: NotebookNode, sandboxed: bool,
                 admit: Callable[[], bool] | None) -> None:
        self.spec = spec
        self.admit = admit
        # When the student's turn came: at once without ``admit``; None if it never came.
        self.admitted_at: float | None = time.monotonic() if admit is None else None
        self.name = spec.notebook.name
        self.student_nb = student_nb
        self.sandboxed = sandboxed
        self.work_dir = spec.work_dir.resolve()
        self.private = self.work_dir / PRIVATE_DIR
        self.temporary_socket_dir: Path | None = None  # connection file and ipc sockets
        self.lease: sandbox.UserLease | None = None
        self.failure: Failure | None = None
        self.errors: list[Failure] = []
        self.own_values = literal_assignments(student_nb.cells)
        self.state: dict = {}
        self.cell_seconds = [0.0] * len(student_nb.cells)
        self.plan = plan_notebook(student_nb, self._install_code(), self._dump_code(),
                                  spec.parameters, spec.scale, spec.kernel.known_parameters)
        self.client: OutputCappedClient | None = None

    def _install_code(self) -> str:
        spec = self.spec
        config = {"work_dir": str(self.work_dir), "device": spec.device,
                  "data_root": None if spec.data_root is None else str(spec.data_root.resolve()),
                  "state_file": STATE_FILE, "threads": spec.threads, **spec.kernel.config}
        return f"import {spec.kernel.runtime} as _slimgrade\n_slimgrade.install({config!r})\n"

    def _dump_code(self) -> str:
        return (f"import {self.spec.kernel.runtime} as _slimgrade\n"
                f"_slimgrade.dump_state(globals(), {STATE_FILE!r})\n")

    def prepare(self) -> None:
        if self.private.exists():
            shutil.rmtree(self.private)
        (self.private / "home").mkdir(parents=True)
        (self.work_dir / STATE_FILE).unlink(missing_ok=True)
        write_kernel_files(self.work_dir, dict(self.spec.kernel.files))
        # The connection file and sockets live outside the work dir: jupyter_client removes
        # them by path after the run, and a kernel could have made their folder a link.
        # (A short path also keeps the sockets within sun_path's 108 bytes.)
        self.temporary_socket_dir = Path(tempfile.mkdtemp(prefix="slimgrade-"))
        socket_dir = self.temporary_socket_dir
        # A uid/gid of this kernel's own (when the grader is root): its process limit is its own.
        self.lease = sandbox.lease_user() if self.sandboxed else None
        user = self.lease.user if self.lease is not None else None
        self.place = KernelPlace(self.work_dir, socket_dir, self.spec.data_root,
                                 self.spec.device, self.sandboxed, user,
                                 self.spec.profile.file_limit_mb * 1024 * 1024, self._sees())
        if self.sandboxed:
            sandbox.hand_over(self.work_dir, user)
            if self.temporary_socket_dir is not None:
                sandbox.hand_over(self.temporary_socket_dir, user)

    def _sees(self) -> tuple[Path, ...]:
        return tuple(path for path, _ in self.spec.kernel.sees)

    def cleanup(self) -> None:
        if self.temporary_socket_dir is not None:
            shutil.rmtree(self.temporary_socket_dir, ignore_errors=True)
        if self.lease is not None:  # the kernel is down: its processes died with its sandbox
            self.lease.release()
            self.lease = None

    def kernel_env(self) -> dict[str, str]:
        """The kernel's whole environment: nothing of the grader's own (tokens, keys) leaks in."""
        threads = str(self.spec.threads)
        python_path = sorted({str(folder.parent) for folder in sandbox.package_dirs(self._sees())})
        env = {
            "PATH": os.pathsep.join([str(Path(os.path.abspath(sys.executable)).parent),
                                     "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(self.private / "home"),
            # The kernel's uid has no passwd entry: getpass.getuser() (torch's and
            # matplotlib's cache folders) reads these first.
            "USER": KERNEL_USER_NAME,
            "LOGNAME": KERNEL_USER_NAME,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join(python_path),
            "PYTHONNOUSERSITE": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            # debugpy warns about frozen modules on every start; it is noise here.
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
        # TMPDIR stays the system's (a private /tmp in the sandbox): DataLoader workers pass
        # tensors through AF_UNIX sockets under it, and a path inside a deep work dir can
        # exceed the 108 bytes a socket path may have, which hangs the workers.
        if self.spec.visible_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.spec.visible_gpu
        elif "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        return env

    async def execute(self) -> None:
        km = StudentKernelManager(self.place)
        quiet = logging.getLogger(f"{__name__}.nbclient")
        # nbclient logs every timeout and dead kernel as an error; each is a Failure here.
        quiet.setLevel(logging.CRITICAL)
        client = OutputCappedClient(self.plan.nb, self.spec.profile.output_limit_bytes, km=km,
                                    allow_errors=True, record_timing=True, iopub_timeout=30,
                                    startup_timeout=KERNEL_START_TIMEOUT_S, log=quiet)
        self.client = client
        env = self.kernel_env()
        log_path = grader_dir(self.work_dir) / KERNEL_LOG  # outside the kernel's reach
        with open(log_path, "wb") as kernel_log:
            try:
                await km.start_kernel(extra_arguments=["--HistoryManager.hist_file=:memory:"],
                                      env=env, cwd=str(self.work_dir), stdout=kernel_log,
                                      stderr=kernel_log)
            except Exception as error:
                raise HarnessError(f"could not start a kernel for {self.name}: {error}") from error
        root = sandbox.launched_process(km)
        profile = self.spec.profile
        watch = MemoryWatch(root, profile.memory_limit_mb * 1024 * 1024, self.work_dir,
                            profile.disk_limit_mb * 1024 * 1024,
                            sandbox.tmpfs_mounts() if self.sandboxed else None,
                            socket_dir=self.temporary_socket_dir,
                            kernel_uid=self.lease.uid if self.lease is not None else None) \
            if root is not None else None
        try:
            if watch is not None:
                watch.start()
            try:
                await client.async_start_new_kernel_client()
            except Exception as error:
                raise HarnessError(f"the kernel for {self.name} did not start: {error}; "
                                   f"its log ends with: {self._log_tail()}") from error
            await self._run_install(client)
            if self.admit is not None:
                if not await asyncio.to_thread(self.admit):
                    return
                self.admitted_at = time.monotonic()
                if self.sandboxed:  # the inputs placed while the kernel waited
                    sandbox.hand_over(self.work_dir, self.place.user)
            timed_out = await self._run_student_cells(client, km, watch)
            if await km.is_alive():
                if timed_out:
                    await km.interrupt_kernel()
                await self._run_dump(client)
        finally:
            if watch is not None:
                watch.stop()
            await self._shutdown(client, km, root)

    async def _run_install(self, client: OutputCappedClient) -> None:
        position = self.plan.install_position
        cell = self.plan.nb.cells[position]
        client.timeout = INSTALL_TIMEOUT_S
        try:
            await client.async_execute_cell(cell, position)
        except (CellTimeoutError, DeadKernelError) as error:
            raise HarnessError(f"the grader's setup cell did not finish for {self.name}: "
                               f"{error}; kernel log: {self._log_tail()}") from error
        error_output = _error_output(cell)
        if error_output is not None:
            raise HarnessError(f"the grader's setup cell failed for {self.name}:\n"
                               f"{_traceback_tail(error_output)}")

    async def _run_student_cells(self, client: OutputCappedClient, km: StudentKernelManager,
                                 watch: MemoryWatch | None) -> bool:
        """Run every cell between the grader's first and last; True when a timeout stopped them."""
        profile = self.spec.profile
        budget_start = time.monotonic()
        for position in range(self.plan.install_position + 1, self.plan.dump_position):
            cell = self.plan.nb.cells[position]
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            origin = self.plan.origin[position]
            reported = origin if origin is not None else self.plan.follows[position]
            left = profile.run_timeout_s - (time.monotonic() - budget_start)
            if left <= 0:
                self.failure = self._timeout_failure(reported, whole_run=True)
                return True
            whole_run = left < profile.cell_timeout_s
            client.timeout = max(1, math.ceil(min(profile.cell_timeout_s, left)))
            began = time.monotonic()
            running_before = asyncio.all_tasks()
            try:
                await client.async_execute_cell(cell, position)
            except CellTimeoutError:
                _cancel_tasks_since(running_before)
                self.failure = self._timeout_failure(reported, whole_run)
                return True
            except DeadKernelError:
                self.failure = self._death_failure(reported, km, watch)
                return False
            finally:
                if origin is not None:
                    self.cell_seconds[origin] += time.monotonic() - began
            error_output = _error_output(cell)
            if error_output is not None:
                # As nbgrader's autograding: every cell runs, a failing one costs only what
                # depends on it (the checks see which artifacts and names are missing).
                error = self._exception_failure(error_output, origin, self.plan.follows[position])
                self.errors.append(error)
                if error.profile_cause is None:
                    self.failure = self.failure or error
        return False

    async def _run_dump(self, client: OutputCappedClient) -> None:
        position = self.plan.dump_position
        cell = self.plan.nb.cells[position]
        client.timeout = DUMP_TIMEOUT_S
        try:
            await client.async_execute_cell(cell, position)
        except (CellTimeoutError, DeadKernelError):
            return
        if _error_output(cell) is not None:
            return
        try:  # the student's code could have replaced the dump: a link, a FIFO, a JSON bomb
            loaded = read_json(self.work_dir / STATE_FILE, MAX_STATE_BYTES, self.work_dir)
        except UntrustedFileError as error:
            log.info("%s: state dump not used: %s", self.name, error)
            return
        if isinstance(loaded, dict):
            self.state = loaded

    async def _shutdown(self, client: OutputCappedClient, km: StudentKernelManager,
                        root: psutil.Process | None) -> None:
        leftovers = process_tree(root) if root is not None else []
        try:
            if await km.is_alive():
                await km.shutdown_kernel(now=True)
        finally:
            kill_processes(leftovers)
            await km.cleanup_resources()
            if client.kc is not None:
                client.kc.stop_channels()
                client.kc = None

    def _cell_label(self, origin: int | None) -> str:
        return f"cell {origin + 1}" if origin is not None else "the grader's setup"

    def _timeout_failure(self, origin: int | None, whole_run: bool) -> Failure:
        profile = self.spec.profile
        label = self._cell_label(origin)
        if whole_run:
            message = (f"{self.name}: the notebook used up its time budget of "
                       f"{profile.run_timeout_s} s in {label}, which was stopped.")
        else:
            message = (f"{self.name}: {label} was still running after {profile.cell_timeout_s} s, "
                       f"the time limit for one cell, and was stopped.")
        return Failure(self.name, "timeout", message, origin, "")

    def _death_failure(self, origin: int | None, km: StudentKernelManager,
                       watch: MemoryWatch | None) -> Failure:
        label = self._cell_label(origin)
        if watch is not None and watch.exceeded and watch.reason == "disk":
            limit = self.spec.profile.disk_limit_mb
            return Failure(self.name, "out-of-memory",
                           f"{self.name}: {label} filled the disk: the notebook's folder held more "
                           f"than {limit} MB (or {MAX_WORK_DIR_ENTRIES} files), the disk limit of "
                           f"this grading profile, and the kernel was stopped.", origin, "")
        if watch is not None and watch.exceeded:
            limit = self.spec.profile.memory_limit_mb
            return Failure(self.name, "out-of-memory",
                           f"{self.name}: {label} used more than {limit} MB of memory (files in "
                           f"/tmp and /dev/shm included), the limit of this grading profile, "
                           f"and the kernel was stopped.", origin, "")
        status = _exit_status(km)
        return Failure(self.name, "kernel-died",
                       f"{self.name}: the Python kernel died while running {label}{status}; "
                       f"the notebook may call os._exit() or exit(), or crash the interpreter.",
                       origin, "")

    def _exception_failure(self, error_output: NotebookNode, origin: int | None,
                           follows: int | None) -> Failure:
        ename = error_output.get("ename", "Exception")
        evalue = _first_line(_strip_ansi(str(error_output.get("evalue", ""))))
        if len(evalue) > MESSAGE_VALUE_CHARS:
            evalue = evalue[:MESSAGE_VALUE_CHARS] + "..."
        raised = f"{ename}: {evalue}" if evalue else ename
        if origin is None:
            where = self._cell_label(follows)
            message = f"{self.name}: the grader's parameter cell after {where} raised {raised}."
            return Failure(self.name, "exception", message, follows, _traceback_tail(error_output))
        message = f"{self.name}: {self._cell_label(origin)} raised {raised}"
        if not message.endswith((".", "!", "?")):
            message += "."
        return Failure(self.name, "exception", message, origin, _traceback_tail(error_output),
                       self._profile_cause(origin))

    def _profile_cause(self, origin: int) -> str | None:
        """Why a failing cell may be the profile's doing: it hard-codes a number that the
        notebook assigns to a name the profile changed (``range(120)`` beside ``EPOCHS = 120``)."""
        source = self.student_nb.cells[origin].source
        written = numeric_literals(source)
        for name, injected in self.spec.parameters.items():
            if name in assigned_names(source):
                continue
            for own in self.own_values.get(name, ()):
                # Only telling numbers: a bool, 0, 1 or 2 is written everywhere for other reasons.
                if type(own) not in (int, float) or abs(own) <= 2:
                    continue
                if own != injected and own in written:
                    return (f"this cell writes {own!r}, the notebook's own {name}, while the "
                            f"grading profile sets {name} = {injected!r}: use {name} instead of "
                            f"the number so the cell follows the setting")
        return None

    def _log_tail(self) -> str:
        try:  # only the tail: a kernel may have flooded its stderr
            with open(grader_dir(self.work_dir) / KERNEL_LOG, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 2000))
                data = handle.read(2000)
        except OSError:
            return "(no kernel log)"
        return data.decode("utf-8", "replace").strip() or "(empty)"

    def result(self, executed_path: Path, duration_s: float) -> RunResult:
        artifacts = {name: found for name in self.spec.expected_artifacts
                     if (found := self._find_artifact(name)) is not None}
        missing = [name for name in self.spec.expected_artifacts if name not in artifacts]
        if self.failure is None and missing:
            caused = next((e for e in self.errors if e.profile_cause), None)
            why = (f"after {self._cell_label(caused.cell_index)} failed ({caused.profile_cause})"
                   if caused else "although no cell raised")
            self.failure = Failure(self.name, "missing-artifact",
                                   f"{self.name} did not write {', '.join(missing)} {why}.",
                                   caused.cell_index if caused else None, "")
        client = self.client
        truncated = client.truncated if client is not None else False
        image_positions = client.image_positions if client is not None else set()
        images = sorted({self.plan.origin[p] for p in image_positions
                         if self.plan.origin[p] is not None})
        texts = []
        for position, cell in enumerate(self.plan.nb.cells):
            if self.plan.origin[position] is None or cell.cell_type != "code":
                continue
            texts += [out.get("text", "") for out in cell.get("outputs", [])
                      if out.get("output_type") == "stream"]
        return RunResult(self.spec.run_id, self.name, executed_path, self.failure, self.state,
                         "".join(texts), images, duration_s, truncated, self.cell_seconds,
                         self.errors, list(self.spec.expected_artifacts), artifacts)

    def _find_artifact(self, name: str) -> str | None:
        """Where the run wrote ``name``: the name itself, the notebook's own paths for it, or
        where its ``torch.save`` put a file of one of those names (as the kernel recorded it,
        latest first); a regular file inside the work dir, never a link."""
        saved = self.state.get(SAVED_KEY)
        recorded = [p for p in reversed(saved) if isinstance(p, str)] if isinstance(saved, list) else []
        aliases = [name, *self.spec.artifact_aliases.get(name, [])]
        names = {os.path.basename(alias) for alias in aliases}
        candidates = [*aliases, *(p for p in recorded if os.path.basename(p) in names)]
        for relative in candidates:
            if not _is_plain_relative(relative):
                continue
            path = self.work_dir / relative
            if os.path.realpath(path) != str(path):
                continue  # a link on the way (the file or a folder above it)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    return relative
            except OSError:
                continue
        return None


def _is_plain_relative(path: str) -> bool:
    """A relative path that stays below its folder (no '..', not absolute)."""
    parts = Path(path).parts
    return bool(parts) and not Path(path).is_absolute() and ".." not in parts


def _cancel_tasks_since(earlier: set[asyncio.Task]) -> None:
    """Cancel what a timed-out cell left running.

    nbclient keeps the cell's IOPub reader alive after a timeout; it would go on taking
    (and dropping) the messages of the next cell, which then waits for output that never comes.
    """
    for task in asyncio.all_tasks() - earlier:
        if task is not asyncio.current_task():
            task.cancel()


def _error_output(cell: NotebookNode) -> NotebookNode | None:
    return next((out for out in cell.get("outputs", []) if out.get("output_type") == "error"),
                None)


def _traceback_tail(error_output: NotebookNode, max_lines: int = 60, library_frames: int = 2,
                    frame_lines: int = 6) -> str:
    """The traceback as the student needs it: every frame of their own code (a notebook cell,
    "Cell In[..]" / "Input In [..]" / "<ipython-input-..>", or a file of theirs such as
    models/vgg.py), the ``library_frames`` library frames nearest the error (the others
    become one "[... N library frame(s) left out ...]" line), and the exception text; each
    frame cut to ``frame_lines`` lines around its arrow. Past ``max_lines`` in all, the
    first and last lines are kept. Each line is cut to ``ERROR_TAIL_LINE_CHARS`` and the
    whole to about ``ERROR_TAIL_CHARS`` (``_bounded_lines``)."""
    text = _strip_ansi("\n".join(error_output.get("traceback", [])))
    lines = text.splitlines()
    if not lines:
        return _bounded_lines(
            f"{error_output.get('ename', '')}: {error_output.get('evalue', '')}".splitlines())
    frame_start = re.compile(r"(Cell In\s*\[\d+\]|Input In\s*\[\d+\]|<ipython-input-\d+-|File \S|\S[^ ]*\.py in )")
    own_cell = re.compile(r"(Cell In\s*\[|Input In\s*\[|<ipython-input-)")
    library = re.compile(r"(site-packages|dist-packages|/lib/python\d|/usr/lib/|/usr/local/lib/|<frozen )")
    blocks: list[tuple[str, list[str]]] = [("text", [])]  # ("text" | "own" | "library", lines)
    for line in lines:
        if frame_start.match(line):
            kind = "own" if own_cell.match(line) or not library.search(line) else "library"
            blocks.append((kind, [line]))
        elif blocks[-1][0] != "text" and not line.strip() and len(blocks[-1][1]) > 1:
            blocks.append(("text", []))  # a frame ends at a blank line; what follows is text
        else:
            blocks[-1][1].append(line)

    def cut(frame: list[str]) -> list[str]:
        """The frame's first line, then the lines before its arrow and one after."""
        if len(frame) <= frame_lines:
            return frame
        arrow = next((k for k, line in enumerate(frame) if re.match(r"\s*-+>", line)), len(frame) - 1)
        end = min(len(frame), arrow + 2)
        return [frame[0], *frame[max(1, end - (frame_lines - 1)):end]]

    kept_library = {k for k in [k for k, (kind, _) in enumerate(blocks) if kind == "library"][-library_frames:]} \
        if library_frames > 0 else set()
    out: list[str] = []
    dropped = 0
    for k, (kind, block) in enumerate(blocks):
        if kind == "library" and k not in kept_library:
            dropped += 1
            continue
        if kind == "text" and not any(line.strip() for line in block):
            continue  # the blank line between two frames
        if dropped:
            out += [f"[... {dropped} library frame(s) left out ...]", ""]
            dropped = 0
        if kind == "text":
            if any(line.strip() for line in block):
                out += block
        else:
            out += cut(block) + [""]
    if dropped:
        out.append(f"[... {dropped} library frame(s) left out ...]")
    while out and not out[-1].strip():
        out.pop()
    if len(out) > max_lines:
        head = max_lines // 3
        out = out[:head] + [f"[... {len(out) - max_lines} lines left out ...]"] + out[-(max_lines - head):]
    return _bounded_lines(out)


def _bounded_lines(lines: list[str]) -> str:
    """``lines`` joined, each cut to ``ERROR_TAIL_LINE_CHARS``; past ``ERROR_TAIL_CHARS`` in
    all, the first third and the last two thirds of that are kept."""
    text = "\n".join(line if len(line) <= ERROR_TAIL_LINE_CHARS
                     else line[:ERROR_TAIL_LINE_CHARS] + "..." for line in lines)
    if len(text) <= ERROR_TAIL_CHARS:
        return text
    head = ERROR_TAIL_CHARS // 3
    return (text[:head] + f"\n[... {len(text) - ERROR_TAIL_CHARS} characters left out ...]\n"
            + text[-(ERROR_TAIL_CHARS - head):])


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _exit_status(km: StudentKernelManager) -> str:
    process = getattr(km.provisioner, "process", None)
    code = process.poll() if process is not None else None
    if code is None:
        return ""
    # bwrap reports a child killed by signal N as exit status 128 + N.
    signal_number = -code if code < 0 else code - 128 if code > 128 else None
    if signal_number is not None:
        return f" (killed by signal {signal_number})"
    return f" (exit status {code})"
