"""Training and evaluation speed of the reference against the lab notebook's plain loop.

Both sides train the quick profile's model on the same stand-in data for the same
number of epochs, alternating so that machine load hits both alike, and print
images per second and the ratio. The notebook side uses torchvision transforms
image by image inside a DataLoader, as the lab's notebooks do.

    .venv/bin/python bench/reference_speed.py [--epochs 2] [--repeats 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from reference.data import TensorLoader, load_digits_standin
from reference.model import vgg
from reference.profiles import QUICK
from reference.train import accuracy, train, update_bn


class NotebookStyleSet(Dataset):
    """What torchvision.datasets.CIFAR10 gives a notebook: PIL images through a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


NORMALISE = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def notebook_epoch(model, optimizer, loader, lam: float) -> int:
    model.train()
    seen = 0
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        update_bn(model, lam)
        optimizer.step()
        seen += len(y)
    return seen


@torch.no_grad()
def notebook_eval(model, loader) -> int:
    model.eval()
    correct = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
    return correct


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits_standin()
    profile = QUICK
    train_tf = transforms.Compose([transforms.Pad(4), transforms.RandomCrop(32),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), NORMALISE])
    test_tf = transforms.Compose([transforms.ToTensor(), NORMALISE])
    plain_train = DataLoader(NotebookStyleSet(data.train.images, data.train.labels, train_tf),
                             batch_size=profile.train_batch_size, shuffle=True)
    plain_test = DataLoader(NotebookStyleSet(data.test.images, data.test.labels, test_tf),
                            batch_size=profile.test_batch_size)
    fast_train = TensorLoader(data.train, profile.train_batch_size, True, seed=0)
    fast_test = TensorLoader(data.test, profile.test_batch_size, False)

    totals = {"notebook": [0.0, 0.0], "reference": [0.0, 0.0]}  # train s, eval s
    for _ in range(args.repeats):
        for side in ("notebook", "reference"):
            torch.manual_seed(0)
            model = vgg(width_divisor=profile.width_divisor)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            for _ in range(args.epochs):
                if side == "notebook":
                    seconds, _ = timed(lambda: notebook_epoch(model, optimizer, plain_train, 5e-3))
                else:
                    seconds, _ = timed(lambda: train(model, fast_train, fast_test, epochs=1, lr=0.1,
                                                     momentum=0.9, weight_decay=1e-4, lam=5e-3))
                totals[side][0] += seconds
            evaluate = (lambda: notebook_eval(model, plain_test)) if side == "notebook" else \
                (lambda: accuracy(model, fast_test))
            seconds, _ = timed(evaluate)
            totals[side][1] += seconds

    n_train = len(data.train) * args.epochs * args.repeats
    n_test = len(data.test) * args.repeats
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; quick profile model (width / {profile.width_divisor}), "
          f"batch {profile.train_batch_size}, {args.epochs} epochs x {args.repeats} repeats")
    for side, (train_s, eval_s) in totals.items():
        print(f"{side:>9}: train {n_train / train_s:8.0f} images/s   eval {n_test / eval_s:8.0f} images/s")
    (nb_train, nb_eval), (ref_train, ref_eval) = totals["notebook"], totals["reference"]
    print(f"ratio reference / notebook: train x{nb_train / ref_train:.2f}, eval x{nb_eval / ref_eval:.2f}")


if __name__ == "__main__":
    main()
