"""grader.cli: usage checked while parsing (exit 2 with one sentence), --version, --debug
anywhere, a student's bad hand-in graded rather than refused, progress and summaries.

Every case of issue 11's table is here; none runs a notebook: the CLI's main() is called
in-process and stops before any grading, or the grading is replaced by a fake.
"""
from __future__ import annotations

import html
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

from grader import cli
from grader.prepare import several_submissions
from labs.slimming.lab import NOTEBOOKS
from grader.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
RUBRIC = ROOT / "labs" / "slimming" / "rubric.json"
LAB = ("sparsity_train", "vggprune", "train_prune_model")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", re.MULTILINE)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def lab_folder(path: Path, notebooks=LAB) -> Path:
    path.mkdir(parents=True)
    for name in notebooks:
        (path / f"{name}.ipynb").write_text("{}")
    return path


def usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def submission(tmp_path) -> Path:
    return lab_folder(tmp_path / "alice")


@pytest.fixture
def no_grading(monkeypatch):
    """Fails the test if a command starts: every case here must stop while parsing."""
    def started(args):
        raise AssertionError(f"{args.command} started")

    for command in list(cli.COMMANDS):
        monkeypatch.setitem(cli.COMMANDS, command, started)


# ---------------------------------------------------------------- --version and --debug

def test_version(capsys):
    from grader import __version__

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"slimgrade {__version__}"


@pytest.mark.parametrize("argv", [["--debug", "grade", "x"], ["grade", "x", "--debug"],
                                  ["grade", "--debug", "x"], ["batch", "x", "--out", "o", "--debug"]])
def test_debug_is_accepted_anywhere(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    assert cli.build_parser().parse_args(argv).debug is True


def test_debug_defaults_off_and_shows_the_traceback_of_a_harness_error(submission, capsys, monkeypatch):
    assert cli.build_parser().parse_args(["grade", str(submission)]).debug is False

    def broken(args):
        raise RuntimeError("the harness broke")

    monkeypatch.setitem(cli.COMMANDS, "grade", broken)
    code, _, err = run(["grade", submission], capsys)
    assert code == 1 and "internal error" in err and "the harness broke" in err
    with pytest.raises(RuntimeError, match="the harness broke"):
        cli.main(["grade", str(submission), "--debug"])


# ---------------------------------------------------------------- --rubric

def test_a_missing_rubric_is_a_usage_error(submission, tmp_path, capsys, no_grading):
    code, _, err = run(["grade", submission, "--rubric", tmp_path / "nope.json"], capsys)
    usage_error(code, err, "--rubric", "nope.json does not exist")


def test_a_folder_as_rubric_is_a_usage_error(submission, tmp_path, capsys, no_grading):
    code, _, err = run(["grade", submission, "--rubric", tmp_path], capsys)
    usage_error(code, err, "is not a file")


@pytest.mark.parametrize("text, said", [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    ('{"name": "x"}', 'no "items" list'),
    ('{"items": []}', 'no "items" list'),
    ('{"items": [{"id": "blank-lambda"}]}', '"points"'),
    ('{"items": [{"id": "made-up", "points": 5, "stage": "x", "title": "x"}]}',
     "no automatic check is called made-up"),
    ('{"items": [{"id": "blank-lambda", "points": 5, "stage": "x", "title": "x"}]}', "lambda_range"),
])
def test_a_rubric_that_cannot_be_used_is_a_usage_error(text, said, submission, tmp_path, capsys,
                                                       no_grading):
    rubric = tmp_path / "rubric.json"
    rubric.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run(["grade", submission, "--rubric", rubric], capsys)
    usage_error(code, err, said)
    code, _, err = run(["batch", submission.parent, "--out", tmp_path / "out", "--rubric", rubric], capsys)
    usage_error(code, err, said)


def test_the_course_rubric_and_a_manual_item_are_accepted(tmp_path):
    assert cli.rubric_file(str(RUBRIC)) == RUBRIC
    rubric = json.loads(RUBRIC.read_text())
    rubric["items"].append({"id": "extra-oral", "stage": "report", "points": 5, "manual": True,
                            "title": "Oral"})
    path = tmp_path / "rubric.json"
    path.write_text(json.dumps(rubric))
    assert cli.rubric_file(str(path)) == path


# ---------------------------------------------------------------- --device

def test_an_unknown_device_lists_the_devices_found(submission, capsys, no_grading):
    code, _, err = run(["grade", submission, "--device", "gpu"], capsys)
    usage_error(code, err, "'gpu' is not a device", "found here:", "cpu")


def test_cuda_without_a_gpu_is_a_usage_error(submission, capsys, no_grading):
    import torch

    if torch.cuda.is_available():
        code, _, err = run(["grade", submission, "--device", f"cuda:{torch.cuda.device_count()}"], capsys)
        usage_error(code, err, "there is no cuda:", "found here:")
        return
    for asked in ("cuda", "cuda:0"):
        code, _, err = run(["grade", submission, "--device", asked], capsys)
        usage_error(code, err, "no CUDA GPU", "--device cpu")


def test_cpu_is_a_device():
    assert cli.device("CPU") == "cpu"


# ---------------------------------------------------------------- --workers

@pytest.mark.parametrize("workers, said", [("0", "0 is too small"), ("-1", "-1 is too small"),
                                           ("two", "'two' is not a whole number")])
def test_workers_below_one_are_usage_errors(workers, said, submission, tmp_path, capsys, no_grading):
    # -1 used to hang (the scheduler waited for a free slot that never came): now it stops here.
    code, _, err = run(["grade", submission, "--workers", workers], capsys)
    usage_error(code, err, "--workers", said)
    code, _, err = run(["batch", submission.parent, "--out", tmp_path / "o", "--workers", workers], capsys)
    usage_error(code, err, "--workers", said)


# ---------------------------------------------------------------- paths

def test_a_missing_path_is_a_usage_error(tmp_path, capsys, no_grading):
    code, _, err = run(["grade", tmp_path / "nobody"], capsys)
    usage_error(code, err, "nobody does not exist")
    code, _, err = run(["batch", tmp_path / "nobody", "--out", tmp_path / "o"], capsys)
    usage_error(code, err, "nobody does not exist")


def test_out_that_is_a_file_is_a_usage_error(submission, tmp_path, capsys, no_grading):
    (tmp_path / "taken").write_text("")
    code, _, err = run(["grade", submission, "--out", tmp_path / "taken"], capsys)
    usage_error(code, err, "is a file, not a folder")


def test_a_data_root_that_is_not_there_is_a_usage_error(submission, tmp_path, capsys, no_grading):
    code, _, err = run(["grade", submission, "--data-root", tmp_path / "cifar"], capsys)
    usage_error(code, err, "--data-root", "does not exist")
    code, _, err = run(["grade", submission, "--profile", "full"], capsys)
    usage_error(code, err, "give --data-root")
    code, _, err = run(["grade", submission, "--profile", "full", "--data-root", tmp_path], capsys)
    usage_error(code, err, "holds no CIFAR-10 python batches")


# ---------------------------------------------------------------- a class where one hand-in is expected

def test_grade_on_a_class_folder_refuses_and_names_the_students(tmp_path, capsys, no_grading):
    root = tmp_path / "class"
    lab_folder(root / "alice")
    lab_folder(root / "bob" / "lab4")  # notebooks one folder down: still bob's hand-in
    with zipfile.ZipFile(root / "carl.zip", "w") as archive:
        for name in LAB:
            archive.writestr(f"carl/{name}.ipynb", "{}")
    (root / "notes").mkdir()  # no notebook: not a student
    for command in ("grade", "check"):
        code, _, err = run([command, root], capsys)
        usage_error(code, err, "3 students", "alice, bob, carl.zip", "slimgrade batch")


def test_one_hand_in_in_sub_folders_is_not_a_class(tmp_path):
    split = tmp_path / "dora"  # one notebook per sub-folder: one student's hand-in
    lab_folder(split / "part1", ["sparsity_train"])
    lab_folder(split / "part2", ["vggprune"])
    lab_folder(split / "part3", ["train_prune_model"])
    assert several_submissions(split, NOTEBOOKS) == []
    nested = tmp_path / "eve"
    lab_folder(nested / "Colab Notebooks" / "lab4")
    (nested / "models").mkdir()
    assert several_submissions(nested, NOTEBOOKS) == []
    flat = lab_folder(tmp_path / "flat")
    lab_folder(flat / "old_copy")  # notebooks at the top level: that is the hand-in
    assert several_submissions(flat, NOTEBOOKS) == []
    two = tmp_path / "two"
    lab_folder(two / "v1", ["vggprune"])
    lab_folder(two / "v2", ["vggprune"])
    assert several_submissions(two, NOTEBOOKS) == ["v1", "v2"]


def test_batch_on_an_empty_folder_says_so(tmp_path, capsys, no_grading):
    (tmp_path / "class").mkdir()
    code, _, err = run(["batch", tmp_path / "class", "--out", tmp_path / "out"], capsys)
    usage_error(code, err, "holds no hand-in")


def test_batch_on_one_students_folder_says_so(submission, tmp_path, capsys, no_grading):
    code, _, err = run(["batch", submission, "--out", tmp_path / "out"], capsys)
    usage_error(code, err, "is one student's submission", "slimgrade grade")


def test_batch_only_an_unknown_id_is_a_usage_error(tmp_path, capsys, no_grading):
    lab_folder(tmp_path / "class" / "alice")
    code, _, err = run(["batch", tmp_path / "class", "--out", tmp_path / "out", "--only", "zed"], capsys)
    usage_error(code, err, "--only names zed", "alice")


# ---------------------------------------------------------------- a student's bad hand-in is graded

@pytest.mark.parametrize("content, said", [
    (b"PK\x03\x04 this is not a whole zip", "not a readable .zip"),
    (None, "holds none of the lab's notebooks"),
])
def test_a_bad_hand_in_is_graded_zero_with_its_reason(content, said, tmp_path, capsys):
    if content is None:
        handed_in = tmp_path / "frank.zip"
        with zipfile.ZipFile(handed_in, "w") as archive:
            archive.writestr("frank/readme.txt", "I forgot the notebooks")
    else:
        handed_in = tmp_path / "frank.zip"
        handed_in.write_bytes(content)
    out = tmp_path / "out"
    code, stdout, err = run(["grade", handed_in, "--out", out, "--format", "gradescope"], capsys)
    assert code == 0, err
    assert said in err and "Traceback" not in err and "internal error" not in err
    result = json.loads((out / "result.json").read_text())
    assert result["score"] == 0 and result["submission"] == "frank"
    [failure] = result["failures"]
    assert said in failure["message"]
    assert said in html.unescape((out / "report.html").read_text())
    gradescope = json.loads((out / "results.json").read_text())
    assert gradescope["score"] == 0 and said in gradescope["output"]
    assert stdout.startswith("frank: 0/")


# ---------------------------------------------------------------- progress

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar_with_total_and_eta():
    stream = Terminal()
    with Progress("grading alice", 10, "run", stream) as progress:
        for k in range(3):
            progress.step(f"run {k}")
        meter = str(progress.bar)  # what the bar shows now
    assert "3/10" in meter and "30%" in meter and "<" in meter  # "[elapsed<ETA, rate]"
    text = stream.getvalue()
    assert "0/10" in text and STAMP.search(text) is None
    assert "3/3" in text.splitlines()[-1]  # fewer runs than the bound: the bar ends full


def test_progress_elsewhere_is_one_timestamped_line_per_step():
    stream = io.StringIO()
    with Progress("batch", 3, "hand-in", stream, announce="grading 3 hand-in(s)") as progress:
        for sid in ("alice", "bob", "carl"):
            progress.step(f"{sid}: 60/60")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all(STAMP.match(line) for line in lines), lines
    assert "[1/3 hand-ins] alice: 60/60" in lines[1] and "left)" in lines[1]
    assert "[3/3 hand-ins] carl" in lines[3] and "left" not in lines[3]


def test_grade_prints_a_line_per_finished_run_when_piped(submission, tmp_path, capsys, monkeypatch):
    import types

    pipeline = types.ModuleType("grader.pipeline")  # no notebook runs: a fake grading

    def fake_grade(path, out, profile, *args, on_progress=None, **kwargs):
        for run_id in ("sparsity", "prune-0.9", "chained-prune-0.5"):
            on_progress(run_id)
        result = {"submission": "alice", "score": 60.0, "max_score": 60.0,
                  "manual_max_points": 40.0, "checks": [], "diagnoses": [], "failures": []}
        Path(out).mkdir(parents=True, exist_ok=True)
        return result

    pipeline.grade = fake_grade
    monkeypatch.setitem(sys.modules, "grader.pipeline", pipeline)
    code, stdout, err = run(["grade", submission, "--out", tmp_path / "out"], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if STAMP.match(line)]
    assert len(lines) == 4, err  # the announcement, then one line per finished run
    assert "pruning the reference checkpoint at 90 %" in lines[2]
    assert "your own pipeline: pruning at 50 %" in lines[3]
    assert "chained-prune" not in err
    assert stdout.startswith("alice: 60/60")


def test_batch_ends_with_a_summary_line(tmp_path):
    from grader.batch import batch_summary

    rows = [{"student_id": "alice", "status": "graded", "failures": ""},
            {"student_id": "bob", "status": "graded", "failures": "vggprune.ipynb:exception"},
            {"student_id": "carl", "status": "not graded", "failures": "submission:timeout"},
            {"student_id": "dora", "status": "no submission", "failures": ""}]
    line = batch_summary(rows, tmp_path)
    assert line.startswith("Batch done: 4 hand-in(s): 2 graded (1 with a failed run)")
    assert "1 not graded, see their report (carl)" in line and "1 without a submission (dora)" in line
    assert str(tmp_path / "gradebook.csv") in line and str(tmp_path / "summary.html") in line


def test_check_summary_names_the_severity_and_the_notes():
    result = {"score": 60.0, "max_score": 60.0, "manual_max_points": 40.0, "checks": [],
              "failures": [{"kind": "exception", "message": "vggprune.ipynb: cell 3 raised X."}],
              "diagnoses": [{"id": "min-channel-first-k", "severity": "warning", "message": "m", "hint": "h"},
                            {"id": "bn-statistics-shift", "severity": "info", "message": "n", "hint": ""}],
              "profile_notes": [{"message": "cell 9 raised ValueError.", "explanation": "range(120)."}]}
    text = cli.summary_text(result)
    assert "Worth fixing (costs nothing) [min-channel-first-k]" in text
    assert "Worth knowing (not your fault) [bn-statistics-shift]" in text
    assert "Mistake" not in text and "Not counted: cell 9 raised ValueError." in text
    assert text.index("Failure (exception)") < text.index("min-channel-first-k")

