"""``slimgrade``: grade, check, batch, reference, for any installed lab (``--lab``).

Without ``--lab``, grade and check take the lab whose notebooks the hand-in holds, batch
the lab of the class's hand-ins, and reference the default lab (grader/lab.py).

Exit codes: 0 when a grade (or bundle) was produced, whatever the score; 2 for
bad usage (a wrong path, a missing data root, no expected bundle matching the profile, a
bundle whose hash does not match); 1 when the harness itself failed; 3 when
``reference --verify`` finds a rebuild drifting past the tolerances (reference/drift.py).
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR, HARNESS_ERROR, DRIFT_FOUND = 2, 1, 3
STATUS_MARK = {"pass": "ok  ", "fail": "FAIL", "error": "ERR ", "skip": "hand"}


DEBUG_HELP = "show the traceback of a harness error (accepted before or after the command)"


# ---------------------------------------------------------------- values checked while parsing
# Each raises argparse.ArgumentTypeError with one sentence; argparse then prints the usage
# line and "argument --x: <sentence>", and exits with 2.

def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number: give {least} or more.") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is too small: give {least} or more.")
        return value
    return parse


positive_int = whole_number(1)
non_negative_int = whole_number(0)


def existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist: check the path.")
    return path


def existing_folder(text: str) -> Path:
    path = existing_path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a folder.")
    return path


def output_folder(text: str) -> Path:
    """A folder slimgrade writes into: made when missing, refused when it is a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder: give a folder to write into.")
    return path


def rubric_file(text: str) -> Path:
    """A rubric JSON file of the course rubric's shape, checked before any notebook runs."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{path} {'is not a file' if path.exists() else 'does not exist'}: give a rubric JSON "
            "file shaped like the lab's rubric.json.")
    from grader.score import load_rubric

    try:
        rubric = load_rubric(path)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{path} cannot be read ({error.strerror}).") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(rubric, dict) or not isinstance(rubric.get("items"), list) or not rubric["items"]:
        raise argparse.ArgumentTypeError(
            f'{path}: it has no "items" list: give a rubric shaped like the lab\'s rubric.json.')
    return path


def rubric_problem(rubric: object, lab) -> str:
    """What makes ``rubric`` unusable for ``lab`` (one sentence), or "" when it can be used."""
    shape = "shaped like the lab's rubric.json"
    if not isinstance(rubric, dict) or not isinstance(rubric.get("items"), list) or not rubric["items"]:
        return f'it has no "items" list: give a rubric {shape}.'
    ids = []
    for n, item in enumerate(rubric["items"], 1):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            return f'item {n} has no "id": every item needs an id, stage, title and points.'
        points = item.get("points")
        if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
            return f'item {item["id"]!r} has no "points" (a number, 0 or more).'
        ids.append(item["id"])
    if len(set(ids)) != len(ids):
        return f"item ids repeat ({', '.join(sorted({i for i in ids if ids.count(i) > 1}))})."
    checks = lab.checks  # loaded only when a rubric is given: it may load torch
    unknown = [i for i, item in zip(ids, rubric["items"]) if not item.get("manual") and i not in checks]
    if unknown:
        return (f"no automatic check is called {', '.join(unknown)}: use the ids of the "
                f"{lab.name} lab's rubric.json ({', '.join(sorted(checks))}) or mark the item "
                "\"manual\": true.")
    return lab.rubric_problem(rubric)


def devices_found() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{n} ({torch.cuda.get_device_name(n)})"
                             for n in range(torch.cuda.device_count())]
    return found


def device(text: str) -> str:
    """cpu, cuda or cuda:N, and only a device this machine has."""
    text = text.strip().lower()
    if text == "cpu":
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    found = devices_found()
    listed = ", ".join(found) if len(found) > 1 else "cpu only, no CUDA GPU"
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device: give cpu, cuda or cuda:N (found here: {listed}).")
    if len(found) == 1:
        raise argparse.ArgumentTypeError(
            f"{text} was asked for but this machine has no CUDA GPU that torch can use "
            "(found here: cpu only): give --device cpu or leave --device out.")
    import torch

    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"there is no {text} (found here: {listed}).")
    return text


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N by its form only: ``batch`` checks it against this machine in
    ``check_usage``, unless the gradings run on a cluster (whose workers have the GPUs)."""
    name = text.strip().lower()
    if name == "cpu" or re.fullmatch(r"cuda(?::\d+)?", name):
        return name
    return device(text)  # not a device: the sentence that lists the devices found


def walltime(text: str) -> str:
    """A Slurm time limit: HH:MM:SS, or D-HH:MM:SS."""
    if not re.fullmatch(r"(\d+-)?\d{1,3}:[0-5]\d:[0-5]\d", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time limit: give HH:MM:SS or "
                                         "D-HH:MM:SS (e.g. 12:00:00 or 2-00:00:00).")
    return text.strip()


def memory_size(text: str) -> str:
    """Memory of a Slurm job as Dask reads it: 64GB, 500MB, 1.5TB."""
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", text.strip(), re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of memory: give e.g. 64GB.")
    return text.strip()


SLURM_ONLY = ("jobs", "gpus_per_job", "partition", "walltime", "cores_per_job", "memory_per_job")


def cluster_problem(args: argparse.Namespace) -> str:
    """What is wrong with batch's cluster options (one sentence), or ""."""
    on_cluster = args.scheduler or args.cluster
    given = [f"--{name.replace('_', '-')}" for name in SLURM_ONLY if getattr(args, name) is not None]
    if args.scheduler and args.cluster:
        return ("give --scheduler ADDRESS (a cluster that is running) or --cluster slurm (one "
                "started for this batch), not both.")
    if given and args.cluster != "slurm":
        return (f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} the Slurm jobs of "
                "--cluster slurm: add it" + (" (with --scheduler the workers are already there)."
                                             if args.scheduler else "."))
    if not on_cluster:
        return ""
    if args.workers is not None:
        return ("--workers sizes the local pool: on a cluster each worker grades as many hand-ins "
                "at once as it has threads (or GPUs); leave --workers out.")
    import importlib.util

    needed = ["distributed"] + (["dask_jobqueue"] if args.cluster == "slurm" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return (f"{', '.join(missing)} is not installed: install the cluster extra, "
                "pip install 'slimgrade[cluster]' (Dask and dask-jobqueue).")
    if args.cluster == "slurm":
        import shutil

        if shutil.which("sbatch") is None:
            return ("sbatch is not on this machine's PATH: run the batch on the cluster's login "
                    "node, or start Dask workers yourself and give --scheduler ADDRESS.")
    return ""


def build_parser() -> argparse.ArgumentParser:
    from grader import __version__
    from grader.lab import installed_labs
    from grader.machine import RUNS_AT_ONCE

    parser = argparse.ArgumentParser(prog="slimgrade", description=(
        "Grades ML lab notebooks (installed labs: " + ", ".join(sorted(installed_labs())) +
        "): runs the notebooks, finds which mistake was made and explains it."), epilog="Exit codes: 0 a grade was produced (whatever the "
        "score), 2 bad usage, 1 the harness itself failed, 3 'reference --verify' found a "
        "rebuild drifting past its tolerances.")
    parser.add_argument("--version", action="version", version=f"slimgrade {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # The same flag after the command; SUPPRESS: not given there, it leaves the one above alone.
    anywhere = argparse.ArgumentParser(add_help=False)
    anywhere.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(command: argparse.ArgumentParser, device_type=device) -> None:
        command.add_argument("--lab", choices=sorted(installed_labs()), default=None,
                             help="the lab graded (default: the one whose notebooks the hand-in "
                                  "holds)")
        command.add_argument("--profile", default=None,
                             help="data, width, epochs and tolerances (default: the lab's "
                                  "quick profile)")
        command.add_argument("--data-root", type=existing_folder, default=None,
                             help="the lab's data for the full profile (slimming: the folder holding "
                                  "cifar-10-batches-py/; lowcomplexity: cifar-100-python/)")
        command.add_argument("--device", type=device_type, default=None,
                             help="cpu, cuda or cuda:N (default: CUDA when present)")
        command.add_argument("--cache", type=output_folder, default=None,
                             help="where --bundle archives are unpacked (default: ~/.cache/slimgrade)")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[anywhere], help=help, description=help)

    def bundle_option(command: argparse.ArgumentParser, what: str) -> None:
        command.add_argument("--bundle", type=existing_path, default=None, metavar="DIR", help=(
            f"{what}: a folder 'slimgrade reference --out' wrote, or a .tar.gz/.zip of it, "
            "checked by its hash (default: the bundle shipped for the profile)"))

    grade = add("grade", "grade one submission (folder or .zip)")
    grade.add_argument("path", type=existing_path)
    grade.add_argument("--out", type=output_folder, default=Path("slimgrade-out"))
    grade.add_argument("--format", choices=["slimgrade", "gradescope"], default="slimgrade",
                       help="gradescope also writes results.json in Gradescope's format")
    grade.add_argument("--rubric", type=rubric_file, default=None,
                       help="a rubric JSON file to use instead of the course's")
    grade.add_argument("--workers", type=positive_int, default=RUNS_AT_ONCE,
                       help=f"notebook runs at once (default {RUNS_AT_ONCE})")
    grade.add_argument("--run-cache", type=output_folder, default=None,
                       help="reuse runs of byte-identical notebooks and inputs from this folder")
    common(grade)
    bundle_option(grade, "the expected bundle to grade against")

    check = add("check", "check your own lab folder before handing it in")
    check.add_argument("path", type=existing_path, nargs="?", default=Path("."))
    check.add_argument("--out", type=output_folder, default=Path("slimgrade-check"))
    common(check)
    bundle_option(check, "the expected bundle to grade against")

    batch = add("batch", "grade every submission in a folder")
    batch.add_argument("path", type=existing_folder)
    batch.add_argument("--out", type=output_folder, required=True)
    batch.add_argument("--workers", type=positive_int, default=None,
                       help="submissions graded at once on this machine (default 1)")
    batch.add_argument("--force", action="store_true", help="grade again what is already graded")
    batch.add_argument("--only", nargs="+", metavar="ID", default=None,
                       help="grade only these hand-ins (student ids or folder/.zip names), again "
                            "if they were graded; the others stay as they are")
    batch.add_argument("--exclude", action="append", metavar="GLOB", default=[],
                       help="leave out hand-ins whose name or id matches (repeatable, e.g. 'TA-*')")
    batch.add_argument("--rubric", type=rubric_file, default=None)
    batch.add_argument("--run-cache", type=output_folder, default=None,
                       help="reuse runs of byte-identical notebooks and inputs from this folder")
    cluster = batch.add_argument_group(
        "on a Dask cluster", "grade on other machines (pip install 'slimgrade[cluster]'); "
        "results come back into --out as on this machine")
    cluster.add_argument("--scheduler", metavar="ADDRESS", default=None,
                         help="the scheduler of a running Dask cluster, e.g. tcp://host:8786")
    cluster.add_argument("--cluster", choices=["slurm"], default=None,
                         help="start a cluster for this batch: slurm (through dask-jobqueue)")
    cluster.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                         help="Slurm jobs to submit (default 1)")
    cluster.add_argument("--gpus-per-job", type=non_negative_int, default=None, metavar="G",
                         help="GPUs per job, one grading per GPU (default 0; 1 with --device cuda)")
    cluster.add_argument("--partition", default=None, metavar="P", help="the Slurm partition")
    cluster.add_argument("--walltime", type=walltime, default=None, metavar="T",
                         help="each job's time limit, HH:MM:SS (default 02:00:00 quick, "
                              "48:00:00 full): longer than one grading")
    cluster.add_argument("--cores-per-job", type=positive_int, default=None, metavar="C",
                         help="CPUs per job (default 4 per grading slot)")
    cluster.add_argument("--memory-per-job", type=memory_size, default=None, metavar="M",
                         help="memory per job, e.g. 64GB (default: twice the profile's memory "
                              "limit of a run, plus 4 GB, per grading slot)")
    common(batch, device_type=device_name)
    bundle_option(batch, "the expected bundle every grading uses")

    reference = add("reference", "build a profile's expected bundle, or check a rebuild's drift")
    reference.add_argument("--out", type=output_folder, default=None,
                           help="the folder to write the bundle into (with --verify: keep the "
                                "rebuild there)")
    reference.add_argument("--verify", action="store_true",
                           help="rebuild the bundle and compare it with the shipped one (or "
                                "--bundle) within documented tolerances; exit 3 past them")
    common(reference)
    bundle_option(reference, "with --verify, the bundle to compare the rebuild with")
    return parser


def choose_lab(args: argparse.Namespace):
    """The lab named by --lab, or the one the hand-in (a class's, for batch) is of."""
    from grader.lab import get_lab, lab_of

    if args.lab is not None or args.command == "reference":
        return get_lab(args.lab)
    return lab_of(args.path, several=args.command == "batch")


def check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What depends on several arguments; ``parser.error`` (exit 2) with one sentence."""
    from grader.lab import LabError
    from grader.score import load_rubric

    try:
        lab = args.lab_object = choose_lab(args)
    except LabError as error:
        parser.error(str(error))
    args.profile = args.profile or lab.default_profile
    if args.profile not in lab.profiles:
        parser.error(f"argument --profile: the {lab.name} lab has no profile {args.profile!r} "
                     f"(choose from {', '.join(sorted(lab.profiles))}).")
    problem = lab.data_problem(lab.profiles[args.profile], args.data_root)
    if problem:
        parser.error(problem)
    rubric = getattr(args, "rubric", None)
    if rubric is not None:
        problem = rubric_problem(load_rubric(rubric), lab)
        if problem:
            parser.error(f"argument --rubric: {rubric}: {problem}")
    if args.command == "batch":
        from grader.batch import BatchError, class_entries

        problem = cluster_problem(args)
        if problem:
            parser.error(problem)
        if args.device is not None and not (args.scheduler or args.cluster):
            try:  # on a cluster the workers have the GPUs, not this machine
                device(args.device)
            except argparse.ArgumentTypeError as error:
                parser.error(f"argument --device: {error}")
        try:
            class_entries(args.path, args.out, args.only, args.exclude, lab.notebooks)
        except BatchError as error:
            parser.error(str(error))
    if args.command in ("grade", "check"):
        from grader.prepare import several_submissions

        students = several_submissions(args.path, lab.notebooks)
        if students:
            shown = ", ".join(students[:8]) + (f" and {len(students) - 8} more" if len(students) > 8 else "")
            parser.error(f"{args.path} holds the submissions of {len(students)} students ({shown}), "
                         f"not one: grade them all with 'slimgrade batch {args.path} --out DIR', or "
                         f"one with 'slimgrade {args.command} {args.path / students[0]}'.")


def check_bundle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Find and check the expected bundle before anything runs (``args.found_bundle``): a
    hash that does not match, another profile's bundle or none at all is a usage error."""
    from grader.bundles import BundleError

    if args.command == "reference" and not args.verify:
        if args.out is None:
            parser.error("give --out DIR, the folder to write the bundle into (or --verify to "
                         "rebuild it and compare the rebuild with the shipped bundle).")
        if args.bundle is not None:
            parser.error("--bundle names the bundle to compare a rebuild with: use it with --verify.")
        return
    try:
        args.found_bundle = args.lab_object.resolve_bundle(_profile(args), args.bundle, args.cache)
    except BundleError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:  # argparse exits (2 for bad usage, 0 for --help and --version); main returns instead
        args = parser.parse_args(argv)
        check_usage(parser, args)
        check_bundle(parser, args)
    except SystemExit as leaving:
        return leaving.code if isinstance(leaving.code, int) else USAGE_ERROR
    if args.debug:  # the tracebacks of evaluation steps that became 'error' facts
        import logging
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("grader").setLevel(logging.DEBUG)
    from grader.bundles import BundleError
    from grader.prepare import PrepareError

    previous = _stop_on_signals()
    try:
        return COMMANDS[args.command](args)
    except (PrepareError, BundleError, *args.lab_object.user_errors) as error:
        print(f"slimgrade: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("slimgrade: interrupted; finished results are kept.", file=sys.stderr)
        return HARNESS_ERROR
    except Exception as error:  # noqa: BLE001 - the last line of defence of a CLI
        if args.debug:
            raise
        print(f"slimgrade: internal error ({type(error).__name__}: {error}); run again with "
              "--debug for details.", file=sys.stderr)
        return HARNESS_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_on_signals() -> dict:
    """SIGTERM, like Ctrl-C, raises KeyboardInterrupt in the main thread, after telling the
    kernels to die: the grading then leaves through its clean-up (kernels shut down, work
    root removed) instead of vanishing and leaking them. Returns the handlers replaced."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: object) -> None:
        execute = sys.modules.get("grader.execute")  # no import in a signal handler
        if execute is not None:
            execute.abort_kernels()
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


def _profile(args: argparse.Namespace):
    return args.lab_object.profiles[args.profile]


def _run_progress(desc: str, args: argparse.Namespace, what: str):
    """A Progress over the runs of one grading and the callback grade() calls per run."""
    from grader.progress import Progress

    lab, profile = args.lab_object, _profile(args)
    total = lab.planned_runs(profile)
    progress = Progress(desc, total, "run", announce=f"{what}: up to {total} notebook runs "
                        f"({profile.name} profile), each notebook in a fresh kernel.")
    return progress, (lambda run_id: progress.step(f"finished {lab.report.run_label(run_id)}"))


def run_grade(args: argparse.Namespace) -> int:
    from grader.prepare import PrepareError, hand_in_problem
    from grader.render import gradescope_results

    lab, profile = args.lab_object, _profile(args)
    # The path exists (checked while parsing): what may be wrong is the hand-in itself (a
    # .zip that does not open, no lab notebook). That is the student's, and it gets a grade
    # of 0 with the reason, as in a batch, not a usage error.
    problem = hand_in_problem(args.path, lab.notebooks)
    if problem:
        result = not_graded(args, problem)
    else:
        from grader.pipeline import grade

        progress, tick = _run_progress(f"grading {args.path.name}", args, f"grading {args.path}")
        try:
            with progress:
                result = grade(args.path, args.out, profile, args.data_root, args.device,
                               args.workers, args.rubric, args.cache, on_progress=tick,
                               run_cache=args.run_cache, bundle=args.found_bundle, lab=lab)
        except PrepareError as error:
            result = not_graded(args, str(error))
    if args.format == "gradescope":
        (args.out / "results.json").write_text(json.dumps(gradescope_results(result, args.lab_object.report), indent=1))
    print(f"{result['submission']}: {result['score']:g}/{result['max_score']:g} "
          f"(+{result['manual_max_points']:g} graded by hand) -> {args.out / 'report.html'}")
    return 0


def not_graded(args: argparse.Namespace, message: str) -> dict:
    """The result of a hand-in that cannot be graded at all: 0 points, the reason as its failure."""
    from grader.batch import failure_result, student_id, write_failure
    from grader.score import load_rubric

    print(f"slimgrade: {message}", file=sys.stderr)
    result = failure_result(student_id(args.path.resolve().name), args.profile,
                            load_rubric(args.rubric, args.lab_object.name),
                            " ".join(message.split()), "", 0.0,
                            bundle=args.found_bundle.to_dict())
    write_failure(Path(args.out), result, args.lab_object.name)
    return result


def run_check(args: argparse.Namespace) -> int:
    from grader.pipeline import grade

    progress, tick = _run_progress("checking your lab", args, f"checking {args.path.resolve()}")
    with progress:
        result = grade(args.path, args.out, _profile(args), args.data_root, args.device,
                       on_progress=tick, bundle=args.found_bundle, lab=args.lab_object)
    print(summary_text(result))
    print(f"\nFull report: {(args.out / 'report.html').resolve()}")
    return 0


SEVERITY_WORDS = {"error": "Mistake", "warning": "Worth fixing (costs nothing)",
                  "info": "Worth knowing (not your fault)"}


def summary_text(result: dict) -> str:
    lines = [f"Score {result['score']:g}/{result['max_score']:g} "
             f"(the report, {result['manual_max_points']:g} points, is graded by hand)", ""]
    for check in result["checks"]:
        if check["status"] != "skip":
            lines.append(f"  [{STATUS_MARK[check['status']]}] {check['title']}: "
                         f"{check['points']:g}/{check['max_points']:g}  {check['message']}")
    for failure in result["failures"]:
        lines += ["", f"Failure ({failure['kind']}): {failure['message']}"]
    for diagnosis in result["diagnoses"]:
        lines += ["", f"{SEVERITY_WORDS.get(diagnosis['severity'], 'Mistake')} "
                      f"[{diagnosis['id']}]: {diagnosis['message']}"]
        if diagnosis.get("hint"):
            lines.append(f"  Hint: {diagnosis['hint']}")
    for note in result.get("profile_notes") or []:
        lines += ["", f"Not counted: {note['message']}", f"  {note.get('explanation', '')}".rstrip()]
    return "\n".join(lines)


def run_batch(args: argparse.Namespace) -> int:
    from grader.batch import batch_summary, grade_class

    options = dict(data_root=args.data_root, device=args.device, force=args.force,
                   rubric_path=args.rubric, cache_root=args.cache, run_cache=args.run_cache,
                   only=args.only, exclude=args.exclude, bundle=args.found_bundle,
                   lab=args.lab_object.name)
    if args.scheduler or args.cluster:  # Dask is imported only here
        from grader.cluster import ClusterSpec, grade_class_on_cluster

        spec = ClusterSpec(scheduler=args.scheduler, cluster=args.cluster, jobs=args.jobs or 1,
                           gpus_per_job=args.gpus_per_job or 0, partition=args.partition,
                           walltime=args.walltime, cores_per_job=args.cores_per_job,
                           memory_per_job=args.memory_per_job)
        rows = grade_class_on_cluster(args.path, args.out, _profile(args), spec, **options)
    else:
        rows = grade_class(args.path, args.out, _profile(args), workers=args.workers or 1,
                           **options)
    print(batch_summary(rows, args.out))
    return 0


def run_reference(args: argparse.Namespace) -> int:
    lab, profile = args.lab_object, _profile(args)
    if args.verify:
        report, drifted = lab.verify_reference(profile, args.found_bundle, args.out,
                                               args.data_root, args.device)
        print(report)
        return DRIFT_FOUND if drifted else 0
    print(lab.build_reference(profile, args.out, args.data_root, args.device))
    return 0


COMMANDS = {"grade": run_grade, "check": run_check, "batch": run_batch, "reference": run_reference}

if __name__ == "__main__":
    sys.exit(main())
