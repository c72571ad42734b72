"""grader/batch.py: a class at once, resumable and kill-safe, with a gradebook and a summary.

The fast tests put a fake grading function in place of the pipeline. Gradings
run in spawned processes, so the fake lives at module level here (the processes
import it by name) and talks to the test through files named in environment
variables: every call appends a line to SLIMGRADE_FAKE_LOG; the submission named
by SLIMGRADE_FAKE_HANG writes its pid into the FIFO ``<log>.hang-pid`` and then
blocks until it is killed.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import select
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import nbformat
import psutil
import pytest

from grader import batch
from grader.prepare import PrepareError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
RUBRIC = json.loads((ROOT / "labs" / "slimming" / "rubric.json").read_text())
AUTOMATIC = [item for item in RUBRIC["items"] if not item.get("manual")]
MANUAL = [item for item in RUBRIC["items"] if item.get("manual")]
AUTOMATIC_MAX = sum(item["points"] for item in AUTOMATIC)
HOSTILE_MESSAGE = '<script>alert("pwned")</script> & "quoted" <b onmouseover=x>'


# ---------------------------------------------------------------- the fakes (module level: picklable)

def fake_grade(submission_path, out_dir, profile, data_root=None, device=None, workers=2,
               rubric_path=None, cache_root=None, keep_work=False, on_progress=None,
               run_cache=None, threads=None, bundle=None, lab=None) -> dict:
    """Writes a plausible result.json, report.html and notebooks/ in a blink.

    A submission named ``broken*`` raises PrepareError (no notebooks), ``crash*``
    kills its own process, ``mutant*`` gets the bn-copy-bug diagnosis, and a
    ``message.txt`` inside a folder becomes a diagnosis message.
    """
    submission_path, out_dir = Path(submission_path), Path(out_dir)
    name = submission_path.name.removesuffix(".zip")
    log = os.environ.get("SLIMGRADE_FAKE_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{name} {workers} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "notebooks").mkdir(exist_ok=True)
    (out_dir / "notebooks" / "sparsity.ipynb").write_text("{}")
    if name == os.environ.get("SLIMGRADE_FAKE_HANG"):
        Path(f"{log}.hang-pid").write_text(str(os.getpid()))
        threading.Event().wait()  # hang until the batch kills this process
    if name.startswith("broken"):
        raise PrepareError(f"{submission_path} holds none of the lab's notebooks "
                           "(sparsity_train.ipynb, vggprune.ipynb, train_prune_model.ipynb): "
                           "check the folder.")
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    mutant = name.startswith("mutant")
    checks = []
    for item in RUBRIC["items"]:
        manual = bool(item.get("manual"))
        wrong = mutant and item["id"] == "blank-copy-bn-stats"
        checks.append({"id": item["id"], "stage": item["stage"], "title": item["title"],
                       "status": "skip" if manual else "fail" if wrong else "pass",
                       "points": 0.0 if manual or wrong else float(item["points"]),
                       "max_points": float(item["points"]), "message": "fake"})
    diagnoses = []
    if mutant:
        diagnoses.append({"id": "bn-copy-bug", "stage": "vggprune", "severity": "error",
                          "message": "running stats not copied", "evidence": [], "hint": ""})
    note = submission_path / "message.txt"
    if note.is_file():
        diagnoses.append({"id": "student-said", "stage": "vggprune", "severity": "info",
                          "message": note.read_text(), "evidence": [], "hint": ""})
    result = {"submission": name, "score": sum(c["points"] for c in checks if c["status"] != "skip"),
              "max_score": float(AUTOMATIC_MAX), "checks": checks, "diagnoses": diagnoses,
              "failures": [], "metrics": {}, "environment": {}}
    if bundle is not None:
        result["bundle"] = bundle.to_dict()
    (out_dir / "result.json").write_text(json.dumps(result))
    (out_dir / "report.html").write_text("<!DOCTYPE html><title>fake report</title>")
    return result


FAKE_BUNDLE_HASH = "ab" * 32


def fake_reference(profile, cache_root, data_root, device, bundle=None, lab=None):
    from grader.bundles import Bundle

    return Bundle(Path("/nonexistent-bundle"), FAKE_BUNDLE_HASH, "quick", "shipped")


# ---------------------------------------------------------------- helpers

@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The fake grader and bundle in place; returns a function reading the calls so far."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("SLIMGRADE_FAKE_LOG", str(log))
    monkeypatch.delenv("SLIMGRADE_FAKE_HANG", raising=False)
    monkeypatch.setattr(batch, "grade", fake_grade)
    references = []
    monkeypatch.setattr(batch, "ensure_reference",
                        lambda *args: references.append(args) or fake_reference(*args))

    def calls() -> list[str]:
        return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []

    calls.log = log
    calls.references = references
    return calls


def quick_profile():
    from reference.profiles import get_profile

    return get_profile("quick")


def make_folder(path: Path, message: str | None = None) -> Path:
    path.mkdir(parents=True)
    for name in ("sparsity_train", "vggprune", "train_prune_model"):
        (path / f"{name}.ipynb").write_text("{}")
    if message is not None:
        (path / "message.txt").write_text(message)
    return path


def make_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("sparsity_train", "vggprune", "train_prune_model"):
            archive.writestr(f"lab/{name}.ipynb", "{}")
    return path


def make_class(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        make_zip(root / name) if name.endswith(".zip") else make_folder(root / name)
    return root


def read_gradebook(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / "gradebook.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".partial-" in p.name)


def exited(pid: int, timeout: float = 0.0) -> bool:
    """Whether process ``pid`` has ended (a zombie has), waiting up to ``timeout`` seconds."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([handle], [], [], timeout)[0])  # readable once it ends
    finally:
        os.close(handle)


def hanging_pid(fifo: Path, process: subprocess.Popen, timeout: float = 60.0) -> int:
    """The pid the hanging grading writes into ``fifo``; fails if the batch ends first."""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([reader, process.stdout], [], [], timeout)
        assert reader in ready, f"the hanging grading never started: {process.communicate()}"
        return int(os.read(reader, 64))
    finally:
        os.close(reader)


# ---------------------------------------------------------------- the class folder

def test_student_ids_are_safe_folder_names():
    assert batch.student_id("Alice Smith.zip") == "Alice_Smith"
    assert batch.student_id("bob.ZIP") == "bob"
    assert batch.student_id("José") == "José"
    assert batch.student_id("<img src=x onerror=alert(1)>") == "img_src_x_onerror_alert_1"
    assert batch.student_id("..") == "submission"
    assert batch.student_id("-rf") == "rf"
    assert batch.student_id("eve.partial-0123abcd") == "eve_partial-0123abcd"
    assert batch.student_id("gradebook.csv") == "gradebook.csv_"
    assert len(batch.student_id("x" * 500)) == batch.MAX_ID_CHARS


def test_entries_folders_and_zips_only(tmp_path):
    root = make_class(tmp_path / "class", ["alice", "alice.zip", "bob.zip", ".hidden", "__MACOSX"])
    (root / "notes.txt").write_text("not a submission")
    (root / ".DS_Store").write_text("")
    out = root / "graded"
    out.mkdir()
    entries = batch.find_submissions(root, out)
    assert [(e.id, e.path.name) for e in entries] == [
        ("alice", "alice"), ("alice-2", "alice.zip"), ("bob", "bob.zip")]


# ---------------------------------------------------------------- a class of four

def test_four_submissions_one_broken(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "mutant-carl", "bob.zip", "broken"])
    (root / ".ipynb_checkpoints").mkdir()
    out = tmp_path / "out"
    rows = batch.grade_class(root, out, quick_profile(), workers=2)

    assert [r["student_id"] for r in rows] == ["alice", "bob", "broken", "mutant-carl"]
    assert sorted(fake()) == ["alice", "bob", "broken", "mutant-carl"]
    assert len(fake.references) == 1
    columns, book = read_gradebook(out)
    assert columns == (["student_id"] + [item["id"] for item in RUBRIC["items"]]
                       + ["total", "max_total", "hand_total", "final", "final_max", "status",
                          "failures", "diagnoses", "comment", "duration_s", "report", "bundle"])
    by_id = {row["student_id"]: row for row in book}
    # One bundle for the whole batch: every grading, and the failed one, names its hash.
    assert {row["bundle"] for row in book} == {FAKE_BUNDLE_HASH}
    assert set(by_id) == {"alice", "bob", "broken", "mutant-carl"}
    assert by_id["alice"]["total"] == f"{AUTOMATIC_MAX:g}"
    assert by_id["alice"]["blank-lambda"] == "5"
    assert all(by_id["alice"][item["id"]] == "" for item in MANUAL)
    assert by_id["alice"]["failures"] == "" and by_id["alice"]["report"] == "alice/report.html"
    assert by_id["mutant-carl"]["diagnoses"] == "bn-copy-bug"
    assert by_id["mutant-carl"]["blank-copy-bn-stats"] == "0"

    assert by_id["alice"]["status"] == "graded" and by_id["alice"]["final"] == f"{AUTOMATIC_MAX:g}"
    assert by_id["alice"]["final_max"] == f"{AUTOMATIC_MAX + sum(i['points'] for i in MANUAL):g}"
    broken = by_id["broken"]
    assert broken["status"] == "not graded"
    assert broken["total"] == "0" and broken["max_total"] == f"{AUTOMATIC_MAX:g}"
    assert broken["failures"] == "submission:exception"
    assert broken["report"] == "broken/report.html"
    result = json.loads((out / "broken" / "result.json").read_text())
    assert result["score"] == 0 and result["max_score"] == AUTOMATIC_MAX
    [failure] = result["failures"]
    assert failure["kind"] == "exception"
    assert "holds none of the lab's notebooks" in failure["message"]
    assert "\n" not in failure["message"] and failure["message"].endswith(".")
    assert {c["status"] for c in result["checks"]} == {"error", "skip"}
    assert (out / "broken" / "report.html").is_file()

    for sid in ("alice", "bob", "broken", "mutant-carl"):
        assert (out / sid / "result.json").is_file() and (out / sid / "notebooks").is_dir()
    assert partials(out) == []
    summary = (out / "summary.html").read_text()
    assert 'href="alice/report.html"' in summary and "bn-copy-bug" in summary
    assert "data:image/png;base64," in summary


def test_grading_workers_share_two_cores(tmp_path, fake):
    root = make_class(tmp_path / "class", ["a", "b"])
    batch.grade_class(root, tmp_path / "one", quick_profile(), workers=1)
    assert {line.split()[1] for line in fake.log.read_text().splitlines()} == {"2"}
    fake.log.unlink()
    batch.grade_class(root, tmp_path / "two", quick_profile(), workers=2)
    assert {line.split()[1] for line in fake.log.read_text().splitlines()} == {"1"}


def test_each_grading_process_gets_its_share_of_the_gpus(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(batch, "gpu_shares", lambda device, workers: ["0,2", "1,3"][:workers])
    root = make_class(tmp_path / "class", ["a", "b", "c", "d"])
    batch.grade_class(root, tmp_path / "out", quick_profile(), workers=2)
    shares = [line.split()[2] for line in fake.log.read_text().splitlines()]
    assert len(shares) == 4 and set(shares) == {"0,2", "1,3"}
    assert shares[0] != shares[1]  # the first two run together


def test_gpu_shares_leave_an_explicit_device_alone():
    assert batch.gpu_shares("cuda:1", 3) == [None, None, None]
    assert batch.gpu_shares("cpu", 2) == [None, None]


def test_a_grading_process_that_dies_is_a_failure_row(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "crash"])
    out = tmp_path / "out"
    rows = batch.grade_class(root, out, quick_profile())
    assert [r["student_id"] for r in rows] == ["alice", "crash"]
    assert rows[1]["failures"] == "submission:exception" and rows[1]["total"] == 0
    [failure] = json.loads((out / "crash" / "result.json").read_text())["failures"]
    assert "SIGKILL" in failure["message"]
    assert partials(out) == []


def test_a_process_that_cannot_start_records_nothing(tmp_path, fake, monkeypatch):
    # A function the grading processes cannot import (it exists only in this process):
    # a harness problem, so no student gets a failure result for it.
    def ghost_grade(*args, **kwargs):
        return fake_grade(*args, **kwargs)

    ghost_grade.__qualname__ = ghost_grade.__name__ = "ghost_grade"
    monkeypatch.setattr(sys.modules[__name__], "ghost_grade", ghost_grade, raising=False)
    monkeypatch.setattr(batch, "grade", ghost_grade)
    root = make_class(tmp_path / "class", ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="ended before grading started"):
        batch.grade_class(root, out, quick_profile(), workers=2)
    assert not batch.is_finished(out, "a") and not batch.is_finished(out, "b")
    assert partials(out) == [] and read_gradebook(out)[1] == []

    monkeypatch.setattr(batch, "grade", fake_grade)
    assert len(batch.grade_class(root, out, quick_profile(), workers=2)) == 2
    assert sorted(fake()) == ["a", "b"]


# ---------------------------------------------------------------- resume

def test_rerun_grades_nothing_twice_and_force_grades_again(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "bob.zip", "broken"])
    out = tmp_path / "out"
    first = batch.grade_class(root, out, quick_profile(), workers=2)
    assert len(fake()) == 3

    again = batch.grade_class(root, out, quick_profile(), workers=2)
    assert len(fake()) == 3, "a finished submission was graded again"
    assert again == first
    assert len(fake.references) == 1, "the bundle is not needed when nothing is left to grade"

    make_folder(root / "dora")
    shutil.rmtree(out / "bob")
    batch.grade_class(root, out, quick_profile(), workers=2)
    assert sorted(fake()[3:]) == ["bob", "dora"]

    batch.grade_class(root, out, quick_profile(), workers=2, force=True)
    assert sorted(fake()[5:]) == ["alice", "bob", "broken", "dora"]
    assert len(read_gradebook(out)[1]) == 4
    assert partials(out) == []


def test_stale_partial_folders_are_removed_and_not_finished(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice"])
    out = tmp_path / "out"
    stale = out / "alice.partial-0123abcd"
    stale.mkdir(parents=True)
    (stale / "result.json").write_text('{"score": 99}')
    (out / ".gradebook.csv.89abcdef.tmp").write_text("half")
    rows = batch.grade_class(root, out, quick_profile())
    assert fake() == ["alice"]
    assert rows[0]["total"] == AUTOMATIC_MAX
    assert partials(out) == [] and not (out / ".gradebook.csv.89abcdef.tmp").exists()


KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_batch
from grader import batch
from reference.profiles import get_profile
batch.grade = test_batch.fake_grade
batch.ensure_reference = test_batch.fake_reference
try:
    batch.grade_class(Path({root!r}), Path({out!r}), get_profile("quick"), workers=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def start_batch(root: Path, out: Path, log: Path, hang: str) -> subprocess.Popen:
    """The batch in a process of its own; the grading of ``hang`` will block in it."""
    os.mkfifo(f"{log}.hang-pid")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLIMGRADE_FAKE_LOG": str(log),
           "SLIMGRADE_FAKE_HANG": hang}
    script = KILL_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root), out=str(out))
    return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume(tmp_path, fake):
    root = make_class(tmp_path / "class", ["a", "b", "c", "d.zip"])
    out = tmp_path / "out"
    log = tmp_path / "killed.log"
    process = start_batch(root, out, log, hang="c")
    try:
        grading_pid = hanging_pid(Path(f"{log}.hang-pid"), process)  # the third grading started
        assert process.poll() is None, process.communicate()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert exited(grading_pid, timeout=15), "the orphaned grading process did not end"

    assert [line.split()[0] for line in log.read_text().splitlines()] == ["a", "b", "c"]
    for sid in ("a", "b"):
        assert batch.is_finished(out, sid) and (out / sid / "report.html").is_file()
    assert not (out / "c").exists() and not (out / "d").exists()
    [half] = partials(out)
    assert half.startswith("c.partial-") and (out / half / "notebooks").is_dir()
    assert not batch.is_finished(out, "c")
    assert [row["student_id"] for row in read_gradebook(out)[1]] == ["a", "b"]

    rows = batch.grade_class(root, out, quick_profile())
    assert sorted(fake()) == ["c", "d"], "only the unfinished submissions are graded again"
    assert [row["student_id"] for row in rows] == ["a", "b", "c", "d"]
    assert partials(out) == []
    assert [row["student_id"] for row in read_gradebook(out)[1]] == ["a", "b", "c", "d"]


def test_sigterm_stops_cleanly_and_keeps_what_is_finished(tmp_path):
    root = make_class(tmp_path / "class", ["a", "b", "c"])
    out = tmp_path / "out"
    log = tmp_path / "stopped.log"
    process = start_batch(root, out, log, hang="b")
    try:
        grading_pid = hanging_pid(Path(f"{log}.hang-pid"), process)  # the second grading started
        os.kill(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    assert exited(grading_pid)
    assert batch.is_finished(out, "a")
    assert not (out / "b").exists() and not (out / "c").exists()
    assert partials(out) == [], "the interrupted grading's partial folder is removed"
    assert [row["student_id"] for row in read_gradebook(out)[1]] == ["a"]
    assert "c" in (out / "summary.html").read_text()  # listed as not graded yet


def test_a_grading_past_its_deadline_is_a_timeout_and_the_batch_goes_on(tmp_path, fake,
                                                                         monkeypatch):
    root = make_class(tmp_path / "class", ["a", "b", "c"])
    out = tmp_path / "out"
    monkeypatch.setenv("SLIMGRADE_FAKE_HANG", "b")  # b blocks until it is stopped
    monkeypatch.setattr(batch, "grading_deadline_s", lambda profile, workers, lab=None: 3.0)
    rows = batch.grade_class(root, out, quick_profile(), workers=1)
    assert [row["student_id"] for row in rows] == ["a", "b", "c"]
    assert [row["failures"] for row in rows] == ["", "submission:timeout", ""]
    result = json.loads((out / "b" / "result.json").read_text())
    assert result["score"] == 0
    assert "longer than 3 s" in result["failures"][0]["message"]
    assert partials(out) == []


def test_the_deadline_allows_every_run_its_whole_budget():
    profile = quick_profile()
    runs = 2 * len(profile.prune_ratios) + 6
    assert batch.grading_deadline_s(profile, 1) > runs * profile.run_timeout_s
    assert batch.grading_deadline_s(profile, 2) < batch.grading_deadline_s(profile, 1)


# ---------------------------------------------------------------- summary.html

def test_summary_escapes_hostile_ids_and_messages(tmp_path, fake):
    root = tmp_path / "class"
    root.mkdir()
    make_folder(root / '<img src=x onerror=alert(1)>"', message=HOSTILE_MESSAGE)
    make_folder(root / "alice")
    out = tmp_path / "out"
    rows = batch.grade_class(root, out, quick_profile())
    assert {r["student_id"] for r in rows} == {"alice", "img_src_x_onerror_alert_1"}
    summary = (out / "summary.html").read_text()
    assert "<script" not in summary and "<img src=x" not in summary and "<b onmouseover" not in summary
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in summary
    assert "&lt;img src=x onerror=alert(1)&gt;&#34;" in summary  # the name as handed in

    # The template escapes by itself, whatever the id cleaning lets through.
    hostile_id = '"><script>alert(1)</script>'
    book = batch.Gradebook(out, [batch.Entry(hostile_id, root / "alice")], RUBRIC, "<i>class</i>", "quick")
    book.results[hostile_id] = {"score": 1, "max_score": 2, "checks": [],
                                "diagnoses": [{"id": "<x-id>", "message": HOSTILE_MESSAGE}],
                                "failures": [{"notebook": "<nb>", "kind": "<k>", "message": HOSTILE_MESSAGE}]}
    page = batch.summary_html(book.view())
    assert "<script" not in page and "<i>class</i>" not in page and "<x-id>" not in page
    assert "<nb>" not in page and "<k>" not in page and "<b onmouseover" not in page
    assert "&lt;x-id&gt;" in page and "&#34;&gt;&lt;script&gt;" in page


def test_gradebook_cells_never_start_a_formula():
    assert batch._csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert batch._csv_cell(2.5) == "2.5" and batch._csv_cell(None) == ""


def test_a_missing_class_folder_is_a_usage_error(tmp_path):
    with pytest.raises(PrepareError, match="is not a folder"):
        batch.grade_class(tmp_path / "nope", tmp_path / "out", quick_profile())


# ---------------------------------------------------------------- the real pipeline

@pytest.mark.slow
def test_real_batch_on_fixtures(tmp_path, run_cache):
    sources = [FIXTURES / "solution", FIXTURES / "no-running-stats", FIXTURES / "forges-result",
               FIXTURES / "pickle-bomb", FIXTURES / "reads-outside"]
    root = tmp_path / "class"
    root.mkdir()
    for source in sources:
        shutil.copytree(source, root / source.name)
    out = tmp_path / "out"
    rows = batch.grade_class(root, out, quick_profile(), workers=2, run_cache=run_cache)

    assert [row["student_id"] for row in rows] == sorted(p.name for p in sources)
    for row, source in zip(rows, sorted(sources)):
        expected = json.loads((source / "expected.json").read_text())
        failures = set(filter(None, row["failures"].split(";")))
        assert failures == {f"{f['notebook']}:{f['kind']}" for f in expected["failures"]}, row
        assert set(expected["diagnoses"]) <= set(filter(None, row["diagnoses"].split(";"))), row
        low, high = expected["score_band"]
        assert low <= row["total"] <= high, row
        assert (out / row["report"]).is_file()
    assert len(read_gradebook(out)[1]) == len(sources)
    from grader.bundles import recorded_hash
    from labs.slimming.lab import shipped_bundle_dir
    assert {row["bundle"] for row in rows} == {recorded_hash(shipped_bundle_dir("quick"))}
    # The forged result.json / report.html stayed inside the student's own work dir.
    assert json.loads((out / "forges-result" / "result.json").read_text())["submission"] == "forges-result"
    assert not list(tmp_path.glob("result.json")) and not (root / "result.json").exists()
    assert (out / "summary.html").is_file() and partials(out) == []


BLOCKING_CELL = """
with open({fifo!r}, "w") as handle:  # tells the test the kernel runs this cell
    handle.write("started")
import threading
threading.Event().wait()
"""


@pytest.mark.slow
def test_sigterm_during_grade_shuts_the_kernels_down_and_removes_the_work_root(tmp_path):
    shared = tmp_path / "shared"  # the data root, so the sandboxed kernels see the FIFO
    shared.mkdir(mode=0o755)
    fifo = shared / "started"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    submission = tmp_path / "lab"
    submission.mkdir()
    for name in ("sparsity_train", "vggprune", "train_prune_model"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(BLOCKING_CELL.format(fifo=str(fifo)))]
        nbformat.write(nb, submission / f"{name}.ipynb")
    scratch = tmp_path / "tmp"  # the grading's TMPDIR: where its work root goes
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    process = subprocess.Popen(
        [sys.executable, "-m", "grader.cli", "grade", str(submission), "--out",
         str(tmp_path / "out"), "--data-root", str(shared), "--workers", "2"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([reader, process.stdout], [], [], 600)
        assert reader in ready, f"no kernel reached the blocking cell: {process.communicate()}"
        assert [p.name for p in scratch.iterdir() if p.name.startswith("slimgrade-")]
        descendants = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        assert descendants
        os.kill(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        os.close(reader)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    for pid in descendants:
        assert exited(pid, timeout=30), f"process {pid} outlived the grading"
    assert [p.name for p in scratch.iterdir() if p.name.startswith("slimgrade-")] == []


# ---------------------------------------------------------------- hand-ins without notebooks, --only, --exclude

def test_a_folder_without_notebooks_is_no_submission_not_a_zero(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice"])
    (root / "ghost").mkdir()
    (root / "ghost" / "report.pdf").write_text("no notebooks here")
    with zipfile.ZipFile(root / "hollow.zip", "w") as archive:
        archive.writestr("hollow/readme.txt", "nothing")
    out = tmp_path / "out"
    rows = batch.grade_class(root, out, quick_profile())
    assert fake() == ["alice"], "a hand-in without notebooks is not graded"
    by_id = {row["student_id"]: row for row in rows}
    for sid in ("ghost", "hollow"):
        assert by_id[sid]["status"] == "no submission"
        assert by_id[sid]["total"] is None and by_id[sid]["final"] is None
        assert not (out / sid).exists()
    book = {row["student_id"]: row for row in read_gradebook(out)[1]}
    assert book["ghost"]["total"] == "" and book["ghost"]["status"] == "no submission"
    summary = (out / "summary.html").read_text()
    assert "no submission" in summary and "ghost" in summary
    lms = list(csv.DictReader(open(out / "canvas-grades.csv", encoding="utf-8")))
    assert {r["student_id"]: r["score"] for r in lms}["ghost"] == ""
    assert batch.batch_summary(rows, out).count("without a submission (ghost, hollow)") == 1


def test_only_regrades_the_named_hand_ins_and_keeps_the_others(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "bob.zip", "carl"])
    out = tmp_path / "out"
    batch.grade_class(root, out, quick_profile())
    assert sorted(fake()) == ["alice", "bob", "carl"]
    rows = batch.grade_class(root, out, quick_profile(), only=["bob.zip", "CARL"])
    assert sorted(fake()[3:]) == ["bob", "carl"], "--only grades the named ones again"
    assert [row["student_id"] for row in rows] == ["alice", "bob", "carl"]
    with pytest.raises(batch.BatchError, match="--only names zed"):
        batch.grade_class(root, out, quick_profile(), only=["zed"])


def test_exclude_leaves_hand_ins_out(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "TA-test", "ta-demo.zip", "bob"])
    out = tmp_path / "out"
    rows = batch.grade_class(root, out, quick_profile(), exclude=["ta-*"])
    assert sorted(fake()) == ["alice", "bob"]
    assert [row["student_id"] for row in rows] == ["alice", "bob"]
    with pytest.raises(batch.BatchError, match="leaves out every hand-in"):
        batch.grade_class(root, out, quick_profile(), exclude=["*"])


# ---------------------------------------------------------------- hand grades

def test_hand_grades_survive_reruns_and_reach_the_gradebook_and_the_report(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "bob"])
    out = tmp_path / "out"
    batch.grade_class(root, out, quick_profile())
    hand = out / "hand-grades.csv"
    header, *rows = list(csv.reader(open(hand, encoding="utf-8")))
    assert header == ["student_id", *(item["id"] for item in MANUAL), "comment"]
    assert rows == [["alice"] + [""] * (len(header) - 1), ["bob"] + [""] * (len(header) - 1)]

    # The TA types marks in a spreadsheet that saves with ';' and decimal commas.
    first, second = MANUAL[0]["id"], MANUAL[1]["id"]
    typed = (";".join(header) + "\n"
             + ";".join(["alice", "7,5", "8"] + [""] * (len(header) - 4) + ["Clear plots."]) + "\n"
             + ";".join(["bob", "ten", "99"] + [""] * (len(header) - 3)) + "\n")
    hand.write_text(typed, encoding="utf-8")
    make_folder(root / "carl")
    batch.grade_class(root, out, quick_profile(), force=True)

    text = hand.read_text(encoding="utf-8")
    assert text.startswith(typed), "hand-grades.csv is never rewritten"
    assert text[len(typed):].startswith("carl;"), "a new student gets a row appended"
    book = {row["student_id"]: row for row in read_gradebook(out)[1]}
    alice = book["alice"]
    assert alice[first] == "7.5" and alice[second] == "8" and alice["hand_total"] == "15.5"
    assert alice["final"] == f"{AUTOMATIC_MAX + 15.5:g}" and alice["comment"] == "Clear plots."
    assert book["bob"][first] == "" and book["bob"]["hand_total"] == ""  # bad cells left out
    summary = (out / "summary.html").read_text()
    assert "line 3 (bob)" in summary and "&#39;ten&#39;" in summary and "&#39;99&#39;" in summary
    report = (out / "alice" / "report.html").read_text()
    assert "Graded by hand from your written report: 15.5 / 40" in report
    assert "Clear plots." in report and "7.5 / 8" in report
    lms = {r["student_id"]: r for r in csv.DictReader(open(out / "canvas-grades.csv", encoding="utf-8"))}
    assert lms["alice"]["score"] == f"{AUTOMATIC_MAX + 15.5:g}"
    assert lms["alice"]["max_score"] == f"{AUTOMATIC_MAX + 40:g}"
    assert "Clear plots." in lms["alice"]["comment"] and "Report: alice/report.html" in lms["alice"]["comment"]
    assert "not graded yet" in lms["bob"]["comment"]

    # A later batch that grades nothing leaves the report alone (nothing changed) ...
    stamp = (out / "alice" / ".hand-grades.json").stat().st_mtime_ns
    batch.grade_class(root, out, quick_profile())
    assert (out / "alice" / ".hand-grades.json").stat().st_mtime_ns == stamp
    # ... and a changed mark reaches the report on the next run.
    hand.write_text(text.replace("7,5", "6"), encoding="utf-8")
    batch.grade_class(root, out, quick_profile())
    assert "Graded by hand from your written report: 14 / 40" in (out / "alice" / "report.html").read_text()


def test_a_hand_grades_file_without_student_id_is_named_not_used(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "hand-grades.csv").write_text("name,report-problems\nalice,8\n")
    rows = batch.grade_class(root, out, quick_profile())
    assert rows[0]["hand_total"] is None
    assert (out / "hand-grades.csv").read_text() == "name,report-problems\nalice,8\n"
    assert "must start with a student_id column" in (out / "summary.html").read_text()


# ---------------------------------------------------------------- progress

def test_batch_prints_a_timestamped_line_per_finished_hand_in(tmp_path, fake):
    root = make_class(tmp_path / "class", ["alice", "mutant-bob", "broken"])
    stream = io.StringIO()
    batch.grade_class(root, tmp_path / "out", quick_profile(), stream=stream)
    lines = stream.getvalue().splitlines()
    stamped = [line for line in lines if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d batch: \[\d/3", line)]
    assert len(stamped) == 3, lines
    text = "\n".join(stamped)
    assert f"alice: {AUTOMATIC_MAX:g}/{AUTOMATIC_MAX:g}" in text
    assert f"mutant-bob: {AUTOMATIC_MAX - 5:g}/{AUTOMATIC_MAX:g}" in text
    assert "broken: not graded" in text and "holds none of the lab's notebooks" in text
    stream = io.StringIO()
    batch.grade_class(root, tmp_path / "out", quick_profile(), stream=stream)
    assert "nothing to grade: 3 hand-in(s) already graded" in stream.getvalue()


# ---------------------------------------------------------------- summary.html for a TA

def synthetic_book(tmp_path, results: dict) -> batch.Gradebook:
    entries = [batch.Entry(sid, tmp_path / sid) for sid in results]
    book = batch.Gradebook(tmp_path, entries, RUBRIC, "class", "quick")
    book.results.update(results)
    return book


def result_with(failures=(), notes=(), diagnoses=(), lam="pass", duration=90.0) -> dict:
    checks = [{"id": "blank-lambda", "status": lam, "points": 5.0 if lam == "pass" else 0.0},
              {"id": "prune-0.9", "status": "pass", "points": 10.0}]
    return {"score": 15.0, "max_score": 60.0, "checks": checks, "failures": list(failures),
            "profile_notes": list(notes), "diagnoses": list(diagnoses), "duration_s": duration}


CELL_FAILURE = {"notebook": "vggprune.ipynb", "run": "prune-0.9", "kind": "exception", "cell_index": 23,
                "message": "vggprune.ipynb: cell 24 raised IndexError: index 5 is out of bounds."}


def test_summary_flags_a_failure_most_of_the_class_shares(tmp_path):
    other = {**CELL_FAILURE, "cell_index": 3, "message": "vggprune.ipynb: cell 4 raised NameError: x."}
    book = synthetic_book(tmp_path, {"a": result_with([CELL_FAILURE]), "b": result_with([CELL_FAILURE]),
                                     "c": result_with([CELL_FAILURE, other], lam="fail")})
    view = book.view()
    [shared, single] = view["failure_groups"]
    assert shared["students"] == ["a", "b", "c"] and shared["suspect"] and shared["cell"] == "24"
    assert single["students"] == ["c"] and not single["suspect"]
    assert view["suspects"] == 1
    rates = {c["id"]: c for c in view["checks"]}
    assert rates["blank-lambda"]["pass"] == 2 and rates["blank-lambda"]["fail"] == 1
    assert rates["blank-lambda"]["rate"] == "67 %" and rates["prune-0.9"]["rate"] == "100 %"
    page = batch.summary_html(view)
    assert page.count('<span class="flag">likely a grading problem</span>') == 1
    assert "67 %" in page and "vggprune.ipynb, cell 24" in page


def test_summary_does_not_flag_a_failure_of_one_student_in_three(tmp_path):
    book = synthetic_book(tmp_path, {"a": result_with([CELL_FAILURE]), "b": result_with(),
                                     "c": result_with()})
    [group] = book.view()["failure_groups"]
    assert not group["suspect"]
    assert "<span class=\"flag\">likely a grading problem" not in batch.summary_html(book.view())


def test_summary_separates_notes_from_mistakes_and_shows_time(tmp_path):
    mistake = {"id": "bn-copy-bug", "severity": "error", "message": "stats not copied"}
    info = {"id": "bn-statistics-shift", "severity": "info", "message": "not your fault"}
    note = {"notebook": "sparsity_train.ipynb", "cell_index": 8, "cause": "profile",
            "message": "cell 9 raised ValueError.", "explanation": "range(120) while EPOCHS is 12."}
    book = synthetic_book(tmp_path, {"a": result_with(diagnoses=[mistake, info], notes=[note], duration=150.0),
                                     "b": result_with(diagnoses=[info], duration=30.0)})
    view = book.view()
    assert [d["id"] for d in view["diagnoses"]] == ["bn-copy-bug"]
    assert [d["id"] for d in view["notes"]] == ["bn-statistics-shift"]
    assert view["note_groups"][0]["cell"] == "9" and view["note_groups"][0]["students"] == ["a"]
    assert view["time_mean"] == "1 min 30 s" and view["time_total"] == "3 min 00 s"
    assert [s["time"] for s in view["students"]] == ["2 min 30 s", "30 s"]
    page = batch.summary_html(view)
    mistakes, notes = page.index('id="diagnoses"'), page.index('id="notes"')
    assert mistakes < page.index("bn-copy-bug") < notes < page.index("not counted: sparsity_train.ipynb, cell 9")
