"""Lab 5's words and its part of report.html (``grader.lab.ReportSection``), and its picture
of a class for the batch summary (``class_plot``).

The section puts each printed figure next to the grader's measurement, the student's model
next to the reference model (a table and a scatter of accuracy against MACs), and the
facts of the export and of the transforms. It reads result["metrics"] (the evaluation of
``labs.lowcomplexity.grading``) with grader.render's defensive readers: whatever the
kernel reported is untrusted, and the template (templates/section.html.j2) escapes
everything it shows. Plots are PNG data URIs drawn on a private matplotlib Figure (no
pyplot state: a batch renders reports in threads); no student text is drawn in them,
because matplotlib interprets ``$...$`` in labels.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from types import MappingProxyType

import jinja2

from grader.render import (NOT_AVAILABLE, as_dict, as_list, data_uri, fixed, number, pct, plain,
                           text)
from labs.lowcomplexity.diagnoses import (FIGURE_WORDS, claim_check, describe_normalization,
                                          measured_figures, normalization)

STAGES = ("lowcomplexity", "report")
STAGE_TITLES = MappingProxyType({
    "lowcomplexity": "Your model (lowcomplexity.ipynb and its weights)",
    "report": "Written report (graded by hand)",
})
RUN_WORDS = MappingProxyType({
    "export": "your notebook's definitions (its training left out), with your weights loaded "
              "into your model and the model exported",
})
GLOSSARY = ("How your model was measured: the grader ran your notebook once with its training "
            "left out (imports, functions, classes and plain assignments only), loaded your "
            "weights into the model they fit and exported it with torch.export; outside your "
            "notebook it then counted the parameters and FLOPs on the exported graph and "
            "measured top-1 accuracy on the test set with its own code.")
CANDIDATES_SHOWN = 20
WHY_CHARS = 400
# Marker area (points^2) of the scatters: the smallest model, plus up to this much for the largest.
MARKER_MIN, MARKER_SPAN = 30.0, 600.0
Point = tuple[str, float, float, float]  # series, MACs, accuracy %, parameters


def run_label(run_id: object) -> str:
    """A run of the grading in words a student understands."""
    label = plain(run_id).strip()
    return RUN_WORDS.get(label, label)


def profile_summary(changes: dict) -> str:
    """What the profile changed (result["profile_changes"], written by the lab's grading)."""
    changes = as_dict(changes)
    data, model, device = (text(changes.get(key), 500) or NOT_AVAILABLE
                           for key in ("data", "model", "device"))
    return f"measured on {data}; {model}; on {device}."


# ---------------------------------------------------------------- the section

def section_view(result: dict) -> dict:
    """Everything the section shows, already made safe to read: plain strings and numbers."""
    metrics = as_dict(as_dict(result).get("metrics"))
    return {"glossary": GLOSSARY, "claims": _claim_rows(metrics),
            "reference": _reference(metrics), "export": _export(metrics),
            "transforms": _transforms(metrics)}


def _count(value: object) -> str:
    """A count with thousands separators: 31269888 -> "31,269,888"."""
    n = number(value)
    return NOT_AVAILABLE if n is None else f"{round(n):,}"


def _kb(value: object) -> str:
    return NOT_AVAILABLE if number(value) is None else f"{fixed(value, 3)} kB"


# ---------------------------------------------------------------- claims

def _claimed(figure: str, value: object) -> str:
    if number(value) is None:
        return NOT_AVAILABLE
    return {"flops": _count, "parameter_kb": _kb, "accuracy_pct": pct}[figure](value)


def _measured(figure: str, measured: dict) -> str:
    if figure == "flops":
        return (f"{_count(measured['flops'])} FLOPs (2 per MAC) = {_count(measured['macs'])} MACs")
    if figure == "parameter_kb":
        return f"{_kb(measured['parameter_kb'])} ({_count(measured['parameters'])} parameters)"
    images = number(measured.get("test_images"))
    on = f" on {_count(images)} test images" if images is not None else ""
    return f"{pct(measured['accuracy_pct'])}{on}"


def _claim_rows(metrics: dict) -> list[dict]:
    """One row per figure: printed, measured, the verdict and the line it was read from."""
    claims = as_dict(metrics.get("claims"))
    lines = as_dict(claims.get("lines"))
    measured = measured_figures(metrics)
    rows = []
    for figure, words in FIGURE_WORDS.items():
        found = claim_check(metrics, figure)
        claimed = claims.get(figure)
        if number(claimed) is None:
            verdict, status = "not printed", "bad"
        elif measured is None or "ok" not in found:
            verdict, status = "not checked (nothing measured)", "na"
        elif found["ok"] is True:
            convention = text(found.get("convention"), 200)
            verdict, status = f"matches{f' ({convention})' if convention else ''}", "ok"
        else:
            verdict, status = "differs", "bad"
        rows.append({"figure": words[:1].upper() + words[1:],
                     "claimed": _claimed(figure, claimed),
                     "measured": _measured(figure, measured) if measured else NOT_AVAILABLE,
                     "verdict": verdict, "status": status,
                     "line": text(found.get("evidence") or lines.get(figure), 200)})
    return rows


# ---------------------------------------------------------------- against the reference

def _point(series: str, figures: object) -> Point | None:
    """A model's point on accuracy against MACs, or None when a figure is missing."""
    figures = as_dict(figures)
    macs, accuracy, parameters = (number(figures.get(k))
                                  for k in ("macs", "accuracy_pct", "parameters"))
    if macs is None or accuracy is None or parameters is None or macs <= 0 or parameters < 0:
        return None
    return series, macs, accuracy, parameters


def _scatter(points: list[Point]) -> bytes:
    """Accuracy against MACs (log axis), one colour per series, marker area growing with
    the square root of the parameters."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.4), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    largest = max(p[3] for p in points) or 1.0
    for series in dict.fromkeys(p[0] for p in points):
        mine = [p for p in points if p[0] == series]
        axes.scatter([p[1] for p in mine], [p[2] for p in mine], label=series, alpha=0.6,
                     s=[MARKER_MIN + MARKER_SPAN * math.sqrt(p[3] / largest) for p in mine],
                     edgecolors="black", linewidths=0.5)
    axes.set_xscale("log")
    axes.set_xlabel("MACs of one 32x32 image (log scale)")
    axes.set_ylabel("top-1 test accuracy (%)")
    axes.legend(title="marker area: parameters", fontsize="small", title_fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _reference(metrics: dict) -> dict:
    measured, reference = as_dict(metrics.get("measured")), as_dict(metrics.get("reference"))

    def row(label: str, figures: dict) -> dict:
        return {"label": label, "parameters": _count(figures.get("parameters")),
                "parameter_kb": _kb(figures.get("parameter_kb")),
                "macs": _count(figures.get("macs")), "flops": _count(figures.get("flops")),
                "accuracy": pct(figures.get("accuracy_pct")),
                "train_accuracy": pct(figures.get("train_accuracy_pct"))}

    ratios = {}
    for key in ("parameters", "macs"):
        mine, theirs = number(measured.get(key)), number(reference.get(key))
        ratios[key] = f"{mine / theirs:.2g} x" if mine is not None and theirs else NOT_AVAILABLE
    yours, theirs = _point("yours", measured), _point("reference", reference)
    points = [p for p in (yours, theirs) if p]
    width = number(reference.get("width"))
    name = text(reference.get("model"), 100) or "the reference model"
    return {"rows": [row("yours", measured),
                     row(f"{name} (width {width:g})" if width is not None else name, reference)],
            "ratios": ratios,
            "plot": data_uri(lambda: _scatter(points)) if yours else None}


def class_plot(rows: list[dict]) -> str | None:
    """The class on accuracy against MACs (marker area: parameters), with the reference
    model, as a PNG data URI from a list of result.json dicts; None when no hand-in was
    measured. No names are drawn: the summary's tables name the students."""
    metrics = [as_dict(as_dict(row).get("metrics")) for row in as_list(rows)]
    points = [p for m in metrics if (p := _point("hand-ins", m.get("measured")))]
    if not points:
        return None
    reference = next((p for m in metrics if (p := _point("reference", m.get("reference")))), None)
    return data_uri(lambda: _scatter(points + ([reference] if reference else [])))


# ---------------------------------------------------------------- weights, model, export

def _export(metrics: dict) -> dict:
    weights, model = as_dict(metrics.get("weights")), as_dict(metrics.get("model"))
    export, measured = as_dict(metrics.get("export")), as_dict(metrics.get("measured"))
    if weights.get("refused"):
        loaded = f"refused: {text(weights['refused'], WHY_CHARS)}"
    elif weights.get("loaded") is True:
        loaded = (f"loaded: {_count(weights.get('tensors'))} tensors, "
                  f"{_count(weights.get('elements'))} numbers")
    elif weights.get("loaded") is False:
        loaded = f"not loaded: {text(weights.get('why'), WHY_CHARS) or 'no reason given'}"
    else:
        loaded = NOT_AVAILABLE
    if export.get("exported") is True:
        exported = "yes, for any batch size" if export.get("dynamic_batch") is True else \
            f"yes, for a fixed batch size ({text(export.get('why_static'), WHY_CHARS)})"
    elif export.get("exported") is False:
        exported = f"no: {text(export.get('why'), WHY_CHARS) or 'no reason given'}"
    else:
        exported = NOT_AVAILABLE
    candidates = [as_dict(c) for c in as_list(model.get("candidates"))]
    return {
        "file": text(weights.get("file"), 200) or "none handed in",
        "loaded": loaded,
        "chosen": text(model.get("chosen"), 200) or "none",
        "candidates": [{"name": text(c.get("name"), 200),
                        "why": text(c.get("why"), WHY_CHARS) if c.get("why") else "fits"}
                       for c in candidates[:CANDIDATES_SHOWN]],
        "candidates_hidden": max(0, len(candidates) - CANDIDATES_SHOWN),
        "exported": exported,
        "buffers": _count(measured.get("buffer_elements")),
        "error": text(measured.get("error"), WHY_CHARS),
    }


# ---------------------------------------------------------------- transforms

def _transforms(metrics: dict) -> dict:
    transforms, measured = as_dict(metrics.get("transforms")), as_dict(metrics.get("measured"))
    train, test = transforms.get("train"), transforms.get("test")
    rows = []
    for name, entry in as_dict(transforms.get("found")).items():
        entry = as_dict(entry)
        roles = [role for role, named in (("training", train), ("test", test)) if name == named]
        rows.append({"name": text(name, 100), "role": " and ".join(roles) or "not used",
                     "steps": ", ".join(text(s, 60) for s in as_list(entry.get("steps"))[:30]),
                     "random": "yes" if entry.get("random") is True else "no",
                     "normalize": describe_normalization(normalization(entry.get("normalize")))})
    used = transforms.get("used")
    return {"rows": rows,
            "used": describe_normalization(normalization(used)) if used else NOT_AVAILABLE,
            "accuracy": pct(measured.get("accuracy_pct")),
            "as_tested": pct(measured.get("accuracy_with_test_transform_pct"))}


class LowComplexityReport:
    """``grader.lab.ReportSection`` of Lab 5, with the optional words grader.render reads
    (``title``, ``nav``, ``profile_summary``, ``printed_examples``) and grader.batch's
    ``class_plot``."""

    stages: tuple[str, ...] = STAGES
    stage_titles: Mapping[str, str] = STAGE_TITLES
    glossary: str = GLOSSARY
    title = "Lab 5: a low-complexity model"
    nav = (("claims", "Claims"), ("reference", "Against the reference"),
           ("export", "Model and export"), ("transforms", "Transforms"))
    printed_examples = "flops = 31269888, Model parameter size = 8677.812 kB, Accuracy = 90.39 %"

    run_label = staticmethod(run_label)
    profile_summary = staticmethod(profile_summary)
    templates = jinja2.PackageLoader("labs.lowcomplexity", "templates")
    section_view = staticmethod(section_view)
    class_plot = staticmethod(class_plot)


REPORT = LowComplexityReport()
