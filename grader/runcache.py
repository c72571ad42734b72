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
from grader.execute import Failure, RunResult, RunSpec

RESULT_FILE = "run.json"
# Failures that depend on how busy the machine was, not only on the run's inputs.
LOAD_DEPENDENT = {"timeout", "out-of-memory", "kernel-died"}


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
        for item in (entry / "files").iterdir():
            shutil.copyfile(item, spec.work_dir / item.name)
        failure = Failure(**record["failure"]) if record["failure"] else None
        return RunResult(spec.run_id, record["notebook"], spec.work_dir / record["executed_name"],
                         failure, record["state"], record["stdout_text"], record["images"],
                         record["duration_s"], record["output_truncated"], record["cell_seconds"])

    def store(self, key: str, spec: RunSpec, result: RunResult) -> None:
        entry = self.root / key
        if entry.exists() or (result.failure and result.failure.kind in LOAD_DEPENDENT):
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        files = staging / "files"
        files.mkdir()
        for item in spec.work_dir.iterdir():
            if item.is_file() and not item.is_symlink():
                shutil.copyfile(item, files / item.name)
        record = {k: v for k, v in dataclasses.asdict(result).items()
                  if k not in ("run_id", "executed_notebook")}
        record["executed_name"] = result.executed_notebook.name
        (staging / RESULT_FILE).write_text(json.dumps(record, default=str))
        try:
            os.rename(staging, entry)
        except OSError:  # another grading stored the same run first
            shutil.rmtree(staging, ignore_errors=True)
