"""Sparsity training, fine-tuning, testing and BN recalibration, device-agnostic."""
from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from reference.data import TensorLoader
from reference.model import bn_layers


def select_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when present, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int, device: torch.device) -> None:
    """Same seed, same numbers: exact on the CPU, and on CUDA with deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def update_bn(model: nn.Module, lam: float) -> None:
    """The L1 subgradient ``lam * sign(gamma)`` added to every BN scale's gradient."""
    for bn in bn_layers(model):
        bn.weight.grad.add_(lam * torch.sign(bn.weight.detach()))


def lr_for_epoch(base_lr: float, epoch: int, epochs: int) -> float:
    """The lab's schedule: x0.1 at 50 % and at 75 % of the epochs."""
    drops = sum(epoch >= milestone for milestone in (epochs * 0.5, epochs * 0.75))
    return base_lr * (0.1 ** drops)


@torch.no_grad()
def predict(model: nn.Module, loader: TensorLoader) -> torch.Tensor:
    """Eval-mode predicted class of every image, in the loader's order."""
    model.eval()
    return torch.cat([model(x).argmax(1) for x, _ in loader]).cpu()


def accuracy(model: nn.Module, loader: TensorLoader) -> float:
    """Eval-mode top-1 accuracy in percent."""
    preds = predict(model, loader)
    return 100.0 * float((preds == loader.y.cpu()).float().mean())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: TensorLoader, max_batches: int) -> None:
    """Re-estimate every BN layer's running statistics from training batches.

    A cumulative average (momentum None) over up to ``max_batches`` batches; this is
    what separates a statistics shift (recovers) from a copy bug (does not).
    """
    for bn in bn_layers(model):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= max_batches:
            break
        model(x)
    for bn in bn_layers(model):
        bn.momentum = 0.1
    model.eval()


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_prec1: float
    optimizer_state: dict
    history: list[dict] = field(default_factory=list)

    def checkpoint(self) -> dict:
        """The lab's checkpoint layout."""
        return {"epoch": self.best_epoch + 1, "state_dict": self.best_state,
                "best_prec1": self.best_prec1, "optimizer": self.optimizer_state}


def train(model: nn.Module, train_loader: TensorLoader, test_loader: TensorLoader, *,
          epochs: int, lr: float, momentum: float, weight_decay: float, lam: float = 0.0,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """SGD with the lab's schedule; ``lam > 0`` adds the BN penalty (sparsity training)."""
    # NHWC runs the narrow convolutions of the small profiles ~1.5x faster on CPU.
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    best: TrainResult | None = None
    history: list[dict] = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_for_epoch(lr, epoch, epochs)
        model.train()
        total_loss = 0.0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            if lam:
                update_bn(model, lam)
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
        prec1 = accuracy(model, test_loader)
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                  "loss": total_loss / train_loader.num_images, "prec1": prec1}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if best is None or prec1 > best.best_prec1:
            best = TrainResult({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                               epoch, prec1, copy.deepcopy(optimizer.state_dict()))
    assert best is not None, "train() needs at least one epoch"
    best.history = history
    return best
