"""The diagnosis catalogue: documented, and each unit firing on its own evidence."""
from __future__ import annotations

import re
from pathlib import Path

from grader.score import load_rubric, score
from labs.slimming.checks import CHECKS, RUBRIC
from labs.slimming.diagnoses import CATALOGUE, diagnose

DOCS = Path(__file__).resolve().parents[1] / "docs" / "diagnoses.md"


def test_every_diagnosis_id_is_documented_and_every_documented_id_exists():
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOCS.read_text(), flags=re.M))
    assert documented == {entry.id for entry in CATALOGUE.entries}


def test_every_automatic_rubric_item_has_a_check():
    rubric = load_rubric(RUBRIC)
    automatic = {item["id"] for item in rubric["items"] if not item.get("manual")}
    assert automatic == set(CHECKS)


def prune_facts(**overrides):
    facts = {"reference_kept": [3, 4], "student_kept": [3, 4], "mask_strategy": "correct",
             "mask_correct": True, "masks_reported": True, "copy_differences": [],
             "logits_max_diff": 0.0, "accuracy": 90.0, "majority_fraction": 0.2,
             "collapsed": False, "accuracy_recalibrated": 90.0, "claimed_accuracies": [90.0],
             "cfg": [3, "M", 4]}
    facts.update(overrides)
    return facts


def evaluation_with(prune):
    runs = {r: {"failure": None, "usable": True, "images": [3], "histograms": []} for r in
            ("sparsity", "sparsity-lambda0", "prune-0.5", "prune-0.9", "prune-edge", "finetune",
             "chained-finetune")}
    runs["sparsity"]["histograms"] = [{"values": 688, "quantiles": [0.0, 0.01, 0.4, 0.9]}]
    return {"runs": runs, "prune": prune, "sparsity": {}, "chained": {}, "student_lambda": 1e-4,
            "reference": {"bn_channels": 688},
            "gamma_quantiles": {"sparsity": [0.0, 0.012, 0.38, 0.9]}}


def ids(evaluation):
    return {d.id for d in diagnose(evaluation)}


def test_collapse_with_exact_copy_is_a_statistics_shift_not_a_copy_bug():
    shifted = prune_facts(collapsed=True, majority_fraction=1.0, accuracy=10.0,
                          accuracy_recalibrated=85.0, claimed_accuracies=[10.0])
    assert ids(evaluation_with({"0.5": shifted})) == {"bn-statistics-shift"}


def test_collapse_with_fresh_running_stats_is_a_copy_bug_not_a_shift():
    broken = prune_facts(collapsed=True, majority_fraction=1.0, accuracy=10.0, logits_max_diff=3.0,
                         claimed_accuracies=[10.0], copy_differences=[{
                             "key": "feature.4.running_var", "layer": 1, "part": "bn",
                             "tensor": "running_var", "kind": "initial",
                             "detail": "running_var of BN layer 1 is still all 1 (its initial value)"}])
    found = ids(evaluation_with({"0.5": broken}))
    assert found == {"bn-copy-bug"}


def test_train_mode_moves_statistics_without_calling_it_a_copy_bug():
    moved = prune_facts(claimed_accuracies=[60.0], accuracy=20.0, logits_max_diff=1.0,
                        copy_differences=[{"key": "feature.1.running_mean", "layer": 0, "part": "bn",
                                           "tensor": "running_mean", "kind": "moved",
                                           "detail": "moved"}])
    assert ids(evaluation_with({"0.9": moved})) == {"tested-train-mode"}


def test_the_solution_shape_scores_full_marks_on_the_pruning_checks():
    evaluation = evaluation_with({k: prune_facts() for k in ("0.5", "0.9", "edge")})
    checks, _, _ = score(evaluation, diagnose(evaluation), load_rubric(RUBRIC), CHECKS)
    by_id = {c.id: c for c in checks}
    for check_id in ("blank-kept-indices", "blank-copy-bn-affine", "blank-copy-bn-stats",
                     "blank-copy-linear-weight", "blank-copy-linear-bias", "prune-0.5", "prune-0.9"):
        assert by_id[check_id].status == "pass", by_id[check_id]


def test_a_failed_run_costs_only_its_checks():
    evaluation = evaluation_with({k: prune_facts() for k in ("0.5", "0.9", "edge")})
    evaluation["runs"]["finetune"]["failure"] = {"message": "train_prune_model.ipynb: cell 4 ran out of memory.",
                                                 "kind": "out-of-memory"}
    evaluation["runs"]["finetune"]["usable"] = False
    checks, _, _ = score(evaluation, diagnose(evaluation), load_rubric(RUBRIC), CHECKS)
    by_id = {c.id: c for c in checks}
    assert by_id["finetune"].status == "error" and "out of memory" in by_id["finetune"].message
    assert by_id["prune-0.9"].status == "pass"


def test_the_gamma_plot_is_automatic_only_for_a_histogram_of_every_channel():
    def gamma_plot(evaluation):
        checks, _, _ = score(evaluation, diagnose(evaluation), load_rubric(RUBRIC), CHECKS)
        return next(c for c in checks if c.id == "gamma-plot")

    evaluation = evaluation_with({})
    assert gamma_plot(evaluation).status == "pass"
    random = {"values": 688, "quantiles": [0.0, 0.5, 0.9, 1.0]}  # plt.hist(np.random.rand(688))
    evaluation["runs"]["sparsity"]["histograms"] = [random, {"values": 1, "quantiles": [0, 0, 0, 0]}]
    assert gamma_plot(evaluation).status == "skip"  # figures, but not of the gammas: the TA's
    for run in evaluation["runs"].values():
        run["images"] = []
    assert gamma_plot(evaluation).status == "fail"


def test_masks_matching_no_known_mistake_say_what_differs_and_name_no_cause():
    odd = prune_facts(mask_strategy=None, mask_correct=False, student_kept=[2, 4],
                      mask_layers_wrong=[0])
    assert ids(evaluation_with({"0.5": odd})) == {"masks-differ"}
    inverted = prune_facts(mask_strategy="inverted", mask_correct=False, mask_layers_wrong=[0, 1])
    assert ids(evaluation_with({"0.5": inverted})) == {"mask-inverted"}


def test_an_updatebn_that_fails_the_probe_loses_the_blank_even_with_sparse_gammas():
    evaluation = evaluation_with({})
    evaluation["sparsity"]["comparison"] = {
        "small_fraction": 0.6, "reference_small_fraction": 0.5, "baseline_small_fraction": 0.0,
        "mean_abs": 0.1, "reference_mean_abs": 0.1, "baseline_mean_abs": 0.5,
        "max_diff_to_baseline": 0.4, "conv_small_fraction": 0.0, "baseline_conv_small_fraction": 0.0}

    def update_bn(evaluation):
        checks, _, _ = score(evaluation, diagnose(evaluation), load_rubric(RUBRIC), CHECKS)
        return next(c for c in checks if c.id == "blank-updateBN")

    assert update_bn(evaluation).status == "pass"
    probe = {"ran": True, "bn_grad_ok": False, "others_untouched": True, "weights_untouched": True}
    evaluation["runs"]["sparsity"]["update_bn_probe"] = probe  # gammas shrunk after training
    assert "updatebn-probe-mismatch" in ids(evaluation)
    assert update_bn(evaluation).status == "fail"
    evaluation["runs"]["sparsity"]["update_bn_probe"] = {"ran": False, "why": "TypeError"}
    assert update_bn(evaluation).status == "pass"  # an updateBN with other arguments: stats decide
