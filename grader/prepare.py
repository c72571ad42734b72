"""Find the three notebooks of a submission (a folder or a .zip) and copy them somewhere private."""
from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

NOTEBOOKS = ("sparsity_train", "vggprune", "train_prune_model")
# Junk that archivers and Jupyter leave beside real notebooks.
IGNORED_PARTS = {".ipynb_checkpoints", "__MACOSX"}
MAX_UNPACKED_BYTES = 512 * 1024 * 1024


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


def find_notebooks(root: Path) -> dict[str, Path | None]:
    """Each lab notebook by a loose match of its name (case, separators), shallowest first."""
    candidates = sorted((p for p in root.rglob("*.ipynb")
                         if not IGNORED_PARTS & set(p.relative_to(root).parts)),
                        key=lambda p: (len(p.relative_to(root).parts), str(p)))
    found: dict[str, Path | None] = {}
    for name in NOTEBOOKS:
        exact = [p for p in candidates if _key(p.stem) == _key(name)]
        loose = [p for p in candidates if _key(name) in _key(p.stem)]
        found[name] = (exact or loose or [None])[0]
    return found


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Unpack ``archive`` into ``target``; entries that would land outside it are refused."""
    refused: list[str] = []
    try:
        with zipfile.ZipFile(archive) as bundle:
            total = 0
            for entry in bundle.infolist():
                path = PurePosixPath(entry.filename.replace("\\", "/"))
                is_link = stat.S_ISLNK(entry.external_attr >> 16)
                if path.is_absolute() or ".." in path.parts or is_link or re.match(r"^[A-Za-z]:", entry.filename):
                    refused.append(entry.filename)
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
    except zipfile.BadZipFile:
        raise PrepareError(f"{archive} is not a readable .zip file: zip the folder again.") from None
    return refused


def _skipped(folder: str, names: list[str]) -> list[str]:
    """Only plain files and folders are copied: not links (which could point at the grader's
    files), FIFOs or devices (which would block or never end), checkpoints or data."""
    def plain(name: str) -> bool:
        try:
            mode = os.lstat(os.path.join(folder, name)).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode) or stat.S_ISDIR(mode)
    return [n for n in names if not plain(n) or n.endswith((".pth", ".pt", ".tar")) or n == "data"]


def prepare(submission: Path, work_root: Path) -> Submission:
    """A private copy of the submission and where its notebooks are."""
    submission = Path(submission)
    if not submission.exists():
        raise PrepareError(f"{submission} does not exist: give the folder or .zip that holds "
                           "the three notebooks.")
    root = work_root / "submission"
    root.mkdir(parents=True, exist_ok=True)
    refused: list[str] = []
    if submission.is_dir():
        shutil.copytree(submission, root, dirs_exist_ok=True, ignore=_skipped)
    elif zipfile.is_zipfile(submission):
        refused = safe_extract(submission, root)
    else:
        raise PrepareError(f"{submission} is neither a folder nor a .zip file: give the folder "
                           "(or .zip) that holds sparsity_train.ipynb, vggprune.ipynb and "
                           "train_prune_model.ipynb.")
    notebooks = find_notebooks(root)
    if not any(notebooks.values()):
        raise PrepareError(f"{submission} holds none of the lab's notebooks ("
                           + ", ".join(f"{n}.ipynb" for n in NOTEBOOKS) + "): check the folder.")
    name = submission.name.removesuffix(".zip")
    return Submission(name, root, notebooks, refused)


def lab_notebooks_in(path: Path) -> set[str]:
    """Which of the lab's notebooks a folder or a .zip holds (at any depth), read without
    copying or unpacking anything; an unreadable .zip holds none."""
    path = Path(path)
    if path.is_dir():
        return {name for name, found in find_notebooks(path).items() if found is not None}
    try:
        with zipfile.ZipFile(path) as bundle:
            names = [PurePosixPath(n.replace("\\", "/")) for n in bundle.namelist()]
    except (OSError, zipfile.BadZipFile):
        return set()
    stems = [_key(n.stem) for n in names
             if n.suffix.lower() == ".ipynb" and not IGNORED_PARTS & set(n.parts)]
    return {name for name in NOTEBOOKS if any(_key(name) in stem for stem in stems)}


def top_level_notebooks(folder: Path) -> list[str]:
    """The names of the lab's notebooks lying directly in ``folder`` (not in a sub-folder)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file()
                  and p.suffix.lower() == ".ipynb" and any(_key(n) in _key(p.stem) for n in NOTEBOOKS))


def several_submissions(folder: Path) -> list[str]:
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
    if top_level_notebooks(folder):
        return []
    entries = sorted(p for p in folder.iterdir()
                     if not p.name.startswith(".") and p.name not in IGNORED_PARTS)
    holding = {p.name: found for p in entries
               if (p.is_dir() or p.suffix.lower() == ".zip") and (found := lab_notebooks_in(p))}
    counts = [sum(name in found for found in holding.values()) for name in NOTEBOOKS]
    return sorted(holding) if max(counts, default=0) > 1 else []


def hand_in_problem(submission: Path) -> str | None:
    """Why an existing folder or file cannot be graded at all (one sentence, the student's to
    fix: a .zip that does not open, none of the lab's notebooks), else None. Read only."""
    submission = Path(submission)
    if submission.is_file():
        if not zipfile.is_zipfile(submission):
            return (f"{submission} is not a readable .zip file: zip the folder again." if
                    submission.suffix.lower() == ".zip" else
                    f"{submission} is neither a folder nor a .zip file: give the folder (or .zip) "
                    "that holds sparsity_train.ipynb, vggprune.ipynb and train_prune_model.ipynb.")
        try:
            with zipfile.ZipFile(submission) as bundle:
                bundle.infolist()
        except (OSError, zipfile.BadZipFile):
            return f"{submission} is not a readable .zip file: zip the folder again."
    if not lab_notebooks_in(submission):
        return (f"{submission} holds none of the lab's notebooks ("
                + ", ".join(f"{n}.ipynb" for n in NOTEBOOKS) + "): check the folder.")
    return None
