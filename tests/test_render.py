"""grader.render: result.json, report.html (escaping, self-contained) and Gradescope's format."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from grader.render import (gradescope_results, render, report_html, report_view, write_report,
                           write_result)
from labs.slimming.report import REPORT, section_view

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def gamma(scale: float) -> dict:
    edges = [scale * k / 10 for k in range(11)]
    counts = [40, 12, 9, 7, 5, 4, 3, 2, 1, 1]
    return {"histogram": {"counts": counts, "edges": edges}, "mean_abs": scale / 4,
            "fraction_below": {"0.001": 0.1, "0.01": 0.35, "0.1": 0.8}}


def prune(kept: list[int], student: list[int], **extra) -> dict:
    return {"reference_kept": kept, "student_kept": student,
            "cfg": [v for k in kept for v in (k, "M")][:-1], "accuracy": 10.0,
            "accuracy_recalibrated": 71.5, "accuracy_masked_original": 10.0,
            "claimed_accuracies": [9.8, 10.0], "claimed_prune_ratio": 0.9,
            "majority_fraction": 0.97, "copy_differences": [], **extra}


def full_result() -> dict:
    return {
        "slimgrade_version": "0.1.0", "submission": "submissions/alice", "profile": "quick",
        "graded_at": "2025-01-01T12:00:00+00:00", "duration_s": 71.3,
        "score": 45.0, "max_score": 60.0, "manual_max_points": 40.0,
        "checks": [
            {"id": "blank-lambda", "stage": "sparsity_train", "title": "Blank: LAMBDA", "status": "pass",
             "points": 5.0, "max_points": 5.0, "message": "LAMBDA = 0.0001, within [1e-05, 0.001]."},
            {"id": "blank-copy-bn-stats", "stage": "vggprune", "title": "Blank: copy BN running stats",
             "status": "fail", "points": 0.0, "max_points": 5.0,
             "message": "BN running statistics: wrong in run(s) 0.5, 0.9."},
            {"id": "finetune", "stage": "train_prune_model", "title": "Fine-tuning", "status": "error",
             "points": 0.0, "max_points": 0.0, "message": "Not graded: the kernel died"},
            {"id": "report-problems", "stage": "report", "title": "Report: problems met", "status": "skip",
             "points": 0.0, "max_points": 8.0, "message": "Graded by hand from the report."},
        ],
        "diagnoses": [
            {"id": "bn-copy-bug", "stage": "vggprune", "severity": "error",
             "message": "BatchNorm tensors of the pruned model are not the kept slices.",
             "evidence": [{"run": "isolated 0.9", "details": ["bn.1.running_mean differs", "bn.1.running_var differs"]},
                          "a plain evidence line"],
             "hint": "Copy running_mean and running_var too."},
            {"id": "bn-statistics-shift", "stage": "vggprune", "severity": "info",
             "message": "The pruned model predicts one class because of the BN statistics shift.",
             "evidence": [{"run": "isolated 0.9", "details": ["97% of answers to one class"]}],
             "hint": "Nothing to fix in your code."},
        ],
        "failures": [
            {"notebook": "train_prune_model.ipynb", "run": "finetune", "kind": "kernel-died",
             "message": "The kernel died (out of memory?)", "cell_index": 7,
             "error_tail": "\n".join(f"line {k}" for k in range(200)) + "\n\x1b[31mRuntimeError\x1b[0m: boom"},
        ],
        "metrics": {
            "runs": {"sparsity": {"notebook": "sparsity_train.ipynb", "duration_s": 20.5, "failed": False,
                                  "images": [5], "output_truncated": False},
                     "finetune": {"notebook": "train_prune_model.ipynb", "duration_s": 3.0, "failed": True,
                                  "images": [], "output_truncated": True}},
            "sparsity": {"lambda": {"gamma": gamma(0.8), "accuracy": 80.1, "claimed_best_prec1": 80.3},
                         "lambda0": {"gamma": gamma(1.0), "accuracy": 82.0},
                         "comparison": {"small_fraction": 0.35}},
            "prune": {"0.5": prune([8, 8, 16, 16], [8, 8, 16, 16]),
                      "0.9": prune([3, 2, 4, 3], [3, 2, 4, 3], copy_differences=[
                          {"key": "feature.1.running_mean", "detail": "feature.1.running_mean differs", "kind": "differs"}]
                          + [{"key": f"feature.{k}.running_var", "detail": "fresh values", "kind": "fresh"}
                             for k in range(30)]),
                      "edge": {"reference_kept": [1, 3], "thin_error": "size mismatch for feature.0.weight"}},
            "finetune": {"error": "model_pruned.pth not written"},
            "chained": {"lambda": 1e-4, "sparsity": {"gamma": gamma(0.7), "accuracy": 79.0},
                        "prune": {"0.5": prune([8, 8, 16, 16], [8, 8, 16, 16]), "0.9": {"error": "no checkpoint"}},
                        "finetune": {"accuracy": 84.2, "architecture_kept": True, "cfg": [3, "M", 2]}},
            "reference": {"sparsity_gamma": {"lambda": gamma(0.6), "lambda0": gamma(1.0)},
                          "prune": {"0.5": {"kept_per_layer": [8, 8, 16, 16], "accuracy_pruned": 70.0,
                                            "accuracy_recalibrated": 79.0},
                                    "0.9": {"kept_per_layer": [3, 2, 4, 3], "accuracy_pruned": 10.0,
                                            "accuracy_recalibrated": 71.0}},
                          "finetune_accuracy": 85.0, "accuracy_band_pct": 3.0, "sparsity_accuracy": 80.0},
        },
        "handed_in": {"sparsity_train": {"found": True, "path": "alice/sparsity_train.ipynb",
                                         "printed": [f"Train Epoch: {k}" for k in range(100)]},
                      "vggprune": {"found": False, "path": "", "printed": []}},
        "environment": {"python": "3.11.9", "torch": "2.4.0", "platform": "Linux", "sandbox": True,
                        "device": "cpu"},
    }


def hostile_result() -> dict:
    result = full_result()
    result["diagnoses"][0]["message"] = HOSTILE
    result["diagnoses"][0]["evidence"].append(HOSTILE)
    result["diagnoses"][0]["evidence"][0]["details"].append(HOSTILE)
    result["failures"][0]["error_tail"] = "Traceback:\n" + HOSTILE
    result["handed_in"]["sparsity_train"]["printed"] = ["Epoch 1", HOSTILE, "Epoch 2"]
    result["submission"] = HOSTILE
    result["checks"][1]["message"] = HOSTILE
    result["metrics"]["prune"]["0.9"]["cfg"] = [HOSTILE, 3]
    result["metrics"]["prune"]["0.9"]["copy_differences"][0]["detail"] = HOSTILE
    return result


def test_full_result_renders_and_round_trips(tmp_path: Path) -> None:
    result = full_result()
    result_path, report_path = render(result, tmp_path, REPORT)
    assert result_path == tmp_path / "result.json" and report_path == tmp_path / "report.html"
    assert json.loads(result_path.read_text()) == result
    assert not [p for p in tmp_path.iterdir() if p.name not in ("result.json", "report.html")]

    html = report_path.read_text()
    for check in result["checks"]:
        assert check["id"] in html
    for diagnosis in result["diagnoses"]:
        assert diagnosis["id"] in html
    images = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", html)
    assert len(images) == 3  # kept channels at 0.5 and 0.9, gamma histogram
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    # Summary, truncation notes, the manual points and the info styling are there.
    assert "45 / 60" in html and "40 more points" in html
    assert "not your fault" in html
    # A long error keeps its first lines (the student's frames come first) and its end.
    assert "lines in the middle left out" in html and "line 199" in html and "line 100" not in html
    assert "line 0\n" in html and "RuntimeError: boom" in html
    assert "\x1b" not in html
    assert "70 line(s) left out" in html and "Train Epoch: 99" in html  # first 10 and last 20 of 100
    assert "Train Epoch: 50" not in html
    assert "more difference(s) left out" in html


def test_write_result_is_atomic_and_replaces(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    write_result({"score": 1.0}, out)
    path = write_result({"score": 2.0, "nan": float("nan"), "path": Path("/x")}, out)
    assert json.loads(path.read_text()) == {"score": 2.0, "nan": None, "path": "/x"}
    assert [p.name for p in out.iterdir()] == ["result.json"]


@pytest.mark.parametrize("result", [
    {},
    {"score": 0.0, "max_score": 60.0, "checks": [], "diagnoses": [], "failures": []},
    {"submission": "bob", "metrics": {"runs": {}}, "checks": [{"id": "blank-lambda"}]},
    {"metrics": None, "checks": None, "diagnoses": "oops", "failures": [None, 3, "x"],
     "environment": [], "handed_in": {"vggprune": None}},
    {"metrics": {"prune": {"0.9": {"error": "no checkpoint"}, "0.5": None},
                 "sparsity": {"lambda": {"error": "missing"}, "lambda0": {"gamma": {"histogram": {"counts": [1], "edges": []}}}},
                 "chained": {"prune": {"0.5": {"cfg": "garbage", "student_kept": ["a"]}}},
                 "reference": {"prune": {"0.9": {"kept_per_layer": [1, 2]}}}},
     "diagnoses": [{"id": "x", "evidence": [{"run": None}, {"details": None}, 5]}],
     "score": float("inf"), "duration_s": "long"},
])
def test_missing_metrics_still_render(tmp_path: Path, result: dict) -> None:
    _, report = render(result, tmp_path, REPORT)
    html = report.read_text()
    assert "not available" in html.lower()
    assert "<img" not in html or all(s.startswith("data:") for s in re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', html))


def test_result_missing_most_metrics(tmp_path: Path) -> None:
    result = full_result()
    result["metrics"] = {"runs": result["metrics"]["runs"]}
    del result["handed_in"], result["environment"]
    html = write_report(result, tmp_path, REPORT).read_text()
    for check in result["checks"]:
        assert check["id"] in html
    assert "Plot for ratio 0.9 not available" in html and "Gamma histogram not available" in html


def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    html = report_html(hostile_result(), None, REPORT)
    assert HOSTILE not in html
    assert "<script" not in html.lower()
    assert "onerror=alert(1)>" not in html
    assert "<img src=x" not in html
    escaped = "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    # diagnosis message, evidence line, evidence detail, error tail, printed line, check, cfg, copy detail...
    assert html.count(escaped) >= 7
    for template in (Path(__file__).parents[1] / "grader" / "templates" / "report.html.j2",
                     Path(__file__).parents[1] / "labs" / "slimming" / "templates" / "section.html.j2"):
        assert not re.search(r"\{\{[^}]*\|\s*safe", template.read_text())


def test_gradescope_results() -> None:
    result = full_result()
    gradescope = gradescope_results(result, REPORT)
    assert gradescope["score"] == 45.0
    assert gradescope["execution_time"] == 71 and gradescope["output_format"] == "text"
    # Items graded by hand are Gradescope's manual questions: no 0/0 test for them.
    automatic = [c for c in result["checks"] if c["status"] != "skip"]
    assert len(gradescope["tests"]) == len(automatic)
    by_name = {t["name"]: t for t in gradescope["tests"]}
    assert "Report: problems met [report-problems]" not in by_name
    assert all(t["max_score"] > 0 or t["status"] != "passed" or t["score"] == 0 for t in gradescope["tests"])
    assert "Graded by hand in Gradescope" in gradescope["output"] and "Report: problems met" in gradescope["output"]
    assert by_name["Blank: LAMBDA [blank-lambda]"] == {
        "name": "Blank: LAMBDA [blank-lambda]", "score": 5.0, "max_score": 5.0,
        "output": result["checks"][0]["message"], "status": "passed"}
    assert by_name["Fine-tuning [finetune]"]["status"] == "failed"
    assert by_name["Fine-tuning [finetune]"]["output"].count("Not graded") == 1
    assert "bn-copy-bug" in gradescope["output"] and "bn-statistics-shift" in gradescope["output"]
    assert "not your fault" in gradescope["output"]
    # The failure, a cause, comes before the diagnoses; its cell is numbered from 1.
    assert gradescope["output"].index("Failure (kernel-died)") < gradescope["output"].index("Mistake: bn-copy-bug")
    assert "train_prune_model.ipynb, cell 8" in gradescope["output"]
    json.dumps(gradescope)
    empty = gradescope_results({}, REPORT)
    assert empty["score"] == 0.0 and empty["tests"] == [] and isinstance(empty["output"], str)
    assert "execution_time" not in empty and empty["output_format"] == "text"


def test_executed_notebooks_are_linked_locally(tmp_path: Path) -> None:
    result = full_result()
    result["metrics"]["runs"]["../../etc/passwd"] = {"notebook": "x.ipynb"}
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "sparsity.ipynb").write_text("{}")
    html = write_report(result, tmp_path, REPORT).read_text()
    assert 'href="notebooks/sparsity.ipynb"' in html
    assert "notebooks/finetune.ipynb" not in html  # not written, so not linked
    assert "passwd.ipynb" not in html


def test_saved_best_prec1_fraction_is_shown_in_percent() -> None:
    result = full_result()
    result["metrics"]["sparsity"]["lambda"] = {"accuracy": 76.3, "claimed_best_prec1": 0.7632}
    html = report_html(result, None, REPORT)
    assert "76.3%" in html and "0.8%" not in html


def test_report_in_a_headless_browser(tmp_path: Path) -> None:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")

    report = write_report(hostile_result(), tmp_path, REPORT)
    requests, dialogs = [], []
    started = time.monotonic()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_timeout(200)
            title = page.evaluate("document.title")
            text = page.inner_text("body")
            scripts = page.evaluate("document.querySelectorAll('script').length")
            image_sources = page.evaluate("[...document.images].map(i => i.getAttribute('src'))")
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
        finally:
            browser.close()
    assert time.monotonic() - started < 30

    assert not [u for u in requests if u.startswith(("http:", "https:"))], requests
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert title != "pwned" and "pwned" != title.strip()
    assert not dialogs
    assert scripts == 0
    assert len(image_sources) == 3 and all(s.startswith("data:image/png;base64,") for s in image_sources)
    assert broken == 0
    assert HOSTILE in text


# ---------------------------------------------------------------- one numbering, causes first, plain words

TRACEBACK = """---------------------------------------------------------------------------
IndexError                                Traceback (most recent call last)
Cell In[9], line 4
      3 for k in range(5):
----> 4     idx = keep(cfg_mask[k])

Cell In[4], line 2, in keep(mask)
      1 def keep(mask):
----> 2     return np.argwhere(mask)[5]

IndexError: index 5 is out of bounds for axis 0 with size 1"""


def executed_copy(folder: Path, run_id: str, student_cells: int, injected_before: int) -> None:
    """notebooks/<run>.ipynb as the executor writes it: injected cells tagged, In [n] counting them."""
    import nbformat

    cells, count = [], 0
    for _ in range(injected_before):
        count += 1
        cells.append(nbformat.v4.new_code_cell("pass", metadata={"tags": ["slimgrade-injected"]},
                                               execution_count=count))
    for _ in range(student_cells):
        count += 1
        cells.append(nbformat.v4.new_code_cell("x = 1", execution_count=count))
    notebook = nbformat.v4.new_notebook()
    notebook.cells = cells
    (folder / "notebooks").mkdir(exist_ok=True)
    nbformat.write(notebook, folder / "notebooks" / f"{run_id}.ipynb")


def failing_result() -> dict:
    result = full_result()
    index_error = {"notebook": "vggprune.ipynb", "run": "prune-0.9", "kind": "exception",
                   "message": "vggprune.ipynb: cell 8 raised IndexError: index 5 is out of bounds.",
                   "cell_index": 7, "error_tail": TRACEBACK}
    unwritten = {"notebook": "vggprune.ipynb", "run": "prune-0.5", "kind": "missing-artifact",
                 "message": "vggprune.ipynb did not write model_prune.pth although no cell raised.",
                 "cell_index": None, "error_tail": ""}
    missing = {"notebook": "sparsity_train.ipynb", "run": None, "kind": "missing-artifact",
               "message": "sparsity_train.ipynb was not found in the submission: hand it in.",
               "cell_index": None, "error_tail": ""}
    died = result["failures"][0]
    result["failures"] = [died, unwritten, index_error, missing]
    result["checks"].append({"id": "prune-0.9", "stage": "vggprune", "title": "Prune ratio 0.9 done",
                             "status": "error", "points": 0.0, "max_points": 10.0,
                             "message": "Not graded: the notebook stopped."})
    runs = result["metrics"]["runs"]
    for run_id in ("prune-0.9", "chained-prune-0.9"):
        runs[run_id] = {"notebook": "vggprune.ipynb", "failure": index_error, "duration_s": 4.0}
    runs["prune-0.5"] = {"notebook": "vggprune.ipynb", "failure": unwritten, "duration_s": 4.0}
    runs["finetune"]["failure"] = died
    runs["prune-edge"] = {"notebook": "vggprune.ipynb", "duration_s": 4.0,
                          "failure": {**index_error, "run": "prune-edge", "message": "edge only."}}
    result["profile_notes"] = [
        {**index_error, "run": "prune-edge", "message": "edge only.", "cause": "probe",
         "explanation": "This happened only on a probe input the grader built on purpose."},
        {**index_error, "run": "prune-edge", "cause": "probe", "explanation": "a duplicate"},
        {"notebook": "sparsity_train.ipynb", "run": "sparsity", "kind": "exception", "cell_index": 11,
         "message": "sparsity_train.ipynb: cell 12 raised ValueError.", "error_tail": "",
         "cause": "profile", "explanation": "range(120) while EPOCHS is 12."}]
    return result


def test_cells_are_numbered_from_one_with_the_tracebacks_in_number(tmp_path: Path) -> None:
    result = failing_result()
    executed_copy(tmp_path, "prune-0.9", student_cells=10, injected_before=1)
    view = report_view(result, tmp_path, REPORT)
    failure = next(f for f in view["failures"] if f["kind"] == "exception")
    assert failure["cell"] == "8" and failure["shown_in"] == "9"
    # In[9] is the failing cell (8), In[4] the cell defining keep() (3): both named.
    assert "Cell In[9] [your cell 8], line 4" in failure["tail"]
    assert "Cell In[4] [your cell 3], line 2, in keep(mask)" in failure["tail"]
    html = report_html(result, tmp_path, REPORT)
    assert "cell 8 (In [9] in the traceback)" in html and "cell 7" not in html
    note = next(n for n in view["profile_notes"] if n["notebook"] == "sparsity_train.ipynb")
    assert note["cell"] == "12"
    # Without the executed copy the failing cell's In [n] comes from its traceback.
    assert report_view(result, None, REPORT)["failures"][1]["shown_in"] == "9"


def test_causes_come_before_their_consequences(tmp_path: Path) -> None:
    result = failing_result()
    failures = report_view(result, tmp_path, REPORT)["failures"]
    assert [(f["notebook"], f["kind"]) for f in failures] == [
        ("sparsity_train.ipynb", "missing-artifact"),  # not handed in: the first cause
        ("vggprune.ipynb", "exception"),  # the IndexError before what it left unwritten
        ("vggprune.ipynb", "missing-artifact"),
        ("train_prune_model.ipynb", "kernel-died")]  # notebooks in the lab's order
    html = report_html(result, tmp_path, REPORT)
    assert html.index("cell 8 raised IndexError") < html.index("did not write model_prune.pth")
    assert html.index('id="failures"') < html.index('id="diagnoses"')
    stages = {s["id"]: s for s in report_view(result, None, REPORT)["stages"]}
    assert stages["vggprune"]["cause"].startswith("First: vggprune.ipynb: cell 8 raised IndexError")
    assert stages["sparsity_train"]["cause"].startswith("sparsity_train.ipynb was not found")
    first = report_view(result, None, REPORT)["summary"]["first_failure"]
    assert first.startswith("sparsity_train.ipynb was not found")


def test_the_card_counts_every_failed_run_and_no_note_twice() -> None:
    result = failing_result()
    view = report_view(result, None, REPORT)
    # finetune, prune-0.9 and chained-prune-0.9 (the same IndexError), prune-0.5; the edge
    # probe's own failure is a note that costs nothing; a missing notebook is no run.
    assert view["summary"]["failed_runs"] == 4
    assert view["summary"]["missing_notebooks"] == 1
    assert "4 run(s) failed" in view["summary"]["verdict"]
    index_error = next(f for f in view["failures"] if f["kind"] == "exception")
    assert index_error["runs"] == ["pruning the reference checkpoint at 90 %",
                                   "your own pipeline: pruning at 90 %"]
    messages = [n["message"] for n in view["profile_notes"]]
    assert messages == ["sparsity_train.ipynb: cell 12 raised ValueError.", "edge only."]
    html = report_html(result, None, REPORT)
    assert "4 failed run(s), 1 notebook(s) not handed in, 2 not counted" in " ".join(html.split())


def test_runs_are_named_in_plain_words() -> None:
    run_label = REPORT.run_label

    assert run_label("prune-0.5") == "pruning the reference checkpoint at 50 %"
    assert run_label("chained-prune-0.9") == "your own pipeline: pruning at 90 %"
    assert run_label("chained 0.9") == "your own pipeline: pruning at 90 %"
    assert run_label("isolated edge") == run_label("prune-edge")
    assert run_label("chained-sparsity").startswith("your own pipeline")
    html = report_html(full_result(), None, REPORT)
    text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
    assert "chained prune" not in text and "band 3" not in text
    assert "your own pipeline: pruning at 50 %" in text and "yours passes within 3 points" in text
    assert "How each notebook ran" in text  # the glossary line


def test_the_masks_row_says_what_the_chart_draws() -> None:
    result = full_result()
    facts = result["metrics"]["prune"]["0.9"]
    # The grader accepted the masks (a min-channel rule), yet the kept counts differ in
    # layers 1 and 2-3: the row must not say "match the reference" beside those numbers.
    facts.update(student_kept=[3, 3, 5, 4], mask_correct=True, mask_layers_wrong=[])
    [run] = [r for r in section_view(result)["pruning"]["runs"]
             if r["label"] == "pruning the reference checkpoint at 90 %"]
    assert run["kept_match"] is False and run["layers_wrong"] == "1\u20133"
    assert "costs nothing" in run["mask_note"]
    facts.update(student_kept=[3, 2, 4, 3], mask_correct=False, mask_layers_wrong=[2])
    [run] = [r for r in section_view(result)["pruning"]["runs"]
             if r["label"] == "pruning the reference checkpoint at 90 %"]
    assert run["kept_match"] is False and run["layers_wrong"] == "2"
    assert "not the same channels" in run["mask_note"]


def test_hand_grades_merged_by_a_batch_show_in_the_report() -> None:
    result = full_result()
    result["hand_grades"] = {"points": {"report-problems": 6.5, "not-an-item": 3, }, "comment": "Good."}
    view = report_view(result, None, REPORT)
    assert view["summary"]["manual_line"] == "Graded by hand from your written report: 6.5 / 40."
    assert view["summary"]["final_line"] == "Total: 51.5 / 100"
    [report] = [s for s in view["stages"] if s["id"] == "report"]
    assert report["hand_points"] == "6.5"
    html = report_html(result, None, REPORT)
    assert "6.5 / 8" in html and "Your grader's comment: Good." in html
    result["hand_grades"]["points"]["report-problems"] = 9  # more than the item's 8 points
    assert report_view(result, None, REPORT)["summary"]["final_line"] == ""


def _browse(page_path: Path, sync_api) -> dict:
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            seen = page.evaluate("""() => ({
                text: document.body.innerText,
                scripts: document.querySelectorAll('script').length,
                broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
                images: document.images.length,
                visible: sel => 0,
            })""")
            seen["boxes"] = {sel: page.evaluate(
                "s => [...document.querySelectorAll(s)].filter(e => e.getBoundingClientRect().height > 0).length", sel)
                for sel in (".cause", ".first-failure", ".final", "td.masks .bad", ".card.info",
                            "tr.suspect", ".flag", ".bar span", "tr.empty", "ul.problems li")}
            seen["bar_widths"] = page.evaluate(
                "[...document.querySelectorAll('.bar span')].map(e => e.getBoundingClientRect().width)")
        finally:
            browser.close()
    seen["requests"] = requests
    return seen


def test_new_parts_of_the_report_in_a_headless_browser(tmp_path: Path) -> None:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")
    result = failing_result()
    result["hand_grades"] = {"points": {"report-problems": 7}, "comment": "Nice report."}
    result["metrics"]["prune"]["0.9"]["student_kept"] = [3, 3, 4, 3]
    executed_copy(tmp_path, "prune-0.9", student_cells=10, injected_before=1)
    seen = _browse(write_report(result, tmp_path, REPORT), sync_api)
    assert all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]
    assert seen["scripts"] == 0 and seen["broken"] == 0
    text = seen["text"]
    assert "What went wrong first: sparsity_train.ipynb was not found" in text
    assert "Graded by hand from your written report: 7 / 40" in text and "Total: 52 / 100" in text
    assert "Your grader's comment: Nice report." in text
    assert "cell 8 (In [9] in the traceback)" in text and "Cell In[9] [your cell 8]" in text
    assert "The same in 2 runs: pruning the reference checkpoint at 90 %; your own pipeline: pruning at 90 %." in text
    assert "NOT COUNTED" in text.upper() and "cell 12" in text
    assert text.index("Failures") < text.index("Diagnoses\n")
    boxes = seen["boxes"]
    assert boxes[".cause"] >= 2 and boxes[".first-failure"] == 1 and boxes[".final"] == 1
    assert boxes["td.masks .bad"] >= 1 and boxes[".card.info"] >= 2


def test_new_parts_of_the_class_summary_in_a_headless_browser(tmp_path: Path) -> None:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")
    from grader import batch

    rubric = json.loads((Path(__file__).parents[1] / "labs" / "slimming" / "rubric.json").read_text())
    failure = {"notebook": "vggprune.ipynb", "kind": "exception", "cell_index": 23,
               "message": "vggprune.ipynb: cell 24 raised IndexError: index 5 is out of bounds."}
    note = {"notebook": "sparsity_train.ipynb", "cell_index": 8, "message": "cell 9 raised ValueError.",
            "explanation": "range(120)."}

    def result(score: float, lam: str) -> dict:
        return {"score": score, "max_score": 60.0, "duration_s": 95.0, "failures": [failure],
                "profile_notes": [note], "checks": [{"id": "blank-lambda", "status": lam, "points": 0.0}],
                "diagnoses": [{"id": "bn-copy-bug", "severity": "error", "message": "m"},
                              {"id": "bn-statistics-shift", "severity": "info", "message": "n"}]}

    entries = [batch.Entry(sid, tmp_path / sid) for sid in ("ann", "ben", "cy", "dee")]
    book = batch.Gradebook(tmp_path, entries, rubric, "class", "quick", empty={"dee"})
    book.results.update(ann=result(40.0, "pass"), ben=result(50.0, "pass"), cy=result(20.0, "fail"))
    book.hand = {"ann": {"points": {"report-problems": 8.0}, "comment": ""}}
    book.problems = ["hand-grades.csv line 3 (ben): report-problems = 'ten' is not a number"]
    page = tmp_path / "summary.html"
    page.write_text(batch.summary_html(book.view()))
    seen = _browse(page, sync_api)
    assert all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]
    assert seen["scripts"] == 0 and seen["broken"] == 0 and seen["images"] == 1
    text = seen["text"]
    boxes = seen["boxes"]
    assert boxes["tr.suspect"] == 1 and boxes[".flag"] >= 1 and "likely a grading problem" in text
    assert "vggprune.ipynb, cell 24" in text and "3 (100 %)" in text
    assert boxes[".bar span"] == 1 and 70 < seen["bar_widths"][0] < 90  # 2 of 3 pass: 67 %
    assert boxes["tr.empty"] == 1 and "no submission" in text
    assert boxes["ul.problems li"] == 1 and "'ten' is not a number" in text
    assert text.index("Mistakes across the class") < text.index("bn-copy-bug") < text.index("Notes (cost nothing)")
    assert text.index("Notes (cost nothing)") < text.index("bn-statistics-shift")
    assert "1 min 35 s" in text and "48 / 100" in text
