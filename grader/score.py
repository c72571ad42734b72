"""The rubric (a data file) turned into checks and points.

Every automatic rubric item has one check function here returning the fraction
earned and a message. A check depends on named runs: when all of them failed
(timeout, out-of-memory, dead kernel, exception, missing artifact) the check is
an ``error`` worth nothing, and every other check still counts.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from grader.diagnose import (Diagnosis, copy_exact, copy_issues, has_single_channel_layer,
                             looks_like_train_mode)

UPDATEBN_FAMILY = {"updatebn-after-step", "updatebn-wrong-sign", "updatebn-not-sign",
                   "updatebn-on-weights", "l1-all-parameters"}
PRUNE_RUNS = ("prune-0.5", "prune-0.9", "prune-edge")


@dataclass
class Check:
    id: str
    stage: str
    title: str
    status: str  # pass | fail | error | skip
    points: float
    max_points: float
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_rubric(path: str | Path | None = None) -> dict:
    if path is None:
        return json.loads(resources.files("grader").joinpath("rubric.json").read_text())
    return json.loads(Path(path).read_text())


Outcome = tuple[float, str]  # fraction earned (0..1), message
CheckFunction = Callable[[dict, list[Diagnosis], dict], Outcome]
CHECKS: dict[str, tuple[tuple[str, ...], CheckFunction]] = {}


def check(id: str, runs: tuple[str, ...]) -> Callable[[CheckFunction], CheckFunction]:
    def register(function: CheckFunction) -> CheckFunction:
        CHECKS[id] = (runs, function)
        return function
    return register


def score(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> tuple[list[Check], float, float]:
    checks = []
    for item in rubric["items"]:
        title, points = item["title"], float(item["points"])
        if item.get("manual"):
            checks.append(Check(item["id"], item["stage"], title, "skip", 0.0, points,
                                "Graded by hand from the report."))
            continue
        runs, function = CHECKS[item["id"]]
        failed = [evaluation["runs"][r]["failure"] for r in runs
                  if r in evaluation["runs"] and evaluation["runs"][r].get("failure")]
        usable = [r for r in runs if r in evaluation["runs"] and not evaluation["runs"][r].get("failure")]
        if runs and not usable:
            reason = failed[0]["message"] if failed else "the notebook for this stage was not found"
            checks.append(Check(item["id"], item["stage"], title, "error", 0.0, points,
                                f"Not graded: {reason}"))
            continue
        fraction, message = function(evaluation, diagnoses, rubric)
        status = "pass" if fraction >= 1.0 else "fail"
        checks.append(Check(item["id"], item["stage"], title, status, round(points * fraction, 2),
                            points, message))
    automatic = [c for c in checks if c.status != "skip"]
    return checks, round(sum(c.points for c in automatic), 2), sum(c.max_points for c in automatic)


def _ids(diagnoses: list[Diagnosis]) -> set[str]:
    return {d.id for d in diagnoses if d.severity == "error"}


def _isolated_prune(evaluation: dict) -> list[tuple[str, dict]]:
    return [(key, facts) for key, facts in evaluation.get("prune", {}).items() if facts]


def _share(evaluation: dict, ok: Callable[[dict], bool], what: str,
           also: Callable[[dict], bool] = lambda facts: False) -> Outcome:
    """Share of isolated pruning runs where ``ok``; runs without a comparable thin model
    count only when ``also`` says they bear on this blank."""
    judged = [(key, ok(facts)) for key, facts in _isolated_prune(evaluation)
              if "copy_differences" in facts or "thin_error" in facts or also(facts)]
    if not judged:
        return 0.0, f"No pruned model could be compared ({what})."
    wrong = [key for key, good in judged if not good]
    if not wrong:
        return 1.0, f"{what.capitalize()}: right in every pruning run ({', '.join(k for k, _ in judged)})."
    return (len(judged) - len(wrong)) / len(judged), f"{what.capitalize()}: wrong in run(s) {', '.join(wrong)}."


# ---------------------------------------------------------------- sparsity_train

@check("blank-lambda", ())
def lambda_value(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    value = evaluation.get("student_lambda")
    low, high = rubric["lambda_range"]
    if value is None:
        return 0.0, "LAMBDA is not set to a number in sparsity_train.ipynb."
    if low <= value <= high:
        return 1.0, f"LAMBDA = {value:g}, within [{low:g}, {high:g}]."
    return 0.0, f"LAMBDA = {value:g} is outside [{low:g}, {high:g}], the range that sparsifies without ruining accuracy."


@check("blank-updateBN", ("sparsity", "sparsity-lambda0"))
def update_bn(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    found = sorted(UPDATEBN_FAMILY & _ids(diagnoses))
    if found:
        return 0.0, f"updateBN is wrong: {', '.join(found)}."
    c = evaluation.get("sparsity", {}).get("comparison")
    if not c or "baseline_small_fraction" not in c:
        return 0.0, "The sparse checkpoints could not be compared: " + \
            evaluation.get("sparsity", {}).get("lambda", {}).get("error", "a run is missing.")
    if c["small_fraction"] <= c["baseline_small_fraction"]:
        return 0.0, "The lambda run is not sparser than the lambda-0 run."
    return 1.0, (f"{c['small_fraction']:.0%} of |gamma| below 0.01 (reference "
                 f"{c['reference_small_fraction']:.0%}, lambda 0: {c['baseline_small_fraction']:.0%}).")


@check("gamma-plot", ("sparsity",))
def gamma_plot(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    images = evaluation["runs"]["sparsity"].get("images", [])
    if images:
        return 1.0, f"sparsity_train.ipynb draws {len(images)} figure(s)."
    return 0.0, "sparsity_train.ipynb draws no figure: plot the histogram of |gamma|."


# ---------------------------------------------------------------- vggprune

def _crashed_on_one_channel(facts: dict) -> bool:
    """The run failed on a layer left with one channel: the index blank's doing."""
    return bool(facts.get("run_failure")) and has_single_channel_layer(facts)


def _indices_right(facts: dict) -> bool:
    return "thin_error" not in facts and not _crashed_on_one_channel(facts) and not any(
        d["kind"] == "shape" or d["part"] == "conv" for d in facts.get("copy_differences", []))


@check("blank-kept-indices", PRUNE_RUNS)
def kept_indices(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, _indices_right, "the indices of kept channels",
                  also=_crashed_on_one_channel)


@check("blank-copy-bn-affine", PRUNE_RUNS)
def copy_bn_affine(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, lambda f: "thin_error" not in f and not any(
        d["tensor"] in ("weight", "bias") for d in copy_issues(f, "bn")), "BN weight and bias")


@check("blank-copy-bn-stats", PRUNE_RUNS)
def copy_bn_stats(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, lambda f: "thin_error" not in f and not any(
        d["tensor"] in ("running_mean", "running_var") for d in copy_issues(f, "bn")),
        "BN running statistics")


@check("blank-copy-linear-weight", PRUNE_RUNS)
def copy_linear_weight(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, lambda f: "thin_error" not in f and not any(
        d["tensor"] == "weight" for d in copy_issues(f, "linear")), "the Linear weight")


@check("blank-copy-linear-bias", PRUNE_RUNS)
def copy_linear_bias(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, lambda f: "thin_error" not in f and not any(
        d["tensor"] == "bias" for d in copy_issues(f, "linear")), "the Linear bias")


def prune_done(key: str) -> CheckFunction:
    """A third each: a thin model that loads and runs, masks equal to the reference, and a
    thin model that computes what the masked original computes."""
    def judge(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
        facts = evaluation.get("prune", {}).get(key, {})
        problem = facts.get("error") or facts.get("checkpoint_error") or facts.get("thin_error")
        if problem:
            return 0.0, problem
        built = "accuracy" in facts
        masks_right = facts.get("mask_correct", False)
        same_function = copy_exact(facts)
        parts = [f"thin model cfg {facts.get('cfg')}" if built else "no usable thin model",
                 "masks equal the reference" if masks_right else
                 f"masks differ from the reference in layers {facts.get('mask_layers_wrong')}"
                 if facts.get("masks_reported") else "cfg_mask was not found in the notebook",
                 "its logits equal the masked original's" if same_function else
                 "its logits differ from the masked original's"]
        if looks_like_train_mode(facts):
            parts.append("tested in train mode")
        return (built + masks_right + same_function) / 3, "; ".join(parts) + "."
    return judge


check("prune-0.5", ("prune-0.5",))(prune_done("0.5"))
check("prune-0.9", ("prune-0.9",))(prune_done("0.9"))


# ---------------------------------------------------------------- train_prune_model and chained

@check("finetune", ("finetune",))
def finetune(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    facts = evaluation.get("finetune", {})
    if "accuracy" not in facts:
        return 0.0, facts.get("error", "the fine-tuned checkpoint could not be evaluated.")
    reference = evaluation["reference"]["finetune_accuracy"]
    band = evaluation["reference"]["accuracy_band_pct"]
    in_band = facts["accuracy"] >= reference - band
    kept = bool(facts["architecture_kept"])
    return (0.5 * kept + 0.5 * in_band,
            f"architecture {'kept' if kept else 'changed'}; accuracy {facts['accuracy']:.1f}% "
            f"(reference {reference:.1f}%, band {band:g} points).")


@check("chained", ("chained-finetune",))
def chained(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    facts = evaluation.get("chained", {}).get("finetune", {})
    if "accuracy" not in facts:
        return 0.0, facts.get("error", "the chained run produced no fine-tuned model.")
    return 1.0, f"The student's own pipeline ends at {facts['accuracy']:.1f}% after fine-tuning."
