"""A class at once: one grading per submission, resumable, a gradebook and a summary page.

``grade_class`` treats every folder and every ``.zip`` in the class folder as one
submission and writes, under the output folder::

    OUT/<student id>/result.json, report.html, notebooks/   one per submission
    OUT/gradebook.csv                                        one row per submission
    OUT/summary.html                                         the class at a glance

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

Stopping. Ctrl-C or SIGTERM stops starting new gradings, ends the running ones
(their partial folders are removed), keeps what is finished, rewrites the
gradebook and raises ``KeyboardInterrupt`` for the caller to report.

Each grading runs in a process of its own (``spawn``: no fork of a parent that may
have trained the reference bundle with OpenMP threads), in a process group of
its own so a terminal's Ctrl-C reaches only the batch, which then ends it. A
grading process also ends when the batch process disappears (even by SIGKILL).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from urllib.parse import quote

from grader.prepare import PrepareError

RESULT, REPORT, NOTEBOOKS = "result.json", "report.html", "notebooks"
GRADEBOOK, SUMMARY = "gradebook.csv", "summary.html"
LOCK_NAME = ".slimgrade-batch.lock"
PARTIAL = ".partial-"
PARTIAL_NAME = re.compile(r".+\.partial-[0-9a-f]{8}")
TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
IGNORED_ENTRIES = {"__MACOSX"}
RESERVED_IDS = {GRADEBOOK.casefold(), SUMMARY.casefold()}
MAX_ID_CHARS = 100
TOTAL_CORES = 2  # the grading machine's budget: notebook runs of all workers together
STOP_GRACE_S = 5.0
POLL_S = 0.5
SUMMARY_TEXT_CHARS = 300
FAILURE_KIND = "exception"
FIXED_COLUMNS_BEFORE = ("student_id",)
FIXED_COLUMNS_AFTER = ("total", "max_total", "failures", "diagnoses", "report")
TEMPLATES = Path(__file__).parent / "templates"


class BatchError(PrepareError):
    """The class folder or the output folder cannot be used; the message says what to do.

    A PrepareError so that the command line reports it as a usage error.
    """


# ---------------------------------------------------------------- what the batch calls
# Module attributes, looked up at call time, so a test can put fakes in their place.

def grade(submission_path: Path, out_dir: Path, profile, **options) -> dict:
    """Grade one submission (grader.pipeline.grade, imported only when a grading runs)."""
    from grader.pipeline import grade as grade_submission

    return grade_submission(submission_path, out_dir, profile, **options)


def ensure_reference(profile, cache_root: Path | None, data_root: Path | None,
                     device: str | None) -> Path:
    """Build (or find) the profile's expected bundle once, before any grading process starts."""
    from reference.bundle import ensure_bundle

    return ensure_bundle(profile, cache_root, data_root, device)


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

def read_rubric(path: Path | None) -> dict:
    """The rubric JSON (the course's by default), read without importing the scorer."""
    if path is None:
        return json.loads(resources.files("grader").joinpath("rubric.json").read_text())
    return json.loads(Path(path).read_text())


def failure_message(error: BaseException) -> str:
    """One sentence about what stopped a grading."""
    text = " ".join(str(error).split())
    if isinstance(error, PrepareError) and text:
        sentence = _clip(text, 500)
    else:
        detail = f"{type(error).__name__}: {text}" if text else type(error).__name__
        sentence = f"The grader failed on this submission ({_clip(detail, 300)})"
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def failure_result(sid: str, profile_name: str, rubric: dict, message: str, tail: str,
                   duration_s: float) -> dict:
    """A result.json for a submission whose grading raised: every check an error, score 0."""
    from grader import __version__

    checks = []
    for item in rubric.get("items", []):
        manual = bool(item.get("manual"))
        checks.append({"id": item["id"], "stage": item.get("stage", ""),
                       "title": item.get("title", item["id"]),
                       "status": "skip" if manual else "error", "points": 0.0,
                       "max_points": float(item.get("points", 0)),
                       "message": "Graded by hand from the report." if manual
                       else f"Not graded: {message}"})
    automatic = sum(c["max_points"] for c in checks if c["status"] != "skip")
    return {
        "slimgrade_version": __version__, "submission": sid, "profile": profile_name,
        "graded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 1), "score": 0.0, "max_score": automatic,
        "manual_max_points": sum(c["max_points"] for c in checks if c["status"] == "skip"),
        "checks": checks, "diagnoses": [],
        "failures": [{"notebook": None, "run": None, "kind": FAILURE_KIND, "message": message,
                      "cell_index": None, "error_tail": tail[-4000:]}],
        "metrics": {}, "handed_in": {},
        "environment": {"python": platform.python_version(), "platform": platform.platform()},
    }


def write_failure(folder: Path, result: dict) -> None:
    """result.json and a report.html (the usual renderer's, or a plain page if it fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NOTEBOOKS).mkdir(exist_ok=True)
    try:
        from grader.render import write_report

        write_report(result, folder)
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


def write_atomically(path: Path, text: str, newline: str | None = "\n") -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _terminated(signum: int, frame: object) -> None:
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
                                     run_cache=task.run_cache)
        if not (task.partial / RESULT).is_file():
            if not isinstance(result, dict):
                raise TypeError("the grading returned no result and wrote no result.json")
            task.partial.mkdir(parents=True, exist_ok=True)
            write_atomically(task.partial / RESULT, json.dumps(result, indent=2, default=str))
    except Exception as error:  # noqa: BLE001 - one submission never stops the batch
        record_failure(task.partial, task.sid, getattr(task.profile, "name", str(task.profile)),
                       read_rubric(task.rubric_path), failure_message(error),
                       traceback.format_exc(), time.monotonic() - started)
    commit(task.partial, task.out / task.sid)


def record_failure(partial: Path, sid: str, profile_name: str, rubric: dict, message: str,
                   tail: str, duration_s: float) -> None:
    """A failure result in ``partial``; notebooks the grading already wrote are kept."""
    partial.mkdir(parents=True, exist_ok=True)
    for name in (RESULT, REPORT):
        (partial / name).unlink(missing_ok=True)
    write_failure(partial, failure_result(sid, profile_name, rubric, message, tail, duration_s))


def _exit_description(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# ---------------------------------------------------------------- gradebook and summary

class Gradebook:
    """The class's results as they are on disk, and the two files made from them."""

    def __init__(self, out: Path, entries: list[Entry], rubric: dict, title: str, profile_name: str):
        self.out, self.entries, self.rubric = out, entries, rubric
        self.title, self.profile_name = title, profile_name
        self.items = [item for item in rubric.get("items", []) if "id" in item]
        self.results: dict[str, dict | None] = {}

    @property
    def columns(self) -> list[str]:
        return [*FIXED_COLUMNS_BEFORE, *(item["id"] for item in self.items), *FIXED_COLUMNS_AFTER]

    def load(self, sid: str) -> None:
        path = self.out / sid / RESULT
        if not path.is_file():
            self.results.pop(sid, None)
            return
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = None
        self.results[sid] = result if isinstance(result, dict) else None

    def rows(self) -> list[dict]:
        return [self.row(entry.id) for entry in self.entries if entry.id in self.results]

    def row(self, sid: str) -> dict:
        result = self.results.get(sid)
        if result is None:  # a result.json that does not parse
            row = {column: None for column in self.columns}
            row.update(student_id=sid, failures=f"{RESULT}:unreadable", diagnoses="",
                       report=self._report(sid))
            return row
        checks = {c.get("id"): c for c in _list(result.get("checks")) if isinstance(c, dict)}
        row: dict = {"student_id": sid}
        for item in self.items:
            row[item["id"]] = None if item.get("manual") else \
                _number(_dict(checks.get(item["id"])).get("points"))
        row["total"] = _number(result.get("score"))
        row["max_total"] = _number(result.get("max_score"))
        row["failures"] = ";".join(f"{f.get('notebook') or 'submission'}:{f.get('kind') or 'unknown'}"
                                   for f in _list(result.get("failures")) if isinstance(f, dict))
        row["diagnoses"] = ";".join(dict.fromkeys(
            str(d.get("id")) for d in _list(result.get("diagnoses")) if isinstance(d, dict)))
        row["report"] = self._report(sid)
        return row

    def _report(self, sid: str) -> str:
        return f"{sid}/{REPORT}" if (self.out / sid / REPORT).is_file() else ""

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({key: _csv_cell(value) for key, value in row.items()})
        write_atomically(self.out / GRADEBOOK, buffer.getvalue(), newline="")
        write_atomically(self.out / SUMMARY, summary_html(self.view()))

    def view(self) -> dict:
        """Everything summary.html shows, as plain strings and numbers."""
        students, scores, maxima = [], [], []
        diagnosis_students: dict[str, list[str]] = {}
        diagnosis_example: dict[str, str] = {}
        kind_count: Counter = Counter()
        kind_students: dict[str, set[str]] = {}
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
            diagnoses = []
            for d in _list(result.get("diagnoses")):
                if not isinstance(d, dict):
                    continue
                did = _clip(str(d.get("id")), 80)
                message = _clip(str(d.get("message") or ""), SUMMARY_TEXT_CHARS)
                diagnoses.append({"id": did, "message": message})
                if entry.id not in diagnosis_students.setdefault(did, []):
                    diagnosis_students[did].append(entry.id)
                diagnosis_example.setdefault(did, message)
            failures = []
            for f in _list(result.get("failures")):
                if not isinstance(f, dict):
                    continue
                kind = _clip(str(f.get("kind") or "unknown"), 40)
                failures.append({"kind": kind, "where": _clip(str(f.get("notebook") or "submission"), 80),
                                 "message": _clip(str(f.get("message") or ""), SUMMARY_TEXT_CHARS)})
                kind_count[kind] += 1
                kind_students.setdefault(kind, set()).add(entry.id)
            if self.results[entry.id] is None:
                failures.append({"kind": "unreadable", "where": RESULT,
                                 "message": f"{RESULT} could not be read."})
            student = {"id": entry.id, "source": entry.path.name,
                       "href": quote(f"{entry.id}/{REPORT}") if row["report"] else "",
                       "score": _points(score), "max": _points(maximum),
                       "pct": f"{100 * score / maximum:.0f} %" if score is not None and maximum else "",
                       "diagnoses": diagnoses, "failures": failures}
            students.append(student)
            if failures:
                failed_students.append(student)
        graded = len(students)
        top = max(maxima) if maxima else None
        return {
            "title": self.title, "profile": self.profile_name,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "found": len(self.entries), "graded": graded,
            "pending": [e.id for e in self.entries if e.id not in self.results],
            "with_failures": len(failed_students),
            "mean": _points(round(statistics.fmean(scores), 2)) if scores else "",
            "median": _points(round(statistics.median(scores), 2)) if scores else "",
            "max_total": _points(top),
            "histogram": score_histogram(scores, top) if scores else None,
            "diagnoses": [{"id": did, "count": len(ids), "share": f"{100 * len(ids) / graded:.0f} %",
                           "example": diagnosis_example[did], "students": ids}
                          for did, ids in sorted(diagnosis_students.items(),
                                                 key=lambda kv: (-len(kv[1]), kv[0]))],
            "failure_kinds": [{"kind": kind, "count": count, "students": len(kind_students[kind])}
                              for kind, count in kind_count.most_common()],
            "failed_students": failed_students,
            "students": students,
        }


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


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _points(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------- the batch

def grade_class(class_dir: Path, out: Path, profile, *, data_root: Path | None = None,
                device: str | None = None, workers: int = 1, force: bool = False,
                rubric_path: Path | None = None, cache_root: Path | None = None,
                run_cache: Path | None = None) -> list[dict]:
    """Grade every submission of ``class_dir`` into ``out``; the gradebook rows, in id order.

    Submissions already graded (``out/<id>/result.json``) are skipped unless ``force``.
    ``run_cache`` reuses runs of byte-identical notebooks across submissions.
    """
    class_dir, out = Path(class_dir).resolve(), Path(out).resolve()
    if not class_dir.is_dir():
        raise BatchError(f"{class_dir} is not a folder: give the folder that holds one folder "
                         "or .zip per student.")
    if workers < 1:
        raise BatchError(f"--workers must be at least 1 (got {workers}).")
    out.mkdir(parents=True, exist_ok=True)
    rubric = read_rubric(rubric_path)
    profile_name = getattr(profile, "name", str(profile))
    with exclusive(out):
        remove_stale(out)
        entries = find_submissions(class_dir, out)
        book = Gradebook(out, entries, rubric, class_dir.name, profile_name)
        for entry in entries:
            book.load(entry.id)
        pending = [e for e in entries if force or not is_finished(out, e.id)]
        book.write()
        if pending:
            ensure_reference(profile, cache_root, data_root, device)
            _Scheduler(book, pending, profile, workers=workers, data_root=data_root, device=device,
                       rubric_path=rubric_path, cache_root=cache_root, run_cache=run_cache).run()
        return book.rows()


@dataclass
class _Grading:
    """A grading process the scheduler started and has not seen end."""

    entry: Entry
    process: multiprocessing.Process
    partial: Path
    graded_before: bool
    slot: int  # which of the ``workers`` places it holds (and so which GPUs)


class _Scheduler:
    """Up to ``workers`` grading processes at once; the gradebook rewritten as each ends."""

    def __init__(self, book: Gradebook, pending: list[Entry], profile, *, workers: int,
                 data_root, device, rubric_path, cache_root, run_cache):
        self.book, self.queue, self.profile, self.workers = book, list(pending), profile, workers
        self.options = {"data_root": Path(data_root).resolve() if data_root else None,
                        "device": device,
                        "rubric_path": Path(rubric_path).resolve() if rubric_path else None,
                        "cache_root": Path(cache_root).resolve() if cache_root else None,
                        "run_cache": Path(run_cache).resolve() if run_cache else None}
        self.stop = threading.Event()
        # Each running grading holds a slot, and the slot its share of the GPUs.
        self.gpus = gpu_shares(device, workers)
        self.free_slots = list(range(workers))
        self.running: dict[object, _Grading] = {}
        self.unstarted: list[str] = []
        self.context = multiprocessing.get_context("spawn")

    def run(self) -> None:
        from tqdm.auto import tqdm

        previous = self._catch_signals()
        bar = tqdm(total=len(self.queue), desc="grading", unit="submission",
                   disable=not sys.stderr.isatty())
        try:
            while (self.queue or self.running) and not self.stop.is_set():
                while self.queue and len(self.running) < self.workers and not self.stop.is_set():
                    self._start(self.queue.pop(0))
                for sentinel in wait_for_any(list(self.running), timeout=POLL_S):
                    grading = self.running.pop(sentinel)
                    self.free_slots.append(grading.slot)
                    grading.process.join()
                    self._finished(grading)
                    score = _dict(self.book.results.get(grading.entry.id)).get("score")
                    bar.set_postfix_str(f"{grading.entry.id}: {_points(_number(score)) or '?'}")
                    bar.update(1)
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

    def _start(self, entry: Entry) -> None:
        partial = _partial_path(self.book.out, entry.id)
        grade_workers = max(1, TOTAL_CORES // self.workers)
        slot = self.free_slots.pop(0)
        task = Task(sid=entry.id, source=entry.path, out=self.book.out, partial=partial,
                    profile=self.profile, grade_workers=grade_workers,
                    visible_gpus=self.gpus[slot],
                    # every kernel of every grading at once shares the cores
                    threads=max(1, (os.cpu_count() or TOTAL_CORES) // (self.workers * grade_workers)),
                    parent_pid=os.getpid(), grade_function=grade, **self.options)
        process = self.context.Process(target=run_task, args=(task,), name=f"slimgrade-{entry.id}")
        graded_before = is_finished(self.book.out, entry.id)
        process.start()
        self.running[process.sentinel] = _Grading(entry, process, partial, graded_before, slot)

    def _finished(self, grading: _Grading) -> None:
        entry, process, partial = grading.entry, grading.process, grading.partial
        # A grading process exits with 0 only after its commit; one that died while
        # exiting has committed too if its partial folder is gone and a result is there.
        committed = is_finished(self.book.out, entry.id) and (
            process.exitcode == 0 or (not partial.exists() and not grading.graded_before))
        if committed:
            pass
        elif self.stop.is_set():
            _remove(partial)
        elif not partial.exists():
            # It died before grading started (its first act makes the partial folder):
            # a harness problem, not the student's; the submission stays ungraded.
            self.unstarted.append(f"{entry.id}: {_exit_description(process.exitcode)}")
        else:
            # The grading process died before it could record anything: record it here.
            record_failure(partial, entry.id, self.book.profile_name, self.book.rubric,
                           "The grading process ended unexpectedly "
                           f"({_exit_description(process.exitcode)}).", "", 0.0)
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
