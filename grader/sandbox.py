"""Where a student's kernel runs: inside bubblewrap when it works here, in the open otherwise.

Inside the sandbox the kernel sees, read-only: the system (/usr, /bin, /lib*, /etc),
the Python installation (``sys.base_prefix`` and ``sys.prefix``), the ``grader`` and
``reference`` package folders (not the rest of the repository) and the data root;
read-write: its own work dir (and the folder of its ZMQ sockets). It gets fresh /proc,
/dev, a size-capped private /tmp and /dev/shm, no network (its own empty network
namespace, so the client talks to it over ipc sockets in a shared folder), its own
pid namespace and session, and dies with the grader. Everything else is simply
absent: the user's home and caches (where the expected bundle lives), other
submissions' work dirs, the output folder.

Processes are capped with RLIMIT_NPROC, set by ``grader.runtime.launch`` inside the
sandbox. Linux never enforces that limit on root, so when the grader runs as root the
launcher also drops to the unprivileged user ``nobody`` and the work dir is handed to
that user; dropping root also sheds its capabilities, without which a kernel could
mount file systems or create device nodes and see past the sandbox.
Memory is watched from outside by the executor (``grader.execute``).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
from jupyter_client.manager import AsyncKernelManager

import grader
import reference

log = logging.getLogger(__name__)

# The uid/gid of "nobody" on Linux distributions; used only when the grader is root.
UNPRIVILEGED_ID = 65534
# Tasks (processes and threads) the kernel may own: a kernel with torch and a few
# DataLoader workers stays under 60, a fork bomb does not. When the grader is root,
# all sandboxed kernels share the user "nobody" and so this one budget.
MAX_PROCESSES = 1024
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
                "student notebooks run with your permissions, can read your files and reach "
                "the network; to sandbox them, %s.", INSTALL_HINT)


def sandbox_user() -> tuple[int, int] | None:
    """The (uid, gid) the sandboxed kernel drops to: only when the grader is root."""
    return (UNPRIVILEGED_ID, UNPRIVILEGED_ID) if os.geteuid() == 0 else None


def hand_over(folder: Path) -> None:
    """Give ``folder``, recursively, to the sandbox user, who the kernel runs as after root."""
    user = sandbox_user()
    if user is None:
        return
    uid, gid = user
    os.chown(folder, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def package_dirs() -> list[Path]:
    """The folders of the packages the kernel imports from the repository."""
    return [Path(grader.__file__).resolve().parent, Path(reference.__file__).resolve().parent]


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
    args = [bwrap, *_isolation_flags(), *_system_binds(),
            "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
    binds = _Binds(args)
    for root in [*python_roots(), *package_dirs()]:
        binds.add("--ro-bind", root)
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
    user = sandbox_user()
    if user is not None:
        launcher += ["--user", f"{user[0]}:{user[1]}"]
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

    def add(self, kind: str, path: Path) -> None:
        for parent in reversed(path.parents):
            if parent in self.created or any(_inside(parent, f) for f in self.host_folders):
                continue
            self.args += ["--perms", "0755", "--dir", str(parent)]
            self.created.add(parent)
        self.args += [kind, str(path), str(path)]
        self.host_folders.append(path)


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
        user = sandbox_user() if self.place.sandboxed else None
        if user is not None:
            os.chown(self.connection_file, *user)

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
