"""First process inside the sandbox: set the limits, drop root, then become the kernel.

Usage (built by ``grader.sandbox``)::

    python -m grader.runtime.launch --max-processes N [--max-file-bytes B] [--user UID:GID] -- COMMAND...

RLIMIT_NPROC is set here, inside bubblewrap, rather than on the bwrap process: Linux
never applies it to root at all, which is why a grader running as root hands the
kernel to an unprivileged ``--user`` of its own (``grader.sandbox.lease_user``); the
limit counts the tasks of that uid, so of this kernel only.

RLIMIT_FSIZE (``--max-file-bytes``) caps every file the kernel and its children write:
a write past it fails with EFBIG ("File too large"; Python ignores SIGXFSZ), in the
work dir, /tmp and /dev/shm alike. The work dir's total is watched from outside.
"""
from __future__ import annotations

import os
import resource
import sys


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: launch --max-processes N [--max-file-bytes B] [--user UID:GID]"
                         " -- COMMAND...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    settings = dict(zip(options[::2], options[1::2], strict=True))
    limit = int(settings["--max-processes"])
    _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)  # only root may raise a hard limit
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    if "--max-file-bytes" in settings:
        size = int(settings["--max-file-bytes"])
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if hard != resource.RLIM_INFINITY:
            size = min(size, hard)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    if "--user" in settings:
        uid, gid = (int(part) for part in settings["--user"].split(":"))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
