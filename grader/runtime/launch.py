"""First process inside the sandbox: set the limits, drop root, then become the kernel.

Usage (built by ``grader.sandbox``)::

    python -m grader.runtime.launch --max-processes N [--max-file-bytes B] [--user UID:GID] -- COMMAND...

RLIMIT_NPROC is set here, inside bubblewrap, rather than on the bwrap process: Linux
never applies it to root at all, which is why a grader running as root hands the
kernel to an unprivileged ``--user`` of its own (``grader.sandbox.lease_user``); the
limit counts the tasks of that uid, so of this kernel only.

RLIMIT_NOFILE caps open files at ``MAX_OPEN_FILES``, the descriptors of each process the
executor's memory and disk watch look through.

RLIMIT_FSIZE (``--max-file-bytes``) caps every file the kernel and its children write:
a write past it fails with EFBIG ("File too large"; Python ignores SIGXFSZ), in the
work dir, /tmp and /dev/shm alike. The work dir's total is watched from outside.
"""
from __future__ import annotations

import os
import resource
import sys


# Open files per process: far above what a kernel with DataLoader workers uses, and what
# the memory and disk watch look through (a file held open beyond it would go unseen).
MAX_OPEN_FILES = 4096


def _limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)  # only root may raise a hard limit
    resource.setrlimit(which, (value, value))


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: launch --max-processes N [--max-file-bytes B] [--user UID:GID]"
                         " -- COMMAND...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    settings = dict(zip(options[::2], options[1::2], strict=True))
    _limit(resource.RLIMIT_NPROC, int(settings["--max-processes"]))
    _limit(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    if "--max-file-bytes" in settings:
        _limit(resource.RLIMIT_FSIZE, int(settings["--max-file-bytes"]))
    if "--user" in settings:
        uid, gid = (int(part) for part in settings["--user"].split(":"))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
