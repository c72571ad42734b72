"""Where a student's kernel runs: inside bubblewrap when it works here, in the open otherwise.

Inside the sandbox the kernel sees, read-only: the system (/usr, /bin, /lib*, /etc),
the Python installation (``sys.base_prefix`` and ``sys.prefix``), the data root and,
of this repository, only what ``KERNEL_SEES`` and the lab (``KernelSetup.sees``) list
(the runtime shims, and e.g. a lab's trusted model and data modules), each package
folder an empty read-only tmpfs around them: the trusted training, pruning, bundle and
evaluation code is not there, so importing it fails. Read-write: its own work dir (and the folder of its ZMQ sockets). It gets
fresh /proc, /dev, a size-capped private /tmp and /dev/shm, no network (its own empty
network namespace, so the client talks to it over ipc sockets in a shared folder), its
own pid namespace and session, and dies with the grader. Everything else is simply
absent: the user's home and caches (where the expected bundle lives), other
submissions' work dirs, the output folder.

``grader.runtime.launch``, the first process inside, caps processes (RLIMIT_NPROC)
and the size of every file the kernel writes (RLIMIT_FSIZE, the profile's
``file_limit_mb``). Linux never applies RLIMIT_NPROC to root, so when the grader runs
as root the launcher also drops to an unprivileged uid/gid leased for this kernel
alone (``lease_user``): the limit counts that uid's tasks, so a fork bomb exhausts
its own kernel's budget, not that of every grading on the machine. Dropping root also
sheds its capabilities, without which a kernel could mount file systems or create
device nodes and see past the sandbox. The work dir is handed to that uid
(``hand_over``).

Memory (the process tree plus the pages of this sandbox's /tmp and /dev/shm, see
``tmpfs_mounts``) and the work dir's total size are watched from outside by the
executor (``grader.execute.MemoryWatch``). Without bubblewrap the kernel runs as the
grader's own user with none of these walls, after one loud warning
(``warn_unsandboxed_once``).
"""
from __future__ import annotations

import fcntl
import functools
import grp
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
from jupyter_client.manager import AsyncKernelManager

import grader

log = logging.getLogger(__name__)

# When the grader is root, each sandboxed kernel runs as a uid/gid of its own, leased
# from this range for as long as the kernel lives (``lease_user``). RLIMIT_NPROC counts
# the tasks of a uid, so a fork bomb then exhausts its own kernel's budget only, not that
# of every kernel on the machine. The range is one systemd leaves unused (between the
# container ranges and the "foreign" range): no real user, subuid range or DynamicUser.
SANDBOX_ID_BASE = 1_900_000_000
SANDBOX_ID_COUNT = 65_536
# A leased id is a lock file held (flock) by the grading process that runs the kernel:
# every grader process on the machine sees the same folder, whatever its TMPDIR, and a
# lease ends by itself when its process dies, even by SIGKILL.
LEASE_DIRS = (Path("/run/slimgrade/ids"), Path("/var/lock/slimgrade-ids"))
# Tasks (processes and threads) the kernel may own: a kernel with torch and a few
# DataLoader workers stays under 60, a fork bomb does not. Per kernel when the grader is
# root (each kernel has its own uid); otherwise shared by the grader's user.
MAX_PROCESSES = 1024
# What of the harness the kernel sees, read-only, and why; a lab adds its own
# (``KernelSetup.sees``). Nothing else of the packages is there: not a lab's trusted
# training and reference code (the solution of every blank), nor the evaluation, so
# importing them fails.
KERNEL_SEES = (
    ("__init__.py", "the package that holds the runtime"),
    ("runtime", "the shims injected into every kernel, and this sandbox's launcher"),
)
TMP_BYTES = 512 * 1024 * 1024
SHM_BYTES = 1024 * 1024 * 1024
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap; "
                "Fedora: sudo dnf install bubblewrap) and allow unprivileged user namespaces")

_warning_lock = threading.Lock()
_warned = False


@dataclass(frozen=True)
class KernelPlace:
    """Everything that decides where and how one run's kernel is started."""

    work_dir: Path
    socket_dir: Path  # connection file and ipc sockets; the work dir unless its path is too long
    data_root: Path | None = None
    device: str = "cpu"
    sandboxed: bool = True
    user: tuple[int, int] | None = None  # (uid, gid) the kernel drops to; None: the grader's
    max_file_bytes: int | None = None  # RLIMIT_FSIZE: no file the kernel writes grows past it
    sees: tuple[Path, ...] = ()  # the lab's files the kernel sees (``KernelSetup.sees``)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def sandbox_available() -> bool:
    """Whether bubblewrap is installed and can create the namespaces we use (cached)."""
    bwrap = bwrap_path()
    if bwrap is None:
        return False
    probe = [bwrap, *_isolation_flags(), *_system_binds(), "--proc", "/proc", "--dev", "/dev",
             "true"]
    try:
        result = subprocess.run(probe, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if result.returncode != 0:
        log.debug("bwrap probe failed: %s", result.stderr.decode(errors="replace").strip())
    return result.returncode == 0


def warn_unsandboxed_once() -> None:
    """One loud warning per process that student code runs without isolation."""
    global _warned
    with _warning_lock:
        if _warned:
            return
        _warned = True
    log.warning("bubblewrap is not available here, so grading continues WITHOUT isolation: "
                "student notebooks run with your permissions, can read your files (the "
                "expected bundle and slimgrade's reference solution included), reach the "
                "network and start processes without limit; to sandbox them, %s.", INSTALL_HINT)


class UserLease:
    """A uid/gid of ``SANDBOX_ID_BASE``'s range that one kernel runs as; ``release`` it after.

    The lease is the lock on ``<lease dir>/<uid>``. A lock file rather than a hash of the
    run: a hash collides sooner or later, and gradings in other processes (``slimgrade
    batch`` workers, a second batch) could not see each other's choice; a held flock is
    exactly "in use", for every process on the machine, and ends with its holder.
    """

    def __init__(self, uid: int, handle: int, path: Path) -> None:
        self.uid = self.gid = uid
        self._handle: int | None = handle
        self._path = path

    @property
    def user(self) -> tuple[int, int]:
        return self.uid, self.gid

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            os.unlink(self._path)  # while still locked: see lease_user's inode check
        except OSError:
            pass
        os.close(self._handle)
        self._handle = None


def lease_user() -> UserLease | None:
    """A uid/gid no other kernel on the machine runs as, or None when the grader is not root.

    Only root can drop to another user; a grader that is not root runs its kernels as
    itself (Linux applies RLIMIT_NPROC to its user as a whole then).
    """
    if os.geteuid() != 0:
        return None
    folder = _lease_dir()
    start = secrets.randbelow(SANDBOX_ID_COUNT)
    for step in range(SANDBOX_ID_COUNT):
        uid = SANDBOX_ID_BASE + (start + step) % SANDBOX_ID_COUNT
        lease = _try_lease(folder, uid)
        if lease is not None:
            if _id_in_use(uid):  # not ours to give: a passwd entry, or a process runs as it
                lease.release()
                continue
            return lease
    raise RuntimeError(f"all {SANDBOX_ID_COUNT} sandbox user ids are in use")


def _lease_dir() -> Path:
    for folder in LEASE_DIRS:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(folder)
        except OSError:
            continue
        # Only a root-owned folder nobody else may write to holds the leases.
        if stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o022:
            return folder
    raise RuntimeError(f"no folder for sandbox user leases: {', '.join(map(str, LEASE_DIRS))}")


def _try_lease(folder: Path, uid: int) -> UserLease | None:
    path = folder / str(uid)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The file may have been released (unlinked) between our open and our lock: then
        # the lock is on a dead inode, and a new holder may own the name.
        if os.fstat(handle).st_ino != os.stat(path, follow_symlinks=False).st_ino:
            raise BlockingIOError
    except OSError:
        os.close(handle)
        return None
    return UserLease(uid, handle, path)


def _id_in_use(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    for process in psutil.process_iter(["uids"]):
        uids = process.info.get("uids")
        if uids is not None and uid in uids:
            return True
    return False


def hand_over(folder: Path, user: tuple[int, int] | None) -> None:
    """Give ``folder``, recursively, to ``user``, who the kernel runs as (nothing for None).

    The walk holds folder descriptors and never follows a link, so a kernel that turns a
    folder into a link while it runs cannot make root change the owner of a file outside.
    """
    if user is None:
        return
    uid, gid = user
    os.chown(folder, uid, gid, follow_symlinks=False)
    for _, dirs, files, root_fd in os.fwalk(folder, follow_symlinks=False):
        for name in dirs + files:
            try:
                os.chown(name, uid, gid, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue


def package_dirs(sees: tuple[Path, ...] = ()) -> list[Path]:
    """The folders of the packages the kernel imports from (only ``kernel_files`` of them):
    the harness's and the top-level package of each file a lab shows."""
    folders = [Path(grader.__file__).resolve().parent]
    for path in sees:
        top = path.resolve().parent
        while (top.parent / "__init__.py").is_file():
            top = top.parent
        if top not in folders:
            folders.append(top)
    return folders


def kernel_files(sees: tuple[Path, ...] = ()) -> list[Path]:
    """The files and folders of ``KERNEL_SEES``, and the lab's."""
    harness = Path(grader.__file__).resolve().parent
    return [*(harness / relative for relative, _ in KERNEL_SEES), *(p.resolve() for p in sees)]


def tmpfs_mounts() -> dict[str, int]:
    """The sandbox's private tmpfs mounts and their sizes (the memory watch counts their pages)."""
    return {"/dev/shm": SHM_BYTES, "/tmp": TMP_BYTES}


def python_roots() -> list[Path]:
    """The Python installation: the interpreter's prefix and the virtual environment."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
             Path(os.path.realpath(sys.executable)).parent.parent}
    return sorted(root for root in roots if not _inside(root, Path("/usr")))


def bwrap_command(place: KernelPlace, command: list[str]) -> list[str]:
    """The bwrap command line that runs ``command`` inside the sandbox of ``place``."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise RuntimeError(f"bwrap is not installed: {INSTALL_HINT}")
    args = [bwrap, *_isolation_flags(), *_system_binds(), "--proc", "/proc", "--dev", "/dev"]
    for mount, size in tmpfs_mounts().items():
        args += ["--perms", "1777", "--size", str(size), "--tmpfs", mount]
    binds = _Binds(args)
    for root in python_roots():
        binds.add("--ro-bind", root)
    # Each package folder is an empty read-only tmpfs holding only what KERNEL_SEES names;
    # it hides the rest of the package even when it lies in a bound python root (a
    # non-editable install has it in site-packages).
    for folder in package_dirs(place.sees):
        binds.mask(folder)
    for path in kernel_files(place.sees):
        binds.add("--ro-bind", path)
    for folder in package_dirs(place.sees):
        args += ["--remount-ro", str(folder)]
    if place.device.startswith("cuda"):
        for device in sorted(Path("/dev").glob("nvidia*")):
            args += ["--dev-bind", str(device), str(device)]
    work_dir = place.work_dir.resolve()
    binds.add("--bind", work_dir)
    socket_dir = place.socket_dir.resolve()
    if not _inside(socket_dir, work_dir):
        binds.add("--bind", socket_dir)
    if place.data_root is not None:
        binds.add("--ro-bind", place.data_root.resolve())
    launcher = [sys.executable, "-m", "grader.runtime.launch",
                "--max-processes", str(MAX_PROCESSES)]
    if place.max_file_bytes is not None:
        launcher += ["--max-file-bytes", str(place.max_file_bytes)]
    if place.user is not None:
        launcher += ["--user", f"{place.user[0]}:{place.user[1]}"]
    # ipykernel stops when its parent looks like init, and bwrap is pid 1 of the sandbox;
    # --die-with-parent ties the kernel to the grader instead.
    args += ["--unsetenv", "JPY_PARENT_PID", "--chdir", str(work_dir)]
    return [*args, "--", *launcher, "--", *command]


class _Binds:
    """Appends bind mounts to a bwrap command line, creating their parent folders first.

    bwrap creates missing parents with mode 0700, which a kernel that dropped root could
    not traverse; folders made here are 0755 (they hold nothing but the mount points).
    """

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.host_folders = [Path("/usr"), Path("/etc")]  # already there, from the host
        self.created: set[Path] = {Path("/"), Path("/tmp"), Path("/dev"), Path("/proc")}
        self.masked: list[Path] = []  # empty tmpfs mounts: a folder inside one must be made

    def add(self, kind: str, path: Path) -> None:
        self._parents(path)
        self.args += [kind, str(path), str(path)]
        self.host_folders.append(path)

    def _parents(self, path: Path) -> None:
        for parent in reversed(path.parents):
            if parent in self.created or (any(_inside(parent, f) for f in self.host_folders)
                                          and not any(_inside(parent, m) for m in self.masked)):
                continue
            self.args += ["--perms", "0755", "--dir", str(parent)]
            self.created.add(parent)

    def mask(self, folder: Path) -> None:
        """An empty tmpfs at ``folder`` (made read-only later with --remount-ro)."""
        self._parents(folder)
        self.args += ["--perms", "0755", "--tmpfs", str(folder)]
        self.created.add(folder)
        self.masked.append(folder)


def _isolation_flags() -> list[str]:
    return ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            args += ["--ro-bind", name, name]
    return args


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class StudentKernelManager(AsyncKernelManager):
    """An ipykernel on the grader's own interpreter, reached over ipc sockets, maybe sandboxed.

    The kernel always runs ``sys.executable``, whatever kernelspec a notebook names,
    because the runtime shims import torch and the grader's packages from it.
    """

    def __init__(self, place: KernelPlace, **kwargs: object) -> None:
        super().__init__(kernel_name="python3", transport="ipc",
                         ip=str(place.socket_dir / "kernel"),
                         connection_file=str(place.socket_dir / "kernel.json"), **kwargs)
        self.place = place

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        command = [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file,
                   *(extra_arguments or [])]
        return bwrap_command(self.place, command) if self.place.sandboxed else command

    def write_connection_file(self, **kwargs: object) -> None:
        super().write_connection_file(**kwargs)
        if self.place.sandboxed and self.place.user is not None:
            os.chown(self.connection_file, *self.place.user)

    async def interrupt_kernel(self) -> None:
        """SIGINT straight to the kernel: bwrap neither forwards it nor shares the process group."""
        if not self.place.sandboxed:
            await super().interrupt_kernel()
            return
        kernel = kernel_process(self)
        if kernel is not None:
            try:
                kernel.send_signal(signal.SIGINT)
            except psutil.Error:
                pass


def launched_process(km: AsyncKernelManager) -> psutil.Process | None:
    """The process the kernel manager started (bwrap when sandboxed), if still there."""
    pid = getattr(km.provisioner, "pid", None)
    if pid is None:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def kernel_process(km: AsyncKernelManager) -> psutil.Process | None:
    """The ipykernel process: the launched process, or its shallowest ipykernel descendant."""
    level = [p for p in [launched_process(km)] if p is not None]
    while level:
        following: list[psutil.Process] = []
        for process in level:
            try:
                if process.cmdline()[1:3] == ["-m", "ipykernel_launcher"]:
                    return process
                following += process.children()
            except psutil.Error:
                continue
        level = following
    return None
