"""grader/cluster.py: a class graded on a Dask cluster, here a LocalCluster of 2 worker
processes on loopback (one grading each), started once for the module.

The fake grading function lives at module level: the workers import it by name. It is
steered by a ``control.json`` inside the hand-in, which travels with the hand-in to the
worker (the workers were started before the test, so its environment never reaches them):

* ``log``: a file to which every call appends ``<name> <pid> <worker pid>``;
* ``fifo``: write ``<worker pid> <grading pid>`` into this FIFO, then block until killed;
  with ``once`` (a marker file), only the first call blocks;
* ``kill_worker``: kill the worker process running the grading (SIGKILL), every time.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

from grader import batch, cli, cluster  # noqa: E402
from grader.prepare import PrepareError  # noqa: E402
from reference.profiles import get_profile  # noqa: E402
from grader.bundles import BundleError, recorded_hash  # noqa: E402
from labs.slimming.lab import LAB as SLIMMING, shipped_bundle_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUBRIC = json.loads((ROOT / "labs" / "slimming" / "rubric.json").read_text())
AUTOMATIC_MAX = sum(item["points"] for item in RUBRIC["items"] if not item.get("manual"))
SHIPPED_HASH = recorded_hash(shipped_bundle_dir("quick"))
LAB = ("sparsity_train", "vggprune", "train_prune_model")


# ---------------------------------------------------------------- the fake (module level)

def fake_grade(submission_path, out_dir, profile, data_root=None, device=None, workers=2,
               rubric_path=None, cache_root=None, keep_work=False, on_progress=None,
               run_cache=None, threads=None, bundle=None, lab=None) -> dict:
    """A plausible result.json, report.html and notebooks/ in a blink; see the module's doc."""
    submission_path, out_dir = Path(submission_path), Path(out_dir)
    name = submission_path.name.removesuffix(".zip")
    control_file = submission_path / "control.json"
    control = json.loads(control_file.read_text()) if control_file.is_file() else {}
    if control.get("log"):
        with open(control["log"], "a") as handle:
            handle.write(f"{name} {os.getpid()} {os.getppid()} "
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "notebooks").mkdir(exist_ok=True)
    (out_dir / "notebooks" / "sparsity.ipynb").write_text("{}")
    once = control.get("once")
    if control.get("fifo") and not (once and Path(once).exists()):
        if once:
            Path(once).write_text("blocked once")
        with open(control["fifo"], "w") as handle:
            handle.write(f"{os.getppid()} {os.getpid()}")
        threading.Event().wait()  # until the test kills the worker, or the task is cancelled
    if control.get("kill_worker"):
        os.kill(os.getppid(), signal.SIGKILL)
        threading.Event().wait()
    if name.startswith("broken"):
        raise PrepareError(f"{submission_path} holds none of the lab's notebooks: check the folder.")
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    SLIMMING.resolve_bundle(profile, bundle)  # the worker's copy of the bundle, checked by its hash
    checks = [{"id": item["id"], "stage": item["stage"], "title": item["title"],
               "status": "skip" if item.get("manual") else "pass",
               "points": 0.0 if item.get("manual") else float(item["points"]),
               "max_points": float(item["points"]), "message": "fake"} for item in RUBRIC["items"]]
    result = {"submission": name, "score": float(AUTOMATIC_MAX), "max_score": float(AUTOMATIC_MAX),
              "checks": checks, "diagnoses": [], "failures": [], "bundle": bundle.to_dict(),
              "metrics": {"bundle_path": str(bundle.path), "workers": workers, "threads": threads},
              "environment": {}}
    (out_dir / "result.json").write_text(json.dumps(result))
    (out_dir / "report.html").write_text("<!DOCTYPE html><title>fake report</title>")
    return result


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def dask_cluster():
    """Two worker processes on loopback, one thread each; the dashboard on a free port."""
    local = cluster.local_cluster(2)
    client = distributed.Client(local)
    try:
        yield local, client
    finally:
        client.close()
        local.close()


@pytest.fixture
def client(dask_cluster):
    _, client = dask_cluster
    client.wait_for_workers(2, timeout=120)  # a test before may have killed one
    return client


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(batch, "grade", fake_grade)


def make_folder(path: Path, **control) -> Path:
    path.mkdir(parents=True)
    for name in LAB:
        (path / f"{name}.ipynb").write_text("{}")
    if control:
        (path / "control.json").write_text(json.dumps(control))
    return path


def make_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in LAB:
            archive.writestr(f"lab/{name}.ipynb", "{}")
    return path


def make_class(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        make_zip(root / name) if name.endswith(".zip") else make_folder(root / name)
    return root


def on_cluster(root: Path, out: Path, client, cache: Path, stream=None, **options) -> list[dict]:
    return cluster.grade_class_on_cluster(root, out, get_profile("quick"),
                                          cluster.ClusterSpec(client=client),
                                          cache_root=cache, stream=stream, **options)


def read_gradebook(out: Path) -> list[dict]:
    with open(out / "gradebook.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".partial-" in p.name)


def log_lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def read_fifo(fifo: Path, running, timeout: float = 120.0) -> list[int]:
    """The pids the blocking grading writes into ``fifo``; fails if the batch ends first."""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([reader], [], [], timeout)
        assert ready, f"the blocking grading never started (batch done: {running.done()})"
        return [int(n) for n in os.read(reader, 64).split()]  # one short write: both pids
    finally:
        os.close(reader)


def exited(pid: int, timeout: float = 0.0) -> bool:
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([handle], [], [], timeout)[0])
    finally:
        os.close(handle)


# ---------------------------------------------------------------- a class on the cluster

def test_the_cluster_batch_writes_what_the_local_batch_writes(tmp_path, client, fake):
    root = make_class(tmp_path / "class", ["alice", "bob.zip", "broken", "crash"])
    (root / "ghost").mkdir()  # no notebooks: no submission, never sent
    local_out, cluster_out = tmp_path / "local", tmp_path / "cluster"
    local_rows = batch.grade_class(root, local_out, get_profile("quick"), workers=2)
    stream = io.StringIO()
    rows = on_cluster(root, cluster_out, client, tmp_path / "cache", stream=stream)

    def timeless(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "duration_s"} for row in rows]

    assert timeless(rows) == timeless(local_rows)
    assert timeless(read_gradebook(cluster_out)) == timeless(read_gradebook(local_out))
    by_id = {row["student_id"]: row for row in rows}
    assert list(by_id) == ["alice", "bob", "broken", "crash", "ghost"]  # one row per hand-in
    assert by_id["alice"]["total"] == AUTOMATIC_MAX and by_id["bob"]["total"] == AUTOMATIC_MAX
    assert by_id["broken"]["failures"] == "submission:exception"
    assert by_id["crash"]["failures"] == "submission:exception"
    assert by_id["ghost"]["status"] == "no submission"
    assert {by_id[sid]["bundle"] for sid in ("alice", "bob", "broken", "crash")} == {SHIPPED_HASH}
    crash = json.loads((cluster_out / "crash" / "result.json").read_text())
    assert "SIGKILL" in crash["failures"][0]["message"]
    for sid in ("alice", "bob", "broken", "crash"):
        for name in ("result.json", "report.html", "notebooks"):
            assert (cluster_out / sid / name).exists(), (sid, name)
    assert partials(cluster_out) == [] and not (cluster_out / "ghost").exists()
    assert sorted(p.name for p in (cluster_out / "alice" / "notebooks").iterdir()) == ["sparsity.ipynb"]

    # The bundle reached the workers as bytes, unpacked into the cache and checked there.
    alice = json.loads((cluster_out / "alice" / "result.json").read_text())
    assert Path(alice["metrics"]["bundle_path"]) == tmp_path / "cache" / f"bundle-{SHIPPED_HASH}"
    assert alice["bundle"]["source"] == "shipped"
    # One grading per worker, the machine's cores shared: as the local pool with 2 workers.
    local_alice = json.loads((local_out / "alice" / "result.json").read_text())
    assert alice["metrics"]["workers"] == local_alice["metrics"]["workers"]
    assert alice["metrics"]["threads"] == local_alice["metrics"]["threads"]

    text = stream.getvalue()
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/status", text), text
    finished = [line for line in text.splitlines() if re.search(r"batch: \[\d/4 hand-ins\]", line)]
    assert len(finished) == 4, text
    assert any(re.search(rf"alice: {AUTOMATIC_MAX:g}/{AUTOMATIC_MAX:g} on tcp://127\.0\.0\.1:\d+", line)
               for line in finished), text

    stream = io.StringIO()
    on_cluster(root, cluster_out, client, tmp_path / "cache", stream=stream)
    assert "nothing to grade: 4 hand-in(s) already graded" in stream.getvalue()


def test_a_worker_killed_during_a_grading_runs_it_again_elsewhere(tmp_path, client, fake):
    log, fifo = tmp_path / "calls.log", tmp_path / "started"
    os.mkfifo(fifo)
    root = tmp_path / "class"
    make_folder(root / "alice", log=str(log), fifo=str(fifo), once=str(tmp_path / "once"))
    make_folder(root / "bob", log=str(log))
    out = tmp_path / "out"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(on_cluster, root, out, client, tmp_path / "cache")
        worker_pid, grading_pid = read_fifo(fifo, running)
        assert not running.done()
        os.kill(worker_pid, signal.SIGKILL)
        rows = running.result(timeout=300)
    assert exited(grading_pid, timeout=30), "the grading process outlived its worker"
    tries = [line for line in log_lines(log) if line[0] == "alice"]
    assert len(tries) == 2 and int(tries[0][2]) == worker_pid != int(tries[1][2])
    assert [row["student_id"] for row in rows] == ["alice", "bob"]
    assert [row["failures"] for row in rows] == ["", ""]
    assert rows[0]["total"] == AUTOMATIC_MAX and rows[0]["status"] == "graded"
    assert len(read_gradebook(out)) == 2 and partials(out) == []


def test_a_hand_in_that_kills_its_worker_every_time_is_worker_lost(tmp_path, client, fake):
    log = tmp_path / "calls.log"
    root = tmp_path / "class"
    make_folder(root / "alice", log=str(log))
    make_folder(root / "killer", log=str(log), kill_worker=True)
    out = tmp_path / "out"
    rows = on_cluster(root, out, client, tmp_path / "cache")

    tries = [line for line in log_lines(log) if line[0] == "killer"]
    assert len(tries) == cluster.ALLOWED_FAILURES + 1, "a bounded number of tries"
    by_id = {row["student_id"]: row for row in rows}
    assert list(by_id) == ["alice", "killer"]
    assert by_id["alice"]["status"] == "graded" and by_id["alice"]["failures"] == ""
    killer = by_id["killer"]
    assert killer["failures"] == "submission:worker-lost" and killer["status"] == "not graded"
    assert killer["total"] == 0 and killer["bundle"] == SHIPPED_HASH
    [failure] = json.loads((out / "killer" / "result.json").read_text())["failures"]
    assert failure["kind"] == "worker-lost"
    assert f"{cluster.ALLOWED_FAILURES + 1} times" in failure["message"]
    assert (out / "killer" / "report.html").is_file()
    assert len(read_gradebook(out)) == 2 and partials(out) == []


CLIENT_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_cluster
from grader import batch, cluster
from reference.profiles import get_profile
batch.grade = test_cluster.fake_grade
try:
    cluster.grade_class_on_cluster(Path({root!r}), Path({out!r}), get_profile("quick"),
                                   cluster.ClusterSpec(scheduler={address!r}),
                                   cache_root=Path({cache!r}))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_killed_client_loses_nothing_finished_and_a_rerun_resumes(tmp_path, client, fake):
    log, fifo = tmp_path / "calls.log", tmp_path / "started"
    os.mkfifo(fifo)
    root = tmp_path / "class"
    for sid in ("a", "c", "d"):
        make_folder(root / sid, log=str(log))
    # b blocks (its first grading only) until its task is cancelled
    make_folder(root / "b", log=str(log), fifo=str(fifo), once=str(tmp_path / "once"))
    out, cache = tmp_path / "out", tmp_path / "cache"
    script = CLIENT_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root), out=str(out),
                                  address=client.scheduler.address, cache=str(cache))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, grading_pid = read_fifo(fifo, process_future(process))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    finished = {sid for sid in ("a", "b", "c", "d") if batch.is_finished(out, sid)}
    assert "b" not in finished
    # The scheduler lets go of the dead client's tasks; the worker stops b's grading.
    assert exited(grading_pid, timeout=60), "the grading of a killed client kept running"
    before = len(log_lines(log))

    rows = on_cluster(root, out, client, cache)
    again = sorted(line[0] for line in log_lines(log)[before:])
    assert again == sorted({"a", "b", "c", "d"} - finished), "only what had not finished"
    assert [row["student_id"] for row in rows] == ["a", "b", "c", "d"]
    assert len(read_gradebook(out)) == 4 and partials(out) == []


class process_future:  # noqa: N801 - what read_fifo asks of a running batch
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def done(self) -> bool:
        return self.process.poll() is not None


def test_each_grading_asks_for_a_gpu_and_gets_one_of_its_own(tmp_path, fake):
    assert cluster.task_resources("cuda") == {"GPU": 1}
    assert cluster.task_resources("cuda:1") == {"GPU": 1}
    assert cluster.task_resources(None, gpus_per_job=2) == {"GPU": 1}
    assert cluster.task_resources("cpu") is None and cluster.task_resources(None) is None
    # One worker with two GPUs (as a Slurm job with --gres=gpu:2 declares them): each grading
    # holds GPU=1 and sees a single GPU, never one another grading holds.
    gpu_cluster = cluster.local_cluster(1, threads_per_worker=2, resources={"GPU": 2},
                                        env={"CUDA_VISIBLE_DEVICES": "5,7",
                                             cluster.WORKER_CORES_ENV: "2"})
    log = tmp_path / "calls.log"
    root = tmp_path / "class"
    for sid in ("a", "b", "c"):
        make_folder(root / sid, log=str(log))
    asked = []
    try:
        with distributed.Client(gpu_cluster) as gpu_client:
            submit = gpu_client.submit
            gpu_client.submit = lambda *args, **kwargs: asked.append(kwargs.get("resources")) \
                or submit(*args, **kwargs)
            rows = cluster.grade_class_on_cluster(
                root, tmp_path / "out", get_profile("quick"),
                cluster.ClusterSpec(client=gpu_client), device="cuda", cache_root=tmp_path / "cache")
    finally:
        gpu_cluster.close()
    assert [row["status"] for row in rows] == ["graded"] * 3
    assert asked == [{"GPU": 1}] * 3
    assert {line[3] for line in log_lines(log)} <= {"5", "7"} and len(log_lines(log)) == 3


def test_a_worker_takes_the_least_used_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    first, second = cluster.take_gpu(), cluster.take_gpu()
    assert {first, second} == {"2", "3"}
    cluster.give_back_gpu(first)
    assert cluster.take_gpu() == first
    cluster.give_back_gpu(first)
    cluster.give_back_gpu(second)
    monkeypatch.setenv(cluster.WORKER_CORES_ENV, "8")
    assert cluster.worker_cores(2) == 4 and cluster.worker_cores(16) == 1


# ---------------------------------------------------------------- what travels, checked

def test_a_hand_in_folder_travels_as_the_grading_would_copy_it(tmp_path):
    hand_in = make_folder(tmp_path / "alice")
    (hand_in / "models").mkdir()
    (hand_in / "models" / "vgg.py").write_text("# model")
    (hand_in / "model_best.pth").write_bytes(b"checkpoint")  # never copied by prepare
    (hand_in / "link.ipynb").symlink_to("/etc/passwd")
    os.mkfifo(hand_in / "pipe")
    is_folder, payload = cluster.hand_in_bytes(hand_in, SLIMMING.hand_in_skips)
    assert is_folder
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        names = sorted(member.name for member in tar)
        assert all(member.isfile() or member.isdir() for member in tar)
    assert names == ["models", "models/vgg.py", "sparsity_train.ipynb", "train_prune_model.ipynb",
                     "vggprune.ipynb"]
    cluster.unpack_tree(payload, tmp_path / "unpacked")
    assert (tmp_path / "unpacked" / "models" / "vgg.py").read_text() == "# model"
    zipped = make_zip(tmp_path / "bob.zip")
    assert cluster.hand_in_bytes(zipped) == (False, zipped.read_bytes())


def test_a_bundle_that_does_not_match_its_hash_is_refused_on_the_worker(tmp_path):
    shipped = shipped_bundle_dir("quick")
    archive = cluster.pack_tree(shipped)
    placed = cluster.place_bundle(archive, SHIPPED_HASH, tmp_path / "cache")
    assert placed == tmp_path / "cache" / f"bundle-{SHIPPED_HASH}"
    assert cluster.place_bundle(b"not read", SHIPPED_HASH, tmp_path / "cache") == placed  # cached

    copy = tmp_path / "tampered"
    shutil.copytree(shipped, copy)
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    with pytest.raises(BundleError, match="does not match"):
        cluster.place_bundle(cluster.pack_tree(copy), SHIPPED_HASH, tmp_path / "other")
    assert not (tmp_path / "other" / f"bundle-{SHIPPED_HASH}").exists()


def test_the_data_root_travels_checked_by_its_hash(tmp_path):
    from grader.bundles import content_hash

    from reference.data import CIFAR_FOLDER

    cifar = tmp_path / "data" / CIFAR_FOLDER
    cifar.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        (cifar / name).write_bytes(name.encode() * 100)
    digest = content_hash(cifar)
    archive = cluster.pack_tree(cifar, CIFAR_FOLDER)
    placed = cluster.place_data(archive, digest, tmp_path / "cache", CIFAR_FOLDER)
    assert (placed / CIFAR_FOLDER / "test_batch").read_bytes() == b"test_batch" * 100
    with pytest.raises(ValueError, match="hashes to"):
        cluster.place_data(archive, "0" * 64, tmp_path / "cache", CIFAR_FOLDER)


def test_a_result_archive_cannot_write_outside_its_folder(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("result.json", "{}")
        archive.writestr("../escaped.txt", "x")
    with pytest.raises(ValueError, match="escaped"):
        cluster.unzip_result(buffer.getvalue(), tmp_path / "partial")
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------- Slurm, up to the job script

def slurm_script(**options) -> str:
    profile = get_profile(options.pop("profile", "full"))
    device = options.pop("device", None)
    spec = cluster.ClusterSpec(cluster="slurm", slurm_options={
        "scheduler_options": {"host": "127.0.0.1", "dashboard_address": ":0"}}, **options)
    slurm = cluster.slurm_cluster(spec, profile, device)
    try:
        return slurm.job_script()
    finally:
        slurm.close()


def test_the_slurm_job_script_asks_for_gpus_cores_memory_and_time():
    script = slurm_script(jobs=8, gpus_per_job=2, partition="gpu", walltime="12:00:00",
                          device="cuda")
    assert "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH -p gpu" in script and "#SBATCH -t 12:00:00" in script
    assert f"#SBATCH --cpus-per-task={2 * cluster.CORES_PER_SLOT}" in script
    per_slot = cluster.memory_per_slot_gb(get_profile("full"))
    assert re.search(r"#SBATCH --mem=(\d+)G", script).group(1) == str(math.ceil(2 * per_slot * 1e9 / 2**30))
    assert "--nthreads 2" in script and "--resources GPU=2" in script
    assert f"export {cluster.WORKER_CORES_ENV}={2 * cluster.CORES_PER_SLOT}" in script
    assert "#SBATCH -J slimgrade" in script


def test_a_cpu_slurm_job_grades_one_hand_in_at_a_time():
    script = slurm_script(profile="quick", cores_per_job=6, memory_per_job="12GB")
    assert "--gres" not in script and "--resources" not in script
    assert "--nthreads 1" in script and "#SBATCH --cpus-per-task=6" in script
    assert f"#SBATCH -t {cluster.WALLTIME['quick']}" in script
    # --device cuda alone asks for one GPU per job
    assert "#SBATCH --gres=gpu:1" in slurm_script(device="cuda")


# ---------------------------------------------------------------- the command line

def test_cluster_options_are_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    root = make_class(tmp_path / "class", ["alice", "bob"])
    out = str(tmp_path / "out")

    def usage(argv: list[str], *words: str) -> None:
        assert cli.main(["batch", str(root), "--out", out, *argv]) == 2
        err = capsys.readouterr().err
        for word in words:
            assert word in err, err

    usage(["--scheduler", "tcp://127.0.0.1:1", "--cluster", "slurm"], "not both")
    usage(["--jobs", "4"], "--jobs shapes the Slurm jobs", "add it")
    usage(["--scheduler", "tcp://127.0.0.1:1", "--gpus-per-job", "1"], "--gpus-per-job", "already there")
    usage(["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--workers sizes the local pool")
    usage(["--cluster", "slurm", "--walltime", "12h"], "not a time limit")
    usage(["--cluster", "slurm", "--memory-per-job", "lots"], "not an amount of memory")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    usage(["--cluster", "slurm"], "sbatch is not on this machine's PATH")
    assert not (tmp_path / "out" / "gradebook.csv").exists()


def test_a_cuda_device_is_not_checked_here_when_the_workers_grade(tmp_path):
    import torch

    root = make_class(tmp_path / "class", ["alice", "bob"])
    parser = cli.build_parser()
    args = parser.parse_args(["batch", str(root), "--out", str(tmp_path / "out"), "--device", "cuda",
                              "--scheduler", "tcp://127.0.0.1:1"])
    cli.check_usage(parser, args)  # no SystemExit, although this machine may have no GPU
    assert args.device == "cuda"
    if not torch.cuda.is_available():
        local = parser.parse_args(["batch", str(root), "--out", str(tmp_path / "out"), "--device", "cuda"])
        with pytest.raises(SystemExit):
            cli.check_usage(parser, local)


def test_an_unreachable_scheduler_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    root = make_class(tmp_path / "class", ["alice", "bob"])
    with socket_port() as port:  # bound, never listening: nothing answers there
        code = cli.main(["batch", str(root), "--out", str(tmp_path / "out"),
                         "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert code == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err


class socket_port:  # noqa: N801
    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc_info) -> None:
        self.socket.close()


LOCAL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_batch
from grader import batch, cli
batch.grade = test_batch.fake_grade
code = cli.main(["batch", {root!r}, "--out", {out!r}, "--workers", "2"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed", "dask_jobqueue"))
print(code, loaded)
"""


def test_the_local_batch_does_not_import_dask(tmp_path):
    root = make_class(tmp_path / "class", ["alice", "bob"])
    script = LOCAL_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root), out=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.stdout.split("\n")[-2] == "0 []", done.stdout + done.stderr
    assert batch.is_finished(tmp_path / "out", "alice")


# ---------------------------------------------------------------- real gradings

TINY = {"sparsity_train": "LAMBDA = 1e-4\nprint('no training here')",
        "vggprune": "PRUNE_PERCENT = 0.5\nprint('no pruning here')",
        "train_prune_model": "print('no fine-tuning here')"}


def tiny_hand_in(folder: Path, notebooks: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    for name, source in notebooks.items():
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_code_cell(source)]
        nbformat.write(notebook, folder / f"{name}.ipynb")


TIMED = {"duration_s", "graded_at"}


def timeless(value):
    """A result without its times (and with the runs' own durations left out)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


@pytest.mark.slow
def test_real_gradings_on_the_cluster_match_the_local_batch(tmp_path, client):
    root = tmp_path / "class"
    tiny_hand_in(root / "tiny", TINY)
    tiny_hand_in(tmp_path / "zipped", {k: v for k, v in TINY.items() if k != "train_prune_model"})
    with zipfile.ZipFile(root / "tiny-zip.zip", "w") as archive:
        for path in (tmp_path / "zipped").iterdir():
            archive.write(path, f"lab/{path.name}")
    (root / "empty").mkdir()
    local_out, cluster_out = tmp_path / "local", tmp_path / "cluster"
    local_rows = batch.grade_class(root, local_out, get_profile("quick"), workers=2)
    rows = on_cluster(root, cluster_out, client, tmp_path / "cache")

    assert [timeless(row) for row in rows] == [timeless(row) for row in local_rows]
    assert [row["student_id"] for row in rows] == ["empty", "tiny", "tiny-zip"]
    zipped = json.loads((cluster_out / "tiny-zip" / "result.json").read_text())
    assert any(f["notebook"] == "train_prune_model.ipynb" and "not found in the submission"
               in f["message"] for f in zipped["failures"]), zipped["failures"]
    assert zipped["metrics"]["runs"], "the notebooks ran on the workers"
    for sid in ("tiny", "tiny-zip"):
        here = json.loads((local_out / sid / "result.json").read_text())
        there = json.loads((cluster_out / sid / "result.json").read_text())
        assert timeless(there) == timeless(here), sid
        assert sorted(p.name for p in (cluster_out / sid / "notebooks").iterdir()) == \
            sorted(p.name for p in (local_out / sid / "notebooks").iterdir())
        assert (cluster_out / sid / "report.html").is_file()
    assert partials(cluster_out) == []
