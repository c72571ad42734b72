"""result.json, report.html and Gradescope's results.json from one grading's result.

The result dict is the contract (see docs/design.md); any part of it may be
missing when a stage failed, so everything here reads it defensively and shows
"not available" instead of failing.

This is the harness's part of the report and knows no lab: the page, the summary, the
checks stage by stage, the failures, the runs, the diagnoses, what the grading changed,
the notebooks as handed in and the environment. The lab's words and its own sections come
from its ``grader.lab.ReportSection`` (``lab.report``), passed to every function here that
names a run or a stage:

* ``stages`` / ``stage_titles``: the order and the headings of the checks' stages; a
  notebook ``<stage>.ipynb`` belongs to its stage, and so does a run whose id starts with
  ``<stage>-``; failures are listed notebook by notebook in that order;
* ``glossary``: one paragraph that says how the runs are named (above the failures);
* ``run_label(run_id)``: a run or an evidence label in plain words;
* ``section(result, out_dir)``: the lab's sections, an HTML fragment that its own
  template rendered with autoescape on (``template_environment`` below); the page shows
  it after "What this grading changed".

and, if the lab has them (each optional; the page is generic without them):

* ``title``: the lab's name in the page's heading ("<title>: grading report");
* ``nav``: ``(anchor, label)`` pairs of the lab's sections for the links at the top;
* ``profile_summary(profile_changes) -> str``: what the profile changed, in the lab's
  words (plain text, escaped by the page), after "Profile <name>:";
* ``printed_examples``: examples of the lab's key lines, said when a notebook printed none.

The helpers a lab's section needs to read a result as safely are public here: ``as_dict``,
``as_list``, ``number``, ``int_list``, ``plain``, ``text``, ``pct``, ``fraction``,
``fixed``, ``general``, ``compact``, ``seconds``, ``points``, ``data_uri``,
``template_environment`` and ``NOT_AVAILABLE``.

Every string that came from a submission (messages, evidence, tracebacks,
printed lines, paths, cfg) is untrusted. The HTML is rendered by jinja2 with
autoescape on and no template marks text as safe; the one piece of markup the page takes
as it is, the lab's section, was itself rendered by an autoescaping template. The page
also carries a Content-Security-Policy that allows no script, no network and only
``data:`` images, so it is self-contained: plots are inline PNG data URIs
(``data_uri``).
"""
from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from grader.files import write_atomically

if TYPE_CHECKING:
    from grader.lab import ReportSection

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
GRADESCOPE_OUTPUT_CHARS = 20000

STATUSES = ("pass", "fail", "error", "skip")
SEVERITY_LABELS = {"error": "Mistake", "warning": "Worth fixing (costs nothing)",
                   "info": "Worth knowing (not your fault)"}

ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The frame of a notebook cell in an IPython traceback: "Cell In[16], line 3" (IPython 8+),
# "Input In [16], in <cell line: 3>()" (8.0-8.3) and "<ipython-input-16-...>" (7).
CELL_FRAME = re.compile(r"Cell In\s*\[(\d+)\]|Input In\s*\[(\d+)\]|<ipython-input-(\d+)-")


# ---------------------------------------------------------------- public API

def render(result: dict, out_dir: Path, report: ReportSection) -> tuple[Path, Path]:
    """Write out_dir/result.json and out_dir/report.html; return both paths."""
    return write_result(result, out_dir), write_report(result, out_dir, report)


def write_result(result: dict, out_dir: Path) -> Path:
    """out_dir/result.json, written atomically (grader.files.write_atomically)."""
    content = json.dumps(_json_safe(result), indent=2, sort_keys=False, allow_nan=False)
    return write_atomically(Path(out_dir) / "result.json", content + "\n")


def write_report(result: dict, out_dir: Path, report: ReportSection) -> Path:
    """out_dir/report.html: one self-contained page (inline CSS and plots, no script).

    The executed notebooks already in out_dir/notebooks/<run id>.ipynb are linked."""
    html = report_html(result, Path(out_dir), report)
    return write_atomically(Path(out_dir) / "report.html", html)


def report_html(result: dict, out_dir: Path | None, report: ReportSection) -> str:
    """The page, with the lab's section included under ``lab/``: one autoescaping
    environment renders both, so nothing a lab shows is marked safe."""
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(TEMPLATES)),
                                  jinja2.PrefixLoader({"lab": report.templates})])
    return template_environment(loader).get_template("report.html.j2").render(
        r=report_view(result, out_dir, report))


def gradescope_results(result: dict, report: ReportSection) -> dict:
    """Gradescope's results.json: one test per automatic check, the findings in the top-level
    output (failures first: they are the causes), ``execution_time`` and ``output_format``.

    Items graded by hand are left out of the tests (Gradescope grades them as manual
    questions); the output says how many points they are worth.
    """
    result = as_dict(result)
    checks, diagnoses = _checks(result), _diagnoses(result, report)
    failures = _failures(result, report)
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

    view_summary = _summary(result, checks, diagnoses, failures, report)
    lines = [view_summary["score_line"], view_summary["verdict"]]
    manual = [c for c in checks if c["status"] == "skip"]
    if manual:
        lines.append(f"Graded by hand in Gradescope (not in the tests above), "
                     f"{points(sum(c['max_points'] or 0.0 for c in manual))} points: "
                     + "; ".join(c["title"] for c in manual) + ".")
    runs_of = _failed_runs(result, failures, report)
    for failure in failures:
        where = f", cell {failure['cell']}" if failure["cell"] else ""
        runs = runs_of[(failure["notebook"], failure["kind"], failure["message"])]
        lines += ["", f"Failure ({failure['kind']}): {failure['notebook']}{where}", f"  {failure['message']}"]
        if runs:
            lines.append(f"  In: {'; '.join(report.run_label(r) for r in runs)}")
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
    for note in _profile_notes(result, failures, report):
        where = f", cell {note['cell']}" if note["cell"] else ""
        lines += ["", f"Not counted: {note['notebook']}{where}", f"  {note['message']}",
                  f"  {note['explanation']}"]
    output, cut = clip("\n".join(lines), GRADESCOPE_OUTPUT_CHARS)
    if cut:
        output += "\n[output truncated; see report.html]"
    results = {"score": number(result.get("score")) or 0.0, "output": output,
               "output_format": "text", "test_output_format": "text", "tests": tests}
    duration = number(result.get("duration_s"))
    if duration is not None:
        results["execution_time"] = round(duration)
    return results


def template_environment(loader: jinja2.BaseLoader | None = None) -> jinja2.Environment:
    """The jinja2 environment of the report: autoescape on, undefined names an error, the
    ``points`` filter. ``loader`` defaults to grader/templates; a lab passes its own
    (``jinja2.PackageLoader("labs.<lab>", "templates")``) for its section."""
    env = jinja2.Environment(
        loader=loader or jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["points"] = points
    return env


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


# ---------------------------------------------------------------- safe readers (public: labs use them)

def as_dict(value: object) -> dict:
    """``value`` if it is a dict, else {}."""
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list:
    """``value`` as a list if it is a list or tuple, else []."""
    return list(value) if isinstance(value, (list, tuple)) else []


def number(value: object) -> float | None:
    """A finite int or float as a float (not a bool); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def int_list(value: object) -> list[int] | None:
    """A non-empty list of finite numbers as ints, else None."""
    items = as_list(value)
    if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in items):
        return None
    return [int(v) for v in items]


def text(value: object, limit: int = MESSAGE_CHARS) -> str:
    """Untrusted text made printable (no ANSI colours, no control characters) and capped."""
    shown, cut = clip(plain(value), limit)
    return shown + " [...]" if cut else shown


def plain(value: object) -> str:
    """Any value as printable text, uncapped ("" for None, JSON for anything not a str)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = json.dumps(_json_safe(value))
        except (TypeError, ValueError):
            value = str(value)
    return CONTROL_CHARS.sub("", ANSI_ESCAPE.sub("", value))


def clip(value: str, limit: int) -> tuple[str, bool]:
    """The first ``limit`` characters, and whether any were cut."""
    return (value, False) if len(value) <= limit else (value[:limit], True)


# ---------------------------------------------------------------- formats (public: labs use them)

def pct(value: object) -> str:
    """A percentage already in %: 76.34 -> "76.3%"."""
    n = number(value)
    return NOT_AVAILABLE if n is None else f"{n:.1f}%"


def fraction(value: object) -> str:
    """A fraction in [0, 1] as a whole percentage: 0.35 -> "35%"."""
    n = number(value)
    return NOT_AVAILABLE if n is None else f"{100 * n:.0f}%"


def points(value: object, missing: str = "\u2013") -> str:
    """Points as the report shows them: at most 2 decimals; ``missing`` (an en dash) for
    anything not a number."""
    n = number(value)
    return missing if n is None else f"{round(n, 2):g}"


def seconds(value: object) -> str:
    """A duration: "71.3 s", or minutes from 2 minutes on."""
    n = number(value)
    if n is None:
        return NOT_AVAILABLE
    return f"{n:.1f} s" if n < 120 else f"{n / 60:.1f} min"


def general(value: object) -> str:
    """Four significant digits: 0.012345 -> "0.01235"."""
    n = number(value)
    return NOT_AVAILABLE if n is None else f"{n:.4g}"


def compact(value: object) -> str:
    """A count with a k/M/G suffix: 1234567 -> "1.23M"."""
    n = number(value)
    if n is None:
        return NOT_AVAILABLE
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:g}"


def fixed(value: object, digits: int) -> str:
    """A number with ``digits`` decimals."""
    n = number(value)
    return NOT_AVAILABLE if n is None else f"{n:.{digits}f}"


def data_uri(draw: Callable[[], bytes]) -> str | None:
    """A PNG data URI of what ``draw`` returns, or None when the data cannot be plotted."""
    try:
        png = draw()
    except Exception:  # noqa: BLE001 - a plot is never worth a failed report
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- the view of a result

def report_view(result: dict, out_dir: Path | None, report: ReportSection) -> dict:
    """Everything the template shows, already made safe to read: plain strings and numbers,
    and the lab's section, markup its own autoescaping template made."""
    result = as_dict(result)
    checks, diagnoses = _checks(result), _diagnoses(result, report)
    failures = _failures(result, report, out_dir=out_dir)
    runs_of = _failed_runs(result, failures, report)
    for failure in failures:
        failure["run_ids"] = runs_of[(failure["notebook"], failure["kind"], failure["message"])]
        failure["runs"] = [report.run_label(r) for r in failure["run_ids"]]
    submission = text(result.get("submission"), 300) or NOT_AVAILABLE
    title = text(getattr(report, "title", ""), 200)
    return {
        "title": f"slimgrade report: {submission}",
        "heading": f"{title}: grading report" if title else "Grading report",
        "nav": [(text(anchor, 100), text(label, 100)) for anchor, label in getattr(report, "nav", ())],
        "submission": submission,
        "profile": text(result.get("profile"), 100) or NOT_AVAILABLE,
        "graded_at": text(result.get("graded_at"), 100) or NOT_AVAILABLE,
        "duration": seconds(result.get("duration_s")),
        "version": text(result.get("slimgrade_version"), 100) or NOT_AVAILABLE,
        "summary": _summary(result, checks, diagnoses, failures, report),
        "stages": _stages(checks, report, failures, _hand(result, checks)),
        "glossary": text(report.glossary),
        "errors": [d for d in diagnoses if d["severity"] == "error"],
        "warnings": [d for d in diagnoses if d["severity"] == "warning"],
        "infos": [d for d in diagnoses if d["severity"] == "info"],
        "profile_changes": _profile_changes(result, report),
        "profile_notes": _profile_notes(result, failures, report, out_dir),
        "section": _section(result, report),
        "runs": _runs(as_dict(result.get("metrics")), out_dir, report),
        "failures": failures,
        "handed_in": _handed_in(result),
        "printed_examples": text(getattr(report, "printed_examples", ""), 200),
        "environment": _environment_rows(result),
    }


def _section(result: dict, report: ReportSection) -> dict:
    """What the lab's section shows, or why it is not there: a lab's bug in reading the
    facts costs its section, never the page."""
    try:
        return {"view": report.section_view(result), "error": ""}
    except Exception as error:  # noqa: BLE001 - the rest of the report is still worth having
        return {"view": None, "error": text(f"{type(error).__name__}: {error}", 500)}


def _checks(result: dict) -> list[dict]:
    checks = []
    for raw in as_list(result.get("checks")):
        raw = as_dict(raw)
        if not raw:
            continue
        status = raw.get("status") if raw.get("status") in STATUSES else "unknown"
        checks.append({
            "id": text(raw.get("id"), 200) or "(no id)",
            "stage": text(raw.get("stage"), 100) or "other",
            "title": text(raw.get("title"), 300),
            "status": status,
            "points": number(raw.get("points")),
            "max_points": number(raw.get("max_points")),
            "message": text(raw.get("message")),
        })
    return checks


def _evidence(raw: object, report: ReportSection) -> tuple[list[dict], int]:
    """[{"run": label or None, "details": [str], "hidden": n}], and how many items were left out."""
    items = as_list(raw)
    shown = []
    for item in items[:EVIDENCE_ITEMS]:
        if isinstance(item, dict):
            details = as_list(item.get("details"))
            if not details and "details" not in item:
                details = [item]
            shown.append({"run": report.run_label(text(item.get("run"), 200)) or "run",
                          "details": [text(d, DETAIL_CHARS) for d in details[:EVIDENCE_DETAILS]],
                          "hidden": max(0, len(details) - EVIDENCE_DETAILS)})
        else:
            shown.append({"run": None, "details": [text(item, DETAIL_CHARS)], "hidden": 0})
    return shown, max(0, len(items) - EVIDENCE_ITEMS)


def _diagnoses(result: dict, report: ReportSection) -> list[dict]:
    diagnoses = []
    for raw in as_list(result.get("diagnoses")):
        raw = as_dict(raw)
        if not raw:
            continue
        evidence, hidden = _evidence(raw.get("evidence"), report)
        diagnoses.append({
            "id": text(raw.get("id"), 200) or "(no id)",
            "stage": text(raw.get("stage"), 100) or "other",
            "severity": raw.get("severity") if raw.get("severity") in SEVERITY_LABELS else "error",
            "message": text(raw.get("message")),
            "hint": text(raw.get("hint")),
            "evidence": evidence,
            "evidence_hidden": hidden,
        })
    return diagnoses


def _profile_changes(result: dict, report: ReportSection) -> dict:
    """The profile, what it changed in the lab's words (its ``profile_summary``, if any), why,
    and the settings of the notebooks it replaced."""
    raw = as_dict(result.get("profile_changes"))
    changes = [{"notebook": text(c.get("notebook"), 300), "name": text(c.get("name"), 100),
                "notebook_value": text(c.get("notebook_value"), 100) or NOT_AVAILABLE,
                "graded_with": text(c.get("graded_with"), 100)}
               for c in map(as_dict, as_list(raw.get("changes")))]
    describe = getattr(report, "profile_summary", None)
    return {"profile": text(raw.get("profile"), 100) or text(result.get("profile"), 100),
            "summary": text(describe(raw), 4 * MESSAGE_CHARS) if callable(describe) else "",
            "why": text(raw.get("why"), 500),
            "changes": changes}


def _failures(result: dict, report: ReportSection, key: str = "failures",
              out_dir: Path | None = None) -> list[dict]:
    """The failures (or the profile notes) in the order of their causes: a notebook that was
    not handed in first, then notebook by notebook in the lab's order (its stages), a cell
    that raised before what it left unwritten. Cells are numbered as Jupyter shows them,
    from 1."""
    order_of = list(report.stages)
    failures = []
    for order, raw in enumerate(as_list(result.get(key))):
        raw = as_dict(raw)
        if not raw:
            continue
        cell = raw.get("cell_index")
        position = cell if isinstance(cell, int) and not isinstance(cell, bool) and cell >= 0 else None
        run_id = text(raw.get("run"), 100)
        counts = _execution_counts(out_dir, run_id)
        tail_text = plain(raw.get("error_tail") if not isinstance(raw.get("error_tail"), (list, tuple))
                          else "\n".join(plain(v) for v in raw.get("error_tail")))
        shown_in = next((n for n, p in counts.items() if p == position), None)
        if shown_in is None and position is not None:
            first = CELL_FRAME.search(tail_text)  # the outermost frame is the failing cell
            shown_in = int(next(g for g in first.groups() if g)) if first else None
        if position is not None and shown_in is not None:
            counts.setdefault(shown_in, position)
        tail, note = _tail(_name_cells(tail_text, counts))
        notebook = text(raw.get("notebook"), 300) or NOT_AVAILABLE
        kind = text(raw.get("kind"), 100) or "unknown"
        stem = notebook.removesuffix(".ipynb")
        failures.append({
            "notebook": notebook,
            "run": run_id,
            "run_label": report.run_label(run_id) if run_id else "",
            "kind": kind,
            "message": text(raw.get("message")),
            "cell": str(position + 1) if position is not None else "",
            "shown_in": str(shown_in) if shown_in is not None and position is not None else "",
            "tail": tail,
            "tail_note": note,
            "explanation": text(raw.get("explanation")),
            "_order": (0 if not run_id and kind == "missing-artifact" else 1,
                       order_of.index(stem) if stem in order_of else len(order_of),
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
        tags = as_list(as_dict(cell.get("metadata")).get("tags"))
        if INJECTED_TAG in tags:
            continue
        count = cell.get("execution_count")
        if isinstance(count, int) and not isinstance(count, bool):
            counts[count] = position
        position += 1
    return counts


def _name_cells(traceback: str, counts: dict[int, int]) -> str:
    """Each "Cell In[16]" of a traceback followed by the cell it is, as the student counts."""
    def name(match: re.Match) -> str:
        count = int(next(g for g in match.groups() if g))
        return (f"{match.group(0)} [your cell {counts[count] + 1}]" if count in counts
                else match.group(0))
    return CELL_FRAME.sub(name, traceback) if counts else traceback


def _tail(value: object) -> tuple[str, str]:
    """An error as the grader kept it (the student's frames, the library frames nearest the
    error, the exception), capped: its first lines and its end, a note when cut."""
    if isinstance(value, (list, tuple)):
        value = "\n".join(plain(v) for v in value)
    shown = plain(value).rstrip()
    lines = shown.splitlines()
    notes = []
    if len(lines) > ERROR_TAIL_LINES:
        left_out = len(lines) - ERROR_TAIL_LINES
        notes.append(f"{left_out} lines in the middle left out")
        lines = (lines[:ERROR_HEAD_LINES] + [f"[... {left_out} lines left out ...]"]
                 + lines[-(ERROR_TAIL_LINES - ERROR_HEAD_LINES):])
    shown = "\n".join(lines)
    if len(shown) > ERROR_TAIL_CHARS:
        notes.append(f"{len(shown) - ERROR_TAIL_CHARS} earlier characters left out")
        shown = shown[-ERROR_TAIL_CHARS:]
    return shown, "; ".join(notes)


def _profile_notes(result: dict, failures: list[dict], report: ReportSection,
                   out_dir: Path | None = None) -> list[dict]:
    """The notes that cost nothing, less any that repeats a counted failure (a notebook that
    failed on its reference input too did not fail "only on the probe")."""
    counted = {(f["notebook"], f["kind"], f["message"]) for f in failures}
    return [n for n in _failures(result, report, "profile_notes", out_dir)
            if (n["notebook"], n["kind"], n["message"]) not in counted]


def _failed_runs(result: dict, failures: list[dict], report: ReportSection) -> dict[tuple, list[str]]:
    """{(notebook, kind, message) of a counted failure: the runs it happened in}. A failure
    is listed once however many runs met it; the runs are counted here, from metrics.runs
    (a run whose failure is a note that costs nothing is not counted)."""
    counted = {(f["notebook"], f["kind"], f["message"]): [] for f in failures}
    noted = {(n["run"], n["message"]) for n in _profile_notes(result, failures, report)}
    for run_id, raw in as_dict(as_dict(result.get("metrics")).get("runs")).items():
        if (text(run_id, 100), text(as_dict(as_dict(raw).get("failure")).get("message"))) in noted:
            continue
        failure = as_dict(as_dict(raw).get("failure"))
        key = (text(failure.get("notebook"), 300) or NOT_AVAILABLE,
               text(failure.get("kind"), 100) or "unknown", text(failure.get("message")))
        if failure and key in counted:
            counted[key].append(text(run_id, 100))
    for f in failures:  # a failure without metrics still names its own run
        key = (f["notebook"], f["kind"], f["message"])
        if not counted[key] and f["run"]:
            counted[key].append(f["run"])
    return counted


def _hand(result: dict, checks: list[dict]) -> dict:
    """The hand grades merged in by ``slimgrade batch`` (hand-grades.csv), checked against
    the report items' maxima: {"points": {id: float}, "total", "max", "comment"}."""
    raw = as_dict(result.get("hand_grades"))
    maxima = {c["id"]: c["max_points"] for c in checks if c["status"] == "skip"}
    given = {}
    for item, value in as_dict(raw.get("points")).items():
        n, item = number(value), text(item, 200)
        if item in maxima and n is not None and 0 <= n <= (maxima[item] or 0.0):
            given[item] = n
    return {"points": given, "total": sum(given.values()) if given else None,
            "max": sum(m or 0.0 for m in maxima.values()) or None,
            "complete": bool(maxima) and set(given) == set(maxima),
            "comment": text(raw.get("comment"), MESSAGE_CHARS)}


def _summary(result: dict, checks: list[dict], diagnoses: list[dict], failures: list[dict],
             report: ReportSection) -> dict:
    counts = {status: sum(c["status"] == status for c in checks) for status in STATUSES}
    score, max_score = number(result.get("score")), number(result.get("max_score"))
    manual = number(result.get("manual_max_points"))
    if manual is None:
        manual = sum(c["max_points"] or 0.0 for c in checks if c["status"] == "skip") or None
    automatic = counts["pass"] + counts["fail"] + counts["error"]
    mistakes = [d["id"] for d in diagnoses if d["severity"] == "error"]
    runs = _failed_runs(result, failures, report)
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
    score_line = (f"Automatic score: {points(score)} / {points(max_score)}"
                  if score is not None or max_score is not None else "Automatic score: not available")
    hand = _hand(result, checks)
    if hand["total"] is not None:
        manual_line = (f"Graded by hand from your written report: {points(hand['total'])} / "
                       f"{points(manual)}{'' if hand['complete'] else ' (some items still pending)'}.")
    else:
        manual_line = (f"Up to {points(manual)} more points are graded by hand from your written "
                       f"report (pending)." if manual else "")
    final = (f"Total: {points(score + hand['total'])} / {points(max_score + manual)}"
             if hand["total"] is not None and score is not None and max_score is not None and manual
             else "")
    first = failures[0] if failures else None
    return {"score": points(score), "max_score": points(max_score), "counts": counts,
            "verdict": verdict, "level": level, "manual": points(manual) if manual else "",
            "score_line": score_line, "manual_line": manual_line, "final_line": final,
            "hand_comment": hand["comment"],
            "failed_runs": failed_runs, "missing_notebooks": missing,
            "first_failure": (f"{first['message']}" if first else ""),
            "percent": (100.0 * score / max_score) if score is not None and max_score else None}


def _stages(checks: list[dict], report: ReportSection, failures: list[dict] | None = None,
            hand: dict | None = None) -> list[dict]:
    """The checks stage by stage, in the lab's order; above each, what stopped its notebook
    first (a notebook not handed in, the first failure of its runs): the cause comes before
    its consequences. A failure is a stage's when it names the notebook ``<stage>.ipynb`` or
    a run whose id starts with ``<stage>-``."""
    known = list(report.stages)
    order = known + sorted({c["stage"] for c in checks} - set(known))
    titles = report.stage_titles
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
                  or any(r.startswith(f"{stage}-") for r in f.get("run_ids") or [f["run"]])]
        cause = ""
        first = causes[0] if causes else None
        if first and not first["run"] and first["kind"] == "missing-artifact":
            cause = f"{first['message']} Every check of this notebook below follows from that."
        elif first and any(c["status"] == "error" for c in automatic):
            cause = (f"First: {first['message']} The checks below marked error could not be "
                     "graded because of it.")
        stages.append({
            "id": stage, "title": titles.get(stage, stage), "checks": rows,
            "points": points(sum(c["points"] or 0.0 for c in automatic)),
            "max_points": points(sum(c["max_points"] or 0.0 for c in automatic)),
            "manual": not automatic, "cause": cause,
            "hand_points": points(sum(hand_points.get(c["id"], 0.0) for c in rows))
            if any(c["id"] in hand_points for c in rows) else "",
        })
    return stages


# ---------------------------------------------------------------- runs, handed-in, environment

SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _runs(metrics: dict, out_dir: Path | None, report: ReportSection) -> list[dict]:
    """The runs of the grading (metrics.runs, as the pipeline summarised each run)."""
    rows = []
    for run_id, raw in as_dict(metrics.get("runs")).items():
        raw = as_dict(raw)
        failure = as_dict(raw.get("failure"))
        status = ("skipped" if raw.get("skipped") else
                  "failed" if raw.get("failed") or failure else "finished")
        link = ""
        if (out_dir is not None and isinstance(run_id, str) and SAFE_RUN_ID.fullmatch(run_id)
                and (out_dir / "notebooks" / f"{run_id}.ipynb").is_file()):
            link = f"notebooks/{run_id}.ipynb"  # relative: a local file next to the report
        rows.append({"id": text(run_id, 100), "label": report.run_label(run_id),
                     "notebook": text(raw.get("notebook"), 300) or NOT_AVAILABLE,
                     "duration": seconds(raw.get("duration_s")),
                     "status": status,
                     "kind": text(failure.get("kind"), 50),
                     "images": len(as_list(raw.get("images"))),
                     "truncated": bool(raw.get("output_truncated")),
                     "link": link})
    return rows


def _handed_in(result: dict) -> list[dict]:
    notebooks = []
    for name, raw in as_dict(result.get("handed_in")).items():
        raw = as_dict(raw)
        printed = [text(line, PRINTED_LINE_CHARS) for line in as_list(raw.get("printed"))]
        hidden = max(0, len(printed) - PRINTED_HEAD - PRINTED_TAIL)
        if hidden:
            printed = (printed[:PRINTED_HEAD] + [f"[... {hidden} line(s) left out ...]"]
                       + printed[-PRINTED_TAIL:])
        notebooks.append({"name": text(name, 100), "found": bool(raw.get("found")),
                          "path": text(raw.get("path"), 500),
                          "unreadable": text(raw.get("unreadable")),
                          "printed": "\n".join(printed),
                          "printed_count": len(as_list(raw.get("printed"))),
                          "hidden": hidden})
    return notebooks


def _environment_rows(result: dict) -> list[tuple[str, str]]:
    env = as_dict(result.get("environment"))
    sandbox = env.get("sandbox")
    rows = [("slimgrade", text(result.get("slimgrade_version"), 100) or NOT_AVAILABLE),
            ("profile", text(result.get("profile"), 100) or NOT_AVAILABLE),
            ("python", text(env.get("python"), 200) or NOT_AVAILABLE),
            ("torch", text(env.get("torch"), 200) or NOT_AVAILABLE),
            ("platform", text(env.get("platform"), 300) or NOT_AVAILABLE),
            ("device", text(env.get("device"), 100) or NOT_AVAILABLE),
            ("sandbox", NOT_AVAILABLE if sandbox is None else "yes" if sandbox else
             "no (the notebooks ran without the sandbox)")]
    known = {"python", "torch", "platform", "device", "sandbox"}
    rows += [(text(k, 100), text(v, 300)) for k, v in env.items() if k not in known]
    return rows
