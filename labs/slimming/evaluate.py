"""Trusted re-computation of what each run wrote.

Everything here runs in the grader's own process on tensors loaded with
``weights_only=True``; nothing a student wrote is imported or executed. The
output is plain JSON-ready facts that diagnose and score read.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labs.slimming.checkpoints import (CheckpointError, load_student_checkpoint, model_from_state,
                                state_dict_of)
from reference.bundle import majority_fraction
from reference.data import TensorLoader
from reference.metrics import count_macs, count_parameters, gamma_stats
from reference.model import bn_layers, cfg_from_state_dict, masked_state_dict, scaled_cfg
from reference.profiles import Profile
from reference.prune import cfg_from_masks, compute_masks, global_threshold, kept_indices
from reference.train import accuracy, predict, recalibrate_bn

log = logging.getLogger(__name__)

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
    # The bundle's checkpoints by file name (state dicts): a run's output equal to one of
    # these, tensor for tensor, did not come from an honest training run.
    references: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def widest(self) -> list[int | str]:
        """The profile's full cfg: no checkpoint of this grading has more or wider layers."""
        return scaled_cfg(self.profile.width_divisor)


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
    model = model_from_state(state, checkpoint_path.name, widest=data.widest)
    gammas = torch.cat([bn.weight.detach().flatten() for bn in bn_layers(model)])
    conv = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                      if isinstance(m, nn.Conv2d)])
    return {
        "missing_keys": [k for k in ("epoch", "state_dict", "best_prec1", "optimizer")
                         if k not in checkpoint],
        "copied_from": copied_from(state, data.references),
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

def mask_strategies(model: nn.Module, ratio: float, min_channels: int) -> dict[str, list[list[np.ndarray]]]:
    """The masks a correct prune gives, and those of each catalogued way of getting it wrong,
    each in every form a student writes it: a strict or non-strict comparison (``gt``/``>``
    or ``ge``/``>=``), a sort in either direction read from the right end."""
    gammas = [bn.weight.detach().cpu().numpy() for bn in bn_layers(model)]
    magnitudes = [np.abs(g) for g in gammas]
    everything = np.sort(np.concatenate(magnitudes))
    threshold = float(everything[int(len(everything) * ratio)])
    signed = np.sort(np.concatenate(gammas))
    signed_threshold = float(signed[int(len(signed) * ratio)])
    descending_threshold = float(everything[::-1][int(len(everything) * ratio)])

    def above(values: list[np.ndarray], cut: float) -> list[list[np.ndarray]]:
        """Kept where above ``cut``: strictly, and also at it."""
        return [[(v > cut).astype(np.int64) for v in values],
                [(v >= cut).astype(np.int64) for v in values]]

    def first_k(mask: np.ndarray) -> np.ndarray:
        mask = mask.copy()
        if mask.sum() < min_channels:
            mask[:min_channels] = 1
        return mask

    def per_layer(strict: bool) -> list[np.ndarray]:
        return [((m > np.sort(m)[int(len(m) * ratio)]) if strict else
                 (m >= np.sort(m)[int(len(m) * ratio)])).astype(np.int64) for m in magnitudes]

    def correct(k: int) -> list[np.ndarray]:
        return [m.numpy().astype(np.int64) for m in compute_masks(model, ratio, k).cfg_mask]

    def with_min_rules(forms: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Each form as it is, and with a min-channel rule on top: a layer keeping fewer than
        k channels keeps its top-k |gamma|, its top-k signed gamma, or its first k."""
        rules = [lambda m, g: _top_k(m, np.abs(g), min_channels),
                 lambda m, g: _top_k(m, g, min_channels), lambda m, g: first_k(m)]
        return forms + [[rule(m, g) for m, g in zip(form, gammas)] for form in forms for rule in rules]

    # The min-channel rule is an ungraded TODO: any "keep at least k" gives a correct mask.
    # Benign explanations come first: where a mistake with a min-channel rule on top gives
    # the same masks as a correct threshold with a first-k rule, no mistake is shown.
    return {
        "correct": [correct(min_channels), above(magnitudes, threshold)[1]],
        "correct-without-min-rule": [correct(0)],
        **{f"correct-min-{k}": [correct(k)] for k in range(1, MAX_MIN_CHANNELS + 1) if k != min_channels},
        "first-k": [[first_k((m > threshold).astype(np.int64)) for m in magnitudes]],
        "inverted": with_min_rules([[(m <= threshold).astype(np.int64) for m in magnitudes],
                                    [(m < threshold).astype(np.int64) for m in magnitudes]]),
        "signed": with_min_rules(above(gammas, signed_threshold)),
        "per-layer": with_min_rules([per_layer(True), per_layer(False)]),
        "descending": with_min_rules(above(magnitudes, descending_threshold)),
    }


def _top_k(mask: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """``mask`` with its ``k`` highest-scoring channels kept when it keeps fewer than ``k``."""
    if mask.sum() >= k:
        return mask
    mask = mask.copy()
    mask[np.argsort(-score, kind="stable")[:k]] = 1
    return mask


def inverted_by_evidence(masks: list[np.ndarray], model: nn.Module, threshold: float) -> bool:
    """Every kept |gamma| is at or below the threshold: the smallest channels were kept."""
    kept = [np.abs(bn.weight.detach().cpu().numpy())[m.astype(bool)]
            for bn, m in zip(bn_layers(model), masks)]
    values = np.concatenate(kept) if kept else np.array([])
    return values.size > 0 and bool(np.all(values <= threshold))


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


def matching_strategy(masks: list[np.ndarray], strategies: dict[str, list[list[np.ndarray]]]) -> str | None:
    for name, forms in strategies.items():
        for candidate in forms:
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
                             for d in _compare(key, layer, want, thin.get(key), expected)]
        affine_exact = not any(d["tensor"] in ("weight", "bias") and d["part"] == "bn"
                               for d in layer_differences)
        statistics = [d for d in layer_differences if d["tensor"] in ("running_mean", "running_var")]
        # A forward pass in train mode moves both statistics and neither affine tensor: not a
        # copy bug. One statistic alone, or one holding another tensor's values, is a copy bug.
        if affine_exact and len(statistics) == 2 and all(d["kind"] == "differs" for d in statistics):
            for d in statistics:
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


def _compare(key: str, layer: int | None, want: torch.Tensor, got: torch.Tensor | None,
             siblings: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """How ``got`` differs from ``want``; ``siblings`` are the kept slices of the other tensors
    of the same layer, so that "this is running_mean, not running_var" can be said."""
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
    swapped = next((other for other, value in (siblings or {}).items() if other != key
                    and value.shape == got.shape and torch.equal(got, value)), None)
    if swapped is not None:
        source = swapped.rsplit(".", 1)[-1]
        detail = f"{tensor} of {where} holds the kept values of {source}, not of {tensor}"
        kind = "swapped"
    elif kind_of == "bn" and _initial_value(got, FRESH_VALUES[tensor]):
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
    original = model_from_state(original_state, "the original checkpoint", widest=data.widest)
    strategies = mask_strategies(original, ratio, profile.min_channels)
    widths = [len(m) for m in strategies["correct"][0]]
    facts: dict = {
        "ratio": ratio,
        "threshold_reference": global_threshold(original, ratio),
        "threshold_claimed": _as_float(state.get("threshold")),
        "reference_kept": [int(m.sum()) for m in strategies["correct"][0]],
        "reference_kept_without_min_rule": [int(m.sum()) for m in strategies["correct-without-min-rule"][0]],
        "claimed_accuracies": claimed_accuracies(stdout),
        "claimed_prune_ratio": claimed_prune_ratio(stdout),
        "state_cfg": state.get("cfg"),
    }
    masks = student_masks(state, widths)
    facts["masks_reported"] = masks is not None
    if masks is not None:
        facts["student_kept"] = [int(m.sum()) for m in masks]
        strategy = matching_strategy(masks, strategies)
        if strategy is None and inverted_by_evidence(masks, original, facts["threshold_reference"]):
            strategy = "inverted"
        facts["mask_strategy"] = strategy
        # The min-channel rule is an ungraded TODO: keeping a layer's first k is a warning.
        facts["mask_correct"] = (strategy or "").startswith("correct") or strategy == "first-k"
        facts["mask_layers_wrong"] = [] if facts["mask_correct"] else [
            k for k, (a, b) in enumerate(zip(masks, strategies["correct"][0])) if not np.array_equal(a, b)]
        facts["kept_not_top_k"] = _kept_not_top_k(masks, original, profile.min_channels,
                                                   strategies["correct-without-min-rule"][0])
        # Masks that keep nearly everything and match no known mistake do not prune: the
        # copy is then judged against the correct masks, or saving the input unchanged with
        # masks of all ones would pass every copy blank.
        kept_share = sum(facts["student_kept"]) / max(1, sum(widths))
        if strategy is None and kept_share > 1 - ratio / 2:
            facts["masks_not_pruning"] = True
            masks = strategies["correct"][0]
    try:
        checkpoint = load_student_checkpoint(work_dir / checkpoint_name, ("cfg", "state_dict"),
                                             base=work_dir)  # no link on the way either
        thin_state = state_dict_of(checkpoint, checkpoint_name)
    except CheckpointError as error:
        facts["checkpoint_error"] = str(error)
        return facts
    facts["cfg"] = _plain_cfg(checkpoint["cfg"])
    facts["cfg_from_shapes"] = _safe_cfg(thin_state)
    if masks is None:  # no dumped cfg_mask: judge the copy against the reference masks
        masks = strategies["correct"][0] if facts["cfg_from_shapes"] == cfg_from_masks(original, strategies["correct"][0]) else None
    if masks is not None:
        facts["copy_differences"] = copy_differences(original_state, thin_state, masks)
    try:
        thin = model_from_state(thin_state, checkpoint_name, facts["cfg_from_shapes"],
                                widest=data.widest)
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
                                  "the masked original", widest=data.widest)
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
                   data: TrustedData, start: dict[str, torch.Tensor] | None = None) -> dict:
    """Architecture (read from tensor shapes: the checkpoint has no cfg), eval accuracy, and
    whether it is its own input or a reference checkpoint unchanged (no training happened)."""
    checkpoint = load_student_checkpoint(checkpoint_path, ("state_dict",))
    state = state_dict_of(checkpoint, checkpoint_path.name)
    cfg = _safe_cfg(state)
    candidates = {**data.references, **({"its input": start} if start is not None else {})}
    facts = {"cfg": cfg, "architecture_kept": None if start_cfg is None else cfg == list(start_cfg),
             "copied_from": copied_from(state, candidates),
             "claimed_best_prec1": _as_float(checkpoint.get("best_prec1")),
             "start_accuracy": start_accuracy,
             "missing_keys": [k for k in ("epoch", "state_dict", "best_prec1", "optimizer")
                              if k not in checkpoint]}
    model = model_from_state(state, checkpoint_path.name, cfg, widest=data.widest)
    facts["accuracy"] = accuracy(model, data.test_loader)
    return facts


# ---------------------------------------------------------------- provenance

def copied_from(state: dict[str, torch.Tensor], candidates: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The name of a candidate ``state`` equals tensor for tensor: training is random, so an
    honest run never ends exactly on a reference checkpoint or where it started."""
    for name, other in candidates.items():
        if other.keys() == state.keys() and all(
                other[k].shape == v.shape and torch.equal(other[k], v) for k, v in state.items()):
            return name
    return None


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


def safely(step: Callable[[], dict], label: str = "a checkpoint of this run") -> dict:
    """Run one evaluation; whatever goes wrong in it becomes an ``error`` fact, and the
    grading goes on with the next step.

    A checkpoint the grader refuses says why itself (CheckpointError). Anything else a
    student's tensors make the trusted code raise (a layer that does not fit, a tensor
    kind torch cannot compare, ...) becomes one sentence naming ``label`` and the kind of
    problem; the traceback goes to the debug log (the TA's --debug).
    """
    try:
        return step()
    except CheckpointError as error:
        return {"error": str(error)}
    except Exception as error:  # noqa: BLE001 - one evaluation step, never the whole grading
        log.debug("evaluating %s failed", label, exc_info=True)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return {"error": f"{label} could not be evaluated ({type(error).__name__}"
                         f"{': ' + reason if reason else ''}), so its checks are not scored."}


# ---------------------------------------------------------------- the probes' inputs

EDGE_RATIO = 0.5
# The course's suggestion for the min-channel TODO: every layer keeps at least 3 channels.
BALANCED_MIN_KEPT = 3


def _bn_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".running_var")] for k in state if k.endswith(".running_var")]


# Each channel's gamma and beta are scaled by a factor in this range (its readers by the
# inverse) when an input is disguised: enough to reorder close |gamma|, never to cut a layer.
DISGUISE_SCALE = (0.8, 1.25)


def disguised_state(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same network, its channels shuffled and rescaled within each layer.

    The pruning runs' input would otherwise be the same for everyone, so a notebook could
    carry precomputed answers and look them up by the input's hash. Permuting a layer's
    channels (its conv's outputs, its BN tensors, and the inputs of what reads it) and
    scaling gamma and beta by c > 0 with the readers' weights by 1/c keeps the function
    the network computes (ReLU and max-pooling commute with both); the masks a correct
    prune gives follow the channels. ``seed`` comes from the submission, so a grading is
    reproducible on any machine.
    """
    generator = torch.Generator().manual_seed(seed)
    edited = {k: v.clone() for k, v in state.items()}
    prefixes = _bn_prefixes(edited)
    convs = [k for k, v in edited.items() if k.startswith("feature.") and v.dim() == 4]
    readers = [*convs[1:], "classifier.weight"]
    low, high = DISGUISE_SCALE
    for layer, prefix in enumerate(prefixes):
        width = edited[f"{prefix}.weight"].numel()
        order = torch.randperm(width, generator=generator)
        factor = low + (high - low) * torch.rand(width, generator=generator, dtype=torch.float64)
        edited[convs[layer]] = edited[convs[layer]][order]
        for name in ("weight", "bias", "running_mean", "running_var"):
            edited[f"{prefix}.{name}"] = edited[f"{prefix}.{name}"][order]
        edited[readers[layer]] = edited[readers[layer]][:, order]
        scale = factor.to(edited[f"{prefix}.weight"].dtype)
        edited[f"{prefix}.weight"] = edited[f"{prefix}.weight"] * scale
        edited[f"{prefix}.bias"] = edited[f"{prefix}.bias"] * scale
        reader = edited[readers[layer]]
        shape = [1, width] + [1] * (reader.dim() - 2)
        edited[readers[layer]] = reader / scale.view(shape)
    return {k: v.contiguous() for k, v in edited.items()}


def balanced_prune_state(state: dict[str, torch.Tensor], ratio: float,
                         min_kept: int = BALANCED_MIN_KEPT) -> dict[str, torch.Tensor]:
    """The same network with every layer keeping at least ``min_kept`` channels at ``ratio``
    under a correct global threshold, as the full-scale model does at 0.9.

    A short profile's checkpoint can lose whole layers at 0.9, where the full model keeps
    at least 17 channels in each: a notebook without a min-channel rule would crash here
    and not at full scale. So in each short layer its strongest channels are scaled up:
    gamma and beta by c > 0, and the weights that read the channel (the next conv's input
    slice, or the classifier's column) by 1/c. ReLU and max-pooling commute with c > 0, so
    in eval mode the network computes the same function; only the order of |gamma| moves.
    """
    edited = {k: v.clone() for k, v in state.items()}
    prefixes = _bn_prefixes(edited)
    convs = [k for k, v in edited.items() if k.startswith("feature.") and v.dim() == 4]
    readers = [*convs[1:], "classifier.weight"]  # what reads layer i's channels: column dim 1
    for _ in range(len(prefixes) + 1):
        everything = torch.sort(torch.cat([edited[f"{p}.weight"].abs() for p in prefixes]))[0]
        threshold = float(everything[int(len(everything) * ratio)])
        largest = float(everything[-1])
        short = [i for i, p in enumerate(prefixes)
                 if int((edited[f"{p}.weight"].abs() > threshold).sum()) < min_kept]
        if not short:
            return edited
        for layer in short:
            gamma, beta = edited[f"{prefixes[layer]}.weight"], edited[f"{prefixes[layer]}.bias"]
            magnitude = gamma.abs()
            # Positive gammas first: scaling keeps the sign, and a large negative gamma made
            # here would decide a signed-threshold verdict by the luck of training.
            order = sorted(range(magnitude.numel()),
                           key=lambda c: (bool(gamma[c] <= 0), -float(magnitude[c])))
            for rank, channel in enumerate(order[:min_kept]):
                if magnitude[channel] > threshold or magnitude[channel] == 0:
                    continue
                # Distinct targets above every threshold: no tie decides a mask.
                target = largest * (1.0 + 0.01 * (layer * min_kept + rank + 1))
                factor = target / float(magnitude[channel])
                gamma[channel] *= factor
                beta[channel] *= factor
                edited[readers[layer]][:, channel] /= factor
    return edited


def edge_case_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The reference sparse weights with one BN layer left a single channel above the threshold,
    and one large negative gamma elsewhere.

    The first layer of at least 8 channels (past the first two) gets tiny distinct |gamma|
    except its LAST channel, which gets the largest |gamma| of the network. Pruned at
    ``EDGE_RATIO``, a notebook without a min-channel rule meets a 1-channel layer (it needs
    the index guard), and a rule that keeps the first k channels keeps the wrong ones.
    The next layer's first channel gets minus that largest |gamma|: a threshold taken on
    signed gamma cuts it, whatever the trained gammas happen to be on this machine.
    """
    edited = {k: v.clone() for k, v in state.items()}
    prefixes = _bn_prefixes(state)
    largest = max(float(state[f"{p}.weight"].abs().max()) for p in prefixes)
    layer = next(i for i, p in enumerate(prefixes)
                 if i >= 2 and state[f"{p}.weight"].numel() >= 8)
    gamma = edited[f"{prefixes[layer]}.weight"]
    gamma.copy_(torch.arange(1, gamma.numel() + 1, dtype=gamma.dtype) * 1e-6)
    gamma[-1] = largest
    edited[f"{prefixes[layer + 1]}.weight"][0] = -largest * 0.99
    return edited, layer
