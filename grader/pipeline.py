"""One grading: prepare -> execute -> evaluate -> diagnose -> score -> render.

The runs of a grading form a small dependency graph (docs/design.md): the
isolated runs start at once on reference inputs, the chained runs wait for the
student's own checkpoints. ``grader.schedule`` runs them, two at a time (two
cores) by default.
"""
from __future__ import annotations

import ast
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import torch

from grader import __version__
from grader.checkpoints import CheckpointError, load_student_checkpoint, state_dict_of
from grader.diagnose import diagnose
from grader.evaluate import (EDGE_RATIO, TrustedData, compare_sparsity, edge_case_state,
                             finetune_facts, prune_facts, safely, sparsity_facts)
from grader.execute import RunResult
from grader.prepare import Submission, prepare
from grader.render import render
from grader.runcache import RunCache
from grader.sandbox import sandbox_available
from grader.schedule import PlannedRun, execute_all
from grader.score import load_rubric, score
from reference.bundle import (SPARSE, ensure_bundle, environment, load_checkpoint,
                              load_manifest, loaders, prune_file)
from reference.data import load_dataset
from reference.profiles import Profile

WEIGHT_PATH, PRUNE_PATH, FINETUNE_PATH = "model_best.pth", "model_prune.pth", "model_prune_finetune.pth"
KNOWN_PRINTED = ("Test set: Accuracy", "PRUNE RATIO", "LOADING CHECKPOINT", "layer index",
                 "PREPROCESSING SUCCESSFUL", "RESUME PRUNE MODEL", "TRAIN PRUNED MODEL DONE",
                 "NO CHECKPOINT FOUND")


def profile_parameters(profile: Profile, device: str) -> dict:
    return {"EPOCHS": profile.epochs, "TRAIN_BATCH_SIZE": profile.train_batch_size,
            "TEST_BATCH_SIZE": profile.test_batch_size, "LEARNING_RATE": profile.learning_rate,
            "MOMENTUM": profile.momentum, "WEIGHT_DECAY": profile.weight_decay,
            "SEED": profile.seed, "DATA_ROOT": "./data", "DEVICE": device,
            "CUDA": device.startswith("cuda"), "SPARSITY_REGULARIZATION": True, "RESUME": False,
            "WEIGHT_PATH": WEIGHT_PATH, "PRUNE_PATH": PRUNE_PATH,
            "PRUNE_FINETUNE_PATH": FINETUNE_PATH}


def student_lambda(notebook: Path | None) -> float | None:
    """The last literal ``LAMBDA = <number>`` of the handed-in notebook, read without running it."""
    if notebook is None:
        return None
    value = None
    for cell in read_notebook(notebook).cells:
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines()
                         if not line.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "LAMBDA"
                                                    for t in node.targets):
                try:
                    value = float(ast.literal_eval(node.value))
                except (ValueError, TypeError, SyntaxError):
                    value = None
    return value


def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def plan_runs(profile: Profile, bundle: Path, device: str, edge_input: Callable[[], Path],
              own_lambda: float | None) -> list[PlannedRun]:
    base = profile_parameters(profile, device)
    tune = {**base, "EPOCHS": profile.finetune_epochs}
    ratio = profile.finetune_ratio
    train, tune_cost = float(profile.epochs), float(profile.finetune_epochs)  # a pruning: ~1
    runs = [
        PlannedRun("sparsity-lambda0", "sparsity_train", {**base, "LAMBDA": 0.0}, expected=(WEIGHT_PATH,),
                   cost=train),
        PlannedRun("sparsity", "sparsity_train", {**base, "LAMBDA": profile.sparsity_lambda},
                   expected=(WEIGHT_PATH,), cost=train),
        *[PlannedRun(f"prune-{r}", "vggprune", {**base, "PRUNE_PERCENT": r},
                     {WEIGHT_PATH: bundle / SPARSE}, expected=(PRUNE_PATH,))
          for r in profile.prune_ratios],
        PlannedRun("prune-edge", "vggprune", {**base, "PRUNE_PERCENT": EDGE_RATIO},
                   {WEIGHT_PATH: edge_input}, expected=(PRUNE_PATH,)),
        PlannedRun("finetune", "train_prune_model", tune, {PRUNE_PATH: bundle / prune_file(ratio)},
                   expected=(FINETUNE_PATH,), cost=tune_cost),
    ]
    # The chained run trains with the student's own LAMBDA (scaled to the profile's length);
    # when that equals the profile's lambda the isolated sparsity run already is that run.
    sparse_run = "sparsity"
    if own_lambda is None or abs(own_lambda * profile.lambda_scale - profile.sparsity_lambda) > 1e-12:
        sparse_run = "chained-sparsity"
        runs.append(PlannedRun(sparse_run, "sparsity_train", dict(base), scale={"LAMBDA": profile.lambda_scale},
                               expected=(WEIGHT_PATH,), cost=train))
    for r in profile.prune_ratios:
        runs.append(PlannedRun(f"chained-prune-{r}", "vggprune", {**base, "PRUNE_PERCENT": r},
                               {WEIGHT_PATH: Path(sparse_run) / WEIGHT_PATH}, after=(sparse_run,),
                               expected=(PRUNE_PATH,)))
    runs.append(PlannedRun("chained-finetune", "train_prune_model", tune,
                           {PRUNE_PATH: Path(f"chained-prune-{ratio}") / PRUNE_PATH},
                           after=(f"chained-prune-{ratio}",), expected=(FINETUNE_PATH,),
                           cost=tune_cost))
    return runs


def evaluate_all(results: dict[str, RunResult | None], work_root: Path, data: TrustedData,
                 edge_state: dict, own_lambda: float | None) -> dict:
    """The facts of every run that ran, keyed the way diagnose and score read them."""
    bundle, profile, manifest = data.bundle_dir, data.profile, data.manifest
    sparse_state = load_checkpoint(bundle / SPARSE)["state_dict"]

    def ok(run_id: str) -> RunResult | None:
        result = results.get(run_id)
        return result if result is not None and not result.failure else None

    def sparsity(run_id: str) -> dict | None:
        return safely(lambda: sparsity_facts(work_root / run_id / WEIGHT_PATH, data)) if ok(run_id) else None

    def pruned(run_id: str, original: dict, ratio: float) -> dict | None:
        result = results.get(run_id)
        if result is None:
            return None
        facts = safely(lambda: prune_facts(work_root / run_id, result.state, result.stdout_text,
                                           original, ratio, data))
        if result.failure:
            facts["run_failure"] = result.failure.message
        return facts

    def tuned(run_id: str, start: dict | None) -> dict | None:
        if not ok(run_id):
            return None
        start = start or {}
        cfg = start.get("cfg_from_shapes") or start.get("cfg")
        return safely(lambda: finetune_facts(work_root / run_id / FINETUNE_PATH, cfg,
                                             start.get("accuracy"), data))

    evaluation: dict = {"runs": {}, "sparsity": {}, "prune": {}, "chained": {"lambda": own_lambda},
                        "student_lambda": own_lambda}
    for run_id, result in results.items():
        evaluation["runs"][run_id] = _run_summary(result)
    lam, lam0 = sparsity("sparsity"), sparsity("sparsity-lambda0")
    evaluation["sparsity"] = {k: v for k, v in (("lambda", lam), ("lambda0", lam0)) if v}
    if lam and "gamma" in lam:
        evaluation["sparsity"]["comparison"] = compare_sparsity(
            lam, lam0 if lam0 and "gamma" in lam0 else None,
            {"gamma": manifest["sparsity"]["lambda"]["gamma"]})
    for ratio in profile.prune_ratios:
        facts = pruned(f"prune-{ratio}", sparse_state, ratio)
        if facts is not None:
            evaluation["prune"][str(ratio)] = facts
    edge = pruned("prune-edge", edge_state, EDGE_RATIO)
    if edge is not None:
        evaluation["prune"]["edge"] = edge
    reference_prune = manifest["prune"][str(profile.finetune_ratio)]
    reference_start = {"cfg": reference_prune["cfg"], "accuracy": reference_prune["accuracy_pruned"]}
    finetune = tuned("finetune", reference_start)
    if finetune is not None:
        evaluation["finetune"] = finetune

    chained = evaluation["chained"]
    own_sparse = "chained-sparsity" if "chained-sparsity" in results else "sparsity"
    chained["sparsity"] = sparsity(own_sparse) if own_sparse != "sparsity" else lam
    chained["prune"] = {}
    if ok(own_sparse):
        own_state = _own_state(work_root / own_sparse / WEIGHT_PATH)
        for ratio in profile.prune_ratios:
            facts = pruned(f"chained-prune-{ratio}", own_state, ratio) if own_state else None
            if facts is not None:
                chained["prune"][str(ratio)] = facts
    chained_finetune = tuned("chained-finetune", chained["prune"].get(str(profile.finetune_ratio)))
    if chained_finetune is not None:
        chained["finetune"] = chained_finetune
    evaluation["reference"] = reference_summary(manifest, profile)
    return evaluation


def _own_state(path: Path) -> dict | None:
    """The student's own sparse weights, the original of the chained pruning runs."""
    try:
        return state_dict_of(load_student_checkpoint(path), path.name)
    except CheckpointError:
        return None


def _run_summary(result: RunResult | None) -> dict:
    if result is None:
        return {"skipped": True, "failure": None}
    return {"notebook": result.notebook, "duration_s": round(result.duration_s, 2),
            "failure": _failure_dict(result), "images": result.images,
            "output_truncated": result.output_truncated}


def _failure_dict(result: RunResult) -> dict | None:
    f = result.failure
    if f is None:
        return None
    return {"notebook": f.notebook, "run": result.run_id, "kind": f.kind, "message": f.message,
            "cell_index": f.cell_index, "error_tail": f.error_tail}


def reference_summary(manifest: dict, profile: Profile) -> dict:
    return {
        "sparsity_gamma": {k: v["gamma"] for k, v in manifest["sparsity"].items()},
        "sparsity_accuracy": manifest["sparsity"]["lambda"]["best_prec1"],
        "prune": {ratio: {"kept_per_layer": e["kept_per_layer"], "cfg": e["cfg"],
                          "accuracy_pruned": e["accuracy_pruned"],
                          "accuracy_recalibrated": e["accuracy_recalibrated"]}
                  for ratio, e in manifest["prune"].items()},
        "finetune_accuracy": manifest["finetune"]["best_prec1"],
        "accuracy_band_pct": profile.accuracy_band_pct,
    }


def handed_in(submission: Submission) -> dict:
    """What each notebook printed as handed in (the lab's key lines), read as text."""
    summary = {}
    for name, path in submission.notebooks.items():
        if path is None:
            summary[name] = {"found": False}
            continue
        printed: list[str] = []
        try:
            for cell in read_notebook(path).cells:
                for output in cell.get("outputs", []):
                    text = output.get("text", "") if output.get("output_type") == "stream" else ""
                    printed += [line for line in text.splitlines() if line.startswith(KNOWN_PRINTED)]
        except (nbformat.reader.NotJSONError, json.JSONDecodeError, UnicodeDecodeError,
                AttributeError, KeyError, TypeError) as error:
            summary[name] = {"found": True, "path": str(path.relative_to(submission.root)),
                             "unreadable": f"{path.name} is not a valid notebook ({error})"}
            continue
        summary[name] = {"found": True, "path": str(path.relative_to(submission.root)),
                         "printed": printed[:200]}
    return summary


def _strip_private(facts: object) -> object:
    """Drop bulky per-channel arrays from what goes into result.json."""
    if isinstance(facts, dict):
        return {k: _strip_private(v) for k, v in facts.items() if k != "gammas"}
    if isinstance(facts, list):
        return [_strip_private(v) for v in facts]
    return facts


def grade(submission_path: Path, out_dir: Path, profile: Profile, data_root: Path | None = None,
          device: str | None = None, workers: int = 2, rubric_path: Path | None = None,
          cache_root: Path | None = None, keep_work: bool = False,
          on_progress: Callable[[str], None] | None = None, run_cache: Path | None = None,
          threads: int | None = None) -> dict:
    """Grade one submission and write result.json, report.html and the executed notebooks.

    ``threads`` is each kernel's torch thread count; pass it when several gradings share
    the machine (by default the cores are shared among this grading's ``workers``).
    """
    started = time.monotonic()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    work_root = Path(tempfile.mkdtemp(prefix="slimgrade-"))
    try:
        submission = prepare(Path(submission_path), work_root)
        bundle = ensure_bundle(profile, cache_root, data_root, device)
        manifest = load_manifest(bundle)
        dataset = load_dataset(profile.dataset, data_root)
        train_loader, test_loader = loaders(profile, dataset, torch.device(device), profile.seed)
        data = TrustedData(profile, manifest, bundle, train_loader, test_loader)
        edge_state, _ = edge_case_state(load_checkpoint(bundle / SPARSE)["state_dict"])

        def edge_input() -> Path:
            path = work_root / "edge_input.pth"
            if not path.exists():
                torch.save({"epoch": 0, "state_dict": edge_state, "best_prec1": 0.0}, path)
            return path

        own_lambda = student_lambda(submission.notebooks["sparsity_train"])
        plan = plan_runs(profile, bundle, device, edge_input, own_lambda)
        results = execute_all(plan, submission, work_root, profile, data_root, device, workers,
                              on_progress, RunCache(run_cache) if run_cache else None,
                              threads=threads)
        evaluation = evaluate_all(results, work_root, data, edge_state, own_lambda)
        evaluation["prepare"] = {"refused_entries": submission.refused_entries,
                                 "missing_notebooks": submission.missing}
        diagnoses = diagnose(evaluation)
        checks, total, max_total = score(evaluation, diagnoses, load_rubric(rubric_path))
        notebooks_dir = out_dir / "notebooks"
        notebooks_dir.mkdir(exist_ok=True)
        for run_id, result in results.items():
            if result is not None and result.executed_notebook.exists():
                shutil.copyfile(result.executed_notebook, notebooks_dir / f"{run_id}.ipynb")
        failures = list({(f["notebook"], f["kind"], f["message"]): f for f in
                         (_failure_dict(r) for r in results.values() if r) if f}.values())
        failures += [{"notebook": f"{name}.ipynb", "run": None, "kind": "missing-artifact",
                      "message": f"{name}.ipynb was not found in the submission: hand it in.",
                      "cell_index": None, "error_tail": ""} for name in submission.missing]
        result = {
            "slimgrade_version": __version__, "submission": submission.name,
            "profile": profile.name,
            "graded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - started, 1),
            "score": total, "max_score": max_total,
            "manual_max_points": sum(c.max_points for c in checks if c.status == "skip"),
            "checks": [c.to_dict() for c in checks],
            "diagnoses": [d.to_dict() for d in diagnoses],
            "failures": failures,
            "metrics": _strip_private({k: v for k, v in evaluation.items() if k != "prepare"}),
            "handed_in": handed_in(submission),
            "environment": {**environment(), "device": device, "sandbox": sandbox_available()},
        }
        render(result, out_dir)
        return result
    finally:
        if not keep_work:
            shutil.rmtree(work_root, ignore_errors=True)
