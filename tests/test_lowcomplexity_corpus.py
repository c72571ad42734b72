"""Lab 5's corpus: a batch over every fixture of fixtures/lowcomplexity/, graded as a TA would.

Each fixture's expected.json names the diagnoses that must fire, those that must not, and
the score band; the batch must give one gradebook row per hand-in, the summary with the
class plot, and a report per student. The batch runs once for all the tests here.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from grader.batch import grade_class
from labs.lowcomplexity.lab import LAB

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fixtures" / "lowcomplexity"
FIXTURES = sorted(p.parent.name for p in CORPUS.glob("*/expected.json"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab5") / "graded"
    grade_class(CORPUS, out, LAB.profiles["quick"], workers=2, lab=LAB.name)
    return out


def test_the_corpus_is_there():
    assert {"honest", "evaluated-on-train", "macs-as-flops", "numpy-forward", "pickle-weights",
            "missing-weights", "oversized"} <= set(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_each_fixture_gets_its_known_outcome(graded, name):
    expected = json.loads((CORPUS / name / "expected.json").read_text())
    result = json.loads((graded / name / "result.json").read_text())
    found = {d["id"] for d in result["diagnoses"]}
    assert set(expected.get("diagnoses", [])) <= found, (name, found)
    assert not set(expected.get("absent", [])) & found, (name, found)
    low, high = expected["score"]
    assert low <= result["score"] <= high, (name, result["score"], result["checks"])
    report = (graded / name / "report.html").read_text()
    assert "Claim" in report or "claim" in report


def test_the_batch_writes_one_gradebook_row_per_hand_in_and_the_class_plot(graded):
    with (graded / "gradebook.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["student_id"] for row in rows) == FIXTURES
    assert all(row["status"] == "graded" for row in rows)
    summary = (graded / "summary.html").read_text()
    assert summary.count("data:image/png;base64,") >= 2  # the score histogram and the class plot


def test_the_pickle_in_the_weights_never_ran(graded):
    assert not Path("/tmp/slimgrade-escape-marker-lowcomplexity-pickle").exists()
    result = json.loads((graded / "pickle-weights" / "result.json").read_text())
    assert "holds Python objects" in json.dumps(result["diagnoses"]) or \
        "GLOBAL" in json.dumps(result["diagnoses"])


def test_the_honest_hand_in_is_measured_as_it_claims(graded):
    metrics = json.loads((graded / "honest" / "result.json").read_text())["metrics"]
    assert all(check["ok"] for check in metrics["claim_checks"]), metrics["claim_checks"]
    assert metrics["measured"]["flops"] == 2 * metrics["measured"]["macs"]
