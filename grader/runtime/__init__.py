"""Code that runs inside the student's kernel: Colab shims first, a state dump last.

The executor injects two cells into every notebook it runs::

    import grader.runtime as _slimgrade; _slimgrade.install({...})  # first
    import grader.runtime as _slimgrade; _slimgrade.dump_state(globals(), STATE_FILE)  # last

``install`` makes a notebook written for Colab run unchanged on the grading machine:

* ``from google.colab import drive; drive.mount(...)`` is a no-op;
* Drive paths: ``os.chdir``/``%cd`` into a path under ``/content`` (or any absolute
  folder missing here) lands in the work dir; ``open``, ``torch.save``, ``torch.load``,
  ``os.path.exists``/``isfile``/``isdir`` and ``os.makedirs``/``os.mkdir`` given an
  absolute path under ``/content`` (or in a folder missing here) use the
  file of the same *basename* in the work dir (``/content/drive/MyDrive/lab4/model_best.pth``
  becomes ``<work_dir>/model_best.pth``). Only the basename survives: the lab's
  files have distinct names, and one flat folder is what the grader collects;
* ``.cuda()`` on tensors and modules moves to the configured device (a no-op on the
  CPU), and ``torch.load`` without ``map_location`` loads onto it;
* ``torchvision.datasets.CIFAR10`` serves the profile's data (CIFAR-10 from the
  data root, or the digits stand-in) and never downloads;
* ``torch.set_num_threads`` gets the configured thread count;
* ``torch.save`` records where it wrote (the grader finds a notebook's own paths), and
  ``Axes.hist`` what it plotted (the grader recognises a histogram of the gammas).

``dump_state`` writes what the grader reads from the kernel as plain JSON, so the
grader never unpickles anything the student's code produced. Nothing in this module
is trusted by the grader: the student's code runs in the same interpreter and could
change any of it, so the state is evidence to cross-check, not ground truth.

Importing this package stays cheap (no torch) because the sandbox launcher lives here too.
"""
from __future__ import annotations

import builtins
import functools
import json
import math
import os
import sys
import types
from collections.abc import Callable
from typing import Any

DRIVE_ROOT = "/content"
STATE_NAMES = ("LAMBDA", "SPARSITY_REGULARIZATION", "PRUNE_PERCENT", "EPOCHS", "threshold",
               "cfg", "cfg_mask", "WEIGHT_PATH", "PRUNE_PATH", "PRUNE_FINETUNE_PATH",
               "MIN_CHANNELS", "history")
SKIPPED_KEY = "_skipped"
SAVED_KEY = "_saved"
HISTOGRAMS_KEY = "_histograms"
UPDATE_BN_KEY = "_update_bn"  # what the notebook's updateBN did on a probe network
# A state value bigger than this once encoded is skipped: the grader needs masks and
# short lists, and a student's stray giant tensor must not fill the disk.
MAX_VALUE_BYTES = 4_000_000
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

_settings: dict[str, Any] = {}
_saved: list[str] = []  # what torch.save wrote, oldest first, relative to the work dir
MAX_SAVED = 50
_histograms: list[dict] = []  # one entry per hist() call: what was plotted
MAX_HISTOGRAMS = 20
_dataset_cache: dict[tuple[str, str | None], Any] = {}


def install(config: dict) -> None:
    """Set up the kernel for one graded run; ``config`` is the executor's JSON-able dict.

    Keys: ``work_dir``, ``device`` ('cpu' or 'cuda:N'), ``dataset`` ('digits' or
    'cifar10'), ``data_root`` (or None), ``width_divisor``, ``state_file``, ``threads``.
    All of them stay readable in ``_settings`` for the rest of the run; the width is
    already baked into the models/vgg.py the executor wrote.
    """
    _settings.update(config)
    _settings["work_dir"] = os.path.realpath(config["work_dir"])
    _install_colab_stub()
    _install_drive_paths()
    import torch

    torch.set_num_threads(int(config["threads"]))
    _install_device_shims(torch, str(config["device"]))
    _install_cifar10()
    _install_histogram_record()


def drive_path(path: Any) -> Any:
    """``path`` itself, or the same basename in the work dir for an absolute path that only
    exists on the student's machine: under /content (Colab, Drive), or in a folder missing here."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not _elsewhere(path):
        return path
    name = os.path.basename(path.rstrip("/"))
    return os.path.join(_settings["work_dir"], name)


def _elsewhere(path: str) -> bool:
    if not os.path.isabs(path):
        return False
    if _under_drive_root(path):
        return True
    # The kernel's own places (its work dir, home with the libraries' caches, /tmp) stay put.
    own = [_settings["work_dir"], os.path.expanduser("~"), "/tmp", "/dev/shm"]
    if any(path == root or path.startswith(root.rstrip("/") + "/") for root in own):
        return False
    real_isdir = getattr(os.path.isdir, "__wrapped__", os.path.isdir)
    return not real_isdir(os.path.dirname(path.rstrip("/")) or "/")


def _under_drive_root(path: str) -> bool:
    return path == DRIVE_ROOT or path.startswith(DRIVE_ROOT + "/")


def _install_colab_stub() -> None:
    """``google.colab.drive`` as a module whose ``mount`` only says what Colab says."""
    drive = types.ModuleType("google.colab.drive")

    def mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000,
              readonly: bool = False) -> None:
        print(f"Mounted at {mountpoint}")

    def flush_and_unmount(timeout_ms: int = 86400000) -> None:
        return None

    drive.mount = mount
    drive.flush_and_unmount = flush_and_unmount
    colab = types.ModuleType("google.colab")
    colab.__path__ = []
    colab.drive = drive
    try:
        import google  # other google.* packages (protobuf, ...) must keep working
    except ImportError:
        google = types.ModuleType("google")
        google.__path__ = []
        sys.modules["google"] = google
    google.colab = colab
    sys.modules["google.colab"] = colab
    sys.modules["google.colab.drive"] = drive


def _wrap_first_arg(function: Callable) -> Callable:
    """``function`` with its path argument passed through ``drive_path`` (idempotent)."""
    if getattr(function, "_slimgrade", False):
        return function

    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
        return function(drive_path(path), *args, **kwargs)

    wrapper.__name__ = getattr(function, "__name__", "wrapper")
    wrapper.__doc__ = function.__doc__
    wrapper.__wrapped__ = function
    wrapper._slimgrade = True
    return wrapper


def _install_drive_paths() -> None:
    builtins.open = _wrap_first_arg(builtins.open)
    # IPython gives the notebook its own ``open`` (refusing fds 0-2), which bypasses builtins.
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and "open" in shell.user_ns:
        shell.user_ns["open"] = _wrap_first_arg(shell.user_ns["open"])
    real_isdir = getattr(os.path.isdir, "__wrapped__", os.path.isdir)
    os.path.exists = _wrap_first_arg(os.path.exists)
    os.path.isfile = _wrap_first_arg(os.path.isfile)
    os.path.isdir = _wrap_first_arg(os.path.isdir)
    os.makedirs = _wrap_first_arg(os.makedirs)
    os.mkdir = _wrap_first_arg(os.mkdir)
    if getattr(os.chdir, "_slimgrade", False):
        return
    real_chdir = os.chdir

    def chdir(path: Any) -> None:
        target = os.fspath(path) if isinstance(path, os.PathLike) else path
        if isinstance(target, str) and not real_isdir(target) \
                and (_under_drive_root(os.path.abspath(target)) or os.path.isabs(target)):
            target = _settings["work_dir"]
        real_chdir(target)

    chdir.__wrapped__ = real_chdir
    chdir._slimgrade = True
    os.chdir = chdir


def _install_device_shims(torch: Any, device: str) -> None:
    real_load = torch.load
    if getattr(real_load, "_slimgrade", False):
        return

    def tensor_cuda(self: Any, device_index: Any = None, non_blocking: bool = False,
                    memory_format: Any = None) -> Any:
        return self.to(device, non_blocking=non_blocking)

    def module_cuda(self: Any, device_index: Any = None) -> Any:
        return self.to(device)

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        return real_load(drive_path(f), device if map_location is None else map_location,
                         *args, **kwargs)

    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        target = drive_path(f)
        result = real_save(obj, target, *args, **kwargs)
        if isinstance(target, str):  # where it landed, so the grader finds the notebook's own paths
            where = os.path.relpath(os.path.realpath(target), _settings["work_dir"])
            _saved[:] = [p for p in _saved if p != where][-(MAX_SAVED - 1):] + [where]
        return result

    load._slimgrade = True
    load.__doc__ = real_load.__doc__
    save.__doc__ = real_save.__doc__
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    torch.load = load
    torch.save = save


def _profile_data() -> Any:
    """The profile's dataset, read once per kernel however many loaders the notebook builds."""
    key = (str(_settings["dataset"]), _settings.get("data_root"))
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
    """Write the grader-relevant names of ``namespace`` as plain JSON; never raises.

    The file holds one key per name of ``STATE_NAMES`` that is defined and convertible
    (tensors and arrays become lists, numpy scalars become numbers, ``cfg_mask`` a list
    of 0/1 lists, non-finite floats the strings 'nan'/'inf'/'-inf'), plus ``_skipped``:
    name -> type name of each defined value that could not be converted.
    """
    try:
        state: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for name in STATE_NAMES:
            if name not in namespace:
                continue
            value = namespace[name]
            try:
                plain = _to_plain(value)
                if name == "cfg_mask":
                    plain = _as_mask_lists(plain)
                if len(json.dumps(plain)) > MAX_VALUE_BYTES:
                    raise ValueError("too large")
                state[name] = plain
            except Exception:
                skipped[name] = type(value).__name__
        state[SKIPPED_KEY] = skipped
        state[SAVED_KEY] = list(_saved)
        state[HISTOGRAMS_KEY] = list(_histograms)
        state[UPDATE_BN_KEY] = probe_update_bn(namespace)
        folder = _settings.get("work_dir") or os.getcwd()
        path = os.path.join(folder, state_file)
        tmp = path + ".tmp"
        with builtins.open(tmp, "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        os.replace(tmp, path)
    except Exception as error:
        print(f"[slimgrade] could not save the notebook's state: {error}", file=sys.stderr)


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


class _Unconvertible(TypeError):
    pass


def _to_plain(value: Any, depth: int = 0) -> Any:
    """JSON-ready copy of ``value``; raises for anything that is not data."""
    if depth > 20:
        raise _Unconvertible("nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(key): _to_plain(item, depth + 1) for key, item in value.items()}
    module = type(value).__module__ or ""
    if module.startswith("torch") and hasattr(value, "detach") and hasattr(value, "tolist"):
        return _to_plain(value.detach().cpu().tolist(), depth + 1)
    if module.startswith("numpy"):
        import numpy as np

        if isinstance(value, np.ndarray):
            return _to_plain(value.tolist(), depth + 1)
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return _to_plain(float(value), depth + 1)
    raise _Unconvertible(type(value).__name__)


def _as_mask_lists(plain: Any) -> Any:
    """0/1 entries of a mask list as ints (float or bool masks alike); other values untouched."""
    if not isinstance(plain, list):
        return plain
    return [[int(v) if isinstance(v, (int, float)) and v in (0, 1) else v for v in mask]
            if isinstance(mask, list) else mask for mask in plain]
