"""A class graded on a Dask cluster: ``slimgrade batch DIR --out OUT --scheduler ADDRESS``,
or ``--cluster slurm --jobs N`` (a cluster started through dask-jobqueue for the batch).

Only the grading moves: the class folder, the output folder, the gradebook, hand grades,
the summary and resuming stay with the batch on the TA's machine (``batch.grade_class``,
given a ``ClusterScheduler`` instead of its local pool). No filesystem is assumed shared:

* **One hand-in, one Dask task** (``run_on_worker``). The client sends the hand-in as bytes
  (a folder as a tar of what ``prepare.copy_folder`` keeps of it, a .zip as it is); the task
  runs the grading on the worker in a process of its own, exactly as a local batch does
  (``batch.Task`` and ``batch.run_task``: the partial folder, the deadline, SIGTERM, the
  grading process following its parent), and returns the committed folder (result.json,
  report.html, notebooks/) as the bytes of a zip. The client writes it into
  ``OUT/<id>.partial-<random>/`` and renames it to ``OUT/<id>/`` (``batch.commit``), so a
  killed client loses nothing that finished and a rerun grades only what is missing.
* **The expected bundle reaches every worker once, checked by its hash** (``Shipment``, a
  worker plugin: the scheduler hands it to every worker that joins, restarted ones and late
  Slurm jobs included). The worker unpacks it into its cache (``--cache`` when given, else
  its own ``~/.cache/slimgrade``) with ``grader.bundles.unpack_bundle``, which checks the
  hash; a cache on a shared filesystem that already holds ``bundle-<hash>`` is used as it
  is. A lab's data folder (``Lab.data_folder``: the full profile's CIFAR-10) travels the same way
  (``data-<hash>``).
* **Resources.** With ``--device cuda`` (or ``--gpus-per-job`` above 0) each grading asks
  for ``GPU=1``, so Dask never runs two gradings on one GPU; on the worker it gets one GPU
  of its own (``CUDA_VISIBLE_DEVICES``). Notebook runs at once per grading and torch
  threads follow the worker's cores: ``SLIMGRADE_WORKER_CORES`` (set in the Slurm job
  script; give it when several workers share a machine), else the CPUs this process may
  use, divided among the worker's threads.
* **Faults.** A grading that raises, or whose process dies, is a result as in the local
  batch (failure ``exception`` or ``timeout``). A worker that dies under a grading makes
  Dask run it again on another worker; after ``distributed.scheduler.allowed-failures``
  + 1 dead workers (``ALLOWED_FAILURES`` for the clusters slimgrade starts) the hand-in is
  a failure of kind ``worker-lost``. A task that fails for a reason of the cluster's own
  (``retries`` more tries) is not the student's: nothing is recorded and the batch says
  which hand-ins to grade again, as the local batch does for a process that cannot start.
* **Stopping.** Ctrl-C or SIGTERM cancels the gradings still running; a worker notices
  its task was cancelled (or that the client disconnected) and stops the grading process.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import math
import os
import pickle
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import dask
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from grader import batch, machine
from grader.machine import RUNS_AT_ONCE, WORKER_CORES_ENV
from grader.prepare import PrepareError, copy_folder
from grader.progress import Progress
from grader.score import load_rubric
from grader.untrusted import remove_tree

WORKER_LOST = batch.WORKER_LOST_KIND
# A grading is tried on at most ALLOWED_FAILURES + 1 workers that die under it (the
# scheduler's setting; it applies to the clusters slimgrade starts, and an existing
# scheduler's own setting, 3 by default, holds for --scheduler).
ALLOWED_FAILURES = 2
RETRIES = 1  # a task that raised for a reason of its own (not the grading's) runs once more
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CONNECT_TIMEOUT_S = 30
POLL_S = 0.5
KEEP_UP_S = 60.0  # how often a Slurm cluster's ended jobs are submitted again
# A Slurm job: cores and memory per grading slot (one per GPU, or one per CPU job).
CORES_PER_SLOT = 4
WALLTIME = {"quick": "02:00:00", "full": "48:00:00"}


class ClusterError(batch.BatchError):
    """The cluster cannot be used (unreachable scheduler, bad option); one sentence."""


# ---------------------------------------------------------------- where the gradings run

@dataclass
class ClusterSpec:
    """``--scheduler``, or ``--cluster slurm`` and its job shape; or an open ``client``."""

    scheduler: str | None = None
    cluster: str | None = None
    jobs: int = 1
    gpus_per_job: int = 0
    partition: str | None = None
    walltime: str | None = None
    cores_per_job: int | None = None
    memory_per_job: str | None = None
    client: Client | None = None  # already connected (tests, bench); never closed here
    slurm_options: dict = field(default_factory=dict)  # more SLURMCluster arguments


def wants_gpu(device: str | None, gpus_per_job: int = 0) -> bool:
    return gpus_per_job > 0 or (device or "").startswith("cuda")


def task_resources(device: str | None, gpus_per_job: int = 0) -> dict | None:
    """What one grading asks of a worker: a GPU of its own when it runs on GPUs."""
    return {"GPU": 1} if wants_gpu(device, gpus_per_job) else None


def memory_per_slot_gb(profile) -> int:
    """Two notebook runs at once, each within the profile's memory limit, and the grading."""
    return math.ceil((2 * profile.memory_limit_mb + 4096) / 1024)


def slurm_cluster(spec: ClusterSpec, profile, device: str | None = None):
    """The dask_jobqueue.SLURMCluster of ``--cluster slurm`` (no job submitted yet).

    One worker process per job with one thread per grading slot: a slot per GPU
    (``--gres=gpu:G``, worker resource ``GPU=G``) or one slot in a CPU job. Anything
    else (account, QOS, python, interface, modules) comes from the TA's
    ``~/.config/dask/jobqueue.yaml``, as dask-jobqueue reads it.
    """
    from dask_jobqueue import SLURMCluster

    gpus = max(0, spec.gpus_per_job)
    if wants_gpu(device) and gpus == 0:
        gpus = 1
    slots = max(1, gpus)
    cores = spec.cores_per_job or CORES_PER_SLOT * slots
    memory = spec.memory_per_job or f"{memory_per_slot_gb(profile) * slots}GB"
    options = dict(
        cores=slots, processes=1, job_cpu=cores, memory=memory, job_name="slimgrade",
        queue=spec.partition, walltime=spec.walltime or WALLTIME.get(profile.name, "24:00:00"),
        job_extra_directives=[f"--gres=gpu:{gpus}"] if gpus else [],
        worker_extra_args=["--resources", f"GPU={gpus}"] if gpus else [],
        job_script_prologue=[f"export {WORKER_CORES_ENV}={cores}"],
        scheduler_options={"dashboard_address": ":8787"},
    )
    options.update(spec.slurm_options)
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        return SLURMCluster(**options)


def local_cluster(n_workers: int = 2, cores: int | None = None, **options):
    """A distributed.LocalCluster on loopback, one grading per worker process, the machine's
    cores shared among the workers (the tests and bench/batch.py use it)."""
    from distributed import LocalCluster

    cores = cores or machine.cores()
    settings = dict(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=":0",
                    env={WORKER_CORES_ENV: str(max(1, cores // n_workers))})
    settings.update(options)
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        return LocalCluster(**settings)


class Connection:
    """A client to the cluster, opened when there is something to grade; what slimgrade
    started (a Slurm cluster) is closed with it."""

    def __init__(self, spec: ClusterSpec, profile, device: str | None):
        self.spec, self.profile, self.device = spec, profile, device
        self.client: Client | None = None
        self.cluster = None
        self.where = ""
        self.jobs = 0

    def keep_up(self) -> None:
        """Submit a job again for each that ended (its walltime, a node lost): the cluster's
        worker specs still hold it, and scaling to the same number re-creates the missing."""
        if self.cluster is not None and self.jobs:
            self.cluster.scale(jobs=self.jobs)

    def open(self, pending: int) -> Client:
        spec = self.spec
        if spec.client is not None:
            self.client, self.where = spec.client, f"the Dask cluster at {spec.client.scheduler.address}"
        elif spec.scheduler:
            try:
                self.client = Client(spec.scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as error:
                raise ClusterError(
                    f"cannot reach the Dask scheduler at {spec.scheduler} ({error}): start one "
                    "with 'dask scheduler' (and workers with 'dask worker ADDRESS'), or check "
                    "the address.") from None
            self.where = f"the Dask cluster at {spec.scheduler}"
        elif spec.cluster == "slurm":
            self.cluster = slurm_cluster(spec, self.profile, self.device)
            self.jobs = jobs = max(1, min(spec.jobs, pending))
            self.cluster.scale(jobs=jobs)
            self.client = Client(self.cluster)
            self.where = (f"a Slurm cluster of {jobs} job(s) (scheduler "
                          f"{self.cluster.scheduler_address}; workers join as the jobs start)")
        else:
            raise ClusterError("give --scheduler ADDRESS or --cluster slurm.")
        return self.client

    def close(self) -> None:
        if self.spec.client is None and self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()  # cancels the Slurm jobs
        self.client = self.cluster = None


def grade_class_on_cluster(class_dir: Path, out: Path, profile, spec: ClusterSpec, **options
                           ) -> list[dict]:
    """``batch.grade_class`` with its gradings on a Dask cluster; the same rows and files.

    ``options`` are grade_class's (data_root, device, force, only, exclude, rubric_path,
    cache_root, run_cache, stream, bundle; ``workers`` is the local pool's and not used).
    """
    options.pop("workers", None)
    connection = Connection(spec, profile, options.get("device"))

    def runner(book, pending, profile, **kwargs):
        return ClusterScheduler(book, pending, profile, connection=connection,
                                gpus_per_job=spec.gpus_per_job, **kwargs)

    return batch.grade_class(class_dir, out, profile, runner=runner, **options)


# ---------------------------------------------------------------- what travels

def pack_tree(folder: Path, prefix: str = "") -> bytes:
    """A tar (uncompressed) of the plain files and folders of ``folder``; links refused."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(Path(folder).rglob("*")):
            name = str(PurePosixPath(prefix, path.relative_to(folder).as_posix())) if prefix \
                else path.relative_to(folder).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ClusterError(f"{path} is a link or a special file: only plain files "
                                   "are sent to the workers.")
            tar.add(path, arcname=name, recursive=False)
    return buffer.getvalue()


def unpack_tree(data: bytes, target: Path) -> None:
    """Unpack ``pack_tree``'s bytes into ``target`` (tarfile's "data" filter: no absolute
    path, no ``..``, no link out of it, no device)."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(target, filter="data")


def hand_in_bytes(path: Path, skipped: tuple[str, ...] = ()) -> tuple[bool, bytes]:
    """(is a folder, bytes) of a hand-in: a .zip as it is; a folder as a tar of what the
    grading's own copy keeps (``prepare.copy_folder``: plain files and folders, no link,
    FIFO, checkpoint or data, within its bounds; PrepareError past them, as when grading)."""
    path = Path(path)
    if not path.is_dir():
        return False, path.read_bytes()
    staging = Path(tempfile.mkdtemp(prefix="slimgrade-send-"))
    try:
        copy = staging / "copy"
        copy.mkdir()
        for label in copy_folder(path, copy, skipped):  # folders too deep: the worker refuses them too
            if not label.endswith("…"):
                (copy / label.rstrip("/")).mkdir(parents=True, exist_ok=True)
        return True, pack_tree(copy)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def unzip_result(data: bytes, target: Path) -> None:
    """A worker's result folder into ``target``: plain files at relative paths only."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir():
                continue
            if name.is_absolute() or ".." in name.parts or not name.parts:
                raise ValueError(f"a result archive holds {info.filename!r}")
            destination = target.joinpath(*name.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)
    if not (target / batch.RESULT).is_file():
        raise ValueError(f"the worker sent no {batch.RESULT}")


# ---------------------------------------------------------------- the bundle and data on workers

class Shipment(WorkerPlugin):
    """A folder every worker gets once, by its content hash: the expected bundle
    (``kind`` "bundle") or the lab's data folder (``kind`` "data", ``Lab.data_folder``).

    ``setup`` (when the worker joins) unpacks it into the worker's cache and checks the
    hash; a cache that already holds the folder (a shared ``--cache``, an earlier batch)
    is used as it is. The archive's bytes are dropped once the folder is in place.
    """

    idempotent = True

    def __init__(self, kind: str, digest: str, archive: bytes, cache_root: str | None,
                 folder_name: str | None = None):
        self.kind, self.digest, self.archive, self.cache_root = kind, digest, archive, cache_root
        self.folder_name = folder_name  # the data's folder, as the lab's reader looks for it
        self.folder: Path | None = None
        self.error: str | None = None
        self.lock = None

    @property
    def name(self) -> str:
        return shipment_name(self.kind, self.digest, self.cache_root)

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = None

    async def setup(self, worker) -> None:
        self.lock = threading.Lock()
        fallback = Path(worker.local_directory) / "slimgrade-cache"
        await asyncio.get_running_loop().run_in_executor(None, self.place, fallback)

    def place(self, fallback: Path | None = None) -> Path:
        """The folder on this worker, unpacked and checked (once); raises when it cannot be."""
        if self.lock is None:
            self.lock = threading.Lock()
        with self.lock:
            if self.folder is None and self.archive is not None:
                roots = [Path(self.cache_root) if self.cache_root else None]
                if fallback is not None:
                    roots.append(fallback)
                errors = []
                for root in roots:
                    try:
                        self.folder = (place_bundle(self.archive, self.digest, root)
                                       if self.kind == "bundle" else
                                       place_data(self.archive, self.digest, root, self.folder_name))
                        self.error, self.archive = None, None
                        break
                    except Exception as error:  # noqa: BLE001 - said by the task that needs it
                        errors.append(f"{type(error).__name__}: {error}")
                        self.error = "; ".join(errors)
            if self.folder is None:
                raise RuntimeError(f"the {self.kind} {self.digest[:12]} is not on worker "
                                   f"{socket.gethostname()}: {self.error or 'it never arrived'}")
            return self.folder


def shipment_name(kind: str, digest: str, cache_root: str | None) -> str:
    """The plugin's name: the same folder for the same cache (a rerun sends nothing again)."""
    where = "" if cache_root is None else "-" + hashlib.sha256(cache_root.encode()).hexdigest()[:8]
    return f"slimgrade-{kind}-{digest[:16]}{where}"


def place_bundle(archive: bytes, digest: str, root: Path | None) -> Path:
    """``bundle-<digest>`` under ``root`` (default: the worker's bundle cache), checked."""
    from grader.bundles import BundleError, default_cache_root, unpack_bundle, verify_bundle

    root = Path(root) if root is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"bundle-{digest}"
    if target.is_dir():
        try:
            if verify_bundle(target) == digest:
                return target
        except BundleError:
            pass
        raise BundleError(f"{target} does not match its hash: remove it, the next batch "
                          "unpacks the bundle again.")
    sent = root / f".sent-{secrets.token_hex(6)}.tar"
    try:
        sent.write_bytes(archive)
        folder = unpack_bundle(sent, root)
    finally:
        sent.unlink(missing_ok=True)
    if verify_bundle(folder) != digest:
        raise BundleError(f"the bundle sent to this worker hashes to {verify_bundle(folder)[:16]}"
                          f"..., not {digest[:16]}...")
    return folder


def place_data(archive: bytes, digest: str, root: Path | None, name: str) -> Path:
    """``data-<digest>`` (holding the lab's data folder ``name``) under ``root``, checked."""
    from grader.bundles import content_hash, default_cache_root

    root = Path(root) if root is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"data-{digest}"
    if target.is_dir() and content_hash(target / name) == digest:
        return target
    staging = root / f".data-{secrets.token_hex(6)}"
    try:
        unpack_tree(archive, staging)
        found = content_hash(staging / name)
        if found != digest:
            raise ValueError(f"the data sent to this worker hashes to {found[:16]}..., not "
                             f"{digest[:16]}...")
        try:
            os.rename(staging, target)
        except OSError:  # placed meanwhile by another worker of this machine
            if content_hash(target / name) != digest:
                raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- one grading, on a worker

@dataclass(frozen=True, repr=False)
class Job:
    """What a task needs to grade one hand-in on a worker that shares no file with us."""

    sid: str
    name: str  # the hand-in's name as handed in (the grading names the submission after it)
    is_folder: bool
    payload: bytes
    profile: object
    device: str | None
    gpu: bool
    rubric: str | None  # the rubric file's text (--rubric), None for the course's
    cache_root: str | None
    run_cache: str | None
    bundle: tuple[str, str, str]  # hash, profile, source: as the client resolved it
    bundle_plugin: str
    data_plugin: str | None
    grade_function: object
    lab: str | None = None  # the lab's name (grader.lab.get_lab)

    def __repr__(self) -> str:  # Dask logs a failed task with its arguments: not the bytes
        return f"Job({self.sid!r}, {len(self.payload)} bytes)"


_gpu_lock = threading.Lock()
_gpus_taken: list[str] = []


def worker_cores(nthreads: int) -> int:
    """Cores one grading of this worker may use: the worker's (grader.machine.cores:
    SLIMGRADE_WORKER_CORES or the CPUs this process may run on) shared among its
    ``nthreads`` grading slots."""
    return max(1, machine.cores() // max(1, nthreads))


def take_gpu() -> str | None:
    """A GPU of this worker for one grading (CUDA_VISIBLE_DEVICES), the least taken one."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = [part.strip() for part in listed.split(",") if part.strip()]
    else:
        from grader.schedule import visible_gpus

        gpus = visible_gpus()
    if not gpus:
        return None
    with _gpu_lock:
        gpu = min(gpus, key=lambda g: (_gpus_taken.count(g), gpus.index(g)))
        _gpus_taken.append(gpu)
    return gpu


def give_back_gpu(gpu: str | None) -> None:
    if gpu is not None:
        with _gpu_lock:
            _gpus_taken.remove(gpu)


class GradingNotStarted(RuntimeError):
    """The grading process ended before it made its partial folder: a problem of the
    worker, not of the hand-in (as the local batch's 'ended before grading started')."""


def _plugin(worker, name: str) -> Shipment:
    plugin = worker.plugins.get(name) if worker is not None else None
    if plugin is None:
        raise RuntimeError(f"{name} did not reach worker {getattr(worker, 'address', '?')}")
    return plugin


def run_on_worker(job: Job) -> dict | None:
    """Grade one hand-in on this worker; its committed folder as the bytes of a zip.

    None when the task was cancelled meanwhile (the batch stopped, or its client is gone):
    the grading process is stopped and nothing is sent.
    """
    from distributed import get_worker
    from grader.bundles import Bundle

    worker = get_worker()
    key = worker.get_current_task()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="slimgrade-d"))
    scratch = Path(tempfile.mkdtemp(prefix="slimgrade-b"))  # short: the kernels' sockets go there
    fallback = Path(worker.local_directory) / "slimgrade-cache"
    gpu = None
    try:
        bundle = Bundle(_plugin(worker, job.bundle_plugin).place(fallback), *job.bundle)
        data_root = _plugin(worker, job.data_plugin).place(fallback) if job.data_plugin else None
        source = root / "in" / job.name
        if job.is_folder:
            unpack_tree(job.payload, source)
        else:
            source.parent.mkdir(parents=True)
            source.write_bytes(job.payload)
        rubric_path = None
        if job.rubric is not None:
            rubric_path = root / "rubric.json"
            rubric_path.write_text(job.rubric, encoding="utf-8")
        cores = worker_cores(worker.state.nthreads)
        grade_workers = max(1, min(RUNS_AT_ONCE, cores))
        threads = max(1, cores // grade_workers)
        if job.gpu and job.device in (None, "cuda"):
            gpu = take_gpu()
        out = root / "out"
        out.mkdir()
        task = batch.Task(sid=job.sid, source=source, out=out,
                          partial=batch._partial_path(out, job.sid), profile=job.profile,
                          data_root=data_root, device=job.device, visible_gpus=gpu,
                          grade_workers=grade_workers, threads=threads, rubric_path=rubric_path,
                          cache_root=Path(job.cache_root) if job.cache_root else None,
                          run_cache=Path(job.run_cache) if job.run_cache else None,
                          parent_pid=os.getpid(), grade_function=job.grade_function,
                          scratch=scratch, bundle=bundle, lab=job.lab)
        limit_s = batch.grading_deadline_s(job.profile, grade_workers, job.lab)
        exitcode, why = grade_in_process(task, limit_s, lambda: cancelled(worker, key),
                                         root / "task.pickle")
        if why == "cancelled":
            return None
        folder = settle(task, exitcode, why == "deadline", limit_s)
        return {"sid": job.sid, "zip": zip_folder(folder), "worker": worker.address,
                "host": socket.gethostname(), "wall_s": time.monotonic() - started}
    finally:
        give_back_gpu(gpu)
        remove_tree(root)
        remove_tree(scratch)  # the work root of a grading that was killed (kernels' folders)


def cancelled(worker, key) -> bool:
    """Whether the scheduler no longer wants this task (cancelled, or its client left)."""
    state = worker.state.tasks.get(key)
    return state is None or state.state in ("cancelled", "released", "forgotten")


# The grading process: batch.run_task in a fresh interpreter. Not a multiprocessing child:
# a Dask worker is often a daemonic process, which multiprocessing forbids to have children.
GRADING_PROCESS = """import pickle, sys
from grader.batch import run_task
with open(sys.argv[1], "rb") as handle:
    task = pickle.load(handle)
run_task(task)
"""


def grade_in_process(task: batch.Task, limit_s: float, stop, task_file: Path
                     ) -> tuple[int | None, str]:
    """Run ``batch.run_task`` in a process of its own until it ends; (exit code, why it was
    stopped: "" when it ended by itself, "deadline" past ``limit_s``, "cancelled")."""
    with open(task_file, "wb") as handle:
        pickle.dump(task, handle)
    env = {**os.environ, **{name: str(task.threads) for name in THREAD_VARIABLES},
           # what a spawned child gets: this process's import path (the grade function's module)
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # The nanny sets glibc's trim threshold low for the worker's own memory; in the grading
    # (torch evaluating checkpoints) it returns pages to the kernel at every free.
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    process = subprocess.Popen([sys.executable, "-c", GRADING_PROCESS, str(task_file)], env=env,
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + limit_s
    why, stopped_at = "", None
    try:
        while True:
            try:
                return process.wait(POLL_S), why
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if stopped_at is None:
                if now > deadline:
                    why = "deadline"
                elif stop():
                    why = "cancelled"
                if why:
                    stopped_at = now
                    process.terminate()  # it kills its kernels and removes its work root
            elif now > stopped_at + batch.STOP_GRACE_S:
                process.kill()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def settle(task: batch.Task, exitcode: int | None, past_deadline: bool, limit_s: float) -> Path:
    """The grading's committed folder: as ``batch._Scheduler._finished`` decides locally, a
    grading that died or ran past its deadline is recorded as that hand-in's failure."""
    final = task.out / task.sid
    if batch.is_finished(task.out, task.sid) and (exitcode == 0 or not task.partial.exists()):
        return final
    if not task.partial.exists():
        raise GradingNotStarted(f"the grading process ended before grading started "
                                f"({batch._exit_description(exitcode)}) on {socket.gethostname()}")
    profile_name = getattr(task.profile, "name", str(task.profile))
    rubric = load_rubric(task.rubric_path, task.lab)
    fields = batch.bundle_fields(task.bundle)
    if past_deadline:
        batch.record_failure(task.partial, task.sid, profile_name, rubric,
                             f"The grading took longer than {limit_s:.0f} s, the limit for one "
                             "submission under this profile, and was stopped.", "", limit_s,
                             kind=batch.TIMEOUT_KIND, bundle=fields, lab=task.lab)
    else:
        batch.record_failure(task.partial, task.sid, profile_name, rubric,
                             "The grading process ended unexpectedly "
                             f"({batch._exit_description(exitcode)}).", "", 0.0, bundle=fields,
                             lab=task.lab)
    batch.commit(task.partial, final)
    return final


# ---------------------------------------------------------------- the client's side

def worker_lost_message(tries: int) -> str:
    return (f"The grading was lost with the Dask worker running it, {tries} times on "
            f"{'different workers' if tries > 1 else 'a worker'} (the hand-in may use more memory "
            "than a worker has, or bring its machine down), so it was not tried again.")


class ClusterScheduler:
    """Hand-ins out to the cluster, results back into OUT as each grading ends.

    Built by ``batch.grade_class`` (its ``runner``) with the arguments of the local pool.
    """

    def __init__(self, book: batch.Gradebook, pending: list[batch.Entry], profile, *,
                 connection: Connection, gpus_per_job: int = 0, workers: int = 1,
                 data_root=None, device=None, rubric_path=None, cache_root=None,
                 run_cache=None, stream=None, bundle=None, lab: str | None = None):
        self.book, self.queue, self.profile, self.lab = book, list(pending), profile, lab
        self.connection, self.stream, self.device = connection, stream, device
        self.gpu, self.gpus_per_job = wants_gpu(device, gpus_per_job), gpus_per_job
        self.data_root = Path(data_root).resolve() if data_root else None
        self.rubric = Path(rubric_path).read_text(encoding="utf-8") if rubric_path else None
        self.cache_root = str(Path(cache_root).resolve()) if cache_root else None
        self.run_cache = str(Path(run_cache).resolve()) if run_cache else None
        self.bundle = bundle
        self.stop = threading.Event()
        self.finished: queue.Queue = queue.Queue()
        self.running: dict[str, tuple[batch.Entry, object]] = {}  # future key -> entry, future
        self.unrecorded: list[str] = []

    # -- the run

    def run(self) -> None:
        previous = self._catch_signals()
        bar = None
        try:
            client = self.connection.open(len(self.queue))
            bar = Progress("batch", len(self.queue), "hand-in", self.stream, announce=(
                f"grading {len(self.queue)} hand-in(s) on {self.connection.where}, into "
                f"{self.book.out}; dashboard: {self._dashboard(client)}"))
            plugins = self._ship(client, bar)
            self._say_workers(client, bar)
            kept_up = time.monotonic()
            while (self.queue or self.running) and not self.stop.is_set():
                if time.monotonic() > kept_up + KEEP_UP_S:
                    self.connection.keep_up()
                    kept_up = time.monotonic()
                while self.queue and len(self.running) < self._window(client) \
                        and not self.stop.is_set():
                    self._submit(client, self.queue.pop(0), plugins, bar)
                try:
                    future = self.finished.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                entry, _ = self.running.pop(future.key, (None, None))
                if entry is not None:
                    bar.step(self._finished(entry, future))
            while self.stop.is_set() and not self.finished.empty():  # done before the stop: kept
                future = self.finished.get()
                entry, _ = self.running.pop(future.key, (None, None))
                if entry is not None and future.status == "finished":
                    bar.step(self._finished(entry, future))
        finally:
            for _, future in self.running.values():
                future.cancel()
            self.running.clear()
            if bar is not None:
                bar.close()
            self.connection.close()
            self._restore_signals(previous)
            self.book.write()
        if self.stop.is_set():
            raise KeyboardInterrupt
        if self.unrecorded:
            raise RuntimeError(
                f"{len(self.unrecorded)} grading(s) could not run on the cluster "
                f"({'; '.join(self.unrecorded[:3])}{'; ...' if len(self.unrecorded) > 3 else ''}); "
                "nothing was recorded for them: see the messages above and run the batch again.")

    def _dashboard(self, client: Client) -> str:
        try:
            if "dashboard" in client.scheduler_info()["services"]:
                return client.dashboard_link
        except Exception:  # noqa: BLE001 - only a line of progress
            pass
        return "none (the scheduler serves none)"

    def _ship(self, client: Client, bar: Progress) -> dict[str, str | None]:
        """Register the bundle (and data) plugins: every worker, now or later, gets them."""
        from grader.bundles import content_hash

        shipments = [Shipment("bundle", self.bundle.hash, pack_tree(self.bundle.path),
                              self.cache_root)]
        data = (batch.get_lab(self.lab).data_folder(self.profile, self.data_root)
                if self.data_root is not None else None)
        if data is not None:
            shipments.append(Shipment("data", content_hash(data), pack_tree(data, data.name),
                                      self.cache_root, data.name))
        names: dict[str, str | None] = {"bundle": None, "data": None}
        for shipment in shipments:
            answers = client.register_plugin(shipment, name=shipment.name) or {}
            names[shipment.kind] = shipment.name
            failed = [w for w, a in answers.items() if isinstance(a, dict) and a.get("status") != "OK"]
            if failed:
                bar.note(f"the {shipment.kind} could not be placed on {len(failed)} worker(s) "
                         f"({', '.join(failed[:3])}): gradings there will fail and run elsewhere.")
        return names

    def _say_workers(self, client: Client, bar: Progress) -> None:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        if self.gpu and workers and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
            bar.note("no worker declares a GPU (dask worker ... --resources GPU=1): the gradings "
                     "wait for one that does.")
        elif not workers:
            bar.note("no worker yet: the gradings start as workers join.")

    def _window(self, client: Client) -> int:
        try:
            workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
        except Exception:  # noqa: BLE001
            workers = []
        # No more gradings out than the cluster has slots: none waits on a busy worker, where
        # a hand-in that kills its worker would take it down too (and Dask would count it).
        slots = sum(int(w.get("resources", {}).get("GPU", 0)) if self.gpu else int(w.get("nthreads", 1))
                    for w in workers)
        return max(1, slots)

    def _submit(self, client: Client, entry: batch.Entry, plugins: dict, bar: Progress) -> None:
        try:
            is_folder, payload = hand_in_bytes(entry.path, batch.get_lab(self.lab).hand_in_skips)
        except (PrepareError, OSError) as error:  # what the grading itself would have said
            partial = batch._partial_path(self.book.out, entry.id)
            batch.record_failure(partial, entry.id, self.book.profile_name, self.book.rubric,
                                 batch.failure_message(error), traceback.format_exc(), 0.0,
                                 bundle=batch.bundle_fields(self.bundle), lab=self.book.lab)
            batch.commit(partial, self.book.out / entry.id)
            self.book.load(entry.id)
            self.book.write()
            bar.step(self._outcome(entry.id, None))
            return
        job = Job(sid=entry.id, name=entry.path.name, is_folder=is_folder, payload=payload,
                  profile=self.profile, device=self.device, gpu=self.gpu, rubric=self.rubric,
                  cache_root=self.cache_root, run_cache=self.run_cache,
                  bundle=(self.bundle.hash, self.bundle.profile, self.bundle.source),
                  bundle_plugin=plugins["bundle"], data_plugin=plugins["data"],
                  grade_function=batch.grade, lab=self.lab)
        future = client.submit(run_on_worker, job, key=f"grade-{entry.id}-{secrets.token_hex(4)}",
                               pure=False, retries=RETRIES,
                               resources=task_resources(self.device, self.gpus_per_job))
        self.running[future.key] = (entry, future)
        future.add_done_callback(self.finished.put)

    def _finished(self, entry: batch.Entry, future) -> str:
        """Write what came back (or the worker-lost failure) and say it in one line."""
        sid, out, where = entry.id, self.book.out, None
        if future.status == "finished":
            outcome = future.result()
            if outcome is None:
                self.unrecorded.append(f"{sid}: its task was cancelled on the worker")
                return f"{sid}: not recorded (cancelled on its worker)"
            partial = batch._partial_path(out, sid)
            try:
                partial.mkdir()
                unzip_result(outcome["zip"], partial)
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                batch._remove(partial)
                self.unrecorded.append(f"{sid}: its result could not be written ({error})")
                return f"{sid}: not recorded (see above)"
            batch.commit(partial, out / sid)
            where = outcome.get("worker")
        elif future.status == "error" and isinstance(future.exception(), KilledWorker):
            tries = future.exception().allowed_failures + 1
            partial = batch._partial_path(out, sid)
            batch.record_failure(partial, sid, self.book.profile_name, self.book.rubric,
                                 worker_lost_message(tries), str(future.exception()), 0.0,
                                 kind=WORKER_LOST, bundle=batch.bundle_fields(self.bundle),
                                 lab=self.book.lab)
            batch.commit(partial, out / sid)
        else:
            error = future.exception() if future.status == "error" else future.status
            self.unrecorded.append(f"{sid}: {type(error).__name__}: {error}"[:300])
            return f"{sid}: not recorded ({type(error).__name__}: {str(error)[:120]})"
        self.book.load(sid)
        self.book.write()
        return self._outcome(sid, where)

    def _outcome(self, sid: str, worker: str | None) -> str:
        """One line on a finished hand-in, and the worker it ran on."""
        return batch.outcome_line(self.book, sid, f" on {worker}" if worker else "")

    # -- Ctrl-C and SIGTERM: stop, keep what is finished

    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, lambda *_: self.stop.set())
                for signum in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
