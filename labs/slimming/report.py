"""The slimming lab's words and its part of report.html (``grader.lab.ReportSection``).

``REPORT`` names the lab's runs and stages in plain words and renders the lab's own
sections from templates/section.html.j2 (autoescaped, as the harness's page): the kept
channels per BN layer, the |gamma| distribution after sparsity training, the pruning
runs side by side, and the accuracies claimed, measured and of the reference. Everything
here reads result["metrics"] (the lab's evaluation) as defensively as grader.render reads
the rest, with its helpers.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType

import jinja2

from grader.render import (DETAIL_CHARS, NOT_AVAILABLE, as_dict, as_list, compact, data_uri,
                           fixed, fraction, general, int_list, number, pct, plain,
                           text)
from reference import plots

STAGES = ("sparsity_train", "vggprune", "train_prune_model", "chained", "report")
STAGE_TITLES = MappingProxyType({
    "sparsity_train": "Sparsity training (sparsity_train.ipynb)",
    "vggprune": "Pruning (vggprune.ipynb)",
    "train_prune_model": "Fine-tuning (train_prune_model.ipynb)",
    "chained": "Your own pipeline end to end",
    "report": "Written report (graded by hand)",
})
PRUNE_RATIOS = ("0.5", "0.9")
COPY_DIFFERENCES = 15
CFG_CHARS = 400

# ---------------------------------------------------------------- plain words for the runs

RUN_WORDS = MappingProxyType({
    "sparsity-lambda0": "sparsity training with LAMBDA = 0 (the baseline)",
    "sparsity": "sparsity training with the grading's LAMBDA",
    "prune-edge": "the probe: pruning a checkpoint built with a nearly empty layer",
    "finetune": "fine-tuning the reference model pruned at 90 %",
    "chained-sparsity": "your own pipeline: sparsity training with your LAMBDA",
    "chained-finetune": "your own pipeline: fine-tuning your model pruned at 90 %",
})
GLOSSARY = ("How each notebook ran: once on the grader's reference inputs (\"the reference "
            "checkpoint\"), so an early mistake does not sink the later stages; once more as "
            "\"your own pipeline\", each notebook reading what your previous one wrote; and "
            "vggprune once on \"the probe\", a checkpoint built on purpose with a nearly empty layer.")


def run_label(run_id: object) -> str:
    """A run of a grading (``prune-0.9``, ``chained-sparsity``) or an evidence label of the
    diagnoses (``isolated 0.9``, ``chained 0.5``) in words a student understands."""
    label = plain(run_id).strip()
    if label in RUN_WORDS:
        return RUN_WORDS[label]
    evidence = re.fullmatch(r"(isolated|chained) (.+)", label)
    if evidence:
        kind, key = evidence.groups()
        if key == "edge":
            return RUN_WORDS["prune-edge"]
        label = f"{'chained-' if kind == 'chained' else ''}prune-{key}"
    pruning = re.fullmatch(r"(chained-)?prune-([0-9.]+)", label)
    if pruning:
        try:
            percent = f"{100 * float(pruning.group(2)):g} %"
        except ValueError:
            return label
        return (f"your own pipeline: pruning at {percent}" if pruning.group(1)
                else f"pruning the reference checkpoint at {percent}")
    return label


def profile_summary(changes: dict) -> str:
    """What the profile changed (result["profile_changes"], written by the lab's grading)."""
    changes = as_dict(changes)
    data, model, device, epochs, finetune_epochs = (
        text(changes.get(key), 500)
        for key in ("data", "model", "device", "epochs", "finetune_epochs"))
    return (f"{data}; {model}; on {device}; {epochs} epochs of sparsity training and "
            f"{finetune_epochs} of fine-tuning.")


# ---------------------------------------------------------------- the section

def section_view(result: dict) -> dict:
    """Everything the section shows, already made safe to read: plain strings and numbers."""
    metrics = as_dict(as_dict(result).get("metrics"))
    return {
        "glossary": GLOSSARY,
        "pruning": _pruning(metrics),
        "sparsity": _sparsity(metrics),
        "accuracy_rows": _accuracy_rows(metrics),
    }



# ---------------------------------------------------------------- sparsity

def _histogram(stats: object) -> dict | None:
    histogram = as_dict(as_dict(stats).get("histogram"))
    counts, edges = as_list(histogram.get("counts")), as_list(histogram.get("edges"))
    numbers = counts + edges
    if (not counts or len(edges) != len(counts) + 1
            or any(number(v) is None for v in numbers)):
        return None
    return {"counts": [float(v) for v in counts], "edges": [float(v) for v in edges]}


def _sparsity(metrics: dict) -> dict:
    sparsity = as_dict(metrics.get("sparsity"))
    reference = as_dict(as_dict(metrics.get("reference")).get("sparsity_gamma"))
    series = {
        "your notebook, the grading's LAMBDA": as_dict(as_dict(sparsity.get("lambda")).get("gamma")),
        "reference, the same LAMBDA": as_dict(reference.get("lambda")),
        "your notebook, LAMBDA = 0": as_dict(as_dict(sparsity.get("lambda0")).get("gamma")),
    }
    histograms = {label: h for label, stats in series.items() if (h := _histogram(stats))}
    plot = data_uri(lambda: plots.gamma_histogram(histograms)) if histograms else None
    thresholds = sorted({str(t) for stats in series.values() for t in as_dict(stats.get("fraction_below"))
                         if _threshold(t) is not None}, key=_threshold)[:6] or ["0.01"]
    rows = []
    for label, stats in series.items():
        below = as_dict(stats.get("fraction_below"))
        rows.append({"label": label, "mean_abs": fixed(stats.get("mean_abs"), 4),
                     "below": [fraction(below.get(t)) for t in thresholds]})
    errors = [f"{name}: {text(as_dict(sparsity.get(name)).get('error'))}"
              for name in ("lambda", "lambda0") if as_dict(sparsity.get(name)).get("error")]
    return {"plot": plot, "rows": rows, "errors": errors, "thresholds": thresholds,
            "missing": [label for label in series if label not in histograms]}


def _threshold(key: object) -> float | None:
    try:
        value = float(str(key))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------- pruning

def _cfg_kept(cfg: object) -> list[int] | None:
    return int_list([v for v in as_list(cfg) if v != "M"]) if as_list(cfg) else None


def _prune_facts(metrics: dict) -> list[tuple[str, str, dict]]:
    """(label, ratio key, facts) of every vggprune run, isolated first, then chained."""
    runs = [(run_label(f"prune-{key}"), key, as_dict(facts))
            for key, facts in as_dict(metrics.get("prune")).items()]
    runs += [(run_label(f"chained-prune-{key}"), key, as_dict(facts))
             for key, facts in as_dict(as_dict(metrics.get("chained")).get("prune")).items()]
    return runs


def _pruning(metrics: dict) -> dict:
    reference = as_dict(as_dict(metrics.get("reference")).get("prune"))
    isolated = as_dict(metrics.get("prune"))
    plots_ = []
    for ratio in PRUNE_RATIOS:
        facts = as_dict(isolated.get(ratio))
        series: dict[str, list[int]] = {}
        ref = int_list(facts.get("reference_kept")) or int_list(as_dict(reference.get(ratio)).get("kept_per_layer"))
        if ref:
            series["reference"] = ref
        yours = int_list(facts.get("student_kept"))
        if yours:
            series["yours (cfg_mask)"] = yours
        elif (from_cfg := _cfg_kept(facts.get("cfg"))):
            series["yours (saved cfg)"] = from_cfg
        uri = data_uri(lambda s=series: plots.kept_channels(s)) if series else None
        plots_.append({"ratio": ratio, "uri": uri,
                       "note": "" if len(series) == 2 else
                       "only the reference is available" if "reference" in series else
                       "the reference is not available" if series else ""})
    runs = []
    for label, ratio, facts in _prune_facts(metrics):
        differences = [d for d in as_list(facts.get("copy_differences")) if isinstance(d, dict)]
        # The run's own failure first: what it left unwritten follows from it.
        problems = [f"{name.replace('_', ' ')}: {text(facts.get(name))}"
                    for name in ("run_failure", "error", "checkpoint_error", "thin_error")
                    if facts.get(name)]
        ref = int_list(facts.get("reference_kept"))
        yours = int_list(facts.get("student_kept"))
        masks = _mask_verdict(facts, ref, yours)
        runs.append({
            "label": label,
            "ratio": ratio,
            "reference_kept": ", ".join(map(str, ref)) if ref else NOT_AVAILABLE,
            "student_kept": ", ".join(map(str, yours)) if yours else NOT_AVAILABLE,
            "kept_match": masks["match"],
            "mask_note": masks["note"],
            "layers_wrong": masks["layers"],
            "cfg": text(facts.get("cfg"), CFG_CHARS) if facts.get("cfg") is not None else NOT_AVAILABLE,
            "claimed_ratio": fixed(facts.get("claimed_prune_ratio"), 2),
            "threshold_claimed": general(facts.get("threshold_claimed")),
            "threshold_reference": general(facts.get("threshold_reference")),
            "size": (f"{compact(facts.get('parameters'))} parameters, {compact(facts.get('macs'))} MACs"
                     if number(facts.get("parameters")) is not None else NOT_AVAILABLE),
            "logits_gap": general(facts.get("logits_max_diff")),
            "majority": fraction(facts.get("majority_fraction")),
            "mask_strategy": text(facts.get("mask_strategy"), 100) or NOT_AVAILABLE,
            "problems": problems,
            "copy_checked": "copy_differences" in facts,
            "copy_differences": [{"kind": text(d.get("kind"), 50),
                                  "key": text(d.get("key"), 200),
                                  "detail": text(d.get("detail"), DETAIL_CHARS)}
                                 for d in differences[:COPY_DIFFERENCES]],
            "copy_hidden": max(0, len(differences) - COPY_DIFFERENCES),
        })
    return {"plots": plots_, "runs": runs}


def _layer_ranges(layers: list[int]) -> str:
    """0, 3, 4, 5, 9 -> "0, 3-5, 9" (BN layers numbered as the chart's axis, from 0)."""
    parts, start = [], None
    for k, layer in enumerate(layers):
        if start is None:
            start = layer
        if k + 1 == len(layers) or layers[k + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}\u2013{layer}")
            start = None
    return ", ".join(parts)


def _mask_verdict(facts: dict, ref: list[int] | None, yours: list[int] | None) -> dict:
    """The masks row, derived from the same per-layer counts the chart draws; which channels
    were kept (the grader's comparison of the masks themselves) only adds to it."""
    compared = facts.get("mask_correct") if isinstance(facts.get("mask_correct"), bool) else None
    channels = int_list(facts.get("mask_layers_wrong")) or []
    if not (ref and yours):
        return {"match": compared, "layers": _layer_ranges(channels), "note": ""}
    counts = [k for k, (a, b) in enumerate(zip(ref, yours)) if a != b]
    if len(ref) != len(yours):
        counts += list(range(min(len(ref), len(yours)), max(len(ref), len(yours))))
    if counts:
        note = ("the channels kept follow a rule the grader accepts (a minimum per layer; it "
                "costs nothing)" if compared else "")
        return {"match": False, "layers": _layer_ranges(counts), "note": note}
    if compared is False:
        return {"match": False, "layers": _layer_ranges(channels),
                "note": "the same number of channels per layer, but not the same channels"}
    return {"match": True, "layers": "", "note": ""}


# ---------------------------------------------------------------- accuracy

def _last_claim(facts: dict) -> float | None:
    """The last accuracy the notebook printed, else the best_prec1 its checkpoint saved (in %)."""
    claims = [c for c in as_list(facts.get("claimed_accuracies")) if number(c) is not None]
    if claims:
        return number(claims[-1])
    best = number(facts.get("claimed_best_prec1"))
    # The lab's test() returns a fraction (correct / total), so best_prec1 is usually in [0, 1].
    return 100.0 * best if best is not None and 0.0 <= best <= 1.0 else best


def _accuracy_rows(metrics: dict) -> list[dict]:
    reference = as_dict(metrics.get("reference"))
    ref_prune = as_dict(reference.get("prune"))
    band = number(reference.get("accuracy_band_pct"))
    chained = as_dict(metrics.get("chained"))
    sparsity = as_dict(metrics.get("sparsity"))

    def row(label: str, facts: object, ref: object = None, ref_recal: object = None,
            ref_note: str = "") -> dict:
        facts = as_dict(facts)
        measured = number(facts.get("accuracy"))
        return {"label": label,
                "claimed": pct(_last_claim(facts)),
                "measured": pct(measured),
                "recalibrated": pct(facts.get("accuracy_recalibrated")),
                "masked": pct(facts.get("accuracy_masked_original")),
                "reference": pct(ref) + ref_note if number(ref) is not None else NOT_AVAILABLE,
                "reference_recalibrated": pct(ref_recal),
                "error": text(facts.get("error") or facts.get("checkpoint_error")
                              or facts.get("thin_error"), 300)}

    finetune_note = f" (yours passes within {band:g} points of it)" if band is not None else ""
    rows = [row(RUN_WORDS["sparsity"], sparsity.get("lambda"), reference.get("sparsity_accuracy")),
            row(RUN_WORDS["sparsity-lambda0"], sparsity.get("lambda0"))]
    prune = as_dict(metrics.get("prune"))
    for key in sorted(prune, key=lambda k: (k not in PRUNE_RATIOS, k)):
        ref = as_dict(ref_prune.get(key))
        rows.append(row(run_label(f"prune-{key}"), prune[key], ref.get("accuracy_pruned"),
                        ref.get("accuracy_recalibrated")))
    rows.append(row(RUN_WORDS["finetune"], metrics.get("finetune"), reference.get("finetune_accuracy"),
                    ref_note=finetune_note))
    if chained:
        lam = number(chained.get("lambda"))
        rows.append(row(f"your own pipeline: sparsity training (LAMBDA {lam:g})" if lam is not None
                        else "your own pipeline: sparsity training", chained.get("sparsity")))
        for key, facts in as_dict(chained.get("prune")).items():
            rows.append(row(run_label(f"chained-prune-{text(key, 20)}"), facts))
        rows.append(row("your own pipeline: fine-tuned", chained.get("finetune")))
    return rows


class SlimmingReport:
    """``grader.lab.ReportSection`` of the slimming lab (and the optional words
    grader.render reads: ``title``, ``nav``, ``profile_summary``, ``printed_examples``)."""

    stages: tuple[str, ...] = STAGES
    stage_titles: Mapping[str, str] = STAGE_TITLES
    glossary: str = GLOSSARY
    title = "Network slimming lab"
    nav = (("pruning", "Pruning"), ("accuracy", "Accuracy"))
    printed_examples = "accuracy, prune ratio, ..."

    run_label = staticmethod(run_label)
    profile_summary = staticmethod(profile_summary)
    templates = jinja2.PackageLoader("labs.slimming", "templates")
    section_view = staticmethod(section_view)


REPORT = SlimmingReport()
