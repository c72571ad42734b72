"""Network slimming's pruning step, exactly as the lab does it.

All |gamma| of all BN layers are sorted together; ``threshold = sorted[int(total * p)]``;
a channel is kept when ``|gamma| > threshold``. Gamma and beta of cut channels are
zeroed in the original, and a thinner ``vgg(cfg=cfg)`` receives the kept slices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from reference.model import bn_layers, vgg


@dataclass
class PruneResult:
    threshold: float
    cfg: list[int | str]
    cfg_mask: list[torch.Tensor]  # one float 0/1 mask per BN layer

    @property
    def kept_per_layer(self) -> list[int]:
        return [int(m.sum()) for m in self.cfg_mask]

    @property
    def prune_ratio(self) -> float:
        """The lab's ``PRUNE RATIO``: cut channels over all channels."""
        total = sum(len(m) for m in self.cfg_mask)
        return (total - sum(self.kept_per_layer)) / total


def all_gammas(model: nn.Module) -> torch.Tensor:
    return torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in bn_layers(model)])


def global_threshold(model: nn.Module, percent: float) -> float:
    gammas, _ = torch.sort(all_gammas(model))
    return float(gammas[int(len(gammas) * percent)])


def layer_mask(gamma: torch.Tensor, threshold: float, min_channels: int = 0) -> torch.Tensor:
    """``|gamma| > threshold``; with ``min_channels``, a layer keeps at least its top-k |gamma|."""
    magnitude = gamma.detach().abs().cpu()
    mask = (magnitude > threshold).float()
    k = min(min_channels, len(magnitude))
    if int(mask.sum()) < k:
        mask[torch.topk(magnitude, k).indices] = 1.0
    return mask


def compute_masks(model: nn.Module, percent: float, min_channels: int = 0) -> PruneResult:
    """cfg (kept channels per layer, 'M' kept in place) and cfg_mask under one global threshold."""
    threshold = global_threshold(model, percent)
    masks = [layer_mask(bn.weight, threshold, min_channels) for bn in bn_layers(model)]
    return PruneResult(threshold, cfg_from_masks(model, masks), masks)


def cfg_from_masks(model: nn.Module, masks: list) -> list[int | str]:
    """Kept channels per BN layer, with an 'M' wherever ``model`` has a max-pool."""
    cfg: list[int | str] = []
    layer = 0
    for module in model.feature:
        if isinstance(module, nn.MaxPool2d):
            cfg.append("M")
        elif isinstance(module, nn.BatchNorm2d):
            cfg.append(int(masks[layer].sum()))
            layer += 1
    return cfg


def zero_cut_channels_(model: nn.Module, cfg_mask: list[torch.Tensor]) -> None:
    """Gamma and beta of cut channels set to 0 in place (the "masked original")."""
    for bn, mask in zip(bn_layers(model), cfg_mask, strict=True):
        keep = mask.to(bn.weight.device)
        bn.weight.data.mul_(keep)
        bn.bias.data.mul_(keep)


def kept_indices(mask: torch.Tensor) -> np.ndarray:
    """Indices of kept channels, always one-dimensional (a 1-channel layer included)."""
    return np.atleast_1d(np.squeeze(np.argwhere(mask.cpu().numpy())))


def build_pruned(model: nn.Module, result: PruneResult) -> vgg:
    """The thin model with every tensor copied from the kept slices of ``model``."""
    new = vgg(cfg=result.cfg).to(next(model.parameters()).device)
    old_modules, new_modules = list(model.modules()), list(new.modules())
    layer = 0
    in_idx = np.arange(3)
    out_idx = kept_indices(result.cfg_mask[0])
    for old, thin in zip(old_modules, new_modules, strict=True):
        if isinstance(old, nn.BatchNorm2d):
            thin.weight.data = old.weight.data[out_idx].clone()
            thin.bias.data = old.bias.data[out_idx].clone()
            thin.running_mean = old.running_mean[out_idx].clone()
            thin.running_var = old.running_var[out_idx].clone()
            layer += 1
            in_idx = out_idx
            if layer < len(result.cfg_mask):
                out_idx = kept_indices(result.cfg_mask[layer])
        elif isinstance(old, nn.Conv2d):
            thin.weight.data = old.weight.data[out_idx][:, in_idx].clone()
        elif isinstance(old, nn.Linear):
            thin.weight.data = old.weight.data[:, in_idx].clone()
            thin.bias.data = old.bias.data.clone()
    return new


def prune(model: nn.Module, percent: float, min_channels: int = 0) -> tuple[vgg, PruneResult]:
    """Masks, zero the cut channels in ``model`` (in place), and the thin copy."""
    result = compute_masks(model, percent, min_channels)
    zero_cut_channels_(model, result.cfg_mask)
    return build_pruned(model, result), result
