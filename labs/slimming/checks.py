"""The slimming lab's rubric items, one check function each (see ``grader.score``).

Each returns the fraction earned and a message; ``CHECKS`` holds them by rubric item
id with the runs each reads (when all of those failed, the harness makes the check an
``error`` worth nothing). The course's rubric is ``RUBRIC`` (rubric.json here).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grader.diagnose import Diagnosis
from grader.score import CheckFunction, Checks, Outcome
from labs.slimming.diagnoses import (copy_exact, copy_issues, has_single_channel_layer,
                                     looks_like_train_mode, probe_mismatch, update_bn_probe)
from labs.slimming.evaluate import EDGE_RATIO

# The course's rubric, the default when none is given.
RUBRIC = Path(__file__).resolve().with_name("rubric.json")

UPDATEBN_FAMILY = {"updatebn-after-step", "updatebn-wrong-sign", "updatebn-not-sign",
                   "updatebn-on-weights", "l1-all-parameters", "updatebn-probe-mismatch"}
PRUNE_RUNS = ("prune-0.5", "prune-0.9", "prune-edge")

CHECKS = Checks()
check = CHECKS.check  # @check(id, runs) registers below


def _ids(diagnoses: list[Diagnosis]) -> set[str]:
    return {d.id for d in diagnoses if d.severity == "error"}


def _isolated_prune(evaluation: dict, probes: bool = True) -> list[tuple[str, dict]]:
    return [(key, facts) for key, facts in evaluation.get("prune", {}).items()
            if facts and (probes or key != "edge")]


def _share(evaluation: dict, ok: Callable[[dict], bool], what: str,
           also: Callable[[dict], bool] = lambda facts: False, probes: bool = True) -> Outcome:
    """Share of isolated pruning runs where ``ok``; runs without a comparable thin model
    count only when ``also`` says they bear on this blank."""
    judged = [(key, ok(facts)) for key, facts in _isolated_prune(evaluation, probes)
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
    probe = update_bn_probe(evaluation)
    if probe is not None and probe_mismatch(probe):
        return 0.0, f"updateBN on a probe network: {'; '.join(probe_mismatch(probe))}."
    if any(evaluation.get("sparsity", {}).get(k, {}).get("copied_from") for k in ("lambda", "lambda0")):
        return 0.0, "The sparse checkpoint was not trained by the notebook (checkpoint-not-trained)."
    c = evaluation.get("sparsity", {}).get("comparison")
    if not c or "baseline_small_fraction" not in c:
        return 0.0, "The sparse checkpoints could not be compared: " + \
            evaluation.get("sparsity", {}).get("lambda", {}).get("error", "a run is missing.")
    if c["small_fraction"] <= c["baseline_small_fraction"]:
        return 0.0, "The lambda run is not sparser than the lambda-0 run."
    return 1.0, (f"{c['small_fraction']:.0%} of |gamma| below 0.01 (reference "
                 f"{c['reference_small_fraction']:.0%}, lambda 0: {c['baseline_small_fraction']:.0%}).")


GAMMA_PLOT_RUNS = ("sparsity", "prune-0.5", "prune-0.9")
# A plotted |gamma| quantile within this share (plus an absolute slack) of the run's own model:
# the plotted model may be the last epoch's, the checkpoint the best epoch's.
QUANTILE_TOLERANCE = (0.35, 0.01)


def _plots_the_gammas(histogram: dict, reference: list[float] | None, channels: int) -> bool:
    """One value per BN channel, with the median and 90th percentile of the run's |gamma|."""
    if histogram["values"] != channels or not reference:
        return False
    share, slack = QUANTILE_TOLERANCE
    return all(abs(histogram["quantiles"][i] - reference[i]) <= share * reference[i] + slack
               for i in (1, 2))


@check("gamma-plot", GAMMA_PLOT_RUNS)
def gamma_plot(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    """Automatic only when a histogram holds the |gamma| of the run's own network; other
    figures are left to the TA (a picture alone proves nothing: a 1x1 image is a figure)."""
    channels = evaluation["reference"]["bn_channels"]
    quantiles = evaluation.get("gamma_quantiles", {})
    if any(_plots_the_gammas(h, quantiles.get(run_id), channels) for run_id in GAMMA_PLOT_RUNS
           for h in evaluation["runs"].get(run_id, {}).get("histograms", [])):
        return 1.0, f"A histogram of the |gamma| of all {channels} BN channels is drawn."
    figures = sum(len(evaluation["runs"].get(r, {}).get("images", [])) for r in GAMMA_PLOT_RUNS)
    if figures:
        return None, (f"{figures} figure(s) drawn, none of them recognised as a histogram of the "
                      f"network's {channels} |gamma| values: graded by hand from the notebook.")
    return 0.0, "No figure of the gammas is drawn: plot the histogram of |gamma| of every BN layer."


# ---------------------------------------------------------------- vggprune

def _crashed_on_one_channel(facts: dict) -> bool:
    """The run failed on a layer left with one channel: the index blank's doing."""
    return bool(facts.get("run_failure")) and has_single_channel_layer(facts)


def _indices_right(facts: dict) -> bool:
    return "thin_error" not in facts and not _crashed_on_one_channel(facts) and not any(
        d["kind"] == "shape" or d["part"] == "conv" for d in facts.get("copy_differences", []))


@check("blank-kept-indices", PRUNE_RUNS)
def kept_indices(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    # The edge probe's 1-channel layer never occurs at full scale (a model pruned at 0.9
    # keeps at least 17 channels a layer): what it finds is the min-channel-rule warning.
    return _share(evaluation, _indices_right, "the indices of kept channels",
                  also=_crashed_on_one_channel, probes=False)


def _copied(part: str, *tensors: str) -> Callable[[dict], bool]:
    """A pruning run's thin model holds these tensors as the kept slices; masks that prune
    nothing earn no copy blank (copying the whole original is no copy of kept channels). A
    copy cut short by a 1-channel layer's index is the index blank's (and the probe's) doing."""
    def right(facts: dict) -> bool:
        if _crashed_on_one_channel(facts):
            return True
        return "thin_error" not in facts and not facts.get("masks_not_pruning") \
            and not any(d["tensor"] in tensors for d in copy_issues(facts, part))
    return right


@check("blank-copy-bn-affine", PRUNE_RUNS)
def copy_bn_affine(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, _copied("bn", "weight", "bias"), "BN weight and bias")


@check("blank-copy-bn-stats", PRUNE_RUNS)
def copy_bn_stats(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, _copied("bn", "running_mean", "running_var"), "BN running statistics")


@check("blank-copy-linear-weight", PRUNE_RUNS)
def copy_linear_weight(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, _copied("linear", "weight"), "the Linear weight")


@check("blank-copy-linear-bias", PRUNE_RUNS)
def copy_linear_bias(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    return _share(evaluation, _copied("linear", "bias"), "the Linear bias")


def prune_done(key: str) -> CheckFunction:
    """A third each: a thin model that loads and runs, masks equal to the reference, and a
    thin model that computes what the masked original computes."""
    def judge(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
        facts = evaluation.get("prune", {}).get(key, {})
        problem = facts.get("error") or facts.get("checkpoint_error") or facts.get("thin_error")
        if problem:
            return 0.0, problem
        built = "accuracy" in facts
        masks = ("masks equal the reference" if facts.get("mask_correct") else
                 f"masks differ from the reference in layers {facts.get('mask_layers_wrong')}"
                 if facts.get("masks_reported") else "cfg_mask was not found in the notebook")
        masks_right = bool(facts.get("mask_correct"))
        # The edge probe prunes at 0.5 too, with a large negative gamma planted: its masks
        # count here, so a signed threshold is judged the same on every machine.
        edge = evaluation.get("prune", {}).get("edge", {})
        if key == str(EDGE_RATIO) and edge.get("masks_reported") and not edge.get("mask_correct"):
            masks_right = False
            masks += (f"; on the probe input the masks differ in layers "
                      f"{edge.get('mask_layers_wrong')}")
        same_function = copy_exact(facts)
        parts = [f"thin model cfg {facts.get('cfg')}" if built else "no usable thin model", masks,
                 "its logits equal the masked original's" if same_function else
                 "its logits differ from the masked original's"]
        if looks_like_train_mode(facts):
            parts.append("tested in train mode")
        return (built + masks_right + same_function) / 3, "; ".join(parts) + "."
    return judge


check("prune-0.5", ("prune-0.5",))(prune_done("0.5"))
check("prune-0.9", ("prune-0.9",))(prune_done("0.9"))


MIN_CHANNEL_WARNINGS = ("min-channel-first-k", "single-channel-index", "layer-zero-channels")


@check("min-channel-rule", ("prune-edge",))
def min_channel_rule(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    """The course leaves this TODO ungraded (0 points by default); a rubric may weigh it."""
    found = sorted({d.id for d in diagnoses if d.id in MIN_CHANNEL_WARNINGS})
    if found:
        return 0.0, f"A layer that keeps too few channels is not handled well: {', '.join(found)}."
    return 1.0, "A layer left with one channel by the threshold is handled."


# ---------------------------------------------------------------- train_prune_model and chained

@check("finetune", ("finetune",))
def finetune(evaluation: dict, diagnoses: list[Diagnosis], rubric: dict) -> Outcome:
    facts = evaluation.get("finetune", {})
    if "accuracy" not in facts:
        return 0.0, facts.get("error", "the fine-tuned checkpoint could not be evaluated.")
    if facts.get("copied_from"):
        return 0.0, f"The fine-tuned checkpoint equals {facts['copied_from']}: it was not trained."
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
    if facts.get("copied_from"):
        return 0.0, f"The student's own fine-tuned checkpoint equals {facts['copied_from']}."
    return 1.0, f"The student's own pipeline ends at {facts['accuracy']:.1f}% after fine-tuning."
