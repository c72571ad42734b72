"""``slimgrade``: grade, check, batch, reference.

Exit codes: 0 when a grade (or bundle) was produced, whatever the score; 2 for
bad usage (a wrong path, a missing data root); 1 when the harness itself failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE_ERROR, HARNESS_ERROR = 2, 1
STATUS_MARK = {"pass": "ok  ", "fail": "FAIL", "error": "ERR ", "skip": "hand"}


def build_parser() -> argparse.ArgumentParser:
    from reference.profiles import PROFILES

    parser = argparse.ArgumentParser(prog="slimgrade", description=(
        "Grades the network-slimming pruning lab: runs the notebooks, finds which mistake was "
        "made and explains it."))
    parser.add_argument("--debug", action="store_true", help="show tracebacks of harness errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(command: argparse.ArgumentParser, profile_default: str) -> None:
        command.add_argument("--profile", choices=sorted(PROFILES), default=profile_default,
                             help="data, width, epochs and tolerances (default: %(default)s)")
        command.add_argument("--data-root", type=Path, default=None,
                             help="folder holding cifar-10-batches-py/ (the full profile)")
        command.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
        command.add_argument("--cache", type=Path, default=None,
                             help="where expected bundles are cached (default: ~/.cache/slimgrade)")

    grade = commands.add_parser("grade", help="grade one submission (folder or .zip)")
    grade.add_argument("path", type=Path)
    grade.add_argument("--out", type=Path, default=Path("slimgrade-out"))
    grade.add_argument("--format", choices=["slimgrade", "gradescope"], default="slimgrade",
                       help="gradescope also writes results.json in Gradescope's format")
    grade.add_argument("--rubric", type=Path, default=None, help="a rubric JSON file to use instead of the course's")
    grade.add_argument("--workers", type=int, default=2, help="notebook runs at once (default 2)")
    grade.add_argument("--run-cache", type=Path, default=None,
                       help="reuse runs of byte-identical notebooks and inputs from this folder")
    common(grade, "quick")

    check = commands.add_parser("check", help="check your own lab folder before handing it in")
    check.add_argument("path", type=Path, nargs="?", default=Path("."))
    check.add_argument("--out", type=Path, default=Path("slimgrade-check"))
    common(check, "quick")

    batch = commands.add_parser("batch", help="grade every submission in a folder")
    batch.add_argument("path", type=Path)
    batch.add_argument("--out", type=Path, required=True)
    batch.add_argument("--workers", type=int, default=1, help="submissions graded at once")
    batch.add_argument("--force", action="store_true", help="grade again what is already graded")
    batch.add_argument("--rubric", type=Path, default=None)
    batch.add_argument("--run-cache", type=Path, default=None,
                       help="reuse runs of byte-identical notebooks and inputs from this folder")
    common(batch, "quick")

    reference = commands.add_parser("reference", help="build a profile's expected bundle")
    reference.add_argument("--out", type=Path, required=True)
    common(reference, "quick")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grader.checkpoints import CheckpointError
    from grader.prepare import PrepareError
    from reference.data import DataError

    try:
        return COMMANDS[args.command](args)
    except (PrepareError, DataError, CheckpointError) as error:
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


def _profile(args: argparse.Namespace):
    from reference.profiles import get_profile

    return get_profile(args.profile)


def _progress(total_hint: str):
    """A tqdm bar over runs on a terminal, silence elsewhere."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=total_hint, unit="run", disable=not sys.stderr.isatty())
    return bar, (lambda run_id: (bar.set_postfix_str(run_id), bar.update(1)))


def run_grade(args: argparse.Namespace) -> int:
    from grader.pipeline import grade
    from grader.render import gradescope_results

    bar, tick = _progress(f"grading {args.path.name}")
    with bar:
        result = grade(args.path, args.out, _profile(args), args.data_root, args.device,
                       args.workers, args.rubric, args.cache, on_progress=tick,
                       run_cache=args.run_cache)
    if args.format == "gradescope":
        (args.out / "results.json").write_text(json.dumps(gradescope_results(result), indent=1))
    print(f"{result['submission']}: {result['score']:g}/{result['max_score']:g} "
          f"(+{result['manual_max_points']:g} graded by hand) -> {args.out / 'report.html'}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from grader.pipeline import grade

    bar, tick = _progress("checking your lab")
    with bar:
        result = grade(args.path, args.out, _profile(args), args.data_root, args.device,
                       on_progress=tick)
    print(summary_text(result))
    print(f"\nFull report: {(args.out / 'report.html').resolve()}")
    return 0


def summary_text(result: dict) -> str:
    lines = [f"Score {result['score']:g}/{result['max_score']:g} "
             f"(the report, {result['manual_max_points']:g} points, is graded by hand)", ""]
    for check in result["checks"]:
        if check["status"] != "skip":
            lines.append(f"  [{STATUS_MARK[check['status']]}] {check['title']}: "
                         f"{check['points']:g}/{check['max_points']:g}  {check['message']}")
    for diagnosis in result["diagnoses"]:
        lines += ["", f"{'Note' if diagnosis['severity'] == 'info' else 'Mistake'} "
                      f"[{diagnosis['id']}]: {diagnosis['message']}", f"  Hint: {diagnosis['hint']}"]
    for failure in result["failures"]:
        lines += ["", f"Failure ({failure['kind']}): {failure['message']}"]
    return "\n".join(lines)


def run_batch(args: argparse.Namespace) -> int:
    from grader.batch import grade_class

    grade_class(args.path, args.out, _profile(args), data_root=args.data_root, device=args.device,
                workers=args.workers, force=args.force, rubric_path=args.rubric, cache_root=args.cache,
                run_cache=args.run_cache)
    return 0


def run_reference(args: argparse.Namespace) -> int:
    from reference.bundle import build_bundle

    manifest = build_bundle(_profile(args), args.out, args.data_root, args.device)
    sparse = manifest["sparsity"]
    print(f"Expected bundle of profile {args.profile} in {args.out}: sparse accuracy "
          f"{sparse['lambda']['best_prec1']:.1f}% (lambda 0: {sparse['lambda0']['best_prec1']:.1f}%), "
          + ", ".join(f"pruned {r}: {e['accuracy_pruned']:.1f}% (recalibrated "
                      f"{e['accuracy_recalibrated']:.1f}%)" for r, e in manifest["prune"].items())
          + f", fine-tuned {manifest['finetune']['best_prec1']:.1f}%.")
    return 0


COMMANDS = {"grade": run_grade, "check": run_check, "batch": run_batch, "reference": run_reference}

if __name__ == "__main__":
    sys.exit(main())
