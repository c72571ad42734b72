"""Lab 5's diagnoses, checks and report section on synthetic evaluations (no notebook runs).

``honest()`` is the evaluation of a hand-in that did everything right, in the shape
``labs.lowcomplexity.grading.LowComplexityGrading.conclude`` builds; each test changes
the one fact a rule reads and asserts the rule fires on it, and only on it.
"""
from __future__ import annotations

import json

import pytest

from grader.render import report_html
from grader.score import load_rubric, score
from labs.lowcomplexity.checks import CHECKS, RUNS
from labs.lowcomplexity.diagnoses import CATALOGUE
from labs.lowcomplexity.lab import LAB, SHIPPED_BUNDLES
from labs.lowcomplexity.measure import FLOPS_CONVENTION, MACS_CONVENTION
from labs.lowcomplexity.report import REPORT, class_plot

RUBRIC = load_rubric(LAB.rubric)
NORMALIZE = {"mean": [0.507, 0.487, 0.441], "std": [0.267, 0.256, 0.276]}
# The width-16 ReferenceCNN of the quick profile, counted by hand.
REFERENCE = {"model": "ReferenceCNN", "width": 16, "parameters": 110_580,
             "parameter_kb": 110_580 * 4 / 1024, "macs": 28_766_720, "flops": 57_533_440,
             "accuracy_pct": 85.0}
PNG = "data:image/png;base64,"


def section(result: dict) -> str:
    """The report page with the lab's section, as the harness renders it."""
    return report_html(result, None, REPORT)


def honest() -> dict:
    measured = {"parameters": 110_580, "parameter_kb": 110_580 * 4 / 1024, "macs": 28_766_720,
                "flops": 57_533_440, "buffer_elements": 481, "accuracy_pct": 85.3,
                "train_accuracy_pct": 91.0, "accuracy_with_test_transform_pct": None,
                "test_images": 1000}
    lines = {"flops": "flops = 57533440", "parameter_kb": "Model parameter size = 431.953 kB",
             "accuracy_pct": "Accuracy = 84.90 %"}
    claimed = {"flops": 57_533_440.0, "parameter_kb": 431.953, "accuracy_pct": 84.9}
    return {
        "profile": "quick",
        "runs": {"export": {"notebook": "lowcomplexity.ipynb", "duration_s": 4.2, "failure": None,
                            "usable": True, "missing": [], "output_truncated": False}},
        "weights": {"file": "model.pth", "found": True, "refused": None, "loaded": True,
                    "tensors": 26, "elements": 111_061},
        "model": {"chosen": "the object model",
                  "candidates": [{"name": "the object model", "why": None}]},
        "export": {"exported": True, "dynamic_batch": True, "why_static": None,
                   "folder": "export", "files": ["program.json", "tensors.pt", "manifest.json"]},
        "transforms": {
            "found": {"train_transform": {"steps": ["RandomCrop", "ToTensor", "Normalize"],
                                          "random": True, "normalize": dict(NORMALIZE)},
                      "test_transform": {"steps": ["ToTensor", "Normalize"], "random": False,
                                         "normalize": dict(NORMALIZE)}},
            "train": "train_transform", "test": "test_transform",
            "used": dict(NORMALIZE), "test_normalize": dict(NORMALIZE)},
        "reference": dict(REFERENCE),
        "claims": {**claimed, "lines": lines},
        "measured": measured,
        "claim_checks": [
            {"figure": "flops", "claimed": claimed["flops"], "measured": 57_533_440.0,
             "convention": FLOPS_CONVENTION, "ok": True, "evidence": lines["flops"]},
            {"figure": "parameter_kb", "claimed": claimed["parameter_kb"],
             "measured": measured["parameter_kb"], "convention": None, "ok": True,
             "evidence": lines["parameter_kb"]},
            {"figure": "accuracy_pct", "claimed": claimed["accuracy_pct"], "measured": 85.3,
             "convention": None, "ok": True, "evidence": lines["accuracy_pct"]}],
    }


def ids(evaluation: dict) -> list[str]:
    return [d.id for d in CATALOGUE.run(evaluation)]


def fractions(evaluation: dict) -> dict[str, float | None]:
    diagnoses = CATALOGUE.run(evaluation)
    return {item: CHECKS[item][1](evaluation, diagnoses, RUBRIC)[0] for item in CHECKS}


def claimed_accuracy(evaluation: dict, value: float) -> None:
    """The notebook printed another accuracy, compared as measure.compare_claims does."""
    line = f"Accuracy = {value:.2f} %"
    evaluation["claims"]["accuracy_pct"] = value
    evaluation["claims"]["lines"]["accuracy_pct"] = line
    check = evaluation["claim_checks"][2]
    check.update(claimed=value, ok=abs(value - check["measured"]) <= 2.0, evidence=line)


def not_measured(evaluation: dict, **changes: dict) -> dict:
    evaluation.update(measured=None, claim_checks=[], **changes)
    return evaluation


# ------------------------------------------------------------------------------- diagnoses

def test_an_honest_hand_in_has_no_finding_and_full_marks():
    evaluation = honest()
    assert ids(evaluation) == []
    assert fractions(evaluation) == {"model-measured": 1.0, "claims-match": 1.0, "accuracy": 1.0,
                                     "complexity": 1.0, "honest-evaluation": 1.0}
    checks, total, top = score(evaluation, CATALOGUE.run(evaluation), RUBRIC, CHECKS)
    assert (total, top) == (60.0, 60.0)
    assert [c.id for c in checks if c.status == "skip"] == ["report"]


def test_evaluated_on_train():
    evaluation = honest()
    claimed_accuracy(evaluation, 90.39)  # 5.1 points above the test set, 0.6 from training
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["evaluated-on-train"]  # not also a claim mismatch
    assert found[0].severity == "error"
    assert any("90.39" in e for e in found[0].evidence)
    assert any("85.30 %" in e for e in found[0].evidence)
    assert any("91.00 %" in e for e in found[0].evidence)
    got = fractions(evaluation)
    assert got["honest-evaluation"] == 0.0 and got["claims-match"] == pytest.approx(2 / 3)


def test_a_wrong_accuracy_far_from_training_is_a_claim_mismatch():
    evaluation = honest()
    claimed_accuracy(evaluation, 99.0)  # far above both
    assert ids(evaluation) == ["claim-mismatch"]
    claimed_accuracy(evaluation, 88.0)  # beyond the tolerance, within the train gap of the test
    assert ids(evaluation) == ["claim-mismatch"]
    assert fractions(evaluation)["honest-evaluation"] == 1.0


def test_test_transform_differs():
    evaluation = honest()
    transforms = evaluation["transforms"]
    transforms["found"]["test_transform"]["normalize"] = None  # trained normalised, tested 0..1
    transforms["test_normalize"] = {"mean": [0.0] * 3, "std": [1.0] * 3}
    evaluation["measured"]["accuracy_with_test_transform_pct"] = 3.1
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["test-transform-differs"]
    evidence = " | ".join(found[0].evidence)
    assert "train_transform (training): Normalize(mean=(0.507" in evidence
    assert "test_transform (test): no Normalize" in evidence
    assert "85.30 %" in evidence and "3.10 %" in evidence
    assert fractions(evaluation)["honest-evaluation"] == 0.0


def test_rounded_statistics_are_the_same_normalisation():
    evaluation = honest()
    evaluation["transforms"]["found"]["test_transform"]["normalize"] = {
        "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}
    assert ids(evaluation) == []


def test_macs_called_flops_is_information_only():
    evaluation = honest()
    check = evaluation["claim_checks"][0]
    evaluation["claims"]["flops"] = check["claimed"] = 28_766_720.0
    check["convention"] = MACS_CONVENTION
    found = CATALOGUE.run(evaluation)
    assert [(d.id, d.severity) for d in found] == [("macs-called-flops", "info")]
    assert "thop" in found[0].message and "2 FLOPs per MAC" in found[0].message
    assert fractions(evaluation)["claims-match"] == 1.0


def test_flops_in_neither_convention_is_a_claim_mismatch():
    evaluation = honest()
    check = evaluation["claim_checks"][0]
    evaluation["claims"]["flops"] = check["claimed"] = 1_000_000.0
    evaluation["claims"]["lines"]["flops"] = check["evidence"] = "FLOPs: 1.0M"
    check.update(convention=None, ok=False)
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["claim-mismatch"]
    assert "57,533,440 FLOPs" in found[0].evidence[0] and "28,766,720 MACs" in found[0].evidence[0]
    assert fractions(evaluation)["claims-match"] == pytest.approx(2 / 3)


def test_claims_missing():
    evaluation = honest()
    evaluation["claims"].update(parameter_kb=None, accuracy_pct=None, lines={})
    for check in evaluation["claim_checks"][1:]:
        check.update(claimed=None, ok=False, evidence=None)
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["claims-missing"]
    assert "parameter size, accuracy" in found[0].message
    got = fractions(evaluation)
    assert got["claims-match"] == pytest.approx(1 / 3) and got["honest-evaluation"] == 0.0


def test_not_exportable():
    why = "RuntimeError: forward calls numpy: tensor.numpy() on a FakeTensor"
    evaluation = not_measured(honest(), export={"exported": False, "why": why})
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["not-exportable"]
    assert found[0].evidence == [why] and "torch operations only" in found[0].hint
    assert fractions(evaluation) == {"model-measured": 0.0, "claims-match": 0.0, "accuracy": 0.0,
                                     "complexity": 0.0, "honest-evaluation": 0.0}
    message = CHECKS["model-measured"][1](evaluation, found, RUBRIC)[1]
    assert "could not be exported" in message


def test_weights_do_not_fit():
    candidates = [{"name": f"the class Net{i}", "why": f"RuntimeError: size mismatch for fc{i}"}
                  for i in range(7)]
    evaluation = not_measured(honest(), export={}, model={"chosen": None, "candidates": candidates})
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["weights-do-not-fit"]
    assert len(found[0].evidence) == 6 and "2 more" in found[0].evidence[-1]
    assert found[0].evidence[0] == "the class Net0: RuntimeError: size mismatch for fc0"


def test_weights_refused_by_the_grader_and_by_the_kernel():
    evaluation = not_measured(honest(), export={}, model={"chosen": None, "candidates": []})
    evaluation["weights"] = {"file": "model.pth", "found": True, "loaded": False,
                             "refused": "model.pth holds a pickled object (posix.system)",
                             "why": "no weights were handed in"}
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["weights-refused"]
    assert found[0].evidence == ["model.pth holds a pickled object (posix.system)"]
    evaluation["weights"].update(refused=None, why="UnpicklingError: Weights only load failed")
    assert [d.evidence for d in CATALOGUE.run(evaluation)] == [
        ["UnpicklingError: Weights only load failed"]]


def test_weights_missing():
    evaluation = not_measured(honest(), export={}, model={"chosen": None, "candidates": []})
    evaluation["weights"] = {"file": None, "found": False, "refused": None, "loaded": False,
                             "why": "no weights were handed in"}
    assert ids(evaluation) == ["weights-missing"]


def test_export_refused_and_measure_failed():
    refused = "program.json holds the custom operator torch.ops.evil.op.default (registered " \
              "with torch.library), which the grader does not load or run."
    evaluation = honest()
    evaluation.update(measured={"error": refused, "refused": True}, claim_checks=[])
    found = CATALOGUE.run(evaluation)
    assert [d.id for d in found] == ["export-refused"] and found[0].evidence == [refused]
    evaluation["measured"] = {"error": "The model failed on the test images (x).", "refused": False}
    assert ids(evaluation) == ["measure-failed"]


def test_over_budget_against_the_reference():
    evaluation = honest()
    evaluation["measured"].update(macs=400_000_000, flops=800_000_000, accuracy_pct=84.0)
    evaluation["claim_checks"][0].update(ok=False)
    evaluation["claims"]["flops"] = evaluation["claim_checks"][0]["claimed"]
    claimed_accuracy(evaluation, 84.0)
    found = {d.id: d for d in CATALOGUE.run(evaluation)}
    assert set(found) == {"over-budget", "claim-mismatch"}
    assert found["over-budget"].severity == "warning"
    assert "14 times the reference model's MACs" in found["over-budget"].message
    assert fractions(evaluation)["complexity"] == 0.5  # parameters within, MACs over
    evaluation["measured"]["accuracy_pct"] = 86.0  # more accurate: the cost buys something
    assert "over-budget" not in ids(evaluation)


# ------------------------------------------------------------------------------- checks

def test_accuracy_threshold_and_budgets_follow_the_profile():
    evaluation = honest()
    threshold = RUBRIC["accuracy_threshold_pct"]["quick"]
    evaluation["measured"]["accuracy_pct"] = threshold - 0.1
    got = fractions(evaluation)
    assert got["accuracy"] == 0.0 and got["complexity"] == 1.0
    evaluation["measured"]["accuracy_pct"] = threshold / 2 - 0.1  # below half the threshold
    assert fractions(evaluation)["complexity"] == 0.0
    evaluation["measured"].update(accuracy_pct=56.0, parameters=6_000_000)
    evaluation["profile"] = "full"
    got = fractions(evaluation)
    assert got["accuracy"] == 1.0 and got["complexity"] == 0.5


def test_a_profile_the_rubric_does_not_know_is_left_to_the_ta():
    evaluation = honest()
    evaluation["profile"] = "tiny"
    outcome = CHECKS["accuracy"][1](evaluation, [], RUBRIC)
    assert outcome[0] is None and "accuracy_threshold_pct" in outcome[1]
    assert CHECKS["complexity"][1](evaluation, [], RUBRIC)[0] is None


def test_the_rubric_is_the_checks():
    assert LAB.rubric_problem(RUBRIC) == ""
    automatic = [item["id"] for item in RUBRIC["items"] if not item.get("manual")]
    assert sorted(automatic) == sorted(CHECKS)
    assert sum(item["points"] for item in RUBRIC["items"] if not item.get("manual")) == 60
    assert all(CHECKS[item][0] == RUNS for item in CHECKS)
    assert RUBRIC["assumptions"]


def test_the_checks_read_the_grading_run():
    from labs.lowcomplexity.grading import RUN

    assert RUNS == (RUN,)


def test_the_reference_models_are_inside_their_budgets():
    """The budgets admit the grader's own reference of each profile (rubric.json's
    assumptions), and the hand count above is the reference's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from labs.lowcomplexity.profiles import PROFILES
    from labs.lowcomplexity.reference_model import build_reference

    for name, profile in PROFILES.items():
        model = build_reference(profile.reference_width).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 32, 32))
        parameters = sum(p.numel() for p in model.parameters())
        macs = counter.get_total_flops() // 2
        if name == "quick":
            assert (parameters, macs) == (REFERENCE["parameters"], REFERENCE["macs"])
        assert parameters <= RUBRIC["max_parameters"][name] and macs <= RUBRIC["max_macs"][name]


def test_the_shipped_quick_reference_passes_the_quick_rubric():
    manifest = SHIPPED_BUNDLES / "quick" / "manifest.json"
    if not manifest.is_file():
        pytest.skip("the quick bundle is not shipped yet")
    reference = json.loads(manifest.read_text())["reference"]
    assert reference["parameters"] <= RUBRIC["max_parameters"]["quick"]
    assert reference["macs"] <= RUBRIC["max_macs"]["quick"]
    assert reference["accuracy_pct"] >= RUBRIC["accuracy_threshold_pct"]["quick"]


# ------------------------------------------------------------------------------- report

HOSTILE = "<script>alert(1)</script>"


def hostile_result() -> dict:
    evaluation = honest()
    evaluation["claims"]["lines"]["accuracy_pct"] = f"Accuracy = 84.90 % {HOSTILE}"
    evaluation["claim_checks"][2]["evidence"] = f"Accuracy = 84.90 % {HOSTILE}"
    evaluation["model"]["candidates"].insert(0, {"name": HOSTILE, "why": f"KeyError: {HOSTILE}"})
    evaluation["transforms"]["found"][HOSTILE] = {"steps": [HOSTILE], "random": False,
                                                  "normalize": None}
    evaluation["weights"]["file"] = f"{HOSTILE}.pth"
    return {"submission": "student-1", "profile": "quick", "metrics": evaluation,
            "diagnoses": [d.to_dict() for d in CATALOGUE.run(evaluation)]}


def test_the_section_shows_the_claims_and_the_reference_and_escapes_student_text():
    html = section(hostile_result())
    assert "<script" not in html and "&lt;script&gt;" in html
    assert 'id="claims"' in html and "flops = 57533440" in html
    assert "57,533,440 FLOPs (2 per MAC) = 28,766,720 MACs" in html
    assert "matches (FLOPs = 2 x MACs (torch.utils.flop_counter))" in html
    assert 'id="reference"' in html and "ReferenceCNN (width 16)" in html
    assert "110,580" in html and "85.0%" in html and "85.3%" in html
    assert html.count(PNG) == 1


def test_the_whole_page_renders_the_section():
    html = report_html(hostile_result(), None, REPORT)
    assert "The lab's part of this report is not available" not in html
    assert 'id="claims"' in html and "<script" not in html
    assert "Lab 5: a low-complexity model: grading report" in html


def test_an_unmeasured_hand_in_renders_without_plot():
    result = {"metrics": not_measured(honest(), export={"exported": False, "why": HOSTILE})}
    html = section(result)
    assert PNG not in html and "not measured" in html and "<script" not in html
    assert section({}) and section({"metrics": {"measured": "junk", "claims": [1]}})


def test_class_plot():
    rows = [{"metrics": honest()}, {"metrics": {"measured": None}}, {"metrics": "junk"}]
    second = honest()
    second["measured"].update(macs=5_000_000, parameters=40_000, accuracy_pct=70.0)
    rows.append({"metrics": second})
    assert class_plot(rows).startswith(PNG)
    assert REPORT.class_plot(rows).startswith(PNG)
    assert class_plot([{"metrics": {"measured": None}}]) is None
