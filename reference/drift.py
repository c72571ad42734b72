"""Drift between two builds of one profile's expected bundle (``slimgrade reference --verify``).

Training on another machine (other CPU kernels, another thread count) changes the
floating-point sums, and a few epochs of SGD amplify that: the gammas differ, and with
them which channels fall under a threshold. A rebuild is therefore never bit-equal to the
shipped bundle; it must only stay within the tolerances below (docs/design.md, "Bundles").
Every figure of the manifest is compared by the first rule whose pattern matches its path
(keys joined by ``/``); a figure no rule names must be equal, so none is skipped silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from reference.model import scaled_cfg
from reference.profiles import NOT_IN_BUNDLE
from reference.bundle import load_manifest

# Tolerances (docs/design.md, "Bundles"). Measured: the quick bundle rebuilt five ways on one
# machine (one thread instead of two; oneDNN limited to AVX2, with one thread and with two;
# oneDNN limited to SSE4.1 with ATen's generic kernels; without oneDNN) drifted at most
# about four fifths of each tolerance below.
ACCURACY_PP = 8.0  # best test accuracy of the two sparsity trainings (percentage points)
RECALIBRATED_PP = 12.0  # accuracy of a thin model after re-estimating its BN statistics
FINETUNE_PP = 20.0  # best accuracy of a few epochs fine-tuning the 90 % model
# Right after pruning (before recalibration) a short profile's network has collapsed to
# few classes; its accuracy and majority share are noise, bounded only against breakage.
COLLAPSED_PP = 25.0
MAJORITY = 0.8
GAMMA_RELATIVE = 0.6  # mean, median and largest |gamma| (the profile's gamma_band is 0.5..2 times)
GAMMA_FRACTION = 0.15  # shares of |gamma| under 0.01, 0.05, 0.1, and of negative gammas
THRESHOLD_RELATIVE = 0.6  # the global threshold: a quantile of the same |gamma|
LAYER_SHARE, LAYER_MIN = 0.25, 8  # channels kept per layer: max(8, 25 % of its full width)
PRUNE_RATIO = 0.03  # share of channels pruned
SIZE_RELATIVE = 0.4  # parameters, MACs, bytes of a thin model
# Which channels survive differs from build to build about as much as between unrelated
# masks with the same per-layer counts (measured 0.82 to 0.96 of that chance level); masks
# past 1.1 times chance disagree more than unrelated ones would (inverted masks: 1.25 at 0.5).
MASK_CHANCE = 1.1

ABSOLUTE, RELATIVE, EQUAL, LAYERS, MASKS, INFO = "abs", "rel", "equal", "layers", "masks", "info"

# (pattern on the path, how, tolerance): first match wins.
RULES: list[tuple[str, str, float]] = [
    (r"device|environment(/.*)?", INFO, 0.0),
    # budgets and bands do not shape a bundle (the fingerprint leaves them out)
    (rf"profile/({'|'.join(sorted(NOT_IN_BUNDLE))})", INFO, 0.0),
    (r"(sparsity/[^/]+|finetune)/(history|best_epoch)", INFO, 0.0),
    (r"sparsity/[^/]+/gamma/histogram", INFO, 0.0),
    (r"sparsity/[^/]+/best_prec1", ABSOLUTE, ACCURACY_PP),
    (r"sparsity/[^/]+/gamma/(mean_abs|median_abs|max_abs)", RELATIVE, GAMMA_RELATIVE),
    (r"sparsity/[^/]+/gamma/(fraction_below/.*|negative_fraction)", ABSOLUTE, GAMMA_FRACTION),
    (r"prune/[^/]+/threshold", RELATIVE, THRESHOLD_RELATIVE),
    (r"(prune/[^/]+|finetune)/(cfg|kept_per_layer|cfg_without_min_rule)", LAYERS, LAYER_SHARE),
    (r"prune/[^/]+/cfg_mask", MASKS, MASK_CHANCE),
    (r"prune/[^/]+/prune_ratio", ABSOLUTE, PRUNE_RATIO),
    (r"prune/[^/]+/accuracy_(masked|pruned)", ABSOLUTE, COLLAPSED_PP),
    (r"prune/[^/]+/accuracy_recalibrated", ABSOLUTE, RECALIBRATED_PP),
    (r"prune/[^/]+/majority_fraction", ABSOLUTE, MAJORITY),
    (r"(prune/[^/]+|finetune)/(checkpoint_bytes|parameters|macs)", RELATIVE, SIZE_RELATIVE),
    (r"finetune/best_prec1", ABSOLUTE, FINETUNE_PP),
    # profile, fingerprint, lambdas, ratios, counts, the original model: equal
]


@dataclass(frozen=True)
class Row:
    """One figure: both values, the drift and the tolerance as shown; ok None: not judged."""

    figure: str
    shipped: str
    rebuilt: str
    drift: str
    tolerance: str
    ok: bool | None


def rule_for(path: str) -> tuple[str, float]:
    for pattern, how, tolerance in RULES:
        if re.fullmatch(pattern, path):
            return how, tolerance
    return EQUAL, 0.0


def compare_manifests(shipped: dict, rebuilt: dict) -> list[Row]:
    """A row for every figure of either manifest."""
    rows: list[Row] = []
    divisor = (shipped.get("profile") or {}).get("width_divisor", 1)
    widths = [v for v in scaled_cfg(divisor if isinstance(divisor, int) else 1) if v != "M"]

    def walk(a: object, b: object, path: str) -> None:
        how, tolerance = rule_for(path) if path else (EQUAL, 0.0)
        if how == EQUAL and isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}/{key}" if path else key)
            return
        rows.append(_compare(path, a, b, how, tolerance, widths))

    walk(shipped, rebuilt, "")
    return rows


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING = _Missing()


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: object) -> str:
    if value is _MISSING:
        return "missing"
    if _number(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    if isinstance(value, list) and all(_number(v) or v == "M" for v in value):
        text = ",".join(_show(v) for v in value)
        return text if len(text) <= 40 else text[:39] + "…"
    if isinstance(value, list):
        return f"{len(value)} entries"
    if isinstance(value, dict):
        return f"{len(value)} keys"
    text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _compare(path: str, a: object, b: object, how: str, tolerance: float,
             widths: list[int]) -> Row:
    shown = (path, _show(a), _show(b))
    if how == INFO:
        return Row(*shown, "", "not compared", None)
    if a is _MISSING or b is _MISSING:
        return Row(*shown, "only in one", "present in both", False)
    if how == MASKS:
        return _compare_masks(path, a, b, tolerance)
    if how == LAYERS:
        return _compare_layers(path, a, b, tolerance, widths)
    if how in (ABSOLUTE, RELATIVE) and _number(a) and _number(b):
        drift = abs(a - b)
        if how == RELATIVE:
            drift = drift / max(abs(a), 1e-12)
            return Row(*shown, f"{100 * drift:.1f} %", f"<= {100 * tolerance:g} %", drift <= tolerance)
        return Row(*shown, f"{drift:.4g}", f"<= {tolerance:g}", drift <= tolerance)
    return Row(*shown, "" if a == b else "differs", "equal", a == b)


def _compare_layers(path: str, a: object, b: object, share: float, widths: list[int]) -> Row:
    """Channel counts per layer ("M" marks a max-pooling): the same layout, and each layer
    within max(LAYER_MIN, ``share`` of its full width) channels."""
    shown = (path, _show(a), _show(b))
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
            and all((x == "M") == (y == "M") for x, y in zip(a, b))
            and sum(x != "M" for x in a) == len(widths)
            and all(_number(x) for x in a + b if x != "M")):
        return Row(*shown, "other layout", "same layers", False)
    counts = [(x, y) for x, y in zip(a, b) if x != "M"]
    gaps = [(abs(x - y), max(LAYER_MIN, share * w)) for (x, y), w in zip(counts, widths)]
    worst = max(gap for gap, _ in gaps)
    ok = all(gap <= allowed for gap, allowed in gaps)
    return Row(*shown, f"max {worst} channels", f"<= max({LAYER_MIN}, {100 * share:g} % of width)",
               ok)


def _compare_masks(path: str, a: object, b: object, tolerance: float) -> Row:
    """Keep/cut verdicts of every channel: how many differ, against how many would differ
    between unrelated masks keeping the same number of channels in each layer."""
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
            and all(isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and x
                    for x, y in zip(a, b))):
        return Row(path, _show(a), _show(b), "other layout", "same layers", False)
    total = sum(len(x) for x in a)
    flipped = sum(int(p != q) for x, y in zip(a, b) for p, q in zip(x, y))
    chance = sum((sum(x) * (len(x) - sum(y)) + sum(y) * (len(x) - sum(x))) / len(x)
                 for x, y in zip(a, b))
    kept_a, kept_b = sum(map(sum, a)), sum(map(sum, b))
    return Row(path, f"{kept_a}/{total} kept", f"{kept_b}/{total} kept",
               f"{flipped} differ (chance {chance:.0f})", f"<= {tolerance:g} x chance",
               flipped <= tolerance * max(chance, 1.0))


def compare_bundles(shipped_dir: str | Path, rebuilt_dir: str | Path) -> list[Row]:
    return compare_manifests(load_manifest(shipped_dir), load_manifest(rebuilt_dir))


def within_tolerance(rows: list[Row]) -> bool:
    return all(row.ok is not False for row in rows)


def drift_table(rows: list[Row], judged_only: bool = False) -> str:
    """The rows as a plain-text table (``judged_only``: without the figures not compared)."""
    shown = [r for r in rows if r.ok is not None or not judged_only]
    header = ("figure", "shipped", "rebuilt", "drift", "tolerance", "")
    cells = [header] + [(r.figure, r.shipped, r.rebuilt, r.drift, r.tolerance,
                         "" if r.ok is None else "ok" if r.ok else "DRIFT") for r in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in cells)
