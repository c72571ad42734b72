"""Lab 5's rubric items, one check function each (see ``grader.score``).

Each returns the fraction earned and a message; ``CHECKS`` holds them by rubric item id
with the run each reads: when the notebook's run produced nothing usable, the harness
makes the check an ``error`` worth nothing. Thresholds come from the rubric, per profile
(``accuracy_threshold_pct``, ``max_parameters``, ``max_macs``; rubric.json's
"assumptions" says why each is what it is). A profile the rubric sets no number for is
left to the TA rather than failed: that is the rubric's gap, not the student's.
"""
from __future__ import annotations

from grader.diagnose import Diagnosis
from grader.render import as_dict, number
from grader.score import Checks, Outcome
from labs.lowcomplexity.diagnoses import (DISHONEST, FIGURE_WORDS, NOT_MEASURED, budget_figures,
                                          claim_check, credited_accuracy, measured_figures)

RUNS = ("export",)  # the one run of labs.lowcomplexity.grading (its RUN)
# complexity earns nothing below this share of the accuracy threshold: a model that does
# not classify is not a low-complexity model, it is an empty one.
MIN_ACCURACY_SHARE = 0.5

CHECKS = Checks()
check = CHECKS.check  # @check(id, runs) registers below


def _threshold(rubric: dict, key: str, evaluation: dict) -> float | None:
    return number(as_dict(rubric.get(key)).get(evaluation.get("profile")))


def _unset(key: str, evaluation: dict) -> Outcome:
    return None, (f"Not graded automatically: the rubric sets no {key} for the profile "
                  f"{evaluation.get('profile')!s:.40}.")


def _not_measured(diagnoses: list[Diagnosis]) -> str:
    """Why no model was measured: the first cause the diagnoses found."""
    cause = next((d for d in diagnoses if d.id in NOT_MEASURED), None)
    return f"The model was not measured: {cause.message}" if cause else \
        "The model was not measured: the notebook's run exported none (see the failures)."


@check("model-measured", RUNS)
def model_measured(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    measured = measured_figures(evaluation)
    if measured is None:
        return 0.0, _not_measured(diagnoses)
    return 1.0, (f"Exported and measured: {int(measured['parameters']):,} parameters, "
                 f"{int(measured['macs']):,} MACs, {measured['accuracy_pct']:.2f} % top-1.")


@check("claims-match", RUNS)
def claims_match(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    """A third per printed figure that the measurement confirms."""
    if measured_figures(evaluation) is None:
        return 0.0, "No printed figure could be checked: " + _not_measured(diagnoses)
    verdicts, matched = [], 0
    for figure, words in FIGURE_WORDS.items():
        found = claim_check(evaluation, figure)
        if number(found.get("claimed")) is None:
            verdicts.append(f"{words} not printed")
        elif found.get("ok") is True:
            matched += 1
            convention = f" ({found['convention']})" if found.get("convention") else ""
            verdicts.append(f"{words} matches{convention}")
        else:
            verdicts.append(f"{words} differs")
    return matched / len(FIGURE_WORDS), "; ".join(verdicts) + "."


@check("accuracy", RUNS)
def accuracy(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    threshold = _threshold(rubric, "accuracy_threshold_pct", evaluation)
    if threshold is None:
        return _unset("accuracy_threshold_pct", evaluation)
    value = credited_accuracy(evaluation)
    if value is None:
        return 0.0, _not_measured(diagnoses)
    passed = value >= threshold
    measured = float(measured_figures(evaluation)["accuracy_pct"])
    credited = "" if value == measured else \
        f" credited (the test set gives {measured:.2f} %, see {', '.join(_lowered(diagnoses))})"
    return (1.0 if passed else 0.0, f"{value:.2f} % top-1{credited or ' on the test set'}, "
            f"{'at or above' if passed else 'below'} the threshold of {threshold:g} %.")


def _lowered(diagnoses: list[Diagnosis]) -> list[str]:
    return [d.id for d in diagnoses if d.id in ("fragile-accuracy", "learnt-the-test-set")] \
        or ["the diagnoses"]


@check("complexity", RUNS)
def complexity(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    """Half per figure within its budget; nothing for a model that barely classifies."""
    budgets = {key: _threshold(rubric, key, evaluation)
               for key in ("max_parameters", "max_macs", "accuracy_threshold_pct")}
    unset = next((key for key, value in budgets.items() if value is None), None)
    if unset:
        return _unset(unset, evaluation)
    measured = measured_figures(evaluation)
    if measured is None:
        return 0.0, _not_measured(diagnoses)
    floor = MIN_ACCURACY_SHARE * budgets["accuracy_threshold_pct"]
    credited = credited_accuracy(evaluation)
    if credited < floor:
        return 0.0, (f"{credited:.2f} % top-1 is below {floor:g} %, half the "
                     "accuracy threshold: a model that does not classify earns nothing for "
                     "being small.")
    # What the model keeps outside its parameters, and computes where flop_counter does not
    # look, counts too (hidden-parameters, uncounted-compute).
    held = dict(zip(("parameters", "macs"), budget_figures(measured)))
    parts, earned = [], 0.0
    for figure, key, words, extra in (("parameters", "max_parameters", "parameters",
                                       "with buffers and constants"),
                                      ("macs", "max_macs", "MACs", "with uncounted work")):
        within = held[figure] <= budgets[key]
        earned += 0.5 * within
        counted = f" {extra}" if held[figure] != measured[figure] else ""
        parts.append(f"{held[figure]:,} {words}{counted} ({'within' if within else 'over'} "
                     f"the budget of {budgets[key]:,.0f})")
    return earned, " and ".join(parts) + "."


@check("honest-evaluation", RUNS)
def honest_evaluation(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    """Earned only on evidence: a printed accuracy that the measurement could judge."""
    found = [d.id for d in diagnoses if d.id in DISHONEST]
    if found:
        return 0.0, f"The printed accuracy is not a test accuracy: {', '.join(found)}."
    measured = measured_figures(evaluation)
    if measured is None:
        return 0.0, "Not judged: " + _not_measured(diagnoses)
    claimed = number(as_dict(evaluation.get("claims")).get("accuracy_pct"))
    if claimed is None:
        return 0.0, "No accuracy was printed, so there is no evaluation to judge."
    train = number(measured.get("train_accuracy_pct"))
    on_train = f" and {train:.2f} % on training images" if train is not None else ""
    return 1.0, (f"No sign of an evaluation on training images or with another normalisation: "
                 f"printed {claimed:.2f} %, measured {measured['accuracy_pct']:.2f} % on the test "
                 f"set{on_train}.")
