"""The harness's one way to write a file atomically: whole or not at all.

``write_atomically`` writes a temporary file next to the target (``TEMPORARY_NAME``),
syncs it and renames it over the target with ``os.replace``: a reader, or a grading killed
at any moment, sees the old file or the new one, never half of one. A kill leaves at most
the temporary file, which a batch removes on its next run (grader.batch.remove_stale).
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

# ``.<name>.<8 hex digits>.tmp``: what write_atomically leaves behind when it is killed.
TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomically(path: str | Path, text: str, newline: str | None = "\n") -> Path:
    """Write ``text`` (UTF-8; ``newline`` as ``open`` takes it) to ``path``, its folder made
    when missing; the file is readable by all (0644: results are for TAs and their tools)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, _CREATE_FLAGS, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace", newline=newline) as handle:
            os.fchmod(handle.fileno(), 0o644)  # whatever the umask
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
