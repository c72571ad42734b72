"""Find a lab's notebooks in a submission (a folder or a .zip) and copy them somewhere private."""
from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# Junk that archivers and Jupyter leave beside real notebooks.
IGNORED_PARTS = {".ipynb_checkpoints", "__MACOSX"}
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
# Bounds on the shape of a hand-in (zip or folder), checked before anything is created.
# An honest one is a few folders deep with tens of files; a hostile one can nest folders
# thousands deep (Path.mkdir and rglob recurse once per level) or hold millions of
# entries (each costs memory and a syscall). A Colab/Drive export stays under 10 levels.
MAX_DEPTH = 32  # folders below the top of the hand-in
MAX_ENTRIES = 10_000  # files and folders together; a hand-in with CIFAR-10 unpacked has ~60k
MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems: a longer name cannot be created
# How a refused entry is named in a report: a path 1500 folders deep is 3000+ characters.
MAX_LABEL_CHARS = 200


class PrepareError(Exception):
    """A submission that cannot be graded at all; the message says which file and what to do."""


@dataclass
class Submission:
    name: str
    root: Path  # private copy of the submission
    notebooks: dict[str, Path | None]
    refused_entries: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [name for name, path in self.notebooks.items() if path is None]


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


class _TooManyEntries(PrepareError):
    pass


def _walk(root: Path, enter: Callable[[tuple[str, ...], os.DirEntry], bool]
          ) -> Iterator[tuple[tuple[str, ...], os.DirEntry]]:
    """Every entry below ``root`` with its path parts, without recursion or following links.

    A folder is entered when ``enter`` says so and it lies less than MAX_DEPTH levels
    down; an unreadable folder is passed over. Raises ``_TooManyEntries`` at the
    (MAX_ENTRIES + 1)-th entry, before listing further.
    """
    stack: list[tuple[str, tuple[str, ...]]] = [(os.fspath(root), ())]
    count = 0
    while stack:
        folder, parts = stack.pop()
        try:
            listing = os.scandir(folder)
        except OSError:
            continue
        with listing:
            for entry in listing:
                count += 1
                if count > MAX_ENTRIES:
                    raise _TooManyEntries(f"{Path(root).name} holds more than {MAX_ENTRIES} files "
                                          "and folders: hand in the notebooks and models/ only.")
                here = (*parts, entry.name)
                yield here, entry
                try:
                    is_folder = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_folder = False
                if is_folder and len(here) < MAX_DEPTH and enter(here, entry):
                    stack.append((entry.path, here))


def listing(notebooks: tuple[str, ...]) -> str:
    """'a.ipynb, b.ipynb and c.ipynb': the lab's notebooks in a sentence."""
    names = [f"{n}.ipynb" for n in notebooks]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def find_notebooks(root: Path, notebooks: tuple[str, ...]) -> dict[str, Path | None]:
    """Each lab notebook by a loose match of its name (case, separators), shallowest first.

    The walk is bounded (MAX_DEPTH, MAX_ENTRIES; beyond them nothing more is looked at),
    never follows a link, and counts only regular files."""
    found_files: list[tuple[str, ...]] = []
    try:
        for parts, entry in _walk(root, lambda parts, entry: entry.name not in IGNORED_PARTS):
            if parts[-1].lower().endswith(".ipynb") and not IGNORED_PARTS & set(parts) \
                    and entry.is_file(follow_symlinks=False):
                found_files.append(parts)
    except (_TooManyEntries, OSError):
        pass
    candidates = sorted((Path(root).joinpath(*parts) for parts in found_files),
                        key=lambda p: (len(p.relative_to(root).parts), str(p)))
    found: dict[str, Path | None] = {}
    for name in notebooks:
        exact = [p for p in candidates if _key(p.stem) == _key(name)]
        loose = [p for p in candidates if _key(name) in _key(p.stem)]
        found[name] = (exact or loose or [None])[0]
    return found


def _label(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[:MAX_LABEL_CHARS] + "…"


def archive_problem(archive: Path) -> str | None:
    """Why ``archive`` cannot be unpacked at all (not a readable .zip, more entries than
    MAX_ENTRIES), else None. Only the end record is read: ZipFile() reads the whole
    table of contents into memory before a single entry could be counted."""
    try:
        with open(archive, "rb") as handle:
            end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        end = None
    if end is None:
        return f"{archive} is not a readable .zip file: zip the folder again."
    if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ENTRIES:  # type: ignore[attr-defined]
        return (f"{archive.name} holds more than {MAX_ENTRIES} files and folders: hand in the "
                "notebooks and models/ only.")
    if end[zipfile._ECD_SIZE] > MAX_ENTRIES * 4096:  # type: ignore[attr-defined]
        return (f"{archive.name} has a table of contents of more than {MAX_ENTRIES * 4096 >> 20} "
                "MiB, far more than a hand-in needs: zip the folder again.")
    return None


def _claim(kinds: dict[tuple[str, ...], str], parts: tuple[str, ...], is_dir: bool) -> bool:
    """Record ``parts`` as a folder or a file; False when it clashes with an earlier entry
    (a file ``x`` and anything below ``x/``, or a folder where a file was)."""
    folders = [parts[:i] for i in range(1, len(parts))] + ([parts] if is_dir else [])
    if any(kinds.get(folder) == "file" for folder in folders):
        return False
    if not is_dir and kinds.get(parts) == "dir":
        return False
    kinds.update({folder: "dir" for folder in folders})
    if not is_dir:
        kinds[parts] = "file"
    return True


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Unpack ``archive`` into ``target``; returns the names of the entries refused.

    Refused: entries that would land outside ``target`` (absolute, '..', a drive letter, a
    link), names no file system takes (a part longer than MAX_NAME_BYTES, a NUL byte),
    paths more than MAX_DEPTH deep, and an entry clashing with an earlier one (a file ``x``
    and an entry ``x/...``). An archive that cannot be unpacked at all is PrepareError.
    """
    problem = archive_problem(archive)
    if problem is not None:
        raise PrepareError(problem)
    refused: list[str] = []
    kinds: dict[tuple[str, ...], str] = {}
    try:
        with zipfile.ZipFile(archive) as bundle:
            total = 0
            for entry in bundle.infolist():
                path = PurePosixPath(entry.filename.replace("\\", "/"))
                is_link = stat.S_ISLNK(entry.external_attr >> 16)
                if (not path.parts or path.is_absolute() or ".." in path.parts or is_link
                        or re.match(r"^[A-Za-z]:", entry.filename) or "\x00" in entry.filename
                        or len(path.parts) > MAX_DEPTH
                        or any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in path.parts)
                        or not _claim(kinds, path.parts, entry.is_dir())):
                    refused.append(_label(entry.filename))
                    continue
                total += entry.file_size
                if total > MAX_UNPACKED_BYTES:
                    raise PrepareError(f"{archive.name} unpacks to more than "
                                       f"{MAX_UNPACKED_BYTES >> 20} MiB: hand in the notebooks "
                                       "and models/ only, without checkpoints or data.")
                destination = target.joinpath(*path.parts)
                if entry.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(entry) as source, destination.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
    except PrepareError:
        raise
    except zipfile.BadZipFile:
        raise PrepareError(f"{archive} is not a readable .zip file: zip the folder again.") from None
    except Exception as error:  # OSError, RecursionError, RuntimeError (encrypted), zlib.error
        raise PrepareError(f"{archive.name} could not be unpacked ({type(error).__name__}: "
                           f"{_label(str(error).strip().splitlines()[0] if str(error).strip() else '')}): "
                           "zip the folder again.") from None
    return refused


def _skipped_name(name: str, suffixes: tuple[str, ...]) -> bool:
    """A data folder is never copied out of a hand-in folder, nor files the lab makes itself
    (``suffixes``: the slimming lab's checkpoints)."""
    return name == "data" or bool(suffixes) and name.endswith(suffixes)


def copy_folder(source: Path, target: Path, skipped: tuple[str, ...] = ()) -> list[str]:
    """Copy the hand-in folder ``source`` into the existing ``target``; returns the names of
    the folders refused for lying MAX_DEPTH deep (their contents are not looked at).

    Only regular files and folders are copied, never through a link: not links (which
    could point at the grader's files), FIFOs or devices (which would block or never
    end), a ``data`` folder, or files whose name ends with one of ``skipped``. The walk is bounded (MAX_ENTRIES, MAX_DEPTH) and so is what
    is copied (MAX_UNPACKED_BYTES, as for a .zip); PrepareError beyond those.
    """
    refused: list[str] = []
    total = 0
    try:
        for parts, entry in _walk(source, lambda parts, entry: not _skipped_name(entry.name, skipped)):
            if _skipped_name(entry.name, skipped):
                continue
            destination = target.joinpath(*parts)
            if entry.is_dir(follow_symlinks=False):
                if len(parts) >= MAX_DEPTH:
                    refused.append(_label("/".join(parts) + "/"))
                else:
                    destination.mkdir(exist_ok=True)
                continue
            if entry.is_file(follow_symlinks=False):
                total += _copy_regular(entry.path, destination, MAX_UNPACKED_BYTES - total,
                                       source.name)
    except PrepareError:
        raise
    except (OSError, RecursionError, ValueError) as error:
        raise PrepareError(f"{source.name} could not be copied ({type(error).__name__}: "
                           f"{_label(str(error))}): hand in a plain folder or a .zip.") from None
    return refused


def _copy_regular(path: str, destination: Path, budget: int, name: str) -> int:
    """Copy ``path`` if it still is a regular file (opened without following a link or
    waiting on a FIFO); the bytes written, PrepareError past ``budget``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        written = 0
        with destination.open("wb") as sink:
            while chunk := source.read(1024 * 1024):
                written += len(chunk)
                if written > budget:
                    raise PrepareError(f"{name} holds more than {MAX_UNPACKED_BYTES >> 20} MiB "
                                       "besides checkpoints and data: hand in the notebooks "
                                       "and models/ only.")
                sink.write(chunk)
    return written


def prepare(submission: Path, work_root: Path, notebooks: tuple[str, ...],
            skipped: tuple[str, ...] = ()) -> Submission:
    """A private copy of the submission and where its notebooks (the lab's) are; files of a
    folder whose name ends with one of ``skipped`` are left out (``copy_folder``)."""
    submission = Path(submission)
    if not submission.exists():
        raise PrepareError(f"{submission} does not exist: give the folder or .zip that holds "
                           f"{listing(notebooks)}.")
    root = work_root / "submission"
    root.mkdir(parents=True, exist_ok=True)
    refused: list[str] = []
    if submission.is_dir():
        refused = copy_folder(submission, root, skipped)
    elif zipfile.is_zipfile(submission):
        refused = safe_extract(submission, root)
    else:
        raise PrepareError(f"{submission} is neither a folder nor a .zip file: give the folder "
                           f"(or .zip) that holds {listing(notebooks)}.")
    found = find_notebooks(root, notebooks)
    if not any(found.values()):
        raise PrepareError(f"{submission} holds none of the lab's notebooks ("
                           + ", ".join(f"{n}.ipynb" for n in notebooks) + "): check the folder.")
    name = submission.name.removesuffix(".zip")
    return Submission(name, root, found, refused)


def lab_notebooks_in(path: Path, notebooks: tuple[str, ...]) -> set[str]:
    """Which of the lab's notebooks a folder or a .zip holds (at any depth), read without
    copying or unpacking anything; an unreadable .zip holds none."""
    path = Path(path)
    if path.is_dir():
        return {name for name, found in find_notebooks(path, notebooks).items() if found is not None}
    if archive_problem(path) is not None:
        return set()
    try:
        with zipfile.ZipFile(path) as bundle:
            names = [PurePosixPath(n.replace("\\", "/")) for n in bundle.namelist()]
    except (OSError, ValueError, zipfile.BadZipFile):
        return set()
    stems = [_key(n.stem) for n in names
             if n.suffix.lower() == ".ipynb" and not IGNORED_PARTS & set(n.parts)]
    return {name for name in notebooks if any(_key(name) in stem for stem in stems)}


def top_level_notebooks(folder: Path, notebooks: tuple[str, ...]) -> list[str]:
    """The names of the lab's notebooks lying directly in ``folder`` (not in a sub-folder)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file()
                  and p.suffix.lower() == ".ipynb" and any(_key(n) in _key(p.stem) for n in notebooks))


def several_submissions(folder: Path, notebooks: tuple[str, ...]) -> list[str]:
    """The entries of ``folder`` that are each a student's submission, when it holds more
    than one (a class folder given where one submission is expected); [] otherwise.

    A folder with a lab notebook at its top level is one submission. Otherwise each
    sub-folder or .zip holding lab notebooks is a candidate, and the folder is several
    submissions when one of the lab's notebooks is found in two candidates (a hand-in
    split into sub-folders, one notebook each, stays one submission).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if top_level_notebooks(folder, notebooks):
        return []
    entries = sorted(p for p in folder.iterdir()
                     if not p.name.startswith(".") and p.name not in IGNORED_PARTS)
    holding = {p.name: found for p in entries
               if (p.is_dir() or p.suffix.lower() == ".zip") and (found := lab_notebooks_in(p, notebooks))}
    counts = [sum(name in found for found in holding.values()) for name in notebooks]
    return sorted(holding) if max(counts, default=0) > 1 else []


def hand_in_problem(submission: Path, notebooks: tuple[str, ...]) -> str | None:
    """Why an existing folder or file cannot be graded at all (one sentence, the student's to
    fix: a .zip that does not open, none of the lab's notebooks), else None. Read only."""
    submission = Path(submission)
    if submission.is_file():
        if not zipfile.is_zipfile(submission):
            return (f"{submission} is not a readable .zip file: zip the folder again." if
                    submission.suffix.lower() == ".zip" else
                    f"{submission} is neither a folder nor a .zip file: give the folder (or .zip) "
                    f"that holds {listing(notebooks)}.")
        problem = archive_problem(submission)
        if problem is not None:
            return problem
        try:
            with zipfile.ZipFile(submission) as bundle:
                bundle.infolist()
        except (OSError, ValueError, zipfile.BadZipFile):
            return f"{submission} is not a readable .zip file: zip the folder again."
    if not lab_notebooks_in(submission, notebooks):
        return (f"{submission} holds none of the lab's notebooks ("
                + ", ".join(f"{n}.ipynb" for n in notebooks) + "): check the folder.")
    return None
