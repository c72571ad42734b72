"""Code that runs inside the student's kernel, for any lab: Colab shims first, a state dump last.

A lab's own runtime module (``grader.lab.KernelSetup.runtime``) calls ``install`` and
``dump_state`` here and adds what its notebooks need (data, records of their own). The
executor injects two cells into every notebook it runs::

    import <lab runtime> as _slimgrade; _slimgrade.install({...})  # first
    import <lab runtime> as _slimgrade; _slimgrade.dump_state(globals(), STATE_FILE)  # last

``install`` makes a notebook written for Colab run unchanged on the grading machine:

* ``from google.colab import drive; drive.mount(...)`` is a no-op;
* Drive paths: ``os.chdir``/``%cd`` into a path under ``/content`` (or any absolute
  folder missing here) lands in the work dir; ``open``, ``torch.save``, ``torch.load``,
  ``os.path.exists``/``isfile``/``isdir`` and ``os.makedirs``/``os.mkdir`` given an
  absolute path under ``/content`` (or in a folder missing here) use the
  file of the same *basename* in the work dir (``/content/drive/MyDrive/lab4/model_best.pth``
  becomes ``<work_dir>/model_best.pth``). Only the basename survives: a lab's
  files have distinct names, and one flat folder is what the grader collects;
* ``.cuda()`` on tensors and modules moves to the configured device (a no-op on the
  CPU), and ``torch.load`` without ``map_location`` loads onto it;
* ``torch.set_num_threads`` gets the configured thread count;
* ``torch.save`` records where it wrote (the grader finds a notebook's own paths).

``dump_state`` writes what the grader reads from the kernel as plain JSON, so the
grader never unpickles anything the student's code produced. Nothing in this module
is trusted by the grader: the student's code runs in the same interpreter and could
change any of it, so the state is evidence to cross-check, not ground truth.

Importing this package stays cheap (no torch) because the sandbox launcher lives here too.
"""
from __future__ import annotations

import builtins
import json
import math
import os
import sys
import types
from collections.abc import Callable
from typing import Any

DRIVE_ROOT = "/content"
SKIPPED_KEY = "_skipped"
SAVED_KEY = "_saved"
# A state value bigger than this once encoded is skipped: the grader needs masks and
# short lists, and a student's stray giant tensor must not fill the disk.
MAX_VALUE_BYTES = 4_000_000

settings: dict[str, Any] = {}  # the install config, for the lab's runtime too
_saved: list[str] = []  # what torch.save wrote, oldest first, relative to the work dir
MAX_SAVED = 50


def install(config: dict) -> None:
    """Set up the kernel for one graded run; ``config`` is the executor's JSON-able dict.

    Keys: ``work_dir``, ``device`` ('cpu' or 'cuda:N'), ``data_root`` (or None),
    ``state_file``, ``threads``, and the lab's own (``KernelSetup.config``). All of them
    stay readable in ``settings`` for the rest of the run.
    """
    settings.update(config)
    settings["work_dir"] = os.path.realpath(config["work_dir"])
    _install_colab_stub()
    _install_drive_paths()
    import torch

    torch.set_num_threads(int(config["threads"]))
    _install_device_shims(torch, str(config["device"]))


def drive_path(path: Any) -> Any:
    """``path`` itself, or the same basename in the work dir for an absolute path that only
    exists on the student's machine: under /content (Colab, Drive), or in a folder missing here."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not _elsewhere(path):
        return path
    name = os.path.basename(path.rstrip("/"))
    return os.path.join(settings["work_dir"], name)


def _elsewhere(path: str) -> bool:
    if not os.path.isabs(path):
        return False
    if _under_drive_root(path):
        return True
    # The kernel's own places (its work dir, home with the libraries' caches, /tmp) stay put.
    own = [settings["work_dir"], os.path.expanduser("~"), "/tmp", "/dev/shm"]
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
            target = settings["work_dir"]
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
            where = os.path.relpath(os.path.realpath(target), settings["work_dir"])
            _saved[:] = [p for p in _saved if p != where][-(MAX_SAVED - 1):] + [where]
        return result

    load._slimgrade = True
    load.__doc__ = real_load.__doc__
    save.__doc__ = real_save.__doc__
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    torch.load = load
    torch.save = save


def dump_state(namespace: dict, state_file: str, names: tuple[str, ...] = (),
               convert: dict[str, Callable[[Any], Any]] | None = None,
               extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Write ``names`` of ``namespace`` as plain JSON; never raises.

    The file holds one key per name that is defined and convertible (tensors and arrays
    become lists, numpy scalars become numbers, non-finite floats the strings
    'nan'/'inf'/'-inf'; ``convert[name]`` then shapes the plain value), plus ``_skipped``:
    name -> type name of each defined value that could not be converted, ``_saved``, and
    what the lab's ``extra()`` adds.
    """
    try:
        state: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for name in names:
            if name not in namespace:
                continue
            value = namespace[name]
            try:
                plain = to_plain(value)
                if convert and name in convert:
                    plain = convert[name](plain)
                if len(json.dumps(plain)) > MAX_VALUE_BYTES:
                    raise ValueError("too large")
                state[name] = plain
            except Exception:
                skipped[name] = type(value).__name__
        state[SKIPPED_KEY] = skipped
        state[SAVED_KEY] = list(_saved)
        state.update(extra() if extra is not None else {})
        folder = settings.get("work_dir") or os.getcwd()
        path = os.path.join(folder, state_file)
        tmp = path + ".tmp"
        with builtins.open(tmp, "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        os.replace(tmp, path)
    except Exception as error:
        print(f"[slimgrade] could not save the notebook's state: {error}", file=sys.stderr)


class _Unconvertible(TypeError):
    pass


def to_plain(value: Any, depth: int = 0) -> Any:
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
        return [to_plain(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(key): to_plain(item, depth + 1) for key, item in value.items()}
    module = type(value).__module__ or ""
    if module.startswith("torch") and hasattr(value, "detach") and hasattr(value, "tolist"):
        return to_plain(value.detach().cpu().tolist(), depth + 1)
    if module.startswith("numpy"):
        import numpy as np

        if isinstance(value, np.ndarray):
            return to_plain(value.tolist(), depth + 1)
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return to_plain(float(value), depth + 1)
    raise _Unconvertible(type(value).__name__)
