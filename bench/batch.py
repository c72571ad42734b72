"""Benchmark of ``slimgrade batch``: 1 against 2 workers, and grading against plain execution.

    .venv/bin/python bench/batch.py [--corpus DIR] [--limit N] [--profile quick]

The corpus is every fixture folder with an ``expected.json`` (default) or every
folder and .zip of ``--corpus DIR``. It is graded twice into temporary folders,
with 1 and with 2 workers, each batch in a fresh process, and the script prints:

* the wall time of each batch, their ratio and the time per submission (each
  grading's own ``duration_s`` from its result.json, and wall time / count);
* peak memory: ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of the batch
  process (the largest single grading or kernel process) and the peak total RSS
  of the whole process tree, sampled every half second;
* for one submission (``solution`` when present, else ``--plain ID``/the first):
  the time of a plain nbclient execution of its three notebooks chained once
  (the same injected notebooks, no sandbox, no budgets, no evaluation) against
  the time of grading it, and their ratio.

With ``--dask`` it instead grades the corpus with the local pool of 2 workers and on a
Dask LocalCluster of 2 worker processes on loopback (one grading each, the cores shared:
``grader.cluster.local_cluster``), each in a fresh process, and prints their wall times
(the Dask side includes starting and closing the cluster), the ratio
wall(local pool) / wall(Dask) (the target is 0.95 or more: Dask's overhead vanishes next to
a grading), and any hand-in whose score differs between the two.

The expected bundle is built (or found in the cache) before any timing starts.
The figures are printed only; a person records them in docs/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAIN_TIMEOUT_FACTOR = 5
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH_SNIPPET = """
import json, resource, sys, time
from pathlib import Path
from grader.batch import grade_class
from reference.profiles import get_profile
args = json.loads(sys.argv[1])
options = dict(data_root=args["data_root"] and Path(args["data_root"]), device=args["device"],
               cache_root=args["cache"] and Path(args["cache"]))
if args.get("dask"):  # a Dask LocalCluster of `workers` processes on loopback
    from distributed import Client
    from grader.cluster import ClusterSpec, grade_class_on_cluster, local_cluster
    cluster = local_cluster(args["workers"])
    client = Client(cluster)
    started = time.monotonic()
    rows = grade_class_on_cluster(Path(args["class_dir"]), Path(args["out"]),
                                  get_profile(args["profile"]), ClusterSpec(client=client), **options)
    wall = time.monotonic() - started
    client.close()
    cluster.close()
else:
    started = time.monotonic()
    rows = grade_class(Path(args["class_dir"]), Path(args["out"]), get_profile(args["profile"]),
                       workers=args["workers"], **options)
    wall = time.monotonic() - started
print(json.dumps({"wall_s": wall, "rows": len(rows),
                  "maxrss_children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "maxrss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a class folder (default: the fixtures that have expected.json)")
    parser.add_argument("--limit", type=int, default=None, help="grade only the first N submissions")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache", type=Path, default=None, help="expected-bundle cache folder")
    parser.add_argument("--plain", default=None,
                        help="the submission id for the plain-execution comparison")
    parser.add_argument("--skip-plain", action="store_true", help="no plain-execution comparison")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--dask", action="store_true",
                        help="compare the local pool (2 workers) with a Dask LocalCluster of 2 "
                             "worker processes instead")
    return parser.parse_args(argv)


def corpus_sources(corpus: Path | None) -> list[Path]:
    if corpus is not None:
        from grader.batch import find_submissions

        return [entry.path for entry in find_submissions(corpus)]
    fixtures = ROOT / "fixtures"
    return sorted(p for p in fixtures.iterdir() if p.is_dir() and (p / "expected.json").is_file())


def build_class(sources: list[Path], class_dir: Path) -> None:
    class_dir.mkdir(parents=True)
    for source in sources:
        if source.is_dir():
            shutil.copytree(source, class_dir / source.name, symlinks=True)
        else:
            shutil.copyfile(source, class_dir / source.name)


class TreeMemory(threading.Thread):
    """Peak total RSS of a process and all its descendants, sampled every half second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.wait(0.5):
            total = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    total += process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)


def run_batch(class_dir: Path, out: Path, workers: int, args: argparse.Namespace,
              dask: bool = False) -> dict:
    payload = json.dumps({"class_dir": str(class_dir), "out": str(out), "profile": args.profile,
                          "dask": dask,
                          "data_root": args.data_root and str(args.data_root.resolve()),
                          "device": args.device, "workers": workers,
                          "cache": args.cache and str(args.cache.resolve())})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", BATCH_SNIPPET, payload], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    memory.start()
    stdout, _ = process.communicate()
    memory.done.set()
    memory.join()
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"the {'Dask' if dask else 'local'} batch with {workers} worker(s) failed "
                         f"(exit {process.returncode})")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures.update(process_wall_s=wall, tree_peak_bytes=memory.peak, results=read_results(out))
    return figures


def read_results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("*/result.json")):
        try:
            results[path.parent.name] = json.loads(path.read_text())
        except ValueError:
            continue
    return results


def plain_execution(source: Path, args: argparse.Namespace, work_root: Path) -> tuple[float, list[str]]:
    """The three notebooks run once, chained in one folder, by a bare NotebookClient.

    The notebooks are the ones the grader runs (its install and parameters cells
    injected the same way), so only the grader's own work differs: sandbox,
    budgets and output cap, the extra runs, evaluation, diagnosis and the report.
    """
    from nbclient import NotebookClient

    from grader.execute import plan_notebook, read_notebook, write_kernel_files
    from grader.prepare import prepare
    from labs.slimming.grading import profile_parameters
    from labs.slimming.kernel import kernel_setup
    from labs.slimming.lab import NOTEBOOKS
    from reference.profiles import get_profile

    profile = get_profile(args.profile)
    device = args.device or "cpu"
    submission = prepare(source, work_root, NOTEBOOKS)
    work_dir = work_root / "plain"
    work_dir.mkdir()
    kernel = kernel_setup(profile)
    write_kernel_files(work_dir, dict(kernel.files))
    base = profile_parameters(profile, device)
    steps = [("sparsity_train", {**base, "LAMBDA": profile.sparsity_lambda}),
             ("vggprune", {**base, "PRUNE_PERCENT": profile.finetune_ratio}),
             ("train_prune_model", {**base, "EPOCHS": profile.finetune_epochs})]
    config = {"work_dir": str(work_dir), "device": device,
              "data_root": args.data_root and str(args.data_root.resolve()),
              "state_file": "slimgrade_state.json", "threads": os.cpu_count() or 1, **kernel.config}
    install = f"import {kernel.runtime} as _slimgrade\n_slimgrade.install({config!r})\n"
    dump = f"import {kernel.runtime} as _slimgrade\n_slimgrade.dump_state(globals(), 'slimgrade_state.json')\n"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    problems = []
    started = time.monotonic()
    for name, parameters in steps:
        notebook = submission.notebooks.get(name)
        if notebook is None:
            problems.append(f"{name}.ipynb missing")
            continue
        plan = plan_notebook(read_notebook(notebook), install, dump, parameters, {},
                             kernel.known_parameters)
        # No grading budget here: a generous cell timeout only guards against a hang.
        client = NotebookClient(plan.nb, timeout=PLAIN_TIMEOUT_FACTOR * profile.run_timeout_s,
                                kernel_name="python3",
                                resources={"metadata": {"path": str(work_dir)}})
        try:
            client.execute(stderr=subprocess.DEVNULL)  # the kernel's own log lines
        except Exception as error:  # noqa: BLE001 - a figure with a caveat beats no figure
            problems.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
    return time.monotonic() - started, problems


def compare_dask(class_dir: Path, temporary: Path, count: int, args: argparse.Namespace) -> int:
    """The local pool of 2 workers against a Dask LocalCluster of 2 worker processes."""
    runs = {"local pool": run_batch(class_dir, temporary / "out-local", 2, args),
            "Dask": run_batch(class_dir, temporary / "out-dask", 2, args, dask=True)}
    for name, figures in runs.items():
        durations = [r.get("duration_s") or 0.0 for r in figures["results"].values()]
        print(f"\n{name}, 2 workers: wall {figures['process_wall_s']:.1f} s (grading "
              f"{figures['wall_s']:.1f} s), {figures['process_wall_s'] / count:.1f} s per "
              f"submission; a grading's own time: mean {sum(durations) / max(1, len(durations)):.1f} s, "
              f"max {max(durations, default=0):.1f} s; whole tree peak "
              f"{figures['tree_peak_bytes'] / 2**20:.0f} MB")
    local, dask = runs["local pool"], runs["Dask"]
    print(f"\nratio wall(local pool) / wall(Dask): {local['process_wall_s'] / dask['process_wall_s']:.2f} "
          f"(grading only: {local['wall_s'] / dask['wall_s']:.2f}; target 0.95 or more)")
    differ = [sid for sid in sorted(set(local["results"]) | set(dask["results"]))
              if local["results"].get(sid, {}).get("score") != dask["results"].get(sid, {}).get("score")]
    print(f"hand-ins whose score differs: {', '.join(differ) if differ else 'none'}")
    return 0


def megabytes(kilobytes: float) -> str:
    return f"{kilobytes / 1024:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from grader.batch import ensure_reference, student_id
    from grader.sandbox import sandbox_available
    from reference.profiles import get_profile

    sources = corpus_sources(args.corpus)
    if args.limit is not None:
        sources = sources[:args.limit]
    if not sources:
        print("bench: no submission in the corpus", file=sys.stderr)
        return 2
    profile = get_profile(args.profile)
    temporary = Path(tempfile.mkdtemp(prefix="slimgrade-bench-"))
    try:
        class_dir = temporary / "class"
        build_class(sources, class_dir)
        print(f"slimgrade batch benchmark: {len(sources)} submission(s), profile {profile.name}, "
              f"{os.cpu_count()} CPU(s), sandbox {'on' if sandbox_available() else 'off'}")
        started = time.monotonic()
        ensure_reference(profile, args.cache, args.data_root, args.device)
        print(f"expected bundle ready in {time.monotonic() - started:.1f} s (not counted below)")
        if args.dask:
            return compare_dask(class_dir, temporary, len(sources), args)

        runs = {}
        for workers in (1, 2):
            figures = run_batch(class_dir, temporary / f"out-{workers}", workers, args)
            runs[workers] = figures
            durations = [r.get("duration_s") or 0.0 for r in figures["results"].values()]
            print(f"\nworkers={workers}: wall {figures['process_wall_s']:.1f} s "
                  f"(grade_class {figures['wall_s']:.1f} s), {figures['process_wall_s'] / len(sources):.1f} s "
                  f"per submission; grading time per submission: mean "
                  f"{sum(durations) / max(1, len(durations)):.1f} s, max {max(durations, default=0):.1f} s")
            print(f"  peak memory: largest process {megabytes(figures['maxrss_children_kb'])} "
                  f"(getrusage children maxrss), whole tree {figures['tree_peak_bytes'] / 2**20:.0f} MB, "
                  f"batch process {megabytes(figures['maxrss_self_kb'])}")
        one, two = runs[1]["process_wall_s"], runs[2]["process_wall_s"]
        print(f"\nratio wall(1 worker) / wall(2 workers): {one / two:.2f}")

        print("\nper submission (seconds of grading from result.json; score):")
        ids = sorted(set(runs[1]["results"]) | set(runs[2]["results"]))
        width = max(len(i) for i in ids) if ids else 10
        print(f"  {'id':<{width}}  {'1 worker':>9}  {'2 workers':>9}  score")
        for sid in ids:
            a, b = runs[1]["results"].get(sid, {}), runs[2]["results"].get(sid, {})
            score = a.get("score", b.get("score"))
            print(f"  {sid:<{width}}  {a.get('duration_s', float('nan')):>9.1f}  "
                  f"{b.get('duration_s', float('nan')):>9.1f}  "
                  f"{'' if score is None else format(score, 'g')}/{a.get('max_score', '')}")

        if not args.skip_plain:
            by_id = {student_id(p.name): p for p in sources}
            chosen = args.plain or ("solution" if "solution" in by_id else next(iter(by_id)))
            if chosen not in by_id:
                print(f"bench: --plain {chosen} is not in the corpus", file=sys.stderr)
                return 2
            graded = runs[1]["results"].get(chosen, {})
            ran = [r for r in graded.get("metrics", {}).get("runs", {}).values()
                   if isinstance(r, dict) and not r.get("skipped")]
            plain_s, problems = plain_execution(by_id[chosen], args, temporary / "plain")
            grading_s = graded.get("duration_s") or float("nan")
            print(f"\nplain nbclient vs grading, submission {chosen}:")
            print(f"  plain nbclient, the 3 notebooks chained once: {plain_s:.1f} s"
                  + (f" (problems: {'; '.join(problems)})" if problems else ""))
            print(f"  grading it (workers=1 batch, {len(ran)} notebook runs, "
                  f"2 at a time): {grading_s:.1f} s")
            print(f"  ratio grading / plain: {grading_s / plain_s:.2f}"
                  + (" (not meaningful: the plain run did not complete)" if problems else ""))
    finally:
        if args.keep:
            print(f"\nkept: {temporary}")
        else:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
