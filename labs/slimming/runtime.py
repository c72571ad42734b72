"""The slimming lab's code inside the student's kernel, on top of ``grader.runtime``.

``install`` adds to the harness's Colab, path and device shims:

* ``torchvision.datasets.CIFAR10`` serves the profile's data (CIFAR-10 from the
  data root, or the digits stand-in) and never downloads;
* ``Axes.hist`` records what it plotted (the grader recognises a histogram of the gammas).

``dump_state`` writes the lab's names (``STATE_NAMES``), those records and what the
notebook's ``updateBN`` does on a probe network. Like everything in the kernel, it is
evidence to cross-check, not ground truth.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from grader import runtime

STATE_NAMES = ("LAMBDA", "SPARSITY_REGULARIZATION", "PRUNE_PERCENT", "EPOCHS", "threshold",
               "cfg", "cfg_mask", "WEIGHT_PATH", "PRUNE_PATH", "PRUNE_FINETUNE_PATH",
               "MIN_CHANNELS", "history")
HISTOGRAMS_KEY = "_histograms"
UPDATE_BN_KEY = "_update_bn"  # what the notebook's updateBN did on a probe network
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

_histograms: list[dict] = []  # one entry per hist() call: what was plotted
MAX_HISTOGRAMS = 20
_dataset_cache: dict[tuple[str, str | None], Any] = {}


def install(config: dict) -> None:
    """The harness's shims, then the lab's data and records. Besides the harness's keys,
    ``config`` holds ``dataset`` ('digits' or 'cifar10') and ``width_divisor`` (already
    baked into the models/vgg.py the executor wrote)."""
    runtime.install(config)
    _install_cifar10()
    _install_histogram_record()


def _profile_data() -> Any:
    """The profile's dataset, read once per kernel however many loaders the notebook builds."""
    key = (str(runtime.settings["dataset"]), runtime.settings.get("data_root"))
    if key not in _dataset_cache:
        from reference.data import load_dataset

        _dataset_cache[key] = load_dataset(*key)
    return _dataset_cache[key]


def _install_histogram_record() -> None:
    """Remember what each ``hist`` call plotted (how many values, their |value| quantiles), so
    the grader can tell a histogram of the network's gammas from any other figure."""
    import matplotlib.axes
    import numpy as np

    real_hist = matplotlib.axes.Axes.hist
    if getattr(real_hist, "_slimgrade", False):
        return

    # pyplot checks, when imported, that Axes.hist is a method of Axes: keep its identity.
    @functools.wraps(real_hist)
    def hist(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            parts = x if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]) else [x]
            values = np.concatenate([np.abs(np.asarray(
                part.detach().cpu() if hasattr(part, "detach") else part, dtype=float)).ravel()
                for part in parts])
            values = values[np.isfinite(values)]
            if values.size and len(_histograms) < MAX_HISTOGRAMS:
                _histograms.append({"values": int(values.size),
                                    "quantiles": np.quantile(values, [0, 0.5, 0.9, 1]).tolist()})
        except Exception:  # what the student plots is theirs; recording must never break it
            pass
        return real_hist(self, x, *args, **kwargs)

    hist._slimgrade = True
    matplotlib.axes.Axes.hist = hist


def _install_cifar10() -> None:
    import torchvision
    from PIL import Image
    from torch.utils.data import Dataset

    class CIFAR10(Dataset):
        """torchvision's CIFAR10 interface over the grading profile's images; never downloads."""

        classes = CIFAR10_CLASSES

        def __init__(self, root: Any, train: bool = True, transform: Callable | None = None,
                     target_transform: Callable | None = None, download: bool = False) -> None:
            part = _profile_data().train if train else _profile_data().test
            self.root = root
            self.train = train
            self.transform = transform
            self.target_transform = target_transform
            self.data = part.images
            self.targets = [int(label) for label in part.labels]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            image = Image.fromarray(self.data[index]).convert("RGB")
            target = self.targets[index]
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target

        def __repr__(self) -> str:
            split = "Train" if self.train else "Test"
            return (f"Dataset CIFAR10 (served by slimgrade)\n"
                    f"    Number of datapoints: {len(self)}\n    Split: {split}")

    torchvision.datasets.CIFAR10 = CIFAR10


def dump_state(namespace: dict, state_file: str) -> None:
    """``STATE_NAMES`` as plain JSON (``cfg_mask`` a list of 0/1 lists), with the records
    of ``hist`` and the ``updateBN`` probe; never raises."""
    runtime.dump_state(namespace, state_file, STATE_NAMES, {"cfg_mask": _as_mask_lists},
                       lambda: {HISTOGRAMS_KEY: list(_histograms),
                                UPDATE_BN_KEY: probe_update_bn(namespace)})


def probe_update_bn(namespace: dict) -> dict | None:
    """Call the notebook's ``updateBN`` on a small known network and report what it did.

    The sparsity check otherwise sees only the trained gammas, which a notebook could shrink
    after training. The probe network has one conv and one BN layer with zero gradients;
    a correct ``updateBN`` adds ``LAMBDA * sign(gamma)`` to the BN weight's gradient and
    touches nothing else. ``model`` is swapped for the probe network during the call (the
    lab's ``updateBN()`` reads the global) and restored after. None when there is no
    ``updateBN``; ``{"ran": False, ...}`` when it could not be called on the probe.
    """
    update, lam = namespace.get("updateBN"), namespace.get("LAMBDA")
    if not callable(update):
        return None
    if type(lam) not in (int, float) or lam == 0:
        return {"ran": False, "why": "LAMBDA is not a non-zero number"}
    import torch

    probe = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        probe[0].weight.fill_(0.1)
        probe[1].weight.copy_(torch.tensor([0.5, -0.3, 0.2, -0.7]))
    for parameter in probe.parameters():
        parameter.grad = torch.zeros_like(parameter)
    before = [p.detach().clone() for p in probe.parameters()]
    had_model, saved = "model" in namespace, namespace.get("model")
    namespace["model"] = probe
    try:
        try:
            update()
        except TypeError:
            update(probe)
    except Exception as error:
        return {"ran": False, "why": f"{type(error).__name__}: {str(error)[:200]}"}
    finally:
        if had_model:
            namespace["model"] = saved
        else:
            namespace.pop("model", None)
    expected = lam * torch.sign(before[1])
    bn_grad = probe[1].weight.grad
    return {"ran": True,
            "bn_grad_ok": bool(bn_grad is not None and torch.allclose(bn_grad, expected,
                                                                      rtol=1e-4, atol=1e-9)),
            "others_untouched": all(p.grad is None or not p.grad.any()
                                    for p in (probe[0].weight, probe[1].bias)),
            "weights_untouched": all(torch.equal(p.detach(), b)
                                     for p, b in zip(probe.parameters(), before))}


def _as_mask_lists(plain: Any) -> Any:
    """0/1 entries of a mask list as ints (float or bool masks alike); other values untouched."""
    if not isinstance(plain, list):
        return plain
    return [[int(v) if isinstance(v, (int, float)) and v in (0, 1) else v for v in mask]
            if isinstance(mask, list) else mask for mask in plain]
