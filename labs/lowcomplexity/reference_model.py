"""The small trusted reference CNN of Lab 5, and its deterministic training on the CPU.

The rubric compares a student's figures with a point the grader made itself: this model,
trained with this code, measured with ``measure``. Its layout follows the model of the
report the lab is built from (``conv1``..``conv4``, each Conv2d + BatchNorm2d + ReLU,
max-pooling after ``conv2`` and ``conv4``), with a global average pool and one linear
layer instead of the report's dropout MLP, so that ``width`` alone sets its complexity.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from labs.lowcomplexity.data import NUM_CLASSES, Dataset, channel_stats, to_tensor


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    # No conv bias: the BatchNorm right after it has its own.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class ReferenceCNN(nn.Module):
    """Channels 3 -> width -> 2 width -> 4 width -> 8 width, 32x32 -> 16x16 -> 8x8 -> pooled."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = _block(3, width)
        self.conv2 = _block(width, 2 * width)
        self.conv3 = _block(2 * width, 4 * width)
        self.conv4 = _block(4 * width, 8 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        x = self.pool(self.conv4(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_reference(width: int = 16, num_classes: int = NUM_CLASSES) -> ReferenceCNN:
    """A freshly initialised reference model (seed the RNG first for fixed weights)."""
    return ReferenceCNN(width, num_classes)


@torch.no_grad()
def _top1_pct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return 100.0 * correct / len(y)


def train_reference(dataset: Dataset, epochs: int, seed: int = 0, batch_size: int = 128,
                    width: int = 16, lr: float = 0.05) -> tuple[dict[str, torch.Tensor],
                                                                dict[str, Any]]:
    """Trains the reference model; returns its state_dict and the facts to report with it.

    SGD with Nesterov momentum and a one-cycle schedule, no augmentation: the point is
    a modest, reproducible reference, not a record. Inputs are normalised with the
    training set's own per-channel mean and std, which the facts record, because the
    grader must feed the test images the same way. The same seed, data and torch thread
    count give the same weights; the caller's RNG state is left as it was.
    """
    mean, std = channel_stats(dataset.train.images)
    x = to_tensor(dataset.train.images, mean, std)
    y = torch.from_numpy(dataset.train.labels)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_reference(width)
        order_rng = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        epoch_loss = float("nan")
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=order_rng)
            total = 0.0
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                loss = loss_fn(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(idx)
            epoch_loss = total / len(y)
    model.eval()
    test_x = to_tensor(dataset.test.images, mean, std)
    test_y = torch.from_numpy(dataset.test.labels)
    facts = {
        "model": "ReferenceCNN",
        "width": width,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "train_images": len(y),
        "mean": list(mean),
        "std": list(std),
        "final_train_loss": epoch_loss,
        "test_accuracy_pct": _top1_pct(model, test_x, test_y, batch_size),
    }
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return state, facts
