"""A class at once: one grading per submission, resumable, a gradebook and a summary page.

``grade_class`` treats every folder and every ``.zip`` in the class folder as one
submission and writes, under the output folder::

    OUT/<student id>/result.json, report.html, notebooks/   one per submission
    OUT/gradebook.csv                                        one row per hand-in
    OUT/summary.html                                         the class at a glance
    OUT/hand-grades.csv                                      the TA's hand marks (never rewritten)
    OUT/canvas-grades.csv                                    student id, score, comment, for an LMS

A folder without any of the lab's notebooks (or a .zip holding none) is listed as "no
submission": it is not graded and scores nothing rather than 0. ``only`` grades the named
hand-ins (again, if they were graded); ``exclude`` leaves out hand-ins whose name or id
matches a glob: they are neither graded nor listed.

Hand grades. ``OUT/hand-grades.csv`` holds one row per student and one column per rubric
item graded by hand, plus ``comment``. The first batch writes it with empty cells; later
batches only append rows for new students and never rewrite it, so marks typed there (in
a spreadsheet: ``,`` ``;`` or tab, decimal comma allowed) survive every rerun. It is read
on every run and merged into the gradebook, the LMS export, the summary and each student's
report.html (result.json stays the automatic grading's record).

Kill safety. A submission is graded into ``OUT/<id>.partial-<random>/`` by its own
process and renamed to ``OUT/<id>/`` only once result.json and report.html are
written, so ``OUT/<id>/result.json`` exists exactly when that submission is done.
A batch killed at any moment leaves at most ``.partial-`` folders, which the next
run removes before it starts; the next run grades only ids without a result
(``force`` grades them all again). The gradebook and the summary are rewritten
atomically after every finished submission.

Failures. Whatever one grading raises (a folder without notebooks, a harness
bug, a grading process that dies) becomes that student's result: score 0 and a
``failures`` entry of kind ``exception``. The batch goes on with the others.
On a Dask cluster (grader/cluster.py), a grading whose workers died under it on every
try becomes a failure of kind ``worker-lost``.

Deadline. A grading that is still running after ``grading_deadline_s`` (every run
of the grading using its whole budget, with a margin) is stopped like a Ctrl-C stops
it, and recorded as that student's ``timeout`` failure; the batch goes on.

Stopping. Ctrl-C or SIGTERM stops starting new gradings, ends the running ones
(their partial folders are removed), keeps what is finished, rewrites the
gradebook and raises ``KeyboardInterrupt`` for the caller to report.

Each grading runs in a process of its own (``spawn``: no fork of a parent that may
have trained the reference bundle with OpenMP threads), in a process group of
its own so a terminal's Ctrl-C reaches only the batch, which then ends it. A
grading process also ends when the batch process disappears (even by SIGKILL).
SIGTERM makes a grading process kill its kernels and leave through the grading's
clean-up (its work root is removed); its temporary files live in a folder of its
own, which the batch removes once the process has ended, however it ended.
"""
from __future__ import annotations

import base64
import csv
import fnmatch
import html
import io
import json
import math
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from urllib.parse import quote

from grader import render
from grader.files import TEMPORARY_NAME, write_atomically
from grader.lab import get_lab
from grader.machine import RUNS_AT_ONCE, cores
from grader.prepare import (PrepareError, archive_problem, lab_notebooks_in,
                            top_level_notebooks)
from grader.progress import Progress, duration
from grader.score import load_rubric
from grader.untrusted import remove_tree

RESULT, REPORT, NOTEBOOKS = "result.json", "report.html", "notebooks"
GRADEBOOK, SUMMARY = "gradebook.csv", "summary.html"
HAND_GRADES, LMS_GRADES = "hand-grades.csv", "canvas-grades.csv"
HAND_STAMP = ".hand-grades.json"  # in OUT/<id>/: the hand grades its report.html shows
COMMENT = "comment"
NO_SUBMISSION, GRADED, NOT_GRADED, UNREADABLE = "no submission", "graded", "not graded", "unreadable"
# Most of a class failing the same cell with the same error is the signature of a grading
# problem (a profile, a path, a shim), not of a class-wide mistake.
GRADING_PROBLEM_SHARE = 0.5
GRADING_PROBLEM_MIN = 2
LOCK_NAME = ".slimgrade-batch.lock"
PARTIAL = ".partial-"
PARTIAL_NAME = re.compile(r".+\.partial-[0-9a-f]{8}")
IGNORED_ENTRIES = {"__MACOSX"}
RESERVED_IDS = {name.casefold() for name in (GRADEBOOK, SUMMARY, HAND_GRADES, LMS_GRADES)}
MAX_ID_CHARS = 100
STOP_GRACE_S = 10.0  # from SIGTERM to SIGKILL: a grading kills its kernels, removes its work root
# The per-grading deadline: every run may use its whole budget plus kernel start, the
# grader's setup cell and the state dump; the grading's own work (finding the bundle,
# evaluating, the report) gets a fixed allowance, and the sum a margin.
DEADLINE_MARGIN = 1.5
DEADLINE_ALLOWANCE_S = 600.0
TIMEOUT_KIND = "timeout"
# On a Dask cluster (grader/cluster.py): every worker that ran the grading died under it.
WORKER_LOST_KIND = "worker-lost"
POLL_S = 0.5
SUMMARY_TEXT_CHARS = 300
BLANK = ""  # a missing number in the summary and the CSVs (render.points: an en dash)
FAILURE_KIND = "exception"
FIXED_COLUMNS_BEFORE = ("student_id",)
FIXED_COLUMNS_AFTER = ("total", "max_total", "hand_total", "final", "final_max", "status",
                       "failures", "diagnoses", COMMENT, "duration_s", "report", "bundle")
TEMPLATES = Path(__file__).parent / "templates"


class BatchError(PrepareError):
    """The class folder or the output folder cannot be used; the message says what to do.

    A PrepareError so that the command line reports it as a usage error.
    """


# ---------------------------------------------------------------- what the batch calls
# Module attributes, looked up at call time, so a test can put fakes in their place.

def grade(submission_path: Path, out_dir: Path, profile, *, lab: str | None = None,
          **options) -> dict:
    """Grade one submission of the lab named ``lab`` (grader.pipeline.grade, imported only
    when a grading runs)."""
    from grader.pipeline import grade as grade_submission

    return grade_submission(submission_path, out_dir, profile, lab=get_lab(lab), **options)


def ensure_reference(profile, cache_root: Path | None, data_root: Path | None,
                     device: str | None, bundle=None, lab: str | None = None):
    """The expected bundle every grading of the batch uses (``grader.bundles.Bundle``),
    found and checked by its hash once, before any grading process starts; never built.
    ``bundle``: a folder or archive (--bundle), None for the one the lab ships."""
    return get_lab(lab).resolve_bundle(profile, bundle, cache_root)


def bundle_fields(bundle) -> dict | None:
    """What result.json records of a resolved bundle: hash, profile, source (None: unknown)."""
    to_dict = getattr(bundle, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def grading_deadline_s(profile, grade_workers: int, lab: str | None = None) -> float:
    """How long one grading may take before the batch stops it (seconds).

    The lab's runs of a grading (``Lab.planned_runs``), ``grade_workers`` of them at once,
    each within its budget plus the kernel's start, the setup cell and the state dump.
    """
    from grader.execute import DUMP_TIMEOUT_S, INSTALL_TIMEOUT_S, KERNEL_START_TIMEOUT_S

    runs = get_lab(lab).planned_runs(profile)
    per_run = profile.run_timeout_s + KERNEL_START_TIMEOUT_S + INSTALL_TIMEOUT_S + DUMP_TIMEOUT_S
    waves = math.ceil(runs / max(1, grade_workers))
    return DEADLINE_ALLOWANCE_S + DEADLINE_MARGIN * waves * per_run


def gpu_shares(device: str | None, workers: int) -> list[str | None]:
    """What CUDA_VISIBLE_DEVICES each of ``workers`` grading processes gets (None: unchanged).

    Only when the gradings may pick their GPU (``device`` None or "cuda"): with as many
    GPUs as workers or more, each process gets its own; with fewer, they take turns.
    """
    if device not in (None, "cuda"):
        return [None] * workers
    from grader.schedule import gpu_shares as shares, visible_gpus

    return shares(visible_gpus(), workers)


# ---------------------------------------------------------------- the class folder

@dataclass(frozen=True)
class Entry:
    id: str
    path: Path


def student_id(name: str) -> str:
    """A folder name made from an entry's name: letters, digits, ``_``, ``.`` and ``-`` only."""
    stem = name[:-4] if name.lower().endswith(".zip") else name
    clean = re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", stem))
    clean = clean.replace(PARTIAL, "_partial-").strip("._-")[:MAX_ID_CHARS].rstrip("._-")
    clean = clean or "submission"
    return clean + "_" if clean.casefold() in RESERVED_IDS else clean


def find_submissions(class_dir: Path, out: Path | None = None) -> list[Entry]:
    """Every folder and .zip of ``class_dir`` (hidden entries and ``out`` itself excluded).

    Ids are unique even when two names clean up to the same id (``alice`` and
    ``alice.zip``): the later one in name order gets ``-2``, ``-3``, ...
    """
    skip = out.resolve() if out is not None else None
    entries: list[Entry] = []
    taken: set[str] = set()
    for path in sorted(Path(class_dir).iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.name in IGNORED_ENTRIES:
            continue
        if skip is not None and path.resolve() == skip:
            continue
        if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
            continue
        base = student_id(path.name)
        sid, n = base, 2
        while sid.casefold() in taken:
            sid, n = f"{base}-{n}", n + 1
        taken.add(sid.casefold())
        entries.append(Entry(sid, path))
    return entries


def select_entries(entries: list[Entry], only: list[str] | None, exclude: list[str] | None,
                   class_dir: Path) -> tuple[list[Entry], set[str]]:
    """The entries left after ``exclude`` (globs on the name or the id, any case), and the ids
    ``only`` names (an id or a name as handed in; every one must exist)."""
    globs = [g.casefold() for g in exclude or []]
    kept = [e for e in entries if not any(fnmatch.fnmatchcase(name.casefold(), g) for g in globs
                                          for name in (e.id, e.path.name))]
    if not only:
        return kept, set()
    names = {}
    for entry in kept:
        names[entry.id.casefold()] = names[entry.path.name.casefold()] = entry.id
    unknown = [name for name in only if name.casefold() not in names]
    if unknown:
        known = ", ".join(e.id for e in kept[:10]) + (", ..." if len(kept) > 10 else "")
        raise BatchError(f"--only names {', '.join(unknown)}, which {class_dir} does not hold"
                         f"{' (or --exclude leaves out)' if globs else ''}: its hand-ins are "
                         f"{known or 'none'}.")
    return kept, {names[name.casefold()] for name in only}


def no_submission(entry: Entry, notebooks: tuple[str, ...]) -> bool:
    """A folder, or a readable .zip, that holds none of the lab's notebooks. (A .zip that does
    not open was handed in all the same: its grading says what is wrong with it.)

    A problem met while looking (a .zip too large to list, a folder that cannot be read)
    is that student's alone: the hand-in counts as handed in and its grading says why.
    """
    try:
        if entry.path.is_file() and archive_problem(entry.path) is not None:
            return False
        return not lab_notebooks_in(entry.path, notebooks)
    except Exception:  # noqa: BLE001 - one student's hand-in, never the whole class
        return False


def is_finished(out: Path, sid: str) -> bool:
    return (out / sid / RESULT).is_file()


def remove_stale(out: Path) -> list[str]:
    """Partial folders and temporary files a killed batch left behind; returns their names."""
    removed = []
    for path in out.iterdir():
        if PARTIAL_NAME.fullmatch(path.name) or TEMPORARY_NAME.fullmatch(path.name):
            _remove(path)
            removed.append(path.name)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _partial_path(out: Path, sid: str) -> Path:
    return out / f"{sid}{PARTIAL}{secrets.token_hex(4)}"


def commit(partial: Path, final: Path) -> None:
    """Make a complete grading visible: ``partial`` becomes ``final`` in one rename.

    An earlier result (a forced re-grade) is first renamed aside under a partial
    name, so a kill in between leaves no folder that looks finished.
    """
    aside = None
    if final.exists() or final.is_symlink():
        aside = _partial_path(final.parent, final.name)
        os.rename(final, aside)
    os.rename(partial, final)
    if aside is not None:
        _remove(aside)


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One batch at a time per output folder (it removes partial folders it did not make)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchError(f"Another slimgrade batch is writing to {out}: wait for it to "
                             "finish or choose another --out.") from None
        yield


# ---------------------------------------------------------------- rubric and failure results

def failure_message(error: BaseException) -> str:
    """One sentence about what stopped a grading."""
    said = " ".join(str(error).split())
    if isinstance(error, PrepareError) and said:
        sentence = render.text(said, 500)
    else:
        detail = f"{type(error).__name__}: {said}" if said else type(error).__name__
        sentence = f"The grader failed on this submission ({render.text(detail, 300)})"
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def failure_result(sid: str, profile_name: str, rubric: dict, message: str, tail: str,
                   duration_s: float, kind: str = FAILURE_KIND, bundle: dict | None = None) -> dict:
    """A result.json for a submission whose grading raised: every check an error, score 0;
    ``bundle`` (``bundle_fields``) names the expected bundle the grading was to use."""
    from grader.result import GradeResult, now

    checks = []
    for item in rubric.get("items", []):
        manual = bool(item.get("manual"))
        checks.append({"id": item["id"], "stage": item.get("stage", ""),
                       "title": item.get("title", item["id"]),
                       "status": "skip" if manual else "error", "points": 0.0,
                       "max_points": float(item.get("points", 0)),
                       "message": "Graded by hand from the report." if manual
                       else f"Not graded: {message}"})
    return GradeResult(
        submission=sid, profile=profile_name, bundle=bundle, graded_at=now(),
        duration_s=round(duration_s, 1), score=0.0,
        max_score=sum(c["max_points"] for c in checks if c["status"] != "skip"),
        checks=checks, diagnoses=[],
        failures=[{"notebook": None, "run": None, "kind": kind, "message": message,
                   "cell_index": None, "error_tail": tail[-4000:]}],
        profile_notes=[], profile_changes={}, metrics={}, handed_in={},
        environment={"python": platform.python_version(), "platform": platform.platform()}
    ).to_dict()


def write_failure(folder: Path, result: dict, lab: str | None = None) -> None:
    """result.json and a report.html (the usual renderer's, or a plain page if it fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NOTEBOOKS).mkdir(exist_ok=True)
    try:
        from grader.render import write_report

        write_report(result, folder, get_lab(lab).report)
    except Exception:  # noqa: BLE001 - the plain page below still tells the student
        failure = result["failures"][0]
        write_atomically(folder / REPORT, (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'\">"
            f"<title>slimgrade: {html.escape(result['submission'])}</title></head><body>"
            f"<h1>{html.escape(result['submission'])}: not graded</h1>"
            f"<p>{html.escape(failure['message'])}</p>"
            f"<p>Score 0/{result['max_score']:g}.</p></body></html>\n"))
    write_atomically(folder / RESULT, json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- one grading process

@dataclass(frozen=True)
class Task:
    sid: str
    source: Path
    out: Path
    partial: Path
    profile: object
    data_root: Path | None
    device: str | None
    visible_gpus: str | None  # CUDA_VISIBLE_DEVICES of this grading; None: the batch's own
    grade_workers: int
    threads: int
    rubric_path: Path | None
    cache_root: Path | None
    run_cache: Path | None
    parent_pid: int
    grade_function: Callable[..., dict]
    scratch: Path | None = None  # this grading's temporary folder (its work root goes there)
    bundle: object = None  # the batch's resolved grader.bundles.Bundle: the same for every grading
    lab: str | None = None  # the lab's name (grader.lab.get_lab); None: the default lab


def abort_kernels() -> None:
    """Make every kernel this process runs die now (nothing when no notebook ran here).

    Safe in a signal handler; looked up in ``sys.modules`` so that nothing is imported then.
    """
    execute = sys.modules.get("grader.execute")
    if execute is not None:
        execute.abort_kernels()


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM: kill the kernels, then leave through the grading's clean-up (work root removed)."""
    abort_kernels()
    raise SystemExit(128 + signum)


def _follow_parent(parent_pid: int) -> None:
    """End this process (SIGTERM, then for good) when the batch process is gone."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="slimgrade-parent-watch", daemon=True).start()


def run_task(task: Task) -> None:
    """The body of a grading process: grade into the partial folder, then commit it."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # a terminal's Ctrl-C goes to the batch, which decides
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _follow_parent(task.parent_pid)
    task.partial.mkdir(parents=True)  # the sign that grading started (see _Scheduler._finished)
    if task.scratch is not None:  # the work root and sockets go there
        tempfile.tempdir = str(task.scratch)
        os.environ["TMPDIR"] = str(task.scratch)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(task.threads))
    if task.visible_gpus is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = task.visible_gpus
    started = time.monotonic()
    try:
        result = task.grade_function(task.source, task.partial, task.profile,
                                     data_root=task.data_root, device=task.device,
                                     workers=task.grade_workers, rubric_path=task.rubric_path,
                                     cache_root=task.cache_root, threads=task.threads,
                                     run_cache=task.run_cache, bundle=task.bundle, lab=task.lab)
        if not (task.partial / RESULT).is_file():
            if not isinstance(result, dict):
                raise TypeError("the grading returned no result and wrote no result.json")
            task.partial.mkdir(parents=True, exist_ok=True)
            write_atomically(task.partial / RESULT, json.dumps(result, indent=2, default=str))
    except Exception as error:  # noqa: BLE001 - one submission never stops the batch
        record_failure(task.partial, task.sid, getattr(task.profile, "name", str(task.profile)),
                       load_rubric(task.rubric_path, task.lab), failure_message(error),
                       traceback.format_exc(), time.monotonic() - started,
                       bundle=bundle_fields(task.bundle), lab=task.lab)
    finally:  # also when stopped (SIGTERM); the batch removes it too, should we be killed
        if task.scratch is not None:
            remove_tree(task.scratch)
    commit(task.partial, task.out / task.sid)


def record_failure(partial: Path, sid: str, profile_name: str, rubric: dict, message: str,
                   tail: str, duration_s: float, kind: str = FAILURE_KIND,
                   bundle: dict | None = None, lab: str | None = None) -> None:
    """A failure result in ``partial``; notebooks the grading already wrote are kept."""
    partial.mkdir(parents=True, exist_ok=True)
    for name in (RESULT, REPORT):
        (partial / name).unlink(missing_ok=True)
    write_failure(partial, failure_result(sid, profile_name, rubric, message, tail, duration_s,
                                          kind, bundle), lab)


def _exit_description(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# ---------------------------------------------------------------- gradebook and summary

# ---------------------------------------------------------------- hand grades

def manual_items(rubric: dict) -> list[dict]:
    return [item for item in rubric.get("items", []) if "id" in item and item.get("manual")]


def ensure_hand_grades(out: Path, entries: list[Entry], rubric: dict) -> list[str]:
    """Write ``OUT/hand-grades.csv`` with empty cells if it is missing; otherwise only append
    rows for students it does not list yet (it is never rewritten). Returns problems met."""
    path = out / HAND_GRADES
    columns = ["student_id", *(item["id"] for item in manual_items(rubric)), COMMENT]
    if not path.exists():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([entry.id] + [""] * (len(columns) - 1) for entry in entries)
        write_atomically(path, buffer.getvalue(), newline="")
        return []
    listed, _, problems = _read_hand_table(path)
    if listed is None:
        return problems
    new = [entry.id for entry in entries if entry.id.casefold() not in listed]
    if new:
        text = path.read_bytes()
        dialect_line = _first_line_of(text)
        delimiter = _delimiter(dialect_line)
        with open(path, "a", encoding="utf-8", newline="") as handle:
            if text and not text.endswith((b"\n", b"\r")):
                handle.write("\n")
            writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
            header = next(csv.reader([dialect_line], delimiter=delimiter), [])
            writer.writerows([sid] + [""] * max(0, len(header) - 1) for sid in new)
    return problems


def _first_line_of(data: bytes) -> str:
    text = data.decode("utf-8-sig", "replace")
    return text.splitlines()[0] if text.strip() else ""


def _delimiter(header: str) -> str:
    """Spreadsheets save a CSV with ``,``, ``;`` (decimal-comma locales) or a tab."""
    return max(",;\t", key=header.count) if header else ","


def _read_hand_table(path: Path) -> tuple[dict[str, dict] | None, list[str], list[str]]:
    """({casefolded student id: row}, header, problems), or (None, [], problems) when unreadable."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except OSError as error:
        return None, [], [f"{HAND_GRADES} cannot be read ({error.strerror}); hand grades left out."]
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")  # a spreadsheet that saved it in its own encoding
        except UnicodeDecodeError:
            return None, [], [f"{HAND_GRADES} is not UTF-8 text: save it as CSV (UTF-8)."]
    lines = text.splitlines()
    if not lines:
        return {}, [], []
    reader = csv.reader(lines, delimiter=_delimiter(lines[0]))
    header = [h.strip() for h in next(reader, [])]
    if not header or header[0].casefold() != "student_id":
        return None, header, [f"{HAND_GRADES} must start with a student_id column; hand grades left out."]
    rows: dict[str, dict] = {}
    for number, cells in enumerate(reader, 2):
        if not any(c.strip() for c in cells):
            continue
        row = {name: (cells[k].strip() if k < len(cells) else "") for k, name in enumerate(header)}
        row["_line"] = number
        rows[row["student_id"].casefold()] = row
    return rows, header, []


def read_hand_grades(out: Path, rubric: dict, ids: list[str]) -> tuple[dict[str, dict], list[str]]:
    """{student id: {"points": {item id: float}, "comment": str}} from hand-grades.csv, and the
    problems found (a cell that is not a number of points in range is left out and named)."""
    path = out / HAND_GRADES
    if not path.is_file():
        return {}, []
    table, header, problems = _read_hand_table(path)
    if table is None:
        return {}, problems
    items = {item["id"]: float(item.get("points", 0)) for item in manual_items(rubric)}
    unknown_columns = [h for h in header[1:] if h and h not in items and h.casefold() != COMMENT]
    if unknown_columns:
        problems.append(f"{HAND_GRADES}: column(s) {', '.join(unknown_columns)} are not rubric "
                        f"items graded by hand ({', '.join(items) or 'none'}) and are not read.")
    by_id = {sid.casefold(): sid for sid in ids}
    grades: dict[str, dict] = {}
    for key, row in table.items():
        sid = by_id.get(key)
        if sid is None:
            if any(row.get(i) for i in items) or row.get(COMMENT):
                problems.append(f"{HAND_GRADES} line {row['_line']}: no hand-in is called "
                                f"{row['student_id']!r}; its marks are not used.")
            continue
        points = {}
        for item, maximum in items.items():
            cell = row.get(item, "")
            if not cell:
                continue
            try:
                value = float(cell.replace(",", "."))
            except ValueError:
                value = float("nan")
            if not (0.0 <= value <= maximum):
                problems.append(f"{HAND_GRADES} line {row['_line']} ({sid}): {item} = {cell!r} is "
                                f"not a number of points from 0 to {maximum:g}; left out.")
                continue
            points[item] = value
        comment = row.get(COMMENT, "") or next(
            (v for k, v in row.items() if k.casefold() == COMMENT and v), "")
        if points or comment:
            grades[sid] = {"points": points, "comment": comment}
    return grades, problems


class Gradebook:
    """The class's results as they are on disk, and the files made from them."""

    def __init__(self, out: Path, entries: list[Entry], rubric: dict, title: str, profile_name: str,
                 empty: set[str] | frozenset = frozenset(), lab: str | None = None):
        self.out, self.entries, self.rubric, self.lab = out, entries, rubric, lab
        self.title, self.profile_name = title, profile_name
        self.items = [item for item in rubric.get("items", []) if "id" in item]
        self.manual_max = sum(float(item.get("points", 0)) for item in manual_items(rubric))
        self.results: dict[str, dict | None] = {}
        self.empty = set(empty)  # ids of hand-ins without any of the lab's notebooks
        self.hand: dict[str, dict] = {}  # read from hand-grades.csv at every write()
        self.hand_problems: list[str] = []  # met while creating or extending hand-grades.csv
        self.problems: list[str] = []  # hand_problems and those met reading it

    @property
    def columns(self) -> list[str]:
        return [*FIXED_COLUMNS_BEFORE, *(item["id"] for item in self.items), *FIXED_COLUMNS_AFTER]

    def load(self, sid: str) -> None:
        path = self.out / sid / RESULT
        if sid in self.empty or not path.is_file():
            self.results.pop(sid, None)
            return
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = None
        self.results[sid] = result if isinstance(result, dict) else None

    def rows(self) -> list[dict]:
        return [self.row(entry.id) for entry in self.entries
                if entry.id in self.results or entry.id in self.empty]

    def row(self, sid: str) -> dict:
        hand = self.hand.get(sid) or {}
        points = hand.get("points") or {}
        row: dict = {column: None for column in self.columns}
        row.update(student_id=sid, failures="", diagnoses="", comment=hand.get("comment", ""),
                   report=self._report(sid))
        for item in self.items:
            if item.get("manual"):
                row[item["id"]] = points.get(item["id"])
        hand_total = sum(points.values()) if points else None
        row["hand_total"] = hand_total
        if sid in self.empty:
            row.update(status=NO_SUBMISSION, report="")
            return row
        result = self.results.get(sid)
        if result is None:  # a result.json that does not parse
            row.update(status=UNREADABLE, failures=f"{RESULT}:unreadable")
            return row
        checks = {c.get("id"): c for c in render.as_list(result.get("checks")) if isinstance(c, dict)}
        for item in self.items:
            if not item.get("manual"):
                row[item["id"]] = render.number(render.as_dict(checks.get(item["id"])).get("points"))
        failures = [f for f in render.as_list(result.get("failures")) if isinstance(f, dict)]
        row["total"] = render.number(result.get("score"))
        row["max_total"] = render.number(result.get("max_score"))
        if row["total"] is not None:
            row["final"] = round(row["total"] + (hand_total or 0.0), 2)
        if row["max_total"] is not None:
            row["final_max"] = row["max_total"] + self.manual_max
        row["status"] = NOT_GRADED if any(not f.get("notebook") for f in failures) else GRADED
        row["failures"] = ";".join(f"{f.get('notebook') or 'submission'}:{f.get('kind') or 'unknown'}"
                                   for f in failures)
        row["diagnoses"] = ";".join(dict.fromkeys(
            str(d.get("id")) for d in render.as_list(result.get("diagnoses")) if isinstance(d, dict)))
        row["duration_s"] = render.number(result.get("duration_s"))
        row["bundle"] = render.as_dict(result.get("bundle")).get("hash")
        return row

    def _report(self, sid: str) -> str:
        return f"{sid}/{REPORT}" if (self.out / sid / REPORT).is_file() else ""

    def write(self) -> None:
        ids = [entry.id for entry in self.entries]
        self.hand, read_problems = read_hand_grades(self.out, self.rubric, ids)
        self.problems = list(dict.fromkeys(self.hand_problems + read_problems))
        for sid in ids:
            if self.results.get(sid):
                self._merge_hand_grades(sid)
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_cell(value) for key, value in row.items()})
        write_atomically(self.out / GRADEBOOK, buffer.getvalue(), newline="")
        write_atomically(self.out / LMS_GRADES, lms_csv(rows, self.manual_max), newline="")
        write_atomically(self.out / SUMMARY, summary_html(self.view()))

    def _class_plot(self) -> str | None:
        """The lab's picture of the class (``ReportSection.class_plot``, when it has one), as a
        data URI; a lab's plot that fails leaves the summary without it."""
        draw = getattr(get_lab(self.lab).report, "class_plot", None)
        results = [r for r in self.results.values() if isinstance(r, dict)]
        try:
            return draw(results) if draw is not None and results else None
        except Exception:  # noqa: BLE001 - the summary's tables still tell everything
            return None

    def _merge_hand_grades(self, sid: str) -> None:
        """Render the student's report.html again when its hand grades changed since it was
        last rendered (``OUT/<id>/.hand-grades.json`` records what it shows)."""
        hand = self.hand.get(sid) or {}
        stamp = self.out / sid / HAND_STAMP
        try:
            shown = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shown = None
        if shown == hand or (shown is None and not hand):
            return
        try:
            from grader.render import write_report

            write_report({**self.results[sid], "hand_grades": hand}, self.out / sid,
                         get_lab(self.lab).report)
            write_atomically(stamp, json.dumps(hand))
        except Exception as error:  # noqa: BLE001 - the gradebook still gets the marks
            self.problems.append(f"{sid}/{REPORT} could not show the hand grades ({error}).")

    def view(self) -> dict:
        """Everything summary.html shows, as plain strings and numbers."""
        students, scores, maxima, durations = [], [], [], []
        mistake_students: dict[str, list[str]] = {}
        note_students: dict[str, list[str]] = {}
        examples: dict[str, str] = {}
        kind_count: Counter = Counter()
        kind_students: dict[str, set[str]] = {}
        groups: dict[tuple, dict] = {}
        note_groups: dict[tuple, dict] = {}
        check_counts: dict[str, Counter] = {}
        failed_students = []
        for entry in self.entries:
            if entry.id not in self.results:
                continue
            result = self.results[entry.id] or {}
            row = self.row(entry.id)
            score, maximum = row["total"], row["max_total"]
            if score is not None:
                scores.append(score)
            if maximum is not None:
                maxima.append(maximum)
            if row["duration_s"] is not None:
                durations.append(row["duration_s"])
            diagnoses, notes = [], []
            for d in render.as_list(result.get("diagnoses")):
                if not isinstance(d, dict):
                    continue
                did = render.text(str(d.get("id")), 80)
                message = render.text(str(d.get("message") or ""), SUMMARY_TEXT_CHARS)
                mistake = d.get("severity", "error") == "error"
                (diagnoses if mistake else notes).append({"id": did, "message": message})
                table = mistake_students if mistake else note_students
                if entry.id not in table.setdefault(did, []):
                    table[did].append(entry.id)
                examples.setdefault(did, message)
            for c in render.as_list(result.get("checks")):
                if isinstance(c, dict) and c.get("status") in ("pass", "fail", "error"):
                    check_counts.setdefault(str(c.get("id")), Counter())[c["status"]] += 1
            failures = []
            for f in render.as_list(result.get("failures")):
                if not isinstance(f, dict):
                    continue
                kind = render.text(str(f.get("kind") or "unknown"), 40)
                where = render.text(str(f.get("notebook") or "submission"), 80)
                cell = _cell_number(f.get("cell_index"))
                message = render.text(str(f.get("message") or ""), SUMMARY_TEXT_CHARS)
                failures.append({"kind": kind, "where": where, "cell": cell, "message": message})
                kind_count[kind] += 1
                kind_students.setdefault(kind, set()).add(entry.id)
                group = groups.setdefault((where, cell, kind, message), {
                    "where": where, "cell": cell, "kind": kind, "message": message, "students": []})
                if entry.id not in group["students"]:
                    group["students"].append(entry.id)
            for n in render.as_list(result.get("profile_notes")):
                if not isinstance(n, dict):
                    continue
                where = render.text(str(n.get("notebook") or "submission"), 80)
                cell = _cell_number(n.get("cell_index"))
                message = render.text(str(n.get("message") or ""), SUMMARY_TEXT_CHARS)
                notes.append({"id": "not counted", "message": message})
                group = note_groups.setdefault((where, cell, message), {
                    "where": where, "cell": cell, "message": message,
                    "why": render.text(str(n.get("explanation") or ""), SUMMARY_TEXT_CHARS), "students": []})
                if entry.id not in group["students"]:
                    group["students"].append(entry.id)
            if self.results[entry.id] is None:
                failures.append({"kind": "unreadable", "where": RESULT, "cell": "",
                                 "message": f"{RESULT} could not be read."})
            hand = self.hand.get(entry.id) or {}
            student = {"id": entry.id, "source": entry.path.name,
                       "href": quote(f"{entry.id}/{REPORT}") if row["report"] else "",
                       "status": row["status"] or "",
                       "score": render.points(score, BLANK), "max": render.points(maximum, BLANK),
                       "pct": f"{100 * score / maximum:.0f} %" if score is not None and maximum else "",
                       "hand": render.points(row["hand_total"], BLANK) if hand.get("points") else "",
                       "final": render.points(row["final"], BLANK),
                       "final_max": render.points(row["final_max"], BLANK),
                       "comment": render.text(hand.get("comment", ""), SUMMARY_TEXT_CHARS),
                       "time": duration(row["duration_s"]) if row["duration_s"] is not None else "",
                       "diagnoses": diagnoses, "notes": notes, "failures": failures}
            students.append(student)
            if failures:
                failed_students.append(student)
        graded = len(students)
        top = max(maxima) if maxima else None
        titles = {item["id"]: str(item.get("title") or item["id"]) for item in self.items}
        check_rates = []
        for item in self.items:
            counts = check_counts.get(item["id"])
            if item.get("manual") or not counts:
                continue
            judged = sum(counts.values())
            check_rates.append({"id": item["id"], "title": titles[item["id"]],
                                "points": render.points(item.get("points"), BLANK),
                                "pass": counts["pass"], "fail": counts["fail"], "error": counts["error"],
                                "judged": judged, "rate": f"{100 * counts['pass'] / judged:.0f} %",
                                "percent": round(100 * counts["pass"] / judged)})
        failure_groups = []
        for group in sorted(groups.values(), key=lambda g: (-len(g["students"]), g["where"], g["message"])):
            count = len(group["students"])
            failure_groups.append({**group, "count": count,
                                   "share": f"{100 * count / graded:.0f} %" if graded else "",
                                   "suspect": count >= GRADING_PROBLEM_MIN
                                   and count > GRADING_PROBLEM_SHARE * graded})
        hand_done = sum(1 for sid in self.results if (self.hand.get(sid) or {}).get("points"))

        def table(students_of: dict[str, list[str]]) -> list[dict]:
            return [{"id": did, "count": len(ids), "share": f"{100 * len(ids) / graded:.0f} %",
                     "example": examples[did], "students": ids}
                    for did, ids in sorted(students_of.items(), key=lambda kv: (-len(kv[1]), kv[0]))]

        return {
            "title": self.title, "profile": self.profile_name,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "found": len(self.entries), "graded": graded,
            "pending": [e.id for e in self.entries if e.id not in self.results and e.id not in self.empty],
            "no_submission": [{"id": e.id, "source": e.path.name} for e in self.entries if e.id in self.empty],
            "with_failures": len(failed_students),
            "mean": render.points(statistics.fmean(scores), BLANK) if scores else "",
            "median": render.points(statistics.median(scores), BLANK) if scores else "",
            "max_total": render.points(top, BLANK),
            "histogram": score_histogram(scores, top) if scores else None,
            "class_plot": self._class_plot(),
            "time_total": duration(sum(durations)) if durations else "",
            "time_mean": duration(statistics.fmean(durations)) if durations else "",
            "time_max": duration(max(durations)) if durations else "",
            "checks": check_rates,
            "diagnoses": table(mistake_students),
            "notes": table(note_students),
            "note_groups": sorted(note_groups.values(), key=lambda g: (-len(g["students"]), g["where"])),
            "failure_groups": failure_groups,
            "suspects": sum(1 for g in failure_groups if g["suspect"]),
            "failure_kinds": [{"kind": kind, "count": count, "students": len(kind_students[kind])}
                              for kind, count in kind_count.most_common()],
            "failed_students": failed_students,
            "students": students,
            "manual_max": render.points(self.manual_max, BLANK) if self.manual_max else "",
            "hand_done": hand_done,
            "hand_file": HAND_GRADES,
            "problems": [render.text(p, SUMMARY_TEXT_CHARS) for p in self.problems],
        }


def _cell_number(cell_index: object) -> str:
    """The cell as Jupyter shows it to the student: its position counted from 1."""
    return str(cell_index + 1) if isinstance(cell_index, int) and not isinstance(cell_index, bool) else ""


def lms_csv(rows: list[dict], manual_max: float) -> str:
    """A Canvas-style grade export: student id, score (automatic plus hand), out of, comment."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student_id", "score", "max_score", "comment"])
    for row in rows:
        if row["status"] == NO_SUBMISSION:
            writer.writerow([_csv_cell(row["student_id"]), "", "", "No submission."])
            continue
        parts = []
        if row["total"] is not None:
            parts.append(f"Automatic checks {render.points(row['total'], BLANK)}/"
                         f"{render.points(row['max_total'], BLANK)}")
        if manual_max:
            parts.append(f"report {render.points(row['hand_total'], BLANK)}/"
                         f"{render.points(manual_max, BLANK)} (graded by hand)"
                         if row["hand_total"] is not None else
                         f"report (up to {render.points(manual_max, BLANK)}) not graded yet")
        text = ", ".join(parts) + "."
        if row["status"] == NOT_GRADED:
            text = "Not graded: see the report. " + text
        if row["comment"]:
            text += f" {row['comment'].strip()}"
        if row["report"]:
            text += f" Report: {row['report']}"
        writer.writerow([_csv_cell(v) for v in (row["student_id"], row["final"], row["final_max"],
                                                  text.strip())])
    return buffer.getvalue()


def score_histogram(scores: list[float], top: float | None) -> str:
    """The distribution of total scores as a PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = top if top and top > 0 else max(max(scores), 1.0)
    figure = Figure(figsize=(6.4, 2.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bins = [top * i / 10 for i in range(11)]
    axes.hist([min(max(s, 0.0), top) for s in scores], bins=bins, color="#0969da", edgecolor="white")
    axes.set_xlim(0, top)
    axes.set_xlabel(f"total score (of {top:g})")
    axes.set_ylabel("students")
    axes.yaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def summary_html(view: dict) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                     autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
    return environment.get_template("summary.html.j2").render(v=view)


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    # A spreadsheet would run a cell that starts like a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ---------------------------------------------------------------- the batch

def grade_class(class_dir: Path, out: Path, profile, *, data_root: Path | None = None,
                device: str | None = None, workers: int = 1, force: bool = False,
                rubric_path: Path | None = None, cache_root: Path | None = None,
                run_cache: Path | None = None, only: list[str] | None = None,
                exclude: list[str] | None = None, stream=None, bundle=None,
                runner: Callable[..., object] | None = None, lab: str | None = None) -> list[dict]:
    """Grade every submission of ``class_dir`` into ``out``; the gradebook rows, in id order.

    ``bundle`` (--bundle: a folder or archive; None: the one shipped with the profile) is
    resolved once and every grading process gets that same checked folder.

    Submissions already graded (``out/<id>/result.json``) are skipped unless ``force``;
    ``only`` grades just the hand-ins it names, again; ``exclude`` leaves out hand-ins whose
    name or id matches one of its globs. ``run_cache`` reuses runs of byte-identical
    notebooks across submissions. Progress goes to ``stream`` (default stderr).
    """
    class_dir, out = Path(class_dir).resolve(), Path(out).resolve()
    if workers < 1:
        raise BatchError(f"--workers must be at least 1 (got {workers}).")
    notebooks = get_lab(lab).notebooks
    entries, chosen = class_entries(class_dir, out, only, exclude, notebooks)
    out.mkdir(parents=True, exist_ok=True)
    rubric = load_rubric(rubric_path, lab)
    profile_name = getattr(profile, "name", str(profile))
    with exclusive(out):
        remove_stale(out)
        empty = {e.id for e in entries if no_submission(e, notebooks)}
        book = Gradebook(out, entries, rubric, class_dir.name, profile_name, empty, lab)
        book.hand_problems = ensure_hand_grades(out, entries, rubric)
        for entry in entries:
            book.load(entry.id)
        pending = [e for e in entries if e.id not in empty and (
            e.id in chosen if only else force or not is_finished(out, e.id))]
        book.write()
        if pending:
            resolved = ensure_reference(profile, cache_root, data_root, device, bundle, lab)
            _warn_other_bundles(book, resolved, stream)
            # runner: where the gradings run (grader.cluster.ClusterScheduler on a Dask cluster)
            (runner or _Scheduler)(book, pending, profile, workers=workers, data_root=data_root, device=device,
                       rubric_path=rubric_path, cache_root=cache_root, run_cache=run_cache,
                       stream=stream, bundle=resolved, lab=lab).run()
        else:
            _say(stream, f"nothing to grade: {len(entries) - len(empty)} hand-in(s) already graded"
                         f"{', ' + str(len(empty)) + ' without a submission' if empty else ''} "
                         "(--force grades them all again, --only ID... a few).")
        return book.rows()


def class_entries(class_dir: Path, out: Path, only: list[str] | None = None,
                  exclude: list[str] | None = None,
                  notebooks: tuple[str, ...] | None = None) -> tuple[list[Entry], set[str]]:
    """The hand-ins a batch lists and the ids ``only`` names; BatchError (a usage error, one
    sentence) for a folder that is not a class: missing, empty, or one student's hand-in."""
    class_dir, out = Path(class_dir).resolve(), Path(out).resolve()
    if not class_dir.is_dir():
        raise BatchError(f"{class_dir} is not a folder: give the folder that holds one folder "
                         "or .zip per student.")
    top = top_level_notebooks(class_dir, notebooks or get_lab().notebooks)
    if top:
        raise BatchError(f"{class_dir} is one student's submission (it holds {', '.join(top)}), "
                         f"not a class: grade it with 'slimgrade grade {class_dir}', or give the "
                         "folder that holds one folder or .zip per student.")
    found = find_submissions(class_dir, out)
    entries, chosen = select_entries(found, only, exclude, class_dir)
    if not entries:
        raise BatchError(
            f"{class_dir} holds no hand-in (no folder or .zip inside): give the folder that holds "
            "one folder or .zip per student." if not found else
            f"--exclude leaves out every hand-in of {class_dir} ({len(found)}): nothing to grade.")
    return entries, chosen


def _warn_other_bundles(book: Gradebook, bundle, stream) -> None:
    """Say which results kept from an earlier run were graded against another bundle."""
    fields = bundle_fields(bundle)
    if not fields:
        return
    other = [sid for sid, result in book.results.items() if result and
             render.as_dict(result.get("bundle")).get("hash") not in (None, fields["hash"])]
    if other:
        _say(stream, f"{len(other)} result(s) kept from an earlier run ({', '.join(other[:5])}"
                     f"{', ...' if len(other) > 5 else ''}) were graded against another expected "
                     f"bundle than this one ({fields['hash'][:12]}): --force grades them again "
                     "(the gradebook's bundle column shows each one's).")


def _say(stream, text: str) -> None:
    from grader.progress import clock

    print(f"{clock()} batch: {text}", file=stream if stream is not None else sys.stderr, flush=True)


def outcome_line(book: Gradebook, sid: str, on: str = "") -> str:
    """One line on a finished hand-in: its score, its failures, its time, then ``on`` (where
    it ran: a cluster's worker)."""
    row = book.row(sid)
    result = book.results.get(sid) or {}
    failures = [f for f in render.as_list(result.get("failures")) if isinstance(f, dict)]
    took = f" in {duration(row['duration_s'])}" if row["duration_s"] is not None else ""
    if row["status"] == NOT_GRADED:
        why = render.text(str(failures[0].get("message") or failures[0].get("kind")), 120)
        return f"{sid}: not graded{took}{on}: {why}"
    if row["status"] == UNREADABLE:
        return f"{sid}: its {RESULT} cannot be read"
    runs = f", {len(failures)} failed run(s)" if failures else ""
    score = f"{render.points(row['total'], BLANK)}/{render.points(row['max_total'], BLANK)}"
    return f"{sid}: {score}{runs}{took}{on}"


def batch_summary(rows: list[dict], out: Path) -> str:
    """The closing line of a batch: what was graded, what failed, where the files are."""
    out = Path(out).resolve()
    by_status: dict[str, list[str]] = {}
    for row in rows:
        by_status.setdefault(row.get("status") or GRADED, []).append(row["student_id"])
    with_failure = sum(1 for row in rows if row.get("status") == GRADED and row.get("failures"))

    def named(status: str, label: str) -> str:
        ids = by_status.get(status, [])
        if not ids:
            return ""
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        return f", {len(ids)} {label} ({shown})"

    return (f"Batch done: {len(rows)} hand-in(s): {len(by_status.get(GRADED, []))} graded"
            + (f" ({with_failure} with a failed run)" if with_failure else "")
            + named(NOT_GRADED, "not graded, see their report") + named(UNREADABLE, "unreadable result")
            + named(NO_SUBMISSION, "without a submission")
            + f". Gradebook: {out / GRADEBOOK}; summary: {out / SUMMARY}; "
            f"hand grades: {out / HAND_GRADES}; LMS export: {out / LMS_GRADES}.")


@dataclass
class _Grading:
    """A grading process the scheduler started and has not seen end."""

    entry: Entry
    process: multiprocessing.Process
    partial: Path
    graded_before: bool
    slot: int  # which of the ``workers`` places it holds (and so which GPUs)
    scratch: Path  # its temporary folder, removed once it has ended
    deadline: float  # time.monotonic() past which it is stopped
    limit_s: float  # the deadline, from its start
    stopped_at: float | None = None  # when the deadline stopped it (SIGTERM, later SIGKILL)


class _Scheduler:
    """Up to ``workers`` grading processes at once; the gradebook rewritten as each ends."""

    def __init__(self, book: Gradebook, pending: list[Entry], profile, *, workers: int,
                 data_root, device, rubric_path, cache_root, run_cache, stream=None, bundle=None,
                 lab: str | None = None):
        self.book, self.queue, self.profile, self.workers = book, list(pending), profile, workers
        self.stream = stream
        self.options = {"data_root": Path(data_root).resolve() if data_root else None,
                        "device": device,
                        "rubric_path": Path(rubric_path).resolve() if rubric_path else None,
                        "cache_root": Path(cache_root).resolve() if cache_root else None,
                        "run_cache": Path(run_cache).resolve() if run_cache else None,
                        "bundle": bundle, "lab": lab}
        self.stop = threading.Event()
        # Each running grading holds a slot, and the slot its share of the GPUs.
        self.gpus = gpu_shares(device, workers)
        self.free_slots = list(range(workers))
        self.running: dict[object, _Grading] = {}
        self.unstarted: list[str] = []
        self.context = multiprocessing.get_context("spawn")

    def run(self) -> None:
        previous = self._catch_signals()
        bar = Progress("batch", len(self.queue), "hand-in", self.stream, announce=(
            f"grading {len(self.queue)} hand-in(s), {self.workers} at a time, into {self.book.out}"))
        try:
            while (self.queue or self.running) and not self.stop.is_set():
                while self.queue and len(self.running) < self.workers and not self.stop.is_set():
                    self._start(self.queue.pop(0))
                for sentinel in wait_for_any(list(self.running), timeout=POLL_S):
                    grading = self.running.pop(sentinel)
                    self.free_slots.append(grading.slot)
                    grading.process.join()
                    self._finished(grading)
                    bar.step(self._outcome(grading.entry.id))
                self._enforce_deadlines()
        finally:
            self._end_running()
            bar.close()
            self._restore_signals(previous)
            self.book.write()
        if self.stop.is_set():
            raise KeyboardInterrupt
        if self.unstarted:
            raise RuntimeError(
                f"{len(self.unstarted)} grading process(es) ended before grading started "
                f"({', '.join(self.unstarted[:5])}{', ...' if len(self.unstarted) > 5 else ''}); "
                "nothing was recorded for them: see the messages above and run the batch again.")

    def _outcome(self, sid: str) -> str:
        if sid not in self.book.results:
            return f"{sid}: not recorded (see above)"
        return outcome_line(self.book, sid)

    def _start(self, entry: Entry) -> None:
        partial = _partial_path(self.book.out, entry.id)
        grade_workers = max(1, RUNS_AT_ONCE // self.workers)
        slot = self.free_slots.pop(0)
        # A short name: the work root and the kernels' sockets go below it.
        scratch = Path(tempfile.mkdtemp(prefix="slimgrade-b"))
        task = Task(sid=entry.id, source=entry.path, out=self.book.out, partial=partial,
                    profile=self.profile, grade_workers=grade_workers,
                    visible_gpus=self.gpus[slot],
                    # every kernel of every grading at once shares the cores
                    threads=max(1, cores() // (self.workers * grade_workers)),
                    parent_pid=os.getpid(), grade_function=grade, scratch=scratch, **self.options)
        process = self.context.Process(target=run_task, args=(task,), name=f"slimgrade-{entry.id}")
        graded_before = is_finished(self.book.out, entry.id)
        limit_s = grading_deadline_s(self.profile, grade_workers, self.options["lab"])
        try:
            process.start()
        except BaseException:
            remove_tree(scratch)
            raise
        self.running[process.sentinel] = _Grading(entry, process, partial, graded_before, slot,
                                                  scratch, time.monotonic() + limit_s, limit_s)

    def _enforce_deadlines(self) -> None:
        """Stop a grading past its deadline: SIGTERM (it cleans up), SIGKILL after a grace."""
        now = time.monotonic()
        for grading in self.running.values():
            if grading.stopped_at is None and now > grading.deadline:
                grading.stopped_at = now
                grading.process.terminate()
            elif grading.stopped_at is not None and now > grading.stopped_at + STOP_GRACE_S \
                    and grading.process.is_alive():
                grading.process.kill()

    def _finished(self, grading: _Grading) -> None:
        entry, process, partial = grading.entry, grading.process, grading.partial
        # A grading process exits with 0 only after its commit; one that died while
        # exiting has committed too if its partial folder is gone and a result is there.
        committed = is_finished(self.book.out, entry.id) and (
            process.exitcode == 0 or (not partial.exists() and not grading.graded_before))
        remove_tree(grading.scratch)  # the work root of a killed grading (kernels' folders)
        if committed:
            pass
        elif self.stop.is_set():
            _remove(partial)
        elif not partial.exists():
            # It died before grading started (its first act makes the partial folder):
            # a harness problem, not the student's; the submission stays ungraded.
            self.unstarted.append(f"{entry.id}: {_exit_description(process.exitcode)}")
        elif grading.stopped_at is not None:
            record_failure(partial, entry.id, self.book.profile_name, self.book.rubric,
                           f"The grading took longer than {grading.limit_s:.0f} s, the limit for "
                           "one submission under this profile, and was stopped.", "",
                           grading.limit_s, kind=TIMEOUT_KIND,
                           bundle=bundle_fields(self.options["bundle"]), lab=self.book.lab)
            commit(partial, self.book.out / entry.id)
        else:
            # The grading process died before it could record anything: record it here.
            record_failure(partial, entry.id, self.book.profile_name, self.book.rubric,
                           "The grading process ended unexpectedly "
                           f"({_exit_description(process.exitcode)}).", "", 0.0,
                           bundle=bundle_fields(self.options["bundle"]), lab=self.book.lab)
            commit(partial, self.book.out / entry.id)
        self.book.load(entry.id)
        self.book.write()

    def _end_running(self) -> None:
        """Stop what still runs; keep any grading that completed meanwhile."""
        for grading in self.running.values():
            if grading.process.is_alive():
                grading.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for grading in self.running.values():
            grading.process.join(max(0.0, deadline - time.monotonic()))
            if grading.process.is_alive():
                grading.process.kill()
                grading.process.join()
        for grading in self.running.values():
            if grading.partial.exists():
                _remove(grading.partial)
            remove_tree(grading.scratch)
            self.book.load(grading.entry.id)
        self.running.clear()

    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: self.stop.set())
        return previous

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
