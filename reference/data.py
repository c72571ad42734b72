"""The lab's data, held as tensors: CIFAR-10 from a local folder, or the digits stand-in.

Both give uint8 images of shape (N, 32, 32, 3) and int64 labels, the layout of
CIFAR-10's python pickles. Training batches are augmented on the whole batch at
once (pad 4, random crop 32, horizontal flip) instead of image by image.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILE = "test_batch"


class DataError(Exception):
    """A data folder that cannot be used; the message is one sentence for the user."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, (N, 32, 32, 3)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    train: ImageSet
    test: ImageSet


def find_cifar_folder(root: str | Path) -> Path:
    """The folder holding CIFAR-10's python batches, given it or its parent."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"The data root {root} does not exist: point --data-root at the folder "
                        f"that holds {CIFAR_FOLDER}/ (CIFAR-10, python version).")
    for candidate in (root, root / CIFAR_FOLDER):
        if all((candidate / name).is_file() for name in [*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE]):
            return candidate
    raise DataError(f"{root} holds no CIFAR-10 python batches: point --data-root at the folder "
                    f"that holds {CIFAR_FOLDER}/ with data_batch_1..5 and test_batch.")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            # The data root belongs to the person running the grader, never to a student.
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({error}): "
                        "replace it with the file from the python version of CIFAR-10.") from None
    return data.transpose(0, 2, 3, 1).copy(), labels


def load_cifar10(root: str | Path) -> Dataset:
    folder = find_cifar_folder(root)
    parts = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    train = ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = ImageSet(*_read_cifar_batch(folder / CIFAR_TEST_FILE))
    return Dataset(train, test)


def load_digits_standin(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits, upsampled to 32x32 RGB: 10 classes, no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels -> 0..255, nearest-neighbour upsampling x4, grey -> RGB.
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    big = grey.repeat(4, axis=1).repeat(4, axis=2)
    images = np.repeat(big[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Dataset(ImageSet(images[train_idx], labels[train_idx]),
                   ImageSet(images[test_idx], labels[test_idx]))


def load_dataset(name: str, data_root: str | Path | None = None) -> Dataset:
    if name == "digits":
        return load_digits_standin()
    if name == "cifar10":
        if data_root is None:
            raise DataError("This profile trains on CIFAR-10: give --data-root, the folder that "
                            f"holds {CIFAR_FOLDER}/ (python version).")
        return load_cifar10(data_root)
    raise DataError(f"Unknown dataset {name!r}: use 'digits' or 'cifar10'.")


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised with mean 0.5 / std 0.5, the lab's transform."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(0.5).div_(0.5)


class TensorLoader:
    """Batches of a whole dataset kept on the device; the lab's augmentation per batch."""

    def __init__(self, images: ImageSet, batch_size: int, train: bool,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.x = to_tensor(images.images, device)
        self.y = torch.from_numpy(images.labels).to(device)
        self.batch_size = batch_size
        self.train = train
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    @property
    def num_images(self) -> int:
        return len(self.y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size].to(self.x.device)
            x, y = self.x[idx], self.y[idx]
            yield (augment(x, self.generator) if self.train else x), y


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad 4 with zeros (of the raw image, i.e. -1 after normalising), random 32x32 crop, flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-1.0)
    dy = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    cropped = padded[batch, chans, rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
