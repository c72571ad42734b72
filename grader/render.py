"""result.json, report.html and Gradescope's results.json from one grading's result.

The result dict is the contract (see docs/design.md); any part of it may be
missing when a stage failed, so everything here reads it defensively and shows
"not available" instead of failing.

Every string that came from a submission (messages, evidence, tracebacks,
printed lines, paths, cfg) is untrusted. The HTML is rendered by jinja2 with
autoescape on and no filter that marks text as safe anywhere; the page also carries a
Content-Security-Policy that allows no script, no network and only ``data:``
images, so it is self-contained: plots are inline PNG data URIs drawn with
``reference.plots``.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jinja2

from reference import plots

INJECTED_TAG = "slimgrade-injected"  # grader.execute's tag on the cells it adds (not imported: torch)

TEMPLATES = Path(__file__).parent / "templates"

NOT_AVAILABLE = "not available"

# Caps on untrusted text shown in the report; a note says when something was cut.
MESSAGE_CHARS = 2000
EVIDENCE_ITEMS = 30
EVIDENCE_DETAILS = 20
DETAIL_CHARS = 600
ERROR_TAIL_LINES = 80  # what execute keeps is short already; this caps a hostile one
ERROR_HEAD_LINES = 12
ERROR_TAIL_CHARS = 6000
PRINTED_HEAD = 10  # first and last lines of what a notebook printed (the end matters most)
PRINTED_TAIL = 20
PRINTED_LINE_CHARS = 300
COPY_DIFFERENCES = 15
CFG_CHARS = 400
GRADESCOPE_OUTPUT_CHARS = 20000

STAGES = ("sparsity_train", "vggprune", "train_prune_model", "chained", "report")
STAGE_TITLES = {
    "sparsity_train": "Sparsity training (sparsity_train.ipynb)",
    "vggprune": "Pruning (vggprune.ipynb)",
    "train_prune_model": "Fine-tuning (train_prune_model.ipynb)",
    "chained": "Your own pipeline end to end",
    "report": "Written report (graded by hand)",
}
STATUSES = ("pass", "fail", "error", "skip")
SEVERITY_LABELS = {"error": "Mistake", "warning": "Worth fixing (costs nothing)",
                   "info": "Worth knowing (not your fault)"}
PRUNE_RATIOS = ("0.5", "0.9")

ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The frame of a notebook cell in an IPython traceback: "Cell In[16], line 3" (IPython 8+),
# "Input In [16], in <cell line: 3>()" (8.0-8.3) and "<ipython-input-16-...>" (7).
CELL_FRAME = re.compile(r"Cell In\s*\[(\d+)\]|Input In\s*\[(\d+)\]|<ipython-input-(\d+)-")

# ---------------------------------------------------------------- plain words for the runs

RUN_WORDS = {
    "sparsity-lambda0": "sparsity training with LAMBDA = 0 (the baseline)",
    "sparsity": "sparsity training with the grading's LAMBDA",
    "prune-edge": "the probe: pruning a checkpoint built with a nearly empty layer",
    "finetune": "fine-tuning the reference model pruned at 90 %",
    "chained-sparsity": "your own pipeline: sparsity training with your LAMBDA",
    "chained-finetune": "your own pipeline: fine-tuning your model pruned at 90 %",
}
GLOSSARY = ("How each notebook ran: once on the grader's reference inputs (\"the reference "
            "checkpoint\"), so an early mistake does not sink the later stages; once more as "
            "\"your own pipeline\", each notebook reading what your previous one wrote; and "
            "vggprune once on \"the probe\", a checkpoint built on purpose with a nearly empty layer.")


def run_label(run_id: object) -> str:
    """A run of a grading (``prune-0.9``, ``chained-sparsity``) or an evidence label of the
    diagnoses (``isolated 0.9``, ``chained 0.5``) in words a student understands."""
    text = _plain(run_id).strip()
    if text in RUN_WORDS:
        return RUN_WORDS[text]
    evidence = re.fullmatch(r"(isolated|chained) (.+)", text)
    if evidence:
        kind, key = evidence.groups()
        if key == "edge":
            return RUN_WORDS["prune-edge"]
        text = f"{'chained-' if kind == 'chained' else ''}prune-{key}"
    pruning = re.fullmatch(r"(chained-)?prune-([0-9.]+)", text)
    if pruning:
        try:
            percent = f"{100 * float(pruning.group(2)):g} %"
        except ValueError:
            return text
        return (f"your own pipeline: pruning at {percent}" if pruning.group(1)
                else f"pruning the reference checkpoint at {percent}")
    return text


# ---------------------------------------------------------------- public API

def render(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/result.json and out_dir/report.html; return both paths."""
    return write_result(result, out_dir), write_report(result, out_dir)


def write_result(result: dict, out_dir: Path) -> Path:
    """out_dir/result.json, written atomically (a temporary file, then os.replace)."""
    text = json.dumps(_json_safe(result), indent=2, sort_keys=False, allow_nan=False)
    return _write_atomically(Path(out_dir) / "result.json", text + "\n")


def write_report(result: dict, out_dir: Path) -> Path:
    """out_dir/report.html: one self-contained page (inline CSS and plots, no script).

    The executed notebooks already in out_dir/notebooks/<run id>.ipynb are linked."""
    html = report_html(result, Path(out_dir))
    return _write_atomically(Path(out_dir) / "report.html", html)


def report_html(result: dict, out_dir: Path | None = None) -> str:
    return _environment().get_template("report.html.j2").render(r=report_view(result, out_dir))


def gradescope_results(result: dict) -> dict:
    """Gradescope's results.json: one test per automatic check, the findings in the top-level
    output (failures first: they are the causes), ``execution_time`` and ``output_format``.

    Items graded by hand are left out of the tests (Gradescope grades them as manual
    questions); the output says how many points they are worth.
    """
    result = _dict(result)
    checks, diagnoses, failures = _checks(result), _diagnoses(result), _failures(result)
    tests = []
    for check in checks:
        if check["status"] == "skip":
            continue
        test = {"name": f"{check['title']} [{check['id']}]", "score": check["points"] or 0.0,
                "max_score": check["max_points"] or 0.0, "output": check["message"],
                "status": "passed" if check["status"] == "pass" else "failed"}
        if check["status"] == "error":
            test["output"] = f"Not graded: {check['message'].removeprefix('Not graded: ')}"
        tests.append(test)

    view_summary = _summary(result, checks, diagnoses, failures)
    lines = [view_summary["score_line"], view_summary["verdict"]]
    manual = [c for c in checks if c["status"] == "skip"]
    if manual:
        lines.append(f"Graded by hand in Gradescope (not in the tests above), "
                     f"{_points(sum(c['max_points'] or 0.0 for c in manual))} points: "
                     + "; ".join(c["title"] for c in manual) + ".")
    runs_of = _failed_runs(result, failures)
    for failure in failures:
        where = f", cell {failure['cell']}" if failure["cell"] else ""
        runs = runs_of[(failure["notebook"], failure["kind"], failure["message"])]
        lines += ["", f"Failure ({failure['kind']}): {failure['notebook']}{where}", f"  {failure['message']}"]
        if runs:
            lines.append(f"  In: {'; '.join(run_label(r) for r in runs)}")
    for diagnosis in diagnoses:
        label = SEVERITY_LABELS[diagnosis["severity"]]
        lines += ["", f"{label}: {diagnosis['id']} ({diagnosis['stage']})", f"  {diagnosis['message']}"]
        if diagnosis["hint"]:
            lines.append(f"  Hint: {diagnosis['hint']}")
        for item in diagnosis["evidence"]:
            if item["run"] is None:
                lines += [f"  - {d}" for d in item["details"]]
            else:
                lines.append(f"  - {item['run']}:")
                lines += [f"      {d}" for d in item["details"]]
    for note in _profile_notes(result, failures):
        where = f", cell {note['cell']}" if note["cell"] else ""
        lines += ["", f"Not counted: {note['notebook']}{where}", f"  {note['message']}",
                  f"  {note['explanation']}"]
    output, cut = _clip("\n".join(lines), GRADESCOPE_OUTPUT_CHARS)
    if cut:
        output += "\n[output truncated; see report.html]"
    results = {"score": _number(result.get("score")) or 0.0, "output": output,
               "output_format": "text", "test_output_format": "text", "tests": tests}
    seconds = _number(result.get("duration_s"))
    if seconds is not None:
        results["execution_time"] = round(seconds)
    return results


# ---------------------------------------------------------------- files

def _write_atomically(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is for TAs and tools to read
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_safe(value: object) -> object:
    """Plain JSON: non-finite floats become null, tuples lists, unknown objects strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _json_safe(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["points"] = _points
    return env


# ---------------------------------------------------------------- small readers

def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: object, limit: int = MESSAGE_CHARS) -> str:
    """Untrusted text made printable (no ANSI colours, no control characters) and capped."""
    text, cut = _clip(_plain(value), limit)
    return text + " [...]" if cut else text


def _plain(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = json.dumps(_json_safe(value))
        except (TypeError, ValueError):
            value = str(value)
    return CONTROL_CHARS.sub("", ANSI_ESCAPE.sub("", value))


def _clip(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit], True)


def _pct(value: object) -> str:
    number = _number(value)
    return NOT_AVAILABLE if number is None else f"{number:.1f}%"


def _fraction(value: object) -> str:
    number = _number(value)
    return NOT_AVAILABLE if number is None else f"{100 * number:.0f}%"


def _points(value: object) -> str:
    number = _number(value)
    return "\u2013" if number is None else f"{round(number, 2):g}"


def _seconds(value: object) -> str:
    number = _number(value)
    if number is None:
        return NOT_AVAILABLE
    return f"{number:.1f} s" if number < 120 else f"{number / 60:.1f} min"


def _int_list(value: object) -> list[int] | None:
    items = _list(value)
    if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in items):
        return None
    return [int(v) for v in items]


def _cfg_kept(cfg: object) -> list[int] | None:
    return _int_list([v for v in _list(cfg) if v != "M"]) if _list(cfg) else None


# ---------------------------------------------------------------- the view of a result

def report_view(result: dict, out_dir: Path | None = None) -> dict:
    """Everything the template shows, already made safe to read: plain strings and numbers."""
    result = _dict(result)
    metrics = _dict(result.get("metrics"))
    checks, diagnoses = _checks(result), _diagnoses(result)
    failures = _failures(result, out_dir=out_dir)
    runs_of = _failed_runs(result, failures)
    for failure in failures:
        failure["run_ids"] = runs_of[(failure["notebook"], failure["kind"], failure["message"])]
        failure["runs"] = [run_label(r) for r in failure["run_ids"]]
    submission = _text(result.get("submission"), 300) or NOT_AVAILABLE
    return {
        "title": f"slimgrade report: {submission}",
        "submission": submission,
        "profile": _text(result.get("profile"), 100) or NOT_AVAILABLE,
        "graded_at": _text(result.get("graded_at"), 100) or NOT_AVAILABLE,
        "duration": _seconds(result.get("duration_s")),
        "version": _text(result.get("slimgrade_version"), 100) or NOT_AVAILABLE,
        "summary": _summary(result, checks, diagnoses, failures),
        "stages": _stages(checks, failures, _hand(result, checks)),
        "glossary": GLOSSARY,
        "errors": [d for d in diagnoses if d["severity"] == "error"],
        "warnings": [d for d in diagnoses if d["severity"] == "warning"],
        "infos": [d for d in diagnoses if d["severity"] == "info"],
        "profile_changes": _profile_changes(result),
        "profile_notes": _profile_notes(result, failures, out_dir),
        "pruning": _pruning(metrics),
        "sparsity": _sparsity(metrics),
        "accuracy_rows": _accuracy_rows(metrics),
        "runs": _runs(metrics, out_dir),
        "failures": failures,
        "handed_in": _handed_in(result),
        "environment": _environment_rows(result),
    }


def _checks(result: dict) -> list[dict]:
    checks = []
    for raw in _list(result.get("checks")):
        raw = _dict(raw)
        if not raw:
            continue
        status = raw.get("status") if raw.get("status") in STATUSES else "unknown"
        checks.append({
            "id": _text(raw.get("id"), 200) or "(no id)",
            "stage": _text(raw.get("stage"), 100) or "other",
            "title": _text(raw.get("title"), 300),
            "status": status,
            "points": _number(raw.get("points")),
            "max_points": _number(raw.get("max_points")),
            "message": _text(raw.get("message")),
        })
    return checks


def _evidence(raw: object) -> tuple[list[dict], int]:
    """[{"run": label or None, "details": [str], "hidden": n}], and how many items were left out."""
    items = _list(raw)
    shown = []
    for item in items[:EVIDENCE_ITEMS]:
        if isinstance(item, dict):
            details = _list(item.get("details"))
            if not details and "details" not in item:
                details = [item]
            shown.append({"run": run_label(_text(item.get("run"), 200)) or "run",
                          "details": [_text(d, DETAIL_CHARS) for d in details[:EVIDENCE_DETAILS]],
                          "hidden": max(0, len(details) - EVIDENCE_DETAILS)})
        else:
            shown.append({"run": None, "details": [_text(item, DETAIL_CHARS)], "hidden": 0})
    return shown, max(0, len(items) - EVIDENCE_ITEMS)


def _diagnoses(result: dict) -> list[dict]:
    diagnoses = []
    for raw in _list(result.get("diagnoses")):
        raw = _dict(raw)
        if not raw:
            continue
        evidence, hidden = _evidence(raw.get("evidence"))
        diagnoses.append({
            "id": _text(raw.get("id"), 200) or "(no id)",
            "stage": _text(raw.get("stage"), 100) or "other",
            "severity": raw.get("severity") if raw.get("severity") in SEVERITY_LABELS else "error",
            "message": _text(raw.get("message")),
            "hint": _text(raw.get("hint")),
            "evidence": evidence,
            "evidence_hidden": hidden,
        })
    return diagnoses


def _profile_changes(result: dict) -> dict:
    raw = _dict(result.get("profile_changes"))
    changes = [{"notebook": _text(c.get("notebook"), 300), "name": _text(c.get("name"), 100),
                "notebook_value": _text(c.get("notebook_value"), 100) or NOT_AVAILABLE,
                "graded_with": _text(c.get("graded_with"), 100)}
               for c in map(_dict, _list(raw.get("changes")))]
    return {"profile": _text(raw.get("profile"), 100) or _text(result.get("profile"), 100),
            **{key: _text(raw.get(key), 500) for key in ("data", "model", "device", "epochs",
                                                          "finetune_epochs", "why")},
            "changes": changes}


NOTEBOOK_ORDER = ("sparsity_train", "vggprune", "train_prune_model")


def _failures(result: dict, key: str = "failures", out_dir: Path | None = None) -> list[dict]:
    """The failures (or the profile notes) in the order of their causes: a notebook that was
    not handed in first, then notebook by notebook in the lab's order, a cell that raised
    before what it left unwritten. Cells are numbered as Jupyter shows them, from 1."""
    failures = []
    for order, raw in enumerate(_list(result.get(key))):
        raw = _dict(raw)
        if not raw:
            continue
        cell = raw.get("cell_index")
        position = cell if isinstance(cell, int) and not isinstance(cell, bool) and cell >= 0 else None
        run_id = _text(raw.get("run"), 100)
        counts = _execution_counts(out_dir, run_id)
        tail_text = _plain(raw.get("error_tail") if not isinstance(raw.get("error_tail"), (list, tuple))
                           else "\n".join(_plain(v) for v in raw.get("error_tail")))
        shown_in = next((n for n, p in counts.items() if p == position), None)
        if shown_in is None and position is not None:
            first = CELL_FRAME.search(tail_text)  # the outermost frame is the failing cell
            shown_in = int(next(g for g in first.groups() if g)) if first else None
        if position is not None and shown_in is not None:
            counts.setdefault(shown_in, position)
        tail, note = _tail(_name_cells(tail_text, counts))
        notebook = _text(raw.get("notebook"), 300) or NOT_AVAILABLE
        kind = _text(raw.get("kind"), 100) or "unknown"
        stem = notebook.removesuffix(".ipynb")
        failures.append({
            "notebook": notebook,
            "run": run_id,
            "run_label": run_label(run_id) if run_id else "",
            "kind": kind,
            "message": _text(raw.get("message")),
            "cell": str(position + 1) if position is not None else "",
            "shown_in": str(shown_in) if shown_in is not None and position is not None else "",
            "tail": tail,
            "tail_note": note,
            "explanation": _text(raw.get("explanation")),
            "_order": (0 if not run_id and kind == "missing-artifact" else 1,
                       NOTEBOOK_ORDER.index(stem) if stem in NOTEBOOK_ORDER else len(NOTEBOOK_ORDER),
                       1 if kind == "missing-artifact" else 0, order),
        })
    failures.sort(key=lambda f: f["_order"])
    for failure in failures:
        del failure["_order"]
    return failures


def _execution_counts(out_dir: Path | None, run_id: str) -> dict[int, int]:
    """{In [n]: position of the student's cell} in the executed copy of a run, whose cells
    the grader injected are tagged and left out of the count; {} when it is not there."""
    if out_dir is None or not run_id or not SAFE_RUN_ID.fullmatch(run_id):
        return {}
    path = Path(out_dir) / "notebooks" / f"{run_id}.ipynb"
    if not path.is_file():
        return {}
    try:
        from grader.untrusted import read_notebook

        cells = read_notebook(path).cells
    except Exception:  # noqa: BLE001 - numbers are a help, never worth a failed report
        return {}
    counts, position = {}, 0
    for cell in cells:
        tags = _list(_dict(cell.get("metadata")).get("tags"))
        if INJECTED_TAG in tags:
            continue
        number = cell.get("execution_count")
        if isinstance(number, int) and not isinstance(number, bool):
            counts[number] = position
        position += 1
    return counts


def _name_cells(text: str, counts: dict[int, int]) -> str:
    """Each "Cell In[16]" of a traceback followed by the cell it is, as the student counts."""
    def name(match: re.Match) -> str:
        number = int(next(g for g in match.groups() if g))
        return (f"{match.group(0)} [your cell {counts[number] + 1}]" if number in counts
                else match.group(0))
    return CELL_FRAME.sub(name, text) if counts else text


def _tail(value: object) -> tuple[str, str]:
    """An error as the grader kept it (the student's frames, the library frames nearest the
    error, the exception), capped: its first lines and its end, a note when cut."""
    if isinstance(value, (list, tuple)):
        value = "\n".join(_plain(v) for v in value)
    text = _plain(value).rstrip()
    lines = text.splitlines()
    notes = []
    if len(lines) > ERROR_TAIL_LINES:
        left_out = len(lines) - ERROR_TAIL_LINES
        notes.append(f"{left_out} lines in the middle left out")
        lines = (lines[:ERROR_HEAD_LINES] + [f"[... {left_out} lines left out ...]"]
                 + lines[-(ERROR_TAIL_LINES - ERROR_HEAD_LINES):])
    text = "\n".join(lines)
    if len(text) > ERROR_TAIL_CHARS:
        notes.append(f"{len(text) - ERROR_TAIL_CHARS} earlier characters left out")
        text = text[-ERROR_TAIL_CHARS:]
    return text, "; ".join(notes)


def _profile_notes(result: dict, failures: list[dict], out_dir: Path | None = None) -> list[dict]:
    """The notes that cost nothing, less any that repeats a counted failure (a notebook that
    failed on its reference input too did not fail "only on the probe")."""
    counted = {(f["notebook"], f["kind"], f["message"]) for f in failures}
    return [n for n in _failures(result, "profile_notes", out_dir)
            if (n["notebook"], n["kind"], n["message"]) not in counted]


def _failed_runs(result: dict, failures: list[dict]) -> dict[tuple, list[str]]:
    """{(notebook, kind, message) of a counted failure: the runs it happened in}. A failure
    is listed once however many runs met it; the runs are counted here, from metrics.runs
    (a run whose failure is a note that costs nothing is not counted)."""
    counted = {(f["notebook"], f["kind"], f["message"]): [] for f in failures}
    noted = {(n["run"], n["message"]) for n in _profile_notes(result, failures)}
    for run_id, raw in _dict(_dict(result.get("metrics")).get("runs")).items():
        if (_text(run_id, 100), _text(_dict(_dict(raw).get("failure")).get("message"))) in noted:
            continue
        failure = _dict(_dict(raw).get("failure"))
        key = (_text(failure.get("notebook"), 300) or NOT_AVAILABLE,
               _text(failure.get("kind"), 100) or "unknown", _text(failure.get("message")))
        if failure and key in counted:
            counted[key].append(_text(run_id, 100))
    for f in failures:  # a failure without metrics still names its own run
        key = (f["notebook"], f["kind"], f["message"])
        if not counted[key] and f["run"]:
            counted[key].append(f["run"])
    return counted


def _hand(result: dict, checks: list[dict]) -> dict:
    """The hand grades merged in by ``slimgrade batch`` (hand-grades.csv), checked against
    the report items' maxima: {"points": {id: float}, "total", "max", "comment"}."""
    raw = _dict(result.get("hand_grades"))
    maxima = {c["id"]: c["max_points"] for c in checks if c["status"] == "skip"}
    points = {}
    for item, value in _dict(raw.get("points")).items():
        number, item = _number(value), _text(item, 200)
        if item in maxima and number is not None and 0 <= number <= (maxima[item] or 0.0):
            points[item] = number
    return {"points": points, "total": sum(points.values()) if points else None,
            "max": sum(m or 0.0 for m in maxima.values()) or None,
            "complete": bool(maxima) and set(points) == set(maxima),
            "comment": _text(raw.get("comment"), MESSAGE_CHARS)}


def _summary(result: dict, checks: list[dict], diagnoses: list[dict], failures: list[dict]) -> dict:
    counts = {status: sum(c["status"] == status for c in checks) for status in STATUSES}
    score, max_score = _number(result.get("score")), _number(result.get("max_score"))
    manual = _number(result.get("manual_max_points"))
    if manual is None:
        manual = sum(c["max_points"] or 0.0 for c in checks if c["status"] == "skip") or None
    automatic = counts["pass"] + counts["fail"] + counts["error"]
    mistakes = [d["id"] for d in diagnoses if d["severity"] == "error"]
    runs = _failed_runs(result, failures)
    failed_runs = sum(len(r) for r in runs.values())
    missing = sum(1 for f in failures if not f["run"] and f["kind"] == "missing-artifact")
    other = sum(1 for f in failures if not f["run"] and f["kind"] != "missing-artifact")
    trouble = []
    if missing:
        trouble.append(f"{missing} notebook(s) not handed in")
    if failed_runs:
        trouble.append(f"{failed_runs} run(s) failed")
    if other:
        trouble.append(f"{other} failure(s) of the whole grading")
    if not checks:
        verdict = ("No check could be run; see the failures below." if failures
                   else "No grading result is available.")
    elif automatic and counts["error"] == automatic:
        verdict = "None of the notebooks could be graded: they did not run to the end (see Failures)."
    elif counts["pass"] == automatic and not mistakes and not failures:
        verdict = "Every automatic check passes."
    else:
        parts = [f"{counts['pass']} of {automatic} automatic checks pass"]
        if mistakes:
            parts.append(f"mistakes found: {', '.join(mistakes)}")
        parts += trouble
        verdict = "; ".join(parts) + "."
    level = ("good" if score is not None and max_score and score >= max_score and not failures
             else "bad" if not checks or (automatic and counts["error"] == automatic) else "mixed")
    score_line = (f"Automatic score: {_points(score)} / {_points(max_score)}"
                  if score is not None or max_score is not None else "Automatic score: not available")
    hand = _hand(result, checks)
    if hand["total"] is not None:
        manual_line = (f"Graded by hand from your written report: {_points(hand['total'])} / "
                       f"{_points(manual)}{'' if hand['complete'] else ' (some items still pending)'}.")
    else:
        manual_line = (f"Up to {_points(manual)} more points are graded by hand from your written "
                       f"report (pending)." if manual else "")
    final = (f"Total: {_points(score + hand['total'])} / {_points(max_score + manual)}"
             if hand["total"] is not None and score is not None and max_score is not None and manual
             else "")
    first = failures[0] if failures else None
    return {"score": _points(score), "max_score": _points(max_score), "counts": counts,
            "verdict": verdict, "level": level, "manual": _points(manual) if manual else "",
            "score_line": score_line, "manual_line": manual_line, "final_line": final,
            "hand_comment": hand["comment"],
            "failed_runs": failed_runs, "missing_notebooks": missing,
            "first_failure": (f"{first['message']}" if first else ""),
            "percent": (100.0 * score / max_score) if score is not None and max_score else None}


def _stages(checks: list[dict], failures: list[dict] | None = None, hand: dict | None = None) -> list[dict]:
    """The checks stage by stage; above each, what stopped its notebook first (a notebook not
    handed in, the first failure of its runs): the cause comes before its consequences."""
    order = list(STAGES) + sorted({c["stage"] for c in checks} - set(STAGES))
    hand_points = (hand or {}).get("points") or {}
    stages = []
    for stage in order:
        rows = [dict(c) for c in checks if c["stage"] == stage]
        if not rows:
            continue
        for row in rows:
            if row["status"] == "skip" and row["id"] in hand_points:
                row["hand_points"] = hand_points[row["id"]]
        automatic = [c for c in rows if c["status"] != "skip"]
        causes = [f for f in failures or [] if f["notebook"] == f"{stage}.ipynb"
                  or (stage == "chained" and any(r.startswith("chained-")
                                                 for r in f.get("run_ids") or [f["run"]]))]
        cause = ""
        first = causes[0] if causes else None
        if first and not first["run"] and first["kind"] == "missing-artifact":
            cause = f"{first['message']} Every check of this notebook below follows from that."
        elif first and any(c["status"] == "error" for c in automatic):
            cause = (f"First: {first['message']} The checks below marked error could not be "
                     "graded because of it.")
        stages.append({
            "id": stage, "title": STAGE_TITLES.get(stage, stage), "checks": rows,
            "points": _points(sum(c["points"] or 0.0 for c in automatic)),
            "max_points": _points(sum(c["max_points"] or 0.0 for c in automatic)),
            "manual": not automatic, "cause": cause,
            "hand_points": _points(sum(hand_points.get(c["id"], 0.0) for c in rows))
            if any(c["id"] in hand_points for c in rows) else "",
        })
    return stages


# ---------------------------------------------------------------- pruning and sparsity

def _data_uri(draw: Callable[[], bytes]) -> str | None:
    """A PNG data URI, or None when the data cannot be plotted."""
    try:
        png = draw()
    except Exception:  # noqa: BLE001 - a plot is never worth a failed report
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _histogram(stats: object) -> dict | None:
    histogram = _dict(_dict(stats).get("histogram"))
    counts, edges = _list(histogram.get("counts")), _list(histogram.get("edges"))
    numbers = counts + edges
    if (not counts or len(edges) != len(counts) + 1
            or any(_number(v) is None for v in numbers)):
        return None
    return {"counts": [float(v) for v in counts], "edges": [float(v) for v in edges]}


def _sparsity(metrics: dict) -> dict:
    sparsity = _dict(metrics.get("sparsity"))
    reference = _dict(_dict(metrics.get("reference")).get("sparsity_gamma"))
    series = {
        "your notebook, the grading's LAMBDA": _dict(_dict(sparsity.get("lambda")).get("gamma")),
        "reference, the same LAMBDA": _dict(reference.get("lambda")),
        "your notebook, LAMBDA = 0": _dict(_dict(sparsity.get("lambda0")).get("gamma")),
    }
    histograms = {label: h for label, stats in series.items() if (h := _histogram(stats))}
    plot = _data_uri(lambda: plots.gamma_histogram(histograms)) if histograms else None
    thresholds = sorted({str(t) for stats in series.values() for t in _dict(stats.get("fraction_below"))
                         if _threshold(t) is not None}, key=_threshold)[:6] or ["0.01"]
    rows = []
    for label, stats in series.items():
        below = _dict(stats.get("fraction_below"))
        rows.append({"label": label, "mean_abs": _fixed(stats.get("mean_abs"), 4),
                     "below": [_fraction(below.get(t)) for t in thresholds]})
    errors = [f"{name}: {_text(_dict(sparsity.get(name)).get('error'))}"
              for name in ("lambda", "lambda0") if _dict(sparsity.get(name)).get("error")]
    return {"plot": plot, "rows": rows, "errors": errors, "thresholds": thresholds,
            "missing": [label for label in series if label not in histograms]}


def _threshold(key: object) -> float | None:
    try:
        value = float(str(key))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _general(value: object) -> str:
    number = _number(value)
    return NOT_AVAILABLE if number is None else f"{number:.4g}"


def _count(value: object) -> str:
    number = _number(value)
    if number is None:
        return NOT_AVAILABLE
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= limit:
            return f"{number / limit:.3g}{suffix}"
    return f"{number:g}"


def _fixed(value: object, digits: int) -> str:
    number = _number(value)
    return NOT_AVAILABLE if number is None else f"{number:.{digits}f}"


def _prune_facts(metrics: dict) -> list[tuple[str, str, dict]]:
    """(label, ratio key, facts) of every vggprune run, isolated first, then chained."""
    runs = [(run_label(f"prune-{key}"), key, _dict(facts))
            for key, facts in _dict(metrics.get("prune")).items()]
    runs += [(run_label(f"chained-prune-{key}"), key, _dict(facts))
             for key, facts in _dict(_dict(metrics.get("chained")).get("prune")).items()]
    return runs


def _pruning(metrics: dict) -> dict:
    reference = _dict(_dict(metrics.get("reference")).get("prune"))
    isolated = _dict(metrics.get("prune"))
    plots_ = []
    for ratio in PRUNE_RATIOS:
        facts = _dict(isolated.get(ratio))
        series: dict[str, list[int]] = {}
        ref = _int_list(facts.get("reference_kept")) or _int_list(_dict(reference.get(ratio)).get("kept_per_layer"))
        if ref:
            series["reference"] = ref
        yours = _int_list(facts.get("student_kept"))
        if yours:
            series["yours (cfg_mask)"] = yours
        elif (from_cfg := _cfg_kept(facts.get("cfg"))):
            series["yours (saved cfg)"] = from_cfg
        uri = _data_uri(lambda s=series: plots.kept_channels(s)) if series else None
        plots_.append({"ratio": ratio, "uri": uri,
                       "note": "" if len(series) == 2 else
                       "only the reference is available" if "reference" in series else
                       "the reference is not available" if series else ""})
    runs = []
    for label, ratio, facts in _prune_facts(metrics):
        differences = [d for d in _list(facts.get("copy_differences")) if isinstance(d, dict)]
        # The run's own failure first: what it left unwritten follows from it.
        problems = [f"{name.replace('_', ' ')}: {_text(facts.get(name))}"
                    for name in ("run_failure", "error", "checkpoint_error", "thin_error")
                    if facts.get(name)]
        ref = _int_list(facts.get("reference_kept"))
        yours = _int_list(facts.get("student_kept"))
        masks = _mask_verdict(facts, ref, yours)
        runs.append({
            "label": label,
            "ratio": ratio,
            "reference_kept": ", ".join(map(str, ref)) if ref else NOT_AVAILABLE,
            "student_kept": ", ".join(map(str, yours)) if yours else NOT_AVAILABLE,
            "kept_match": masks["match"],
            "mask_note": masks["note"],
            "layers_wrong": masks["layers"],
            "cfg": _text(facts.get("cfg"), CFG_CHARS) if facts.get("cfg") is not None else NOT_AVAILABLE,
            "claimed_ratio": _fixed(facts.get("claimed_prune_ratio"), 2),
            "threshold_claimed": _general(facts.get("threshold_claimed")),
            "threshold_reference": _general(facts.get("threshold_reference")),
            "size": (f"{_count(facts.get('parameters'))} parameters, {_count(facts.get('macs'))} MACs"
                     if _number(facts.get("parameters")) is not None else NOT_AVAILABLE),
            "logits_gap": _general(facts.get("logits_max_diff")),
            "majority": _fraction(facts.get("majority_fraction")),
            "mask_strategy": _text(facts.get("mask_strategy"), 100) or NOT_AVAILABLE,
            "problems": problems,
            "copy_checked": "copy_differences" in facts,
            "copy_differences": [{"kind": _text(d.get("kind"), 50),
                                  "key": _text(d.get("key"), 200),
                                  "detail": _text(d.get("detail"), DETAIL_CHARS)}
                                 for d in differences[:COPY_DIFFERENCES]],
            "copy_hidden": max(0, len(differences) - COPY_DIFFERENCES),
        })
    return {"plots": plots_, "runs": runs}


def _layer_ranges(layers: list[int]) -> str:
    """0, 3, 4, 5, 9 -> "0, 3-5, 9" (BN layers numbered as the chart's axis, from 0)."""
    parts, start = [], None
    for k, layer in enumerate(layers):
        if start is None:
            start = layer
        if k + 1 == len(layers) or layers[k + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}\u2013{layer}")
            start = None
    return ", ".join(parts)


def _mask_verdict(facts: dict, ref: list[int] | None, yours: list[int] | None) -> dict:
    """The masks row, derived from the same per-layer counts the chart draws; which channels
    were kept (the grader's comparison of the masks themselves) only adds to it."""
    compared = facts.get("mask_correct") if isinstance(facts.get("mask_correct"), bool) else None
    channels = _int_list(facts.get("mask_layers_wrong")) or []
    if not (ref and yours):
        return {"match": compared, "layers": _layer_ranges(channels), "note": ""}
    counts = [k for k, (a, b) in enumerate(zip(ref, yours)) if a != b]
    if len(ref) != len(yours):
        counts += list(range(min(len(ref), len(yours)), max(len(ref), len(yours))))
    if counts:
        note = ("the channels kept follow a rule the grader accepts (a minimum per layer; it "
                "costs nothing)" if compared else "")
        return {"match": False, "layers": _layer_ranges(counts), "note": note}
    if compared is False:
        return {"match": False, "layers": _layer_ranges(channels),
                "note": "the same number of channels per layer, but not the same channels"}
    return {"match": True, "layers": "", "note": ""}


def _last_claim(facts: dict) -> float | None:
    """The last accuracy the notebook printed, else the best_prec1 its checkpoint saved (in %)."""
    claims = [c for c in _list(facts.get("claimed_accuracies")) if _number(c) is not None]
    if claims:
        return _number(claims[-1])
    best = _number(facts.get("claimed_best_prec1"))
    # The lab's test() returns a fraction (correct / total), so best_prec1 is usually in [0, 1].
    return 100.0 * best if best is not None and 0.0 <= best <= 1.0 else best


def _accuracy_rows(metrics: dict) -> list[dict]:
    reference = _dict(metrics.get("reference"))
    ref_prune = _dict(reference.get("prune"))
    band = _number(reference.get("accuracy_band_pct"))
    chained = _dict(metrics.get("chained"))
    sparsity = _dict(metrics.get("sparsity"))

    def row(label: str, facts: object, ref: object = None, ref_recal: object = None,
            ref_note: str = "") -> dict:
        facts = _dict(facts)
        measured = _number(facts.get("accuracy"))
        return {"label": label,
                "claimed": _pct(_last_claim(facts)),
                "measured": _pct(measured),
                "recalibrated": _pct(facts.get("accuracy_recalibrated")),
                "masked": _pct(facts.get("accuracy_masked_original")),
                "reference": _pct(ref) + ref_note if _number(ref) is not None else NOT_AVAILABLE,
                "reference_recalibrated": _pct(ref_recal),
                "error": _text(facts.get("error") or facts.get("checkpoint_error")
                               or facts.get("thin_error"), 300)}

    finetune_note = f" (yours passes within {band:g} points of it)" if band is not None else ""
    rows = [row(RUN_WORDS["sparsity"], sparsity.get("lambda"), reference.get("sparsity_accuracy")),
            row(RUN_WORDS["sparsity-lambda0"], sparsity.get("lambda0"))]
    prune = _dict(metrics.get("prune"))
    for key in sorted(prune, key=lambda k: (k not in PRUNE_RATIOS, k)):
        ref = _dict(ref_prune.get(key))
        rows.append(row(run_label(f"prune-{key}"), prune[key], ref.get("accuracy_pruned"),
                        ref.get("accuracy_recalibrated")))
    rows.append(row(RUN_WORDS["finetune"], metrics.get("finetune"), reference.get("finetune_accuracy"),
                    ref_note=finetune_note))
    if chained:
        lam = _number(chained.get("lambda"))
        rows.append(row(f"your own pipeline: sparsity training (LAMBDA {lam:g})" if lam is not None
                        else "your own pipeline: sparsity training", chained.get("sparsity")))
        for key, facts in _dict(chained.get("prune")).items():
            rows.append(row(run_label(f"chained-prune-{_text(key, 20)}"), facts))
        rows.append(row("your own pipeline: fine-tuned", chained.get("finetune")))
    return rows


# ---------------------------------------------------------------- runs, handed-in, environment

SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _runs(metrics: dict, out_dir: Path | None) -> list[dict]:
    rows = []
    for run_id, raw in _dict(metrics.get("runs")).items():
        raw = _dict(raw)
        failure = _dict(raw.get("failure"))
        status = ("skipped" if raw.get("skipped") else
                  "failed" if raw.get("failed") or failure else "finished")
        link = ""
        if (out_dir is not None and isinstance(run_id, str) and SAFE_RUN_ID.fullmatch(run_id)
                and (out_dir / "notebooks" / f"{run_id}.ipynb").is_file()):
            link = f"notebooks/{run_id}.ipynb"  # relative: a local file next to the report
        rows.append({"id": _text(run_id, 100), "label": run_label(run_id),
                     "notebook": _text(raw.get("notebook"), 300) or NOT_AVAILABLE,
                     "duration": _seconds(raw.get("duration_s")),
                     "status": status,
                     "kind": _text(failure.get("kind"), 50),
                     "images": len(_list(raw.get("images"))),
                     "truncated": bool(raw.get("output_truncated")),
                     "link": link})
    return rows


def _handed_in(result: dict) -> list[dict]:
    notebooks = []
    for name, raw in _dict(result.get("handed_in")).items():
        raw = _dict(raw)
        printed = [_text(line, PRINTED_LINE_CHARS) for line in _list(raw.get("printed"))]
        hidden = max(0, len(printed) - PRINTED_HEAD - PRINTED_TAIL)
        if hidden:
            printed = (printed[:PRINTED_HEAD] + [f"[... {hidden} line(s) left out ...]"]
                       + printed[-PRINTED_TAIL:])
        notebooks.append({"name": _text(name, 100), "found": bool(raw.get("found")),
                          "path": _text(raw.get("path"), 500),
                          "unreadable": _text(raw.get("unreadable")),
                          "printed": "\n".join(printed),
                          "printed_count": len(_list(raw.get("printed"))),
                          "hidden": hidden})
    return notebooks


def _environment_rows(result: dict) -> list[tuple[str, str]]:
    env = _dict(result.get("environment"))
    sandbox = env.get("sandbox")
    rows = [("slimgrade", _text(result.get("slimgrade_version"), 100) or NOT_AVAILABLE),
            ("profile", _text(result.get("profile"), 100) or NOT_AVAILABLE),
            ("python", _text(env.get("python"), 200) or NOT_AVAILABLE),
            ("torch", _text(env.get("torch"), 200) or NOT_AVAILABLE),
            ("platform", _text(env.get("platform"), 300) or NOT_AVAILABLE),
            ("device", _text(env.get("device"), 100) or NOT_AVAILABLE),
            ("sandbox", NOT_AVAILABLE if sandbox is None else "yes" if sandbox else
             "no (the notebooks ran without the sandbox)")]
    known = {"python", "torch", "platform", "device", "sandbox"}
    rows += [(_text(k, 100), _text(v, 300)) for k, v in env.items() if k not in known]
    return rows
