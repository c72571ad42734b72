"""Numbers that describe a model: gamma statistics, parameters, MACs, size on disk."""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Fractions of |gamma| under these values describe how sparse a training made the BN scales.
SMALL_GAMMA_THRESHOLDS = (0.01, 0.05, 0.1)
HISTOGRAM_BINS = 40


def gamma_stats(gammas: torch.Tensor | np.ndarray) -> dict:
    """Summary and histogram of |gamma| (all BN layers together)."""
    g = np.abs(np.asarray(gammas, dtype=np.float64)).ravel()
    upper = max(float(g.max()), 1e-6)
    counts, edges = np.histogram(g, bins=HISTOGRAM_BINS, range=(0.0, upper))
    return {
        "count": int(g.size),
        "mean_abs": float(g.mean()),
        "median_abs": float(np.median(g)),
        "max_abs": float(g.max()),
        "fraction_below": {str(t): float((g < t).mean()) for t in SMALL_GAMMA_THRESHOLDS},
        "negative_fraction": float((np.asarray(gammas).ravel() < 0).mean()),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-accumulates of one image's forward pass (torch's FLOP counter / 2)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


def checkpoint_bytes(checkpoint: dict) -> int:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer().nbytes


def model_summary(model: nn.Module) -> dict:
    return {"parameters": count_parameters(model), "macs": count_macs(model)}
