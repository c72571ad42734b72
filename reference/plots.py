"""Plots of a bundle or a grading, drawn with matplotlib off-screen."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def figure_png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def gamma_histogram(histograms: dict[str, dict]) -> bytes:
    """One step histogram of |gamma| per label, on shared axes."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, hist in histograms.items():
        ax.stairs(hist["counts"], hist["edges"], label=label)
    ax.set_xlabel("|gamma|")
    ax.set_ylabel("channels")
    ax.legend()
    return figure_png(fig)


def accuracy_curves(curves: dict[str, list[dict]]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, history in curves.items():
        ax.plot([h["epoch"] + 1 for h in history], [h["prec1"] for h in history],
                marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    return figure_png(fig)


def kept_channels(series: dict[str, list[int]]) -> bytes:
    """Kept channels per BN layer, one group of bars per layer."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(series))
    for i, (label, counts) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width  # each group centred on its layer's tick
        ax.bar([k + offset for k in range(len(counts))], counts, width=width, label=label)
    layers = max((len(counts) for counts in series.values()), default=0)
    ax.set_xticks(range(layers))
    ax.set_xlabel("BN layer")
    ax.set_ylabel("kept channels")
    ax.legend()
    return figure_png(fig)


def save_bundle_plots(manifest: dict, out: Path) -> None:
    sparsity = manifest["sparsity"]
    (out / "gamma_hist.png").write_bytes(gamma_histogram(
        {f"lambda={s['lambda']:g}": s["gamma"]["histogram"] for s in sparsity.values()}))
    curves = {f"sparsity lambda={s['lambda']:g}": s["history"] for s in sparsity.values()}
    curves[f"fine-tune {manifest['finetune']['ratio']:g}"] = manifest["finetune"]["history"]
    (out / "curves.png").write_bytes(accuracy_curves(curves))
