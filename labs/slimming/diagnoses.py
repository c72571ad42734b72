"""The slimming lab's catalogue of mistakes: one small unit per diagnosis id.

Each unit reads the evaluation (plain facts, see ``labs.slimming.evaluate``) and either
finds nothing or returns a message and its evidence. Its id, stage, severity and
hint for the student are declared with it. ``error`` means a mistake of the
student's; ``warning`` is worth fixing but costs nothing under the course's rubric
(the ungraded min-channel TODO; a rubric may weigh it); ``info`` is worth knowing
and not the student's doing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from grader.diagnose import Catalogue, Detector, Finding, finding
from labs.slimming.evaluate import LOGITS_TOLERANCE, RECOVERY_POINTS

# Gap between a printed accuracy and the grader's eval-mode re-test that means "not eval mode".
CLAIM_GAP_PCT = 1.0

CATALOGUE = Catalogue()
diagnosis = CATALOGUE.diagnosis  # @diagnosis(id, stage, hint, severity) registers below
diagnose = CATALOGUE.run


# ---------------------------------------------------------------- helpers over the evaluation

def prune_runs(evaluation: dict) -> Iterator[tuple[str, dict]]:
    """(label, facts) of every vggprune run, isolated and chained, that produced facts."""
    for key, facts in evaluation.get("prune", {}).items():
        yield f"isolated {key}", facts
    for key, facts in evaluation.get("chained", {}).get("prune", {}).items():
        yield f"chained {key}", facts


def copy_issues(facts: dict, part: str) -> list[dict]:
    """Copy mistakes of one part; moved statistics (train mode) and the 1-channel index
    bug have diagnoses of their own. A copy cut short by that bug (the run failed with a
    1-channel layer, then saved what it had), or judged against masks the student did not
    use (masks that prune nothing), says nothing about the copy blanks."""
    if facts.get("masks_not_pruning") or (facts.get("run_failure") and has_single_channel_layer(facts)):
        return []
    return [d for d in facts.get("copy_differences", []) if d["part"] == part
            and d["kind"] != "moved" and (d["kind"] != "shape" or not has_single_channel_layer(facts))]


def kept_channels(facts: dict) -> list:
    """Channels kept per layer, from the dumped cfg_mask or else the dumped cfg."""
    return facts.get("student_kept") or [v for v in (facts.get("state_cfg") or []) if v != "M"]


def has_single_channel_layer(facts: dict) -> bool:
    return 1 in kept_channels(facts)


def claim_gap(facts: dict) -> bool:
    """The notebook's last printed accuracy is not what an eval-mode re-test gives."""
    claimed, measured = facts.get("claimed_accuracies") or [], facts.get("accuracy")
    return bool(claimed) and measured is not None and abs(claimed[-1] - measured) > CLAIM_GAP_PCT


def moved_statistics(facts: dict) -> list[str]:
    return [d["detail"] for d in facts.get("copy_differences", []) if d["kind"] == "moved"]


def looks_like_train_mode(facts: dict) -> bool:
    return claim_gap(facts) or bool(moved_statistics(facts))


def copy_exact(facts: dict) -> bool:
    return ("copy_differences" in facts and not facts["copy_differences"]
            and facts.get("logits_max_diff", 1.0) <= LOGITS_TOLERANCE)


def per_run(evaluation: dict, describe: Callable[[str, dict], list[str]]) -> list:
    evidence = []
    for label, facts in prune_runs(evaluation):
        lines = describe(label, facts)
        if lines:
            evidence.append({"run": label, "details": lines})
    return evidence


# ---------------------------------------------------------------- vggprune: copying

def copy_diagnosis(part: str, message: str) -> Detector:
    """Thin tensors of one kind (bn, linear, conv) that are not their kept slices."""
    def detect(evaluation: dict) -> Finding | None:
        evidence = per_run(evaluation, lambda _, f: [d["detail"] for d in copy_issues(f, part)])
        return (f"{message} (e.g. {evidence[0]['details'][0]}).", evidence) if evidence else None
    return detect


diagnosis("bn-copy-bug", "vggprune",
          "Copy weight, bias, running_mean and running_var of every kept BN channel: "
          "m1.running_mean = m0.running_mean[idx1].clone(), and likewise for the others.")(
    copy_diagnosis("bn", "BatchNorm tensors of the pruned model are not the kept slices of the original"))
diagnosis("linear-copy-bug", "vggprune",
          "The classifier keeps only the input columns of kept channels: "
          "m1.weight.data = m0.weight.data[:, idx0].clone(); its bias is copied whole.")(
    copy_diagnosis("linear", "The pruned classifier is not copied from the original"))
diagnosis("conv-slice-bug", "vggprune",
          "A conv weight keeps output channels idx1 and input channels idx0: "
          "w = m0.weight.data[:, idx0, :, :]; w = w[idx1, :, :, :].")(
    copy_diagnosis("conv", "Conv weights of the pruned model are not the kept slices"))


@diagnosis("bn-statistics-shift", "vggprune",
           "Nothing to fix in your code: cut channels used to output ReLU(beta), so the next "
           "layers' running statistics no longer fit. Fine-tuning (or re-estimating BN "
           "statistics on a few training batches) brings the accuracy back.", severity="info")
def bn_statistics_shift(evaluation: dict) -> Finding | None:
    evidence = []
    for label, facts in prune_runs(evaluation):
        if label.endswith("edge"):
            continue  # the edge probe guts one layer on purpose; its accuracy means nothing
        recovered = facts.get("accuracy_recalibrated", 0.0) >= facts.get("accuracy", 0.0) + RECOVERY_POINTS
        if facts.get("collapsed") and copy_exact(facts) and recovered:
            evidence.append({
                "run": label,
                "details": [
                    f"the pruned model gives {facts['majority_fraction']:.0%} of its answers to one "
                    f"class (accuracy {facts['accuracy']:.1f}%)",
                    f"its logits equal the masked original's (largest difference "
                    f"{facts['logits_max_diff']:.2g}): every tensor was copied exactly",
                    f"after re-estimating BN statistics: {facts['accuracy_recalibrated']:.1f}%",
                ]})
    return finding("The pruned model predicts one class because of the BN statistics shift, not a "
                   "copy bug: the copy is exact and BN recalibration recovers the accuracy.", evidence)


# ---------------------------------------------------------------- vggprune: masks

def mask_strategy_diagnosis(strategy: str, message: str) -> Detector:
    def detect(evaluation: dict) -> Finding | None:
        evidence = per_run(evaluation, lambda _, f: (
            [f"cfg_mask equals the {strategy} masks in every layer; the correct masks keep "
             f"{f['reference_kept']}, yours keep {f['student_kept']}"]
            if f.get("mask_strategy") == strategy else []))
        return (message, evidence) if evidence else None
    return detect


diagnosis("mask-inverted", "vggprune",
          "Keep a channel when its |gamma| is ABOVE the threshold: mask = weight.abs().gt(threshold).")(
    mask_strategy_diagnosis("inverted", "The masks keep the channels with the smallest |gamma|."))
diagnosis("threshold-signed", "vggprune",
          "Sort and compare |gamma| (weight.abs()), not gamma: a large negative gamma matters as much "
          "as a large positive one.")(
    mask_strategy_diagnosis("signed", "The threshold is taken on signed gamma, so large negative "
                                      "gammas are cut."))
diagnosis("threshold-per-layer", "vggprune",
          "Network slimming uses ONE global threshold: sort the |gamma| of all BN layers together.")(
    mask_strategy_diagnosis("per-layer", "Each layer is cut at its own quantile instead of one "
                                         "global threshold."))
diagnosis("sort-descending", "vggprune",
          "Sort |gamma| in increasing order so that sorted[int(total * PRUNE_PERCENT)] cuts that "
          "share of the smallest.")(
    mask_strategy_diagnosis("descending", "The threshold comes from a descending sort, so far too "
                                          "few channels are cut."))


@diagnosis("masks-differ", "vggprune",
           "Sort the |gamma| of all BN layers together, take threshold = sorted[int(total * "
           "PRUNE_PERCENT)], and keep a channel when its |gamma| is above it.")
def masks_differ(evaluation: dict) -> Finding | None:
    """Wrong masks that match no catalogued mistake: say what differs, name no cause."""
    evidence = per_run(evaluation, lambda label, f: (
        [f"cfg_mask differs from a correct global threshold in BN layer(s) "
         f"{f.get('mask_layers_wrong')}: the correct masks keep {f['reference_kept']}, yours "
         f"keep {f['student_kept']}"]
        if f.get("masks_reported") and not f.get("mask_correct") and f.get("mask_strategy") is None
        and not label.startswith("chained") else []))
    return finding("The masks differ from those of one global threshold on |gamma|, in a way "
                   "that matches no known mistake.", evidence)


@diagnosis("min-channel-first-k", "vggprune",
           "When a layer keeps too few channels, keep its channels with the LARGEST |gamma| "
           "(torch.topk of weight.abs()), not its first channels.", severity="warning")
def min_channel_first_k(evaluation: dict) -> Finding | None:
    evidence = per_run(evaluation, lambda _, f: (
        [f"in BN layer(s) {f['kept_not_top_k']} the min-channel rule kept channels that are not "
         "that layer's largest |gamma|"] if f.get("kept_not_top_k") or f.get("mask_strategy") == "first-k"
        else []))
    return finding("The min-channel rule keeps a layer's first channels instead of its strongest.", evidence)


@diagnosis("single-channel-index", "vggprune",
           "np.squeeze turns the indices of a 1-channel layer into a scalar; keep them 1-D: "
           "if idx.size == 1: idx = np.resize(idx, (1,)).", severity="warning")
def single_channel_index(evaluation: dict) -> Finding | None:
    def describe(label: str, facts: dict) -> list[str]:
        if not has_single_channel_layer(facts) or 0 in kept_channels(facts):
            return []  # a layer with no channel at all breaks the run first (layer-zero-channels)
        broken = [d["detail"] for d in facts.get("copy_differences", []) if d["kind"] == "shape"]
        if facts.get("thin_error"):
            broken.append(facts["thin_error"])
        if facts.get("run_failure"):
            broken.append(facts["run_failure"])
        return broken[:4]
    evidence = per_run(evaluation, describe)
    return finding("A layer left with one channel lost a tensor dimension while copying.", evidence)


@diagnosis("layer-zero-channels", "vggprune",
           "Never leave a layer with 0 channels (the TODO): keep at least its top-3 |gamma|.",
           severity="warning")
def layer_zero_channels(evaluation: dict) -> Finding | None:
    evidence = per_run(evaluation, lambda _, f: (
        [f"cfg {f.get('state_cfg')} holds a layer with 0 channels"]
        if 0 in kept_channels(f) else []))
    return finding("A layer was left with no channel at all, so the thin model cannot be built.", evidence)


@diagnosis("tested-train-mode", "vggprune",
           "Call model.eval() in test(): in train mode BatchNorm uses the test batch's statistics "
           "and overwrites its running statistics.")
def tested_train_mode(evaluation: dict) -> Finding | None:
    evidence = per_run(evaluation, lambda _, f: (
        [f"the notebook printed {f['claimed_accuracies'][-1]:.1f}% for the pruned model; the "
         f"grader's eval-mode re-test gives {f['accuracy']:.1f}%"] if claim_gap(f) else [])
        + moved_statistics(f)[:3])
    return finding("The reported accuracy was measured in train mode.", evidence)


@diagnosis("unsafe-checkpoint", "vggprune",
           "Save only tensors, numbers and lists (model.state_dict(), cfg): never objects whose "
           "unpickling runs code.")
def unsafe_checkpoint(evaluation: dict) -> Finding | None:
    evidence = [{"run": label, "details": [facts["checkpoint_error"]]}
                for label, facts in prune_runs(evaluation)
                if "Python objects" in facts.get("checkpoint_error", "")]
    return finding("A checkpoint holds objects that would run code when loaded; it was refused.", evidence)


# ---------------------------------------------------------------- sparsity_train: updateBN

def sparsity_comparison(evaluation: dict) -> dict | None:
    comparison = evaluation.get("sparsity", {}).get("comparison")
    return comparison if comparison and "baseline_mean_abs" in comparison else None


def updatebn_without_effect(c: dict) -> bool:
    identical = c["max_diff_to_baseline"] is not None and c["max_diff_to_baseline"] < 1e-4
    return identical or (abs(c["mean_abs"] / c["baseline_mean_abs"] - 1) < 0.02
                         and c["small_fraction"] <= c["baseline_small_fraction"] + 0.02)


@diagnosis("updatebn-after-step", "sparsity_train",
           "Call updateBN() after loss.backward() and BEFORE optimizer.step(): the next "
           "zero_grad() throws away a penalty added after the step.")
def updatebn_after_step(evaluation: dict) -> Finding | None:
    c = sparsity_comparison(evaluation)
    if not c or not updatebn_without_effect(c):
        return None
    return ("The sparsity penalty had no effect: the gammas of the lambda run equal those of the "
            "lambda-0 run.", [
                f"largest |gamma| difference between the two runs: {c['max_diff_to_baseline']:.3g}",
                f"mean |gamma|: {c['mean_abs']:.4f} with lambda, {c['baseline_mean_abs']:.4f} without"])


@diagnosis("updatebn-wrong-sign", "sparsity_train",
           "Add +LAMBDA * sign(gamma) to the gradient: the optimizer subtracts the gradient, "
           "so this pulls every gamma toward 0.")
def updatebn_wrong_sign(evaluation: dict) -> Finding | None:
    c = sparsity_comparison(evaluation)
    if not c or c["mean_abs"] <= c["baseline_mean_abs"] * 1.05:
        return None
    return ("The penalty pushes gammas away from zero: they end larger than without it.", [
        f"mean |gamma| {c['mean_abs']:.4f} with lambda against {c['baseline_mean_abs']:.4f} with "
        f"lambda 0 (the reference: {c['reference_mean_abs']:.4f})"])


@diagnosis("l1-all-parameters", "sparsity_train",
           "Network slimming penalises only the BN scale factors: add the term to "
           "m.weight.grad of nn.BatchNorm2d modules, nothing else.")
def l1_all_parameters(evaluation: dict) -> Finding | None:
    c = sparsity_comparison(evaluation)
    if not c or c["conv_small_fraction"] < max(0.1, 3 * c["baseline_conv_small_fraction"]):
        return None
    return ("The L1 penalty reached the conv weights too.", [
        f"{c['conv_small_fraction']:.0%} of conv weights are below 1e-3 against "
        f"{c['baseline_conv_small_fraction']:.0%} with lambda 0"])


@diagnosis("updatebn-on-weights", "sparsity_train",
           "Add the penalty to the gradient (m.weight.grad), not to the weights: the optimizer "
           "then scales it by the learning rate.")
def updatebn_on_weights(evaluation: dict) -> Finding | None:
    c = sparsity_comparison(evaluation)
    if not c or l1_all_parameters(evaluation) or c["reference_small_fraction"] <= 0:
        return None
    if not (c["mean_abs"] < 0.5 * c["reference_mean_abs"]
            and c["small_fraction"] > min(0.95, 2 * c["reference_small_fraction"])):
        return None
    return ("The gammas shrank far more than lambda allows, as when the penalty bypasses the "
            "learning rate.", [
                f"{c['small_fraction']:.0%} of |gamma| below 0.01 against "
                f"{c['reference_small_fraction']:.0%} in the reference run"])


@diagnosis("updatebn-not-sign", "sparsity_train",
           "Use the L1 subgradient LAMBDA * torch.sign(gamma): an L2 term (LAMBDA * gamma) or "
           "abs() shrinks gammas without driving them to zero.")
def updatebn_not_sign(evaluation: dict) -> Finding | None:
    c = sparsity_comparison(evaluation)
    if not c or updatebn_without_effect(c) or c["mean_abs"] >= c["baseline_mean_abs"] * 1.05:
        return None
    if c["small_fraction"] >= 0.25 * c["reference_small_fraction"] or l1_all_parameters(evaluation):
        return None
    return ("The gammas shrank but show no spike at zero: the penalty is not the L1 subgradient.", [
        f"{c['small_fraction']:.1%} of |gamma| below 0.01 against {c['reference_small_fraction']:.1%} "
        f"in the reference run and {c['baseline_small_fraction']:.1%} with lambda 0"])


UPDATEBN_STATISTICS = ("updatebn-after-step", "updatebn-wrong-sign", "updatebn-not-sign",
                       "updatebn-on-weights", "l1-all-parameters")


def update_bn_probe(evaluation: dict) -> dict | None:
    """What the notebook's updateBN did on a probe network in the sparsity run, if it ran."""
    probe = evaluation.get("runs", {}).get("sparsity", {}).get("update_bn_probe")
    return probe if probe and probe.get("ran") else None


def probe_mismatch(probe: dict) -> list[str]:
    return [text for flag, text in (
        ("bn_grad_ok", "the BN weight's gradient did not grow by LAMBDA * sign(gamma)"),
        ("others_untouched", "the gradient of a parameter other than a BN weight changed"),
        ("weights_untouched", "a weight itself changed (the penalty belongs in the gradient)"))
        if not probe.get(flag)]


@diagnosis("updatebn-probe-mismatch", "sparsity_train",
           "updateBN adds LAMBDA * torch.sign(m.weight.data) to m.weight.grad of every "
           "nn.BatchNorm2d of model, and changes nothing else.")
def updatebn_probe_mismatch(evaluation: dict) -> Finding | None:
    """updateBN called by the grader on a known network does not do the L1 step, and the
    gamma statistics name no other cause: the sparsity seen may not come from training."""
    probe = update_bn_probe(evaluation)
    if probe is None or not probe_mismatch(probe):
        return None
    if any(entry.detect(evaluation) for entry in CATALOGUE.entries if entry.id in UPDATEBN_STATISTICS):
        return None
    return ("The notebook's updateBN, called on a probe network, does not add the L1 "
            "subgradient to the BN scale factors.", probe_mismatch(probe))


# ---------------------------------------------------------------- train_prune_model

@diagnosis("finetune-architecture-changed", "train_prune_model",
           "Rebuild the model with vgg(cfg=checkpoint['cfg']) before loading the pruned weights.")
def finetune_architecture_changed(evaluation: dict) -> Finding | None:
    facts = evaluation.get("finetune", {})
    if facts.get("architecture_kept") is not False:
        return None
    return "The fine-tuned model does not have the pruned architecture.", [
        f"fine-tuned cfg {facts.get('cfg')}"]


# ---------------------------------------------------------------- provenance

@diagnosis("checkpoint-not-trained", "provenance",
           "Hand in notebooks that train: the grader runs them and judges what they write.")
def checkpoint_not_trained(evaluation: dict) -> Finding | None:
    """A trained checkpoint equal, tensor for tensor, to a reference one or to its own input."""
    places = [("sparsity training", evaluation.get("sparsity", {}).get("lambda")),
              ("sparsity training with lambda 0", evaluation.get("sparsity", {}).get("lambda0")),
              ("fine-tuning", evaluation.get("finetune")),
              ("your own pipeline's sparsity training", evaluation.get("chained", {}).get("sparsity")),
              ("your own pipeline's fine-tuning", evaluation.get("chained", {}).get("finetune"))]
    evidence = [f"the checkpoint of the {what} equals {facts['copied_from']} in every tensor"
                for what, facts in places if facts and facts.get("copied_from")]
    return finding("A checkpoint that training should have written is a copy: an honest run "
                   "never ends exactly on a reference checkpoint or on its own input.", evidence)


# ---------------------------------------------------------------- prepare

@diagnosis("zip-entry-refused", "prepare",
           "Zip the submission folder itself: no entry may be an absolute path, contain '..', "
           "be a link, lie more than 32 folders deep, have a name longer than 255 bytes or be "
           "both a file and a folder.")
def zip_entry_refused(evaluation: dict) -> Finding | None:
    refused = evaluation.get("prepare", {}).get("refused_entries", [])
    if not refused:
        return None
    return (f"{len(refused)} entr{'y' if len(refused) == 1 else 'ies'} of the hand-in would land "
            "outside the submission folder or cannot be created there (too deep, a name too "
            "long or clashing with another) and were not unpacked.", refused[:20])
