"""Lab 5's catalogue of findings: one small unit per diagnosis id (see ``grader.diagnose``).

Each unit reads the evaluation ``labs.lowcomplexity.grading`` builds and either finds
nothing or returns a message and its evidence. ``measured``, ``claims`` and
``claim_checks`` are the grader's own figures. ``weights`` (beyond found/refused),
``model``, ``export`` and ``transforms`` were reported by the kernel that ran the
student's code, so they are read as untrusted shapes: anything of an unexpected type
counts as absent, and text is capped.

Severities follow ``grader.diagnose``: ``error`` is the student's mistake, ``warning`` is
worth fixing but costs nothing by itself (the rubric's own items weigh the budgets), and
``info`` is worth knowing. The units are registered cause first (weights, model, export,
measurement, then what the figures show), the order in which they are listed.
"""
from __future__ import annotations

from grader.diagnose import Catalogue, Finding, finding
from grader.render import as_dict, as_list, number, text
from labs.lowcomplexity.measure import COMPLEXITY_TOLERANCE, MACS_CONVENTION

STAGE = "lowcomplexity"
# A printed accuracy within this many points of the grader's test accuracy holds (the grading
# passes it to measure.compare_claims).
ACCURACY_TOLERANCE_PCT = 2.0
# A printed accuracy this far above the test accuracy, and this close to the accuracy on
# training images, was measured on training images: noise and a lucky seed stay well inside it.
TRAIN_GAP_PCT = max(5.0, 2 * ACCURACY_TOLERANCE_PCT)
# Two Normalize steps whose means and stds differ by at most this are the same (printed
# CIFAR statistics are rounded to 3 or 4 digits).
NORMALIZE_TOLERANCE = 0.01
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no Normalize: inputs on the 0..1 scale
# over-budget: this many times the reference model's MACs or parameters, and not more
# accurate than it, is complexity that buys nothing.
OVER_REFERENCE = 10.0
# Noise added to every pixel of the test images (at most this many levels of 255, a fresh
# seed per grading) for a second accuracy. A model that sees the images loses almost
# nothing (the lab's models: under a point); one that recognises the exact test images
# (a hash of their pixels, their position in a batch) loses everything.
NOISE_LEVELS = 4
FRAGILE_DROP_PCT = 10.0
# Buffers and constants the forward reads (BatchNorm's running statistics aside) count
# towards the parameter budget; past this share of the parameters (and this many
# elements) they are named, as a model kept outside its parameters.
STORED_SHARE, STORED_FLOOR = 0.1, 4096
# Operations flop_counter does not count (elementwise products and sums, matrix-vector
# products) touch 0.2 to 3 % as many elements as the lab's models have FLOPs; past this
# share the excess counts towards the MACs budget (as 2 per MAC), and is named.
UNCOUNTED_SHARE, UNCOUNTED_FLOOR = 0.25, 100_000
CANDIDATES_SHOWN = 5
WHY_CHARS = 400
FIGURE_WORDS = {"flops": "FLOPs", "parameter_kb": "parameter size", "accuracy_pct": "accuracy"}
EXAMPLES = {"flops": "flops = 31269888", "parameter_kb": "Model parameter size = 8677.812 kB",
            "accuracy_pct": "Accuracy = 90.39 %"}
# The findings that explain why no model was measured, in the order they happen.
NOT_MEASURED = ("weights-missing", "weights-refused", "weights-do-not-fit", "not-exportable",
                "export-refused", "export-not-the-weights", "measure-failed")
# The findings that say the printed accuracy is not a test accuracy.
DISHONEST = ("evaluated-on-train", "test-transform-differs", "fragile-accuracy",
             "learnt-the-test-set")

CATALOGUE = Catalogue()
diagnosis = CATALOGUE.diagnosis  # @diagnosis(id, stage, hint, severity) registers below


# ---------------------------------------------------------------- readers of the evaluation

def measured_figures(evaluation: dict) -> dict | None:
    """The grader's measurement, or None when the model was not measured (it carries an
    ``error`` then, or is missing)."""
    measured = as_dict(evaluation.get("measured"))
    figures = ("parameters", "parameter_kb", "macs", "flops", "accuracy_pct")
    return measured if all(number(measured.get(k)) is not None for k in figures) else None


def claim_check(evaluation: dict, figure: str) -> dict:
    """The grader's comparison of one printed figure ({} when there is none)."""
    return next((c for c in map(as_dict, as_list(evaluation.get("claim_checks")))
                 if c.get("figure") == figure), {})


def _claim_line(evaluation: dict, figure: str) -> str:
    line = claim_check(evaluation, figure).get("evidence") or \
        as_dict(as_dict(evaluation.get("claims")).get("lines")).get(figure)
    return f'printed: "{text(line, 200)}"' if line else "printed line not recorded"


def stored_elements(measured: dict) -> int:
    """Elements of the buffers and constants the model reads beyond BatchNorm's statistics."""
    return int(number(measured.get("stored_elements")) or 0)


def uncounted_flops(measured: dict) -> int:
    """Work flop_counter did not count, beyond the share ordinary layers account for."""
    other, flops = number(measured.get("other_flops")) or 0, number(measured.get("flops")) or 0
    excess = other - UNCOUNTED_SHARE * flops
    return int(excess) if excess > UNCOUNTED_FLOOR else 0


def budget_figures(measured: dict) -> tuple[int, int]:
    """(parameters, MACs) held against the budgets: the parameters with the stored
    elements, the MACs with the uncounted work beyond its share (2 per MAC)."""
    return (int(measured["parameters"]) + stored_elements(measured),
            int(measured["macs"]) + uncounted_flops(measured) // 2)


def fragile(evaluation: dict) -> tuple[float, float] | None:
    """(test accuracy, accuracy on the noisy test images) when the noise costs more than
    FRAGILE_DROP_PCT points; None otherwise."""
    measured = measured_figures(evaluation) or {}
    clean, noisy = number(measured.get("accuracy_pct")), number(measured.get("noisy_accuracy_pct"))
    if clean is None or noisy is None or clean - noisy <= FRAGILE_DROP_PCT:
        return None
    return clean, noisy


def above_train(evaluation: dict) -> tuple[float, float] | None:
    """(test accuracy, accuracy on training images) when the test accuracy is more than
    TRAIN_GAP_PCT points above the training one: no model classifies images it never saw
    better than those it learnt from, unless the test images are what it learnt."""
    measured = measured_figures(evaluation) or {}
    test, train = number(measured.get("accuracy_pct")), number(measured.get("train_accuracy_pct"))
    if test is None or train is None or test - train <= TRAIN_GAP_PCT:
        return None
    return test, train


def credited_accuracy(evaluation: dict) -> float | None:
    """The accuracy the rubric credits: the test accuracy, less when the model only knows
    the exact test images (fragile-accuracy: the accuracy with noise) or knows the test
    images better than its training images (learnt-the-test-set: the training accuracy)."""
    measured = measured_figures(evaluation)
    if measured is None:
        return None
    credited = float(measured["accuracy_pct"])
    for found in (fragile(evaluation), above_train(evaluation)):
        if found is not None:
            credited = min(credited, found[1])
    return credited


def trained_accuracy(evaluation: dict) -> tuple[float, float, float] | None:
    """(printed, test, train) accuracies when the printed one is far above the test accuracy
    and close to the accuracy on training images; None otherwise."""
    claimed = number(as_dict(evaluation.get("claims")).get("accuracy_pct"))
    measured = measured_figures(evaluation) or {}
    test, train = number(measured.get("accuracy_pct")), number(measured.get("train_accuracy_pct"))
    if claimed is None or test is None or train is None:
        return None
    if claimed - test > TRAIN_GAP_PCT and abs(claimed - train) <= TRAIN_GAP_PCT:
        return claimed, test, train
    return None


def normalization(value: object) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of a Normalize the kernel recorded ({"mean": [...], "std": [...]}):
    IDENTITY for None (no Normalize), None when the record is not readable."""
    if value is None:
        return IDENTITY
    mean, std = as_list(as_dict(value).get("mean")), as_list(as_dict(value).get("std"))
    if not mean or not std or any(number(v) is None for v in mean + std):
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _same(a: tuple, b: tuple) -> bool:
    return all(len(x) == len(y) and all(abs(u - v) <= NORMALIZE_TOLERANCE for u, v in zip(x, y))
               for x, y in zip(a, b))


def describe_normalization(pair: tuple | None) -> str:
    """A normalisation as the report and the evidence say it."""
    if pair is None:
        return "an unreadable Normalize"
    if _same(pair, IDENTITY):
        return "no Normalize (inputs on the 0..1 scale)"
    mean, std = (", ".join(f"{v:.4g}" for v in values) for values in pair)
    return f"Normalize(mean=({mean}), std=({std}))"


def transform_pair(evaluation: dict) -> tuple[str, str, tuple, tuple] | None:
    """(training name, test name, their normalisations) when the notebook has both
    transforms and they normalise differently; None otherwise."""
    transforms = as_dict(evaluation.get("transforms"))
    found = as_dict(transforms.get("found"))
    train, test = transforms.get("train"), transforms.get("test")
    if not isinstance(train, str) or not isinstance(test, str) or train == test:
        return None
    a, b = (normalization(as_dict(found.get(name)).get("normalize")) for name in (train, test))
    if a is None or b is None or _same(a, b):
        return None
    return train, test, a, b


# ---------------------------------------------------------------- the weights and the model

@diagnosis("weights-missing", STAGE,
           "Hand in the trained weights next to the notebook: "
           "torch.save(model.state_dict(), 'model.pth').")
def weights_missing(evaluation: dict) -> Finding | None:
    if as_dict(evaluation.get("weights")).get("found") is not False:
        return None
    return ("No weights file was handed in (model.pth, or a .pth, .pt, .ckpt or .bin file): the "
            "grader measures your trained model from its weights, it does not train it.", [])


@diagnosis("weights-refused", STAGE,
           "Save the state_dict only: torch.save(model.state_dict(), 'model.pth'). A pickled "
           "model, an optimizer or any other Python object in the file is refused, because "
           "loading it would run code.")
def weights_refused(evaluation: dict) -> Finding | None:
    weights = as_dict(evaluation.get("weights"))
    name = text(weights.get("file"), 200) or "the weights file"
    if weights.get("refused"):
        why = weights["refused"]
    elif weights.get("found") and weights.get("loaded") is False:
        why = weights.get("why") or "no reason given"
    else:
        return None
    return (f"{name} could not be loaded as a state_dict of tensors.", [text(why, WHY_CHARS)])


@diagnosis("weights-do-not-fit", STAGE,
           "Hand in the weights of a model the notebook defines: keep its class as it was "
           "when you trained it, buildable without arguments, or keep the object itself "
           "among the definitions (model = Net(width=32)); both are tried with strict=True.")
def weights_do_not_fit(evaluation: dict) -> Finding | None:
    model = as_dict(evaluation.get("model"))
    if not as_dict(evaluation.get("weights")).get("loaded") or "chosen" not in model \
            or model["chosen"] is not None:
        return None
    tried = [c for c in map(as_dict, as_list(model.get("candidates"))) if c.get("why")]
    evidence = [f"{text(c.get('name'), 100)}: {text(c['why'], WHY_CHARS)}"
                for c in tried[:CANDIDATES_SHOWN]]
    if len(tried) > CANDIDATES_SHOWN:
        evidence.append(f"and {len(tried) - CANDIDATES_SHOWN} more model(s) the weights do not fit")
    if not tried:
        evidence = ["the notebook's definitions hold no nn.Module object or class"]
    return "The handed-in weights fit none of the notebook's models.", evidence


# ---------------------------------------------------------------- export and measurement

@diagnosis("not-exportable", STAGE,
           "Use torch operations only in forward: no numpy, no .item() or .tolist(), no "
           "Python if or loop on tensor values, and the batch size taken from the input "
           "(x.flatten(1), not x.view(64, -1)); torch.export must be able to trace it.")
def not_exportable(evaluation: dict) -> Finding | None:
    export = as_dict(evaluation.get("export"))
    if export.get("exported") is not False:
        return None
    return ("Your model could not be exported with torch.export, so the grader cannot measure it.",
            [text(export.get("why"), WHY_CHARS) or "no reason given"])


@diagnosis("export-refused", STAGE,
           "Build forward from standard torch operations: no custom operators "
           "(torch.library), no torch.no_grad() or other context managers and no control "
           "flow operators (torch.cond) inside forward.")
def export_refused(evaluation: dict) -> Finding | None:
    measured = as_dict(evaluation.get("measured"))
    if measured.get("refused") is not True:
        return None
    return ("The exported model uses something the grader does not run, so it was not measured.",
            [text(measured.get("error"), WHY_CHARS) or "no reason given"])


@diagnosis("export-not-the-weights", STAGE,
           "Let the notebook's definitions only define: no code that runs when a class is "
           "defined, no change to the grader's export, and a model whose forward uses the "
           "weights it was loaded with.")
def export_not_the_weights(evaluation: dict) -> Finding | None:
    measured = as_dict(evaluation.get("measured"))
    if measured.get("not_the_weights") is not True:
        return None
    return ("The model the notebook exported is not the one the handed-in weights were loaded "
            "into, so it was not measured.", [text(measured.get("error"), WHY_CHARS)])


@diagnosis("measure-failed", STAGE,
           "forward must take a float batch N x 3 x 32 x 32 and return logits N x 100; try it "
           "on a batch of test images in the notebook.")
def measure_failed(evaluation: dict) -> Finding | None:
    measured = as_dict(evaluation.get("measured"))
    if not measured.get("error") or measured.get("refused") is True \
            or measured.get("not_the_weights") is True:
        return None
    return ("The exported model could not be measured.", [text(measured["error"], WHY_CHARS)])


# ---------------------------------------------------------------- the printed figures

@diagnosis("claims-missing", STAGE,
           "Print the three figures of the lab in the notebook's outputs, e.g. "
           "\"flops = 31269888\", \"Model parameter size = 8677.812 kB\", "
           "\"Accuracy = 90.39 %\".")
def claims_missing(evaluation: dict) -> Finding | None:
    """An error, not a warning: each figure is a third of the claims-match item."""
    claims = evaluation.get("claims")
    if not isinstance(claims, dict):
        return None  # the notebook was missing or unreadable: its failure says so
    missing = [figure for figure in FIGURE_WORDS if claims.get(figure) is None]
    evidence = [f"{FIGURE_WORDS[f]}: no output line like \"{EXAMPLES[f]}\"" for f in missing]
    return finding(f"The notebook did not print its {', '.join(FIGURE_WORDS[f] for f in missing)}.",
                   evidence)


def _mismatch(evaluation: dict, check: dict) -> str:
    measured = measured_figures(evaluation) or {}
    figure, claimed = check["figure"], number(check.get("claimed")) or 0.0
    if figure == "flops":
        return (f"FLOPs: {_claim_line(evaluation, figure)}; the grader counts "
                f"{int(measured['flops']):,} FLOPs (2 per multiply-accumulate), i.e. "
                f"{int(measured['macs']):,} MACs: {claimed:,.0f} is within "
                f"{COMPLEXITY_TOLERANCE:.0%} of neither")
    if figure == "parameter_kb":
        return (f"parameter size: {_claim_line(evaluation, figure)}; the grader counts "
                f"{int(measured['parameters']):,} parameters, {measured['parameter_kb']:,.3f} kB "
                f"(x 4 bytes / 1024), and {claimed:,.3f} kB is not within "
                f"{COMPLEXITY_TOLERANCE:.0%}")
    return (f"accuracy: {_claim_line(evaluation, figure)}; the grader measures "
            f"{measured['accuracy_pct']:.2f} % top-1 on the test set, and {claimed:.2f} % is not "
            f"within {ACCURACY_TOLERANCE_PCT:g} points")


@diagnosis("claim-mismatch", STAGE,
           "Print figures computed on the model you hand in: its parameters as "
           "sum(p.numel() for p in model.parameters()) * 4 / 1024 kB, the FLOPs of one "
           "1x3x32x32 image with a counting tool (say which), and the accuracy over the whole "
           "test set in model.eval() mode.")
def claim_mismatch(evaluation: dict) -> Finding | None:
    if measured_figures(evaluation) is None:
        return None
    wrong = [c for c in map(as_dict, as_list(evaluation.get("claim_checks")))
             if c.get("figure") in FIGURE_WORDS and number(c.get("claimed")) is not None
             and c.get("ok") is False
             and not (c["figure"] == "accuracy_pct" and trained_accuracy(evaluation))]
    words = ", ".join(FIGURE_WORDS[c["figure"]] for c in wrong)
    return finding(f"The printed {words} differ(s) from the grader's measurement.",
                   [_mismatch(evaluation, c) for c in wrong])


@diagnosis("evaluated-on-train", STAGE,
           "Report the accuracy of a loop over the test set (CIFAR100(train=False)) with the "
           "test transform, in model.eval() mode; a split of the training set is not the test set.")
def evaluated_on_train(evaluation: dict) -> Finding | None:
    found = trained_accuracy(evaluation)
    if found is None:
        return None
    claimed, test, train = found
    return (f"The printed accuracy, {claimed:.2f} %, is {claimed - test:.1f} points above the "
            f"accuracy on the test set and within {TRAIN_GAP_PCT:g} points of the accuracy on "
            "training images: it was most likely measured on training images.",
            [_claim_line(evaluation, "accuracy_pct"),
             f"the grader's top-1 accuracy on the test set: {test:.2f} %",
             f"the grader's top-1 accuracy on training images: {train:.2f} %"])


@diagnosis("test-transform-differs", STAGE,
           "Normalise the test images exactly as the training images (the same Normalize mean "
           "and std); only the random augmentation steps belong to training alone.")
def test_transform_differs(evaluation: dict) -> Finding | None:
    pair = transform_pair(evaluation)
    if pair is None:
        return None
    train, test, a, b = pair
    evidence = [f"{text(train, 100)} (training): {describe_normalization(a)}",
                f"{text(test, 100)} (test): {describe_normalization(b)}"]
    measured = measured_figures(evaluation) or {}
    used = as_dict(as_dict(evaluation.get("transforms")).get("used"))
    as_tested = number(measured.get("accuracy_with_test_transform_pct"))
    if measured:
        evidence.append(f"the grader's test accuracy, fed with "
                        f"{describe_normalization(normalization(used))}: "
                        f"{measured['accuracy_pct']:.2f} %")
    if as_tested is not None:
        evidence.append(f"the same test images fed as your test transform does: {as_tested:.2f} %")
    return (f"The test transform {text(test, 100)} normalises the images differently from the "
            f"training transform {text(train, 100)}.", evidence)


@diagnosis("fragile-accuracy", STAGE,
           "Classify what the images show, not which images they are: a model that looks up "
           "the test images (by their pixels, their order or their batch) has learnt nothing "
           "the rubric credits.")
def fragile_accuracy(evaluation: dict) -> Finding | None:
    found = fragile(evaluation)
    if found is None:
        return None
    clean, noisy = found
    levels = number(as_dict(evaluation.get("measured")).get("noise_levels")) or NOISE_LEVELS
    return (f"Moving each pixel of the test images by at most {levels:g}/255, noise nobody can "
            f"see, drops your model's accuracy from {clean:.2f} % to {noisy:.2f} %: it "
            "recognises the exact test images rather than what they show, so the rubric "
            "credits the accuracy on the noisy images.",
            [f"the grader's top-1 accuracy on the test set: {clean:.2f} %",
             f"on the same images with noise of at most {levels:g}/255 per pixel: {noisy:.2f} % "
             f"(more than {FRAGILE_DROP_PCT:g} points lower)"])


@diagnosis("learnt-the-test-set", STAGE,
           "Train on the training set only, and classify with what the model learnt from it: "
           "test images kept in the model (a table of them, or training on them) make the test "
           "accuracy say nothing about the model.")
def learnt_the_test_set(evaluation: dict) -> Finding | None:
    found = above_train(evaluation)
    if found is None:
        return None
    test, train = found
    return (f"Your model is {test - train:.1f} points more accurate on the test images "
            f"({test:.2f} %) than on training images ({train:.2f} %): it knows the test set, "
            "so the rubric credits the accuracy on training images.",
            [f"the grader's top-1 accuracy on the test set: {test:.2f} %",
             f"the grader's top-1 accuracy on training images: {train:.2f} %"])


@diagnosis("macs-called-flops", STAGE,
           "Nothing to fix: the figure holds in its tool's convention. Say which tool counted "
           "it, since the same model is N \"FLOPs\" in thop and 2N in torch.utils.flop_counter.",
           severity="info")
def macs_called_flops(evaluation: dict) -> Finding | None:
    check, measured = claim_check(evaluation, "flops"), measured_figures(evaluation)
    if measured is None or check.get("ok") is not True \
            or check.get("convention") != MACS_CONVENTION:
        return None
    return ("Your FLOPs figure counts multiply-accumulates (MACs), as thop, ptflops and fvcore do "
            "when they print \"FLOPs\"; the grader reports torch.utils.flop_counter's count, 2 "
            "FLOPs per MAC.",
            [_claim_line(evaluation, "flops"),
             f"the grader: {int(measured['flops']):,} FLOPs = 2 x {int(measured['macs']):,} MACs"])


@diagnosis("over-budget", STAGE,
           "A smaller model does as well here: fewer channels or layers, global average pooling "
           "instead of large fully connected layers, or pruning and distillation.",
           severity="warning")
def over_budget(evaluation: dict) -> Finding | None:
    """More than OVER_REFERENCE times the reference's MACs or parameters for no more accuracy.
    A warning: the rubric's budgets are its complexity item's, not this finding's."""
    measured, reference = measured_figures(evaluation), as_dict(evaluation.get("reference"))
    ref = {k: number(reference.get(k)) for k in ("parameters", "macs", "accuracy_pct")}
    if measured is None or any(v is None or v <= 0 for v in ref.values()) \
            or measured["accuracy_pct"] > ref["accuracy_pct"]:
        return None
    ratios = {k: measured[k] / ref[k] for k in ("macs", "parameters")}
    over = [f"{ratio:.0f} times the reference model's {'MACs' if k == 'macs' else 'parameters'}"
            for k, ratio in ratios.items() if ratio > OVER_REFERENCE]
    if not over:
        return None
    return (f"Your model costs {' and '.join(over)} and is not more accurate than it.",
            [f"yours: {int(measured['parameters']):,} parameters, {int(measured['macs']):,} MACs, "
             f"{measured['accuracy_pct']:.2f} % top-1",
             f"the reference: {int(ref['parameters']):,} parameters, {int(ref['macs']):,} MACs, "
             f"{ref['accuracy_pct']:.2f} % top-1"])


@diagnosis("hidden-parameters", STAGE,
           "Keep what the model learns in nn.Parameter tensors, where the lab counts it. A "
           "table in a buffer or a tensor attribute is part of the model's size all the same "
           "(pruning masks too: apply them with torch.nn.utils.prune.remove before saving).",
           severity="warning")
def hidden_parameters(evaluation: dict) -> Finding | None:
    """A warning: the complexity item already holds the stored elements against the budget."""
    measured = measured_figures(evaluation)
    if measured is None:
        return None
    stored, parameters = stored_elements(measured), int(measured["parameters"])
    if stored <= max(STORED_FLOOR, STORED_SHARE * parameters):
        return None
    return (f"Your model's forward reads {stored:,} numbers kept outside its parameters "
            f"(buffers or tensor constants, BatchNorm's running statistics aside), next to "
            f"{parameters:,} parameters: the grader holds both against the parameter budget.",
            [f"parameters: {parameters:,}", f"buffer and constant elements the forward reads, "
                                            f"beyond BatchNorm's statistics: {stored:,}"])


@diagnosis("uncounted-compute", STAGE,
           "Compute with convolutions and matrix products (nn.Conv2d, nn.Linear, @): an "
           "elementwise product summed up, or a matrix-vector product, is the same work "
           "whether or not a FLOP counter sees it.",
           severity="warning")
def uncounted_compute(evaluation: dict) -> Finding | None:
    """A warning: the complexity item already holds the excess against the MACs budget."""
    measured = measured_figures(evaluation)
    if measured is None or not uncounted_flops(measured):
        return None
    other, flops = int(number(measured.get("other_flops")) or 0), int(measured["flops"])
    _, macs = budget_figures(measured)
    return (f"Per image, your model's operations that torch.utils.flop_counter does not count "
            f"touch {other:,} elements, against {flops:,} counted FLOPs; ordinary layers stay "
            f"under {UNCOUNTED_SHARE:.0%} of the counted FLOPs, and the grader counts the rest "
            f"as work: {macs:,} MACs against the budget.",
            [f"counted by flop_counter: {flops:,} FLOPs ({int(measured['macs']):,} MACs)",
             f"elements touched by the other operations: {other:,}"])
