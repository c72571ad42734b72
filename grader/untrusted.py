"""Reading what a student's kernel left in its work dir, which is hostile from the moment it starts.

The grader runs outside the sandbox, often as root, and a kernel can leave anything at
any name: a symbolic link to a host file (``/etc/shadow``, ``/proc/self/environ``,
``/dev/zero``), a FIFO that blocks ``open()`` forever, a folder, a sparse file of
terabytes, a 2 MB zip that inflates to gigabytes, a pickle declaring huge tensors, JSON
nested deep enough to blow the stack. Every read of a work-dir file goes through here:

* ``read_bytes``: no link followed (the file or any folder on the way), no FIFO opened
  blocking, only a regular file, and its size capped before a byte is read;
* ``copy_file``: ``read_bytes``, then a fresh destination that cannot be a link;
* ``load_checkpoint``: ``read_bytes``, the archive's entry sizes checked before torch
  inflates anything, ``torch.load(weights_only=True)``, then tensor sizes and nesting;
* ``read_json`` and ``read_notebook``: ``read_bytes``, UTF-8, JSON with its depth bounded.

Each refuses with ``UntrustedFileError``, whose message is one sentence naming the file
and what is wrong with it, never with whatever the parser happened to raise.
"""
from __future__ import annotations

import errno
import io
import json
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

MiB = 1024 * 1024
# Student notebooks: an honest one with all its plots and outputs is a few MB. JSON of tiny
# containers costs ~20x its size in Python objects, so the cap also bounds the grader's memory.
MAX_NOTEBOOK_BYTES = 32 * MiB
# Containers nested deeper than this are refused: no honest notebook, state dump (the kernel
# side stops at 20) or checkpoint comes near, and the grader's own code may recurse on them.
MAX_DEPTH = 64

# O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
# O_NOFOLLOW: a link at the last component fails (ELOOP) instead of being followed.
# O_NOCTTY: a terminal device never becomes the grader's controlling terminal.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedFileError(Exception):
    """A file from a work dir the grader will not use; the message names it and says why."""


@dataclass(frozen=True)
class CheckpointLimits:
    """Bounds on one checkpoint; the caller picks them from the size of the model."""

    max_file_bytes: int  # the .pth file itself
    max_unpacked_bytes: int  # sum of the archive's entry sizes once inflated
    max_entries: int  # entries of the archive (each costs memory before anything is checked)
    max_pickle_bytes: int  # the data.pkl entry: containers and keys, never tensor data
    max_tensor_numel: int  # elements of one tensor (a stride-0 view can claim any shape)
    max_total_numel: int  # elements of all tensors together
    max_depth: int = MAX_DEPTH


# ------------------------------------------------------------------------------- files

def _label(path: PurePath, base: Path | None) -> str:
    """How a message names the file: relative to its folder when that is known."""
    if base is not None:
        try:
            return PurePath(path).relative_to(base).as_posix()
        except ValueError:
            pass
    return PurePath(path).name or str(path)


def _split(path: Path, base: Path | None) -> tuple[Path, list[str]]:
    """The trusted folder to start from and the untrusted components below it."""
    path = Path(path)
    if base is None:
        if not path.is_absolute():
            path = Path.cwd() / path
        return path.parent, [path.name]
    base = Path(base)
    try:
        relative = path.relative_to(base) if path.is_absolute() else path
    except ValueError:
        relative = path
    parts = list(relative.parts)
    if not parts or any(part in ("", ".", "..") for part in parts) or relative.is_absolute():
        raise UntrustedFileError(f"{relative} is not a plain path inside {base.name}: the grader "
                                 "reads only files inside the work dir.")
    return base, parts


def _open_parent(base: Path, folders: list[str], label: str) -> int:
    """A descriptor of the folder holding the file, walked without following any link."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise UntrustedFileError(f"{label} cannot be read: its folder is not there "
                                 f"({error.strerror}).") from None
    for folder in folders:
        try:
            child = os.open(folder, _DIR_FLAGS, dir_fd=fd)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UntrustedFileError(f"{label} is not read: {folder} on its path is a symbolic "
                                         "link or not a folder.") from None
            raise UntrustedFileError(f"{label} does not exist (no folder {folder}).") from None
        os.close(fd)
        fd = child
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _size_text(size: int) -> str:
    return f"{size / MiB:.1f} MB" if size >= MiB else f"{size} bytes"


def read_bytes(path: Path, max_bytes: int, base: Path | None = None) -> bytes:
    """The content of the regular file ``path``, at most ``max_bytes`` long.

    ``base`` is a folder the grader trusts (it made it); ``path`` lies inside it, and every
    folder between them is opened without following links. Without ``base``, only the
    last component is untrusted. Raises ``UntrustedFileError`` for a link, a FIFO, a
    folder, a device, a missing file or one larger than ``max_bytes``.
    """
    label = _label(path, base)
    start, parts = _split(path, base)
    dir_fd = _open_parent(start, parts[:-1], label)
    try:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
        except OSError as error:
            raise _open_error(parts[-1], label, error, dir_fd) from None
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFileError(f"{label} is {_kind(info.st_mode)}, not a regular file: the "
                                     "grader reads only files the notebook wrote itself.")
        if info.st_size > max_bytes:
            raise UntrustedFileError(f"{label} is {_size_text(info.st_size)}, more than the "
                                     f"{_size_text(max_bytes)} the grader accepts for it.")
        chunks, total = [], 0
        # Read at most one byte past the cap: a file still growing is refused, not followed.
        while total <= max_bytes:
            chunk = os.read(fd, min(MiB, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UntrustedFileError(f"{label} grew past the {_size_text(max_bytes)} the grader "
                                     "accepts for it while being read.")
        return b"".join(chunks)
    except OSError as error:
        raise UntrustedFileError(f"{label} could not be read ({error.strerror}).") from None
    finally:
        os.close(fd)


def _open_error(name: str, label: str, error: OSError, dir_fd: int) -> UntrustedFileError:
    if error.errno == errno.ENOENT:
        return UntrustedFileError(f"{label} does not exist.")
    if error.errno == errno.ELOOP:
        return UntrustedFileError(f"{label} is a symbolic link, not a file: the grader never "
                                  "follows links out of a work dir.")
    if error.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing
        return UntrustedFileError(f"{label} is a socket or pipe, not a regular file.")
    try:
        kind = _kind(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        kind = "unreadable"
    return UntrustedFileError(f"{label} could not be opened ({error.strerror}; it is {kind}).")


def regular_file_problem(path: Path) -> str | None:
    """None when ``path`` (not followed) is a regular file; otherwise what it is instead."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    return None if stat.S_ISREG(mode) else _kind(mode)


def copy_file(source: Path, destination: Path, max_bytes: int,
              source_base: Path | None = None) -> int:
    """Copy the regular file ``source`` to ``destination``; returns the bytes written.

    The source is read with ``read_bytes``; whatever non-folder sits at the destination's
    name is removed (``unlink`` removes a link, never its target) and the destination is
    created afresh with O_EXCL|O_NOFOLLOW, so no link there is ever written through.
    """
    data = read_bytes(source, max_bytes, source_base)
    destination = Path(destination)
    folder = os.open(destination.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.unlink(destination.name, dir_fd=folder)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise UntrustedFileError(f"{destination.name} is a folder where the grader places "
                                     "an input file.") from None
        fd = os.open(destination.name, _CREATE_FLAGS, 0o644, dir_fd=folder)
    finally:
        os.close(folder)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return len(data)


def remove_tree(path: Path) -> None:
    """``shutil.rmtree(path, ignore_errors=True)`` without recursion and without following
    any link: a kernel can leave folders nested thousands deep in its work dir, and the
    recursive rmtree of Python 3.11 meets them with RecursionError (not an OSError, so
    ``ignore_errors`` does not help). Folders are entered by descriptor one at a time, so
    neither the path length nor the number of open descriptors grows with the depth.
    What cannot be removed is left in place.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:  # a file, a link or nothing: removed (a link, never its target) if there
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    names: list[str] = []  # the folders entered below ``path``, outermost first
    try:
        while True:
            folder = None
            with os.scandir(fd) as listing:
                for entry in listing:
                    if entry.is_dir(follow_symlinks=False):
                        folder = folder or entry.name
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            if folder is not None:
                child = os.open(folder, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(folder)
                continue
            if not names:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    except OSError:
        pass  # ignore_errors: stop at the first thing that will not go
    finally:
        os.close(fd)
    if not names:
        try:
            os.rmdir(path)
        except OSError:
            pass


# ------------------------------------------------------------------------------- JSON

def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether containers nest deeper than ``max_depth`` (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterator[Any] = iter(item.values())
        elif isinstance(item, list):
            children = iter(item)
        else:
            continue
        if depth >= max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(data: bytes, label: str, max_depth: int = MAX_DEPTH) -> Any:
    """``data`` as UTF-8 JSON nested at most ``max_depth`` deep."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UntrustedFileError(f"{label} is not UTF-8 text (byte {error.start} cannot be "
                                 "decoded).") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise UntrustedFileError(f"{label} nests its JSON too deeply to be read.") from None
    except ValueError as error:  # JSONDecodeError, and integers past Python's digit limit
        raise UntrustedFileError(f"{label} is not valid JSON ({str(error)[:200]}).") from None
    if _too_deep(value, max_depth):
        raise UntrustedFileError(f"{label} nests its JSON more than {max_depth} levels deep.")
    return value


def read_json(path: Path, max_bytes: int, base: Path | None = None,
              max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file from a work dir (the kernel's state dump), read with every check above."""
    return parse_json(read_bytes(path, max_bytes, base), _label(path, base), max_depth)


# ------------------------------------------------------------------------------- notebooks

def read_notebook(path: Path, max_bytes: int = MAX_NOTEBOOK_BYTES, base: Path | None = None):
    """A student's notebook as nbformat 4.5 (cell ids), or ``UntrustedFileError``.

    Non-UTF-8, non-JSON, too deep, too large and structurally broken notebooks (cells that
    are not objects, sources that are not text) are all refused with one sentence.
    """
    import nbformat  # here, so that importing this module stays cheap

    label = _label(path, base)
    parsed = parse_json(read_bytes(path, max_bytes, base), label)
    if not isinstance(parsed, dict):
        raise UntrustedFileError(f"{label} is not a notebook: its JSON is not an object.")
    try:
        nb = nbformat.reads(json.dumps(parsed), as_version=4)
        nb = nbformat.v4.upgrade(nb, from_version=4, from_minor=nb.get("nbformat_minor", 0))
        _check_cells(nb, label)
    except UntrustedFileError:
        raise
    except Exception as error:  # nbformat raises many types on malformed input
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UntrustedFileError(f"{label} is not a valid notebook ({type(error).__name__}"
                                 f"{': ' + reason if reason else ''}).") from None
    return nb


def _check_cells(nb: Any, label: str) -> None:
    """What the grader relies on: cells with a type, a text source, metadata and outputs."""
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise UntrustedFileError(f"{label} is not a valid notebook: it has no list of cells.")
    for number, cell in enumerate(cells, 1):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_type"), str) \
                or not isinstance(cell.get("source", ""), str):
            raise UntrustedFileError(f"{label} is not a valid notebook: cell {number} is malformed.")
        if not isinstance(cell.setdefault("metadata", {}), dict):
            raise UntrustedFileError(f"{label} is not a valid notebook: cell {number} has "
                                     "malformed metadata.")
        cell.setdefault("source", "")
        if cell["cell_type"] == "code":
            outputs = cell.setdefault("outputs", [])
            if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
                raise UntrustedFileError(f"{label} is not a valid notebook: cell {number} has "
                                         "malformed outputs.")


# ------------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: Path, limits: CheckpointLimits, base: Path | None = None) -> Any:
    """A checkpoint from a work dir: ``torch.load(weights_only=True)`` within ``limits``."""
    label = _label(path, base)
    return load_checkpoint_bytes(read_bytes(path, limits.max_file_bytes, base), label, limits)


def load_checkpoint_bytes(data: bytes, label: str, limits: CheckpointLimits) -> Any:
    """Checks the archive, loads it with tensors only, then checks what came out."""
    import pickle

    import torch

    _check_archive(data, label, limits)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The sentence diagnose's unsafe-checkpoint looks for ("Python objects").
        raise UntrustedFileError(
            f"{label} holds Python objects other than tensors and plain containers, so it "
            "was not loaded (loading it could run code): save only tensors, numbers and lists."
        ) from None
    except MemoryError:
        raise UntrustedFileError(f"{label} asks for more memory than the grader gives a "
                                 "checkpoint.") from None
    except RecursionError:
        raise UntrustedFileError(f"{label} nests its contents too deeply to be loaded.") from None
    except Exception as error:  # torch raises anything on garbage: IndexError, KeyError, ...
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UntrustedFileError(f"{label} is not a readable PyTorch checkpoint "
                                 f"({type(error).__name__}{': ' + reason if reason else ''}): "
                                 "save it again with torch.save.") from None
    _check_loaded(loaded, label, limits)
    return loaded


def _check_archive(data: bytes, label: str, limits: CheckpointLimits) -> None:
    """Only torch.save's zip format, whose inflated size is known before anything inflates.

    The legacy (non-zip) format is a bare pickle that can declare storages of any size,
    and a deflated entry of a few MB can inflate to GiBs: both are refused up front.
    """
    if not data.startswith(b"PK\x03\x04"):
        raise UntrustedFileError(f"{label} is not a PyTorch checkpoint in the format torch.save "
                                 "writes (a zip archive): save it again with torch.save.")
    handle = io.BytesIO(data)
    try:
        # The end record ZipFile itself reads, so the counts checked are those it will use:
        # a huge central directory costs memory in ZipFile() before any other check.
        end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
        if end is None:
            raise zipfile.BadZipFile("no end of central directory")
        entries = end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
        directory = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        if entries > limits.max_entries or directory > limits.max_entries * 1024:
            raise UntrustedFileError(f"{label} is an archive of {entries} entries, more than a "
                                     "checkpoint has.")
        with zipfile.ZipFile(handle) as archive:
            infos = archive.infolist()
    except UntrustedFileError:
        raise
    except Exception as error:  # BadZipFile, struct.error, ValueError, ...
        raise UntrustedFileError(f"{label} is not a readable PyTorch checkpoint (a damaged zip "
                                 f"archive: {str(error)[:200]}): save it again with "
                                 "torch.save.") from None
    if len(infos) > limits.max_entries:
        raise UntrustedFileError(f"{label} is an archive of {len(infos)} entries, more than a "
                                 "checkpoint has.")
    unpacked = sum(info.file_size for info in infos)
    if unpacked > limits.max_unpacked_bytes:
        raise UntrustedFileError(f"{label} would unpack to {_size_text(unpacked)}, more than the "
                                 f"{_size_text(limits.max_unpacked_bytes)} the grader accepts "
                                 "for a checkpoint.")
    pickles = [info for info in infos if info.filename.endswith("data.pkl")]
    if not pickles:
        raise UntrustedFileError(f"{label} is a zip archive but not a PyTorch checkpoint (it has "
                                 "no data.pkl): save it with torch.save.")
    largest = max(info.file_size for info in pickles)
    if largest > limits.max_pickle_bytes:
        raise UntrustedFileError(f"{label} holds {_size_text(largest)} of pickled containers, "
                                 "far more than a checkpoint's keys and lists.")


# The dtypes a state_dict and its optimizer state hold (int64: BN's num_batches_tracked).
# Sparse, nested and quantized tensors, complex and float8 dtypes are none of the lab's, and
# the grader's tensor code (torch.equal, slicing, load_state_dict) fails on several of them.
ALLOWED_DTYPES = ("float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool")


def _tensor_kind_problem(tensor: Any, torch: Any) -> str | None:
    """What is wrong with the kind of ``tensor`` (not its size), or None for a plain one."""
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"a tensor of layout {str(tensor.layout).removeprefix('torch.')} (not dense)"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.dtype not in {getattr(torch, name) for name in ALLOWED_DTYPES}:
        return f"a tensor of dtype {str(tensor.dtype).removeprefix('torch.')}"
    return None


def _check_loaded(loaded: Any, label: str, limits: CheckpointLimits) -> None:
    """Tensors within size, containers not too deep nor cyclic; each object counted once."""
    import torch

    total = 0
    seen: set[int] = set()
    # (object, depth, leaving): the second visit of a container marks it done (cycle check).
    stack: list[tuple[Any, int, bool]] = [(loaded, 0, False)]
    open_containers: set[int] = set()
    while stack:
        item, depth, leaving = stack.pop()
        if leaving:
            open_containers.discard(id(item))
            continue
        if isinstance(item, torch.Tensor):
            if id(item) in seen:
                continue
            seen.add(id(item))
            kind = _tensor_kind_problem(item, torch)
            if kind is not None:
                raise UntrustedFileError(f"{label} holds {kind}: a checkpoint of the lab holds "
                                         "plain dense tensors only (save model.state_dict()).")
            numel = item.numel()
            if numel > limits.max_tensor_numel:
                raise UntrustedFileError(
                    f"{label} holds a tensor of shape {tuple(item.shape)} ({numel} elements), "
                    f"larger than any layer of the lab's model (limit {limits.max_tensor_numel}).")
            total += numel
            if total > limits.max_total_numel:
                raise UntrustedFileError(f"{label} holds more than {limits.max_total_numel} tensor "
                                         "elements in all, far more than the lab's model has.")
            continue
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            continue
        if id(item) in open_containers:
            raise UntrustedFileError(f"{label} holds a container that contains itself.")
        if id(item) in seen:
            continue
        if depth >= limits.max_depth:
            raise UntrustedFileError(f"{label} nests containers more than {limits.max_depth} "
                                     "levels deep.")
        seen.add(id(item))
        open_containers.add(id(item))
        stack.append((item, depth, True))
        stack.extend((child, depth + 1, False) for child in children)
