"""CIFAR-100 (python version) read without running pickle code, written for tests, and a stand-in.

The data root is the TA's, but a folder copied from somewhere is still a pickle, and
``pickle.load`` runs whatever a pickle names. The reader lets a pickle rebuild numpy
arrays, numpy dtypes and plain containers and nothing else. Images come back as uint8
(N, 32, 32, 3) and labels as int64.

``standin_cifar100`` is a 100-class set built from scikit-learn's bundled digits (no
download), so that tests and dry runs exercise the 100-class code without the real data.
It is learnable on a CPU: the reference CNN at width 8, 6 epochs on 5,000 images (about
20 s on one thread), reaches about 30 % top-1 against 1 % chance; the tint half of the
label is learned at once, the handwriting half is the hard one.
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class DataError(Exception):
    """A data folder that cannot be used; the message is one sentence for the user."""


# Images uint8 (N, 32, 32, 3) with their int64 labels (N,); a train and a test split.
ImageSet = NamedTuple("ImageSet", [("images", np.ndarray), ("labels", np.ndarray)])
Dataset = NamedTuple("Dataset", [("train", ImageSet), ("test", ImageSet)])


CIFAR100_FOLDER = "cifar-100-python"
TRAIN_FILE = "train"
TEST_FILE = "test"
META_FILE = "meta"
NUM_CLASSES = 100
# The real files are Python 2 cPickles of protocol 2; the writer uses the same protocol.
PICKLE_PROTOCOL = 2

# What rebuilding a numpy array needs (numpy 1 and 2 spell the module differently), and
# containers. ``_codecs.encode`` is how Python 3 writes bytes in a protocol-2 pickle (the
# writer's files need it); it only turns a str into bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    *(("builtins", name) for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray")),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a "
                                         "CIFAR-100 file")
        return super().find_class(module, name)


def find_cifar100_folder(root: str | Path) -> Path:
    """The folder holding ``train`` and ``test``, given it or its parent."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"The data root {root} does not exist: point it at the folder that "
                        f"holds {CIFAR100_FOLDER}/ (CIFAR-100, python version).")
    for candidate in (root / CIFAR100_FOLDER, root):
        if all((candidate / name).is_file() for name in (TRAIN_FILE, TEST_FILE)):
            return candidate
    raise DataError(f"{root} holds no CIFAR-100 python files: point it at the folder that "
                    f"holds {CIFAR100_FOLDER}/ with the files train and test.")


def _read_split(path: Path) -> ImageSet:
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
        data = batch[b"data"]
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError("its data is not a uint8 array of N x 3072 with N fine labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"its fine labels are not all in 0..{NUM_CLASSES - 1}")
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError,
            AttributeError, IndexError) as error:
        raise DataError(f"{path} is not a readable CIFAR-100 file ({error}): replace it with "
                        "the file from the python version of CIFAR-100.") from None
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return ImageSet(images, labels)


def load_cifar100(root: str | Path) -> Dataset:
    """CIFAR-100's 50,000 training and 10,000 test images with their fine labels."""
    folder = find_cifar100_folder(root)
    return Dataset(_read_split(folder / TRAIN_FILE), _read_split(folder / TEST_FILE))


def _write_pickle(path: Path, value: dict) -> None:
    path.write_bytes(pickle.dumps(value, protocol=PICKLE_PROTOCOL))


def _split_dict(images: np.ndarray, labels: np.ndarray, batch_label: str) -> dict:
    images = np.asarray(images, dtype=np.uint8)
    fine = [int(v) for v in labels]
    return {
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(len(fine))],
        b"batch_label": batch_label.encode(),
        b"fine_labels": fine,
        # Stand-in superclasses: the real mapping is semantic, any 20-way grouping will do.
        b"coarse_labels": [v // 5 for v in fine],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy(),
    }


def write_cifar100_folder(root: str | Path, train_images: np.ndarray, train_labels: np.ndarray,
                          test_images: np.ndarray, test_labels: np.ndarray) -> Path:
    """``root/cifar-100-python/`` in the real file format; returns that folder.

    Tests use it to round-trip the reader, and a stand-in written with it can be handed
    to anything that expects the real data root.
    """
    folder = Path(root) / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    _write_pickle(folder / TRAIN_FILE, _split_dict(train_images, train_labels,
                                                   "training batch 1 of 1"))
    _write_pickle(folder / TEST_FILE, _split_dict(test_images, test_labels,
                                                  "testing batch 1 of 1"))
    _write_pickle(folder / META_FILE, {
        b"fine_label_names": [f"class_{i:02d}".encode() for i in range(NUM_CLASSES)],
        b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(NUM_CLASSES // 5)],
    })
    return folder


# Ten tints with distinct hue, so the colour of a digit tells its variant apart.
TINTS = np.array([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
    (255, 0, 255), (255, 128, 0), (128, 0, 255), (255, 255, 255), (0, 128, 255),
], dtype=np.float64)


def standin_cifar100(seed: int = 0, train: int = 5000, test: int = 1000,
                     test_shift: int = 0) -> Dataset:
    """100 classes from scikit-learn's digits: class = digit * 10 + tint, 32x32 RGB uint8.

    The 8x8 digits are split into disjoint train and test pools first, so the test set
    holds handwriting the model never saw; each image is one (digit image, tint) pair,
    drawn without repetition. Deterministic for a given seed; never downloads.
    """
    from sklearn.datasets import load_digits  # here: only the stand-in needs scikit-learn

    digits = load_digits()
    grey = digits.images / 16.0
    big = grey.repeat(4, axis=1).repeat(4, axis=2)  # nearest-neighbour 8x8 -> 32x32
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(big))
    n_test_pool = len(big) // 5
    pools = {"test": order[:n_test_pool], "train": order[n_test_pool:]}
    sizes = {"train": train, "test": test}
    splits = {}
    for name, pool in pools.items():
        available = len(pool) * len(TINTS)
        if not 0 < sizes[name] <= available:
            raise ValueError(f"standin_cifar100 can make 1..{available} {name} images, "
                             f"not {sizes[name]}.")
        pairs = rng.choice(available, size=sizes[name], replace=False)
        which, tint = pool[pairs // len(TINTS)], pairs % len(TINTS)
        images = (big[which][..., None] * TINTS[tint][:, None, None, :]).round().astype(np.uint8)
        labels = (digits.target[which] * len(TINTS) + tint).astype(np.int64)
        if name == "test" and test_shift:
            # CIFAR-100's gap between training and test accuracy: test digits sit up to
            # ``test_shift`` pixels off the centre the training digits all share.
            for image, (dy, dx) in zip(images, rng.integers(-test_shift, test_shift + 1, (len(images), 2))):
                image[:] = np.roll(image, (dy, dx), axis=(0, 1))
        splits[name] = ImageSet(images, labels)
    return Dataset(splits["train"], splits["test"])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, on the 0..1 scale ``to_tensor`` uses.

    From a histogram of the 256 levels: exact, and without a float copy of the images
    (CIFAR's training set would take 1.2 GB as float64).
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        weights = counts / counts.sum()
        mean = float(weights @ levels)
        means.append(mean)
        stds.append(float(np.sqrt(max(0.0, weights @ (levels - mean) ** 2))))
    return tuple(means), tuple(stds)


def to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, scaled to 0..1, then ``(x - mean) / std`` per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)
