"""Trusted re-computation of what each run wrote.

Everything here runs in the grader's own process on tensors loaded with
``weights_only=True``; nothing a student wrote is imported or executed. The
output is plain JSON-ready facts that diagnose and score read.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grader.checkpoints import (CheckpointError, load_student_checkpoint, model_from_state,
                                state_dict_of)
from reference.bundle import majority_fraction
from reference.data import TensorLoader
from reference.metrics import count_macs, count_parameters, gamma_stats
from reference.model import bn_layers, cfg_from_state_dict, masked_state_dict
from reference.profiles import Profile
from reference.prune import cfg_from_masks, compute_masks, global_threshold, kept_indices
from reference.train import accuracy, predict, recalibrate_bn

# A network that gives this share of its answers to one class has collapsed (LAB: 1000/10000).
COLLAPSE_FRACTION = 0.8
# Recalibrated BN statistics must win back this many points to call a collapse a statistics shift.
RECOVERY_POINTS = 20.0
# Thin logits within this of the masked original's mean the copy is exact (float32 noise).
LOGITS_TOLERANCE = 1e-3
# A BN scale under this counts as "near zero" when looking for the L1 spike.
SMALL_GAMMA = 0.01
# A conv weight under this counts as "near zero" (L1 on every parameter).
SMALL_WEIGHT = 1e-3
# Largest "keep at least k channels" rule recognised as a correct min-channel rule.
MAX_MIN_CHANNELS = 8

ACCURACY_LINE = re.compile(r"Test set: Accuracy: (\d+)/(\d+) \(([\d.]+)%\)")
PRUNE_RATIO_LINE = re.compile(r"PRUNE RATIO=([\d.eE+-]+)")


@dataclass
class TrustedData:
    """What every evaluation shares: the profile, its expected bundle and its data."""
    profile: Profile
    manifest: dict
    bundle_dir: Path
    train_loader: TensorLoader
    test_loader: TensorLoader


def claimed_accuracies(text: str) -> list[float]:
    return [float(m.group(3)) for m in ACCURACY_LINE.finditer(text)]


def claimed_prune_ratio(text: str) -> float | None:
    found = PRUNE_RATIO_LINE.findall(text)
    return float(found[-1]) if found else None


# ---------------------------------------------------------------- sparsity training

def sparsity_facts(checkpoint_path: Path, data: TrustedData) -> dict:
    """Gamma statistics, conv-weight sparsity and an eval-mode re-test of a sparse checkpoint."""
    checkpoint = load_student_checkpoint(checkpoint_path, ("state_dict",))
    state = state_dict_of(checkpoint, checkpoint_path.name)
    model = model_from_state(state, checkpoint_path.name)
    gammas = torch.cat([bn.weight.detach().flatten() for bn in bn_layers(model)])
    conv = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                      if isinstance(m, nn.Conv2d)])
    return {
        "missing_keys": [k for k in ("epoch", "state_dict", "best_prec1", "optimizer")
                         if k not in checkpoint],
        "claimed_best_prec1": _as_float(checkpoint.get("best_prec1")),
        "accuracy": accuracy(model, data.test_loader),
        "gamma": gamma_stats(gammas.numpy()),
        "gammas": gammas.tolist(),
        "conv_small_fraction": float((conv < SMALL_WEIGHT).float().mean()),
    }


def compare_sparsity(student: dict, baseline: dict | None, reference: dict) -> dict:
    """How the student's lambda run relates to its own lambda-0 run and to the reference."""
    small = str(SMALL_GAMMA)
    comparison = {
        "small_fraction": student["gamma"]["fraction_below"][small],
        "reference_small_fraction": reference["gamma"]["fraction_below"][small],
        "mean_abs": student["gamma"]["mean_abs"],
        "reference_mean_abs": reference["gamma"]["mean_abs"],
    }
    if baseline is not None:
        s, b = np.asarray(student["gammas"]), np.asarray(baseline["gammas"])
        comparison.update({
            "baseline_small_fraction": baseline["gamma"]["fraction_below"][small],
            "baseline_mean_abs": baseline["gamma"]["mean_abs"],
            "max_diff_to_baseline": float(np.abs(s - b).max()) if s.shape == b.shape else None,
            "conv_small_fraction": student["conv_small_fraction"],
            "baseline_conv_small_fraction": baseline["conv_small_fraction"],
        })
    return comparison


# ---------------------------------------------------------------- pruning

def mask_strategies(model: nn.Module, ratio: float, min_channels: int) -> dict[str, list[np.ndarray]]:
    """The masks a correct prune gives, and those of each catalogued way of getting it wrong."""
    gammas = [bn.weight.detach().cpu().numpy() for bn in bn_layers(model)]
    magnitudes = [np.abs(g) for g in gammas]
    everything = np.sort(np.concatenate(magnitudes))
    threshold = float(everything[int(len(everything) * ratio)])
    signed = np.sort(np.concatenate(gammas))
    signed_threshold = float(signed[int(len(signed) * ratio)])
    descending_threshold = float(everything[::-1][int(len(everything) * ratio)])

    def first_k(mask: np.ndarray) -> np.ndarray:
        mask = mask.copy()
        if mask.sum() < min_channels:
            mask[:min_channels] = 1
        return mask

    def per_layer(m: np.ndarray) -> np.ndarray:
        return (m > np.sort(m)[int(len(m) * ratio)]).astype(np.int64)

    def correct(k: int) -> list[np.ndarray]:
        return [m.numpy().astype(np.int64) for m in compute_masks(model, ratio, k).cfg_mask]

    # The min-channel rule is an ungraded TODO: any "keep at least k" gives a correct mask.
    return {
        "correct": correct(min_channels),
        "correct-without-min-rule": correct(0),
        **{f"correct-min-{k}": correct(k) for k in range(1, MAX_MIN_CHANNELS + 1) if k != min_channels},
        "inverted": [(m <= threshold).astype(np.int64) for m in magnitudes],
        "signed": [(g > signed_threshold).astype(np.int64) for g in gammas],
        "per-layer": [per_layer(m) for m in magnitudes],
        "descending": [(m > descending_threshold).astype(np.int64) for m in magnitudes],
        "first-k": [first_k((m > threshold).astype(np.int64)) for m in magnitudes],
    }


def student_masks(state: dict, widths: list[int]) -> list[np.ndarray] | None:
    """``cfg_mask`` as the kernel dumped it, if it has one 0/1 vector per BN layer."""
    raw = state.get("cfg_mask")
    if not isinstance(raw, list) or len(raw) != len(widths):
        return None
    try:
        masks = [np.asarray(m, dtype=np.float64).ravel() for m in raw]
    except (TypeError, ValueError):
        return None
    if any(len(m) != w for m, w in zip(masks, widths)):
        return None
    return [(m != 0).astype(np.int64) for m in masks]


def matching_strategy(masks: list[np.ndarray], strategies: dict[str, list[np.ndarray]]) -> str | None:
    for name, candidate in strategies.items():
        if all(np.array_equal(a, b) for a, b in zip(masks, candidate, strict=True)):
            return name
    return None


def _initial_value(tensor: torch.Tensor, value: float) -> bool:
    return tensor.numel() > 0 and bool(torch.all(tensor == value))


def copy_differences(original: dict[str, torch.Tensor], thin: dict[str, torch.Tensor],
                     masks: list[np.ndarray]) -> list[dict]:
    """Every thin tensor that is not its kept slice of the original, with what it holds instead."""
    differences: list[dict] = []
    conv_keys = [k for k, v in original.items() if k.startswith("feature.") and v.dim() == 4]
    bn_prefixes = [k[: -len(".running_var")] for k in original if k.endswith(".running_var")]
    in_idx = np.arange(3)
    for layer, (conv_key, prefix, mask) in enumerate(zip(conv_keys, bn_prefixes, masks)):
        out_idx = kept_indices(torch.from_numpy(mask))
        expected = {conv_key: original[conv_key][out_idx][:, in_idx]}
        for name in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{prefix}.{name}"] = original[f"{prefix}.{name}"][out_idx]
        layer_differences = [d for key, want in expected.items()
                             for d in _compare(key, layer, want, thin.get(key))]
        affine_exact = not any(d["tensor"] in ("weight", "bias") and d["part"] == "bn"
                               for d in layer_differences)
        for d in layer_differences:
            if affine_exact and d["tensor"] in ("running_mean", "running_var") and d["kind"] == "differs":
                # Copied right, then moved by a forward pass in train mode: not a copy bug.
                d["kind"] = "moved"
                d["detail"] = (f"{d['tensor']} of BN layer {layer} moved away from its kept slice "
                               "while gamma and beta are exact (statistics updated in train mode)")
        differences += layer_differences
        in_idx = out_idx
    differences += _compare("classifier.weight", None, original["classifier.weight"][:, in_idx],
                            thin.get("classifier.weight"))
    differences += _compare("classifier.bias", None, original["classifier.bias"],
                            thin.get("classifier.bias"))
    return differences


FRESH_VALUES = {"weight": 0.5, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _compare(key: str, layer: int | None, want: torch.Tensor, got: torch.Tensor | None) -> list[dict]:
    tensor = key.rsplit(".", 1)[-1]
    kind_of = ("conv" if key.startswith("feature.") and want.dim() == 4 else
               "linear" if key.startswith("classifier.") else "bn")
    base = {"key": key, "layer": layer, "part": kind_of, "tensor": tensor}
    if got is None:
        return [{**base, "kind": "missing", "detail": f"{key} is missing from the thin model"}]
    if got.shape != want.shape:
        return [{**base, "kind": "shape",
                 "detail": f"{key} has shape {tuple(got.shape)}, its kept slice {tuple(want.shape)}"}]
    if torch.equal(got, want):
        return []
    where = f"BN layer {layer}" if layer is not None else "the classifier"
    if kind_of == "bn" and _initial_value(got, FRESH_VALUES[tensor]):
        detail = f"{tensor} of {where} is still all {FRESH_VALUES[tensor]:g} (its initial value)"
        kind = "initial"
    elif kind_of == "linear" and tensor == "bias" and _initial_value(got, 0.0):
        detail, kind = "the classifier bias is still all zeros (its initial value)", "initial"
    elif kind_of == "linear" and tensor == "weight" and abs(float(got.std()) - 0.01) < 0.003 \
            and abs(float(want.std()) - 0.01) > 0.003:
        detail = (f"the classifier weight has std {float(got.std()):.4f}, as initialised "
                  f"(its kept slice: {float(want.std()):.4f})")
        kind = "initial"
    else:
        gap = float((got.float() - want.float()).abs().max())
        detail = f"{key} differs from its kept slice (largest difference {gap:.3g})"
        kind = "differs"
    return [{**base, "kind": kind, "detail": detail}]


def prune_facts(work_dir: Path, state: dict, stdout: str, original_state: dict[str, torch.Tensor],
                ratio: float, data: TrustedData, checkpoint_name: str = "model_prune.pth") -> dict:
    """Masks against the reference and the catalogue, tensors against their slices, logits,
    accuracy (and after BN recalibration), and what the notebook printed."""
    profile = data.profile
    original = model_from_state(original_state, "the original checkpoint")
    strategies = mask_strategies(original, ratio, profile.min_channels)
    widths = [len(m) for m in strategies["correct"]]
    facts: dict = {
        "ratio": ratio,
        "threshold_reference": global_threshold(original, ratio),
        "threshold_claimed": _as_float(state.get("threshold")),
        "reference_kept": [int(m.sum()) for m in strategies["correct"]],
        "reference_kept_without_min_rule": [int(m.sum()) for m in strategies["correct-without-min-rule"]],
        "claimed_accuracies": claimed_accuracies(stdout),
        "claimed_prune_ratio": claimed_prune_ratio(stdout),
        "state_cfg": state.get("cfg"),
    }
    masks = student_masks(state, widths)
    facts["masks_reported"] = masks is not None
    if masks is not None:
        facts["student_kept"] = [int(m.sum()) for m in masks]
        facts["mask_strategy"] = matching_strategy(masks, strategies)
        facts["mask_correct"] = (facts["mask_strategy"] or "").startswith("correct")
        facts["mask_layers_wrong"] = [] if facts["mask_correct"] else [
            k for k, (a, b) in enumerate(zip(masks, strategies["correct"])) if not np.array_equal(a, b)]
        facts["kept_not_top_k"] = _kept_not_top_k(masks, original, profile.min_channels,
                                                   strategies["correct-without-min-rule"])
    try:
        checkpoint = load_student_checkpoint(work_dir / checkpoint_name, ("cfg", "state_dict"))
        thin_state = state_dict_of(checkpoint, checkpoint_name)
    except CheckpointError as error:
        facts["checkpoint_error"] = str(error)
        return facts
    facts["cfg"] = _plain_cfg(checkpoint["cfg"])
    facts["cfg_from_shapes"] = _safe_cfg(thin_state)
    if masks is None:  # no dumped cfg_mask: judge the copy against the reference masks
        masks = strategies["correct"] if facts["cfg_from_shapes"] == cfg_from_masks(original, strategies["correct"]) else None
    if masks is not None:
        facts["copy_differences"] = copy_differences(original_state, thin_state, masks)
    try:
        thin = model_from_state(thin_state, checkpoint_name, facts["cfg_from_shapes"])
    except CheckpointError as error:
        facts["thin_error"] = str(error)
        return facts
    facts["parameters"] = count_parameters(thin)
    facts["macs"] = count_macs(thin)
    preds = predict(thin, data.test_loader)
    facts["accuracy"] = 100.0 * float((preds == data.test_loader.y.cpu()).float().mean())
    facts["majority_fraction"] = majority_fraction(preds)
    facts["collapsed"] = facts["majority_fraction"] >= COLLAPSE_FRACTION
    if masks is not None:
        masked = model_from_state(masked_state_dict(original_state, [torch.from_numpy(m) for m in masks]),
                                  "the masked original")
        facts["accuracy_masked_original"] = accuracy(masked, data.test_loader)
        facts["logits_max_diff"] = _logits_gap(thin, masked, data.test_loader)
    recalibrated = copy.deepcopy(thin)
    recalibrate_bn(recalibrated, data.train_loader, profile.recalibration_batches)
    facts["accuracy_recalibrated"] = accuracy(recalibrated, data.test_loader)
    return facts


def _kept_not_top_k(masks: list[np.ndarray], model: nn.Module, k: int,
                    plain: list[np.ndarray]) -> list[int]:
    """Layers where the min-channel rule fired but did not keep that layer's largest |gamma|."""
    layers = []
    for index, (mask, bn, natural) in enumerate(zip(masks, bn_layers(model), plain)):
        if natural.sum() >= k or mask.sum() == natural.sum() or np.any(natural > mask):
            continue  # the rule did not fire here, or the mask is wrong for another reason
        magnitude = bn.weight.detach().abs().cpu().numpy()
        top = set(np.argsort(-magnitude, kind="stable")[: int(mask.sum())].tolist())
        if set(np.flatnonzero(mask).tolist()) != top:
            layers.append(index)
    return layers


@torch.no_grad()
def _logits_gap(a: nn.Module, b: nn.Module, loader: TensorLoader) -> float:
    a.eval(), b.eval()
    return max(float((a(x) - b(x)).abs().max()) for x, _ in loader)


# ---------------------------------------------------------------- fine-tuning

def finetune_facts(checkpoint_path: Path, start_cfg: list | None, start_accuracy: float | None,
                   data: TrustedData) -> dict:
    """Architecture (read from tensor shapes: the checkpoint has no cfg) and eval accuracy."""
    checkpoint = load_student_checkpoint(checkpoint_path, ("state_dict",))
    state = state_dict_of(checkpoint, checkpoint_path.name)
    cfg = _safe_cfg(state)
    facts = {"cfg": cfg, "architecture_kept": None if start_cfg is None else cfg == list(start_cfg),
             "claimed_best_prec1": _as_float(checkpoint.get("best_prec1")),
             "start_accuracy": start_accuracy,
             "missing_keys": [k for k in ("epoch", "state_dict", "best_prec1", "optimizer")
                              if k not in checkpoint]}
    model = model_from_state(state, checkpoint_path.name, cfg)
    facts["accuracy"] = accuracy(model, data.test_loader)
    return facts


# ---------------------------------------------------------------- small helpers

def _as_float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _plain_cfg(cfg: object) -> list | None:
    if not isinstance(cfg, (list, tuple)):
        return None
    return [v if v == "M" else _as_int(v) for v in cfg]


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _safe_cfg(state: dict[str, torch.Tensor]) -> list | None:
    try:
        return cfg_from_state_dict(state)
    except (ValueError, KeyError):
        return None


def safely(step: Callable[[], dict]) -> dict:
    """Run one evaluation; a checkpoint the grader cannot use becomes an ``error`` fact."""
    try:
        return step()
    except CheckpointError as error:
        return {"error": str(error)}


# ---------------------------------------------------------------- the edge-case input

EDGE_RATIO = 0.5


def edge_case_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The reference sparse weights with one BN layer left a single channel above the threshold.

    The first layer of at least 8 channels (past the first two) gets tiny distinct |gamma|
    except its LAST channel, which gets the largest |gamma| of the network. Pruned at
    ``EDGE_RATIO``, a notebook without a min-channel rule meets a 1-channel layer (it needs
    the index guard), and a rule that keeps the first k channels keeps the wrong ones.
    """
    edited = {k: v.clone() for k, v in state.items()}
    prefixes = [k[: -len(".running_var")] for k in state if k.endswith(".running_var")]
    largest = max(float(state[f"{p}.weight"].abs().max()) for p in prefixes)
    layer = next(i for i, p in enumerate(prefixes)
                 if i >= 2 and state[f"{p}.weight"].numel() >= 8)
    gamma = edited[f"{prefixes[layer]}.weight"]
    gamma.copy_(torch.arange(1, gamma.numel() + 1, dtype=gamma.dtype) * 1e-6)
    gamma[-1] = largest
    return edited, layer
