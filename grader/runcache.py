"""Reuse of a notebook run whose every input is byte-identical.

A run is a pure function of the notebook's bytes, the injected parameters, the
files placed in its work dir, the profile and the grader's version: the same
key gives the same checkpoints, state and outputs. Grading many submissions
that share notebooks (a fixture corpus, resubmissions) then runs each distinct
notebook once. Entries are written to a temporary folder and renamed into place,
so a killed grading never leaves half an entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from grader import __version__
from grader.execute import Failure, RunResult, RunSpec, grader_dir
from grader.untrusted import UntrustedFileError, copy_file, regular_file_problem

RESULT_FILE = "run.json"
EXECUTED_FILE = "executed.ipynb"  # the executed notebook, which lives outside the work dir
# Failures that depend on how busy the machine was, not only on the run's inputs.
LOAD_DEPENDENT = {"timeout", "out-of-memory", "kernel-died"}


def _file_limit(spec: RunSpec) -> int:
    """A file a run left in its work dir is cached only up to the size the kernel could
    write (its RLIMIT_FSIZE)."""
    return spec.profile.file_limit_mb * 1024 * 1024


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, spec: RunSpec, sandboxed: bool) -> str:
        """Digest of everything a run depends on; call it once the inputs are in the work dir."""
        inputs = {p.name: _file_digest(p) for p in sorted(spec.work_dir.iterdir()) if p.is_file()}
        blob = json.dumps({
            "version": __version__, "notebook": _file_digest(spec.notebook),
            "parameters": spec.parameters, "scale": spec.scale, "inputs": inputs,
            "profile": spec.profile.fingerprint(), "device": spec.device,
            "expected": spec.expected_artifacts, "sandboxed": sandboxed,
            "kernel": [spec.kernel.runtime, spec.kernel.config],
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def run(self, spec: RunSpec, sandboxed: bool, execute: Callable[[RunSpec], RunResult]) -> RunResult:
        """The cached result of ``spec``, or ``execute(spec)`` stored for next time."""
        key = self.key(spec, sandboxed)
        with self._locked(key):  # a twin run started elsewhere finishes first, then is reused
            result = self.load(key, spec)
            if result is None:
                result = execute(spec)
                self.store(key, spec, result)
        return result

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with open(self.root / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def load(self, key: str, spec: RunSpec) -> RunResult | None:
        entry = self.root / key
        record_path = entry / RESULT_FILE
        if not record_path.is_file():
            return None
        record = json.loads(record_path.read_text())
        files = entry / "files"
        # The entry is the grader's own; the work dir holds only the inputs placed so far, and
        # copy_file still never writes through a link found there.
        for root, _, names in os.walk(files):
            for name in names:
                relative = Path(root, name).relative_to(files)
                (spec.work_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                copy_file(files / relative, spec.work_dir / relative, _file_limit(spec), files)
        executed = grader_dir(spec.work_dir) / record["executed_name"]
        if (entry / EXECUTED_FILE).is_file():
            shutil.copyfile(entry / EXECUTED_FILE, executed)
        known = {f.name for f in dataclasses.fields(RunResult)} - {"run_id", "executed_notebook"}
        values = {k: v for k, v in record.items() if k in known}
        values["failure"] = Failure(**record["failure"]) if record["failure"] else None
        if "errors" in values:
            values["errors"] = [Failure(**error) for error in values["errors"]]
        return RunResult(run_id=spec.run_id, executed_notebook=executed, **values)

    def store(self, key: str, spec: RunSpec, result: RunResult) -> None:
        entry = self.root / key
        if entry.exists() or (result.failure and result.failure.kind in LOAD_DEPENDENT):
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        try:
            cacheable = self._stage(spec, result, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not cacheable:
            shutil.rmtree(staging, ignore_errors=True)
            return
        try:
            os.rename(staging, entry)
        except OSError:  # another grading stored the same run first
            shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, spec: RunSpec, result: RunResult, staging: Path) -> bool:
        """Copy what the run left into ``staging``; False when it is not worth caching.

        The work dir is the kernel's: its top-level files and the artifacts it wrote are
        copied only as regular files of bounded size, read without following any link. A
        run that left a link, FIFO, device or oversized file under a name the grader may
        read is not cached: reusing it without that file would grade it differently.
        """
        files = staging / "files"
        files.mkdir()
        work_dir = spec.work_dir
        names = [item.name for item in work_dir.iterdir() if regular_file_problem(item) != "a folder"]
        artifacts = getattr(result, "artifacts", {}) or {}
        for relative in sorted(set(names) | set(artifacts.values())):
            (files / relative).parent.mkdir(parents=True, exist_ok=True)
            try:
                copy_file(work_dir / relative, files / relative, _file_limit(spec), work_dir)
            except UntrustedFileError:
                return False
        if result.executed_notebook.is_file():
            shutil.copyfile(result.executed_notebook, staging / EXECUTED_FILE)
        record = {k: v for k, v in dataclasses.asdict(result).items()
                  if k not in ("run_id", "executed_notebook")}
        record["executed_name"] = result.executed_notebook.name
        (staging / RESULT_FILE).write_text(json.dumps(record, default=str))
        return True
