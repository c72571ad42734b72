"""One grading of Lab 5: the notebook's definitions run in the sandbox, the model measured outside.

The hand-in is a notebook that defines and trains a model, the trained weights (a
state_dict), and the three figures the notebook printed. One run executes the notebook
with its training left out (``definitions_only``: imports, functions, classes and
assignments that call none of the notebook's own functions), places the handed-in
weights, and lets the lab's runtime export the model they fit
(``labs.lowcomplexity.runtime``). Outside the sandbox the grader loads that export
without running pickle or student code (``labs.lowcomplexity.measure``), counts
parameters and FLOPs on the graph, computes top-1 accuracy from the logits on the
profile's test set, whose labels never enter the sandbox, and compares the printed
claims with all of it.
"""
from __future__ import annotations

import ast
import hashlib
import time
from pathlib import Path

import nbformat
import numpy as np

from grader.bundles import read_manifest
from grader.execute import RunResult, parse_cell, read_notebook
from grader.lab import GradingRequest, KernelSetup, Outcome
from grader.pipeline import split_failures
from grader.prepare import Submission
from grader.schedule import PlannedRun
from grader.untrusted import (CheckpointLimits, MiB, UntrustedFileError, load_checkpoint,
                              read_bytes, regular_file_problem)
from labs.lowcomplexity.bundle import load_data
from labs.lowcomplexity.diagnoses import ACCURACY_TOLERANCE_PCT, CATALOGUE, NOISE_LEVELS
from labs.lowcomplexity.measure import (MEASURE_SECONDS, ExportRefused, MeasureError, Work,
                                        accuracy, claims_from_outputs, compare_claims, count,
                                        load_program, perturbed, weights_mismatch)
from labs.lowcomplexity.profiles import Profile
from labs.lowcomplexity.runtime import EXPORT_DIR, EXPORT_KEY, MODEL_KEY, TRANSFORMS_KEY, WEIGHTS_KEY

HERE = Path(__file__).resolve().parent
NOTEBOOK = "lowcomplexity"
RUN = "export"
WEIGHT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin")
DEFAULT_WEIGHTS = "model.pth"
# A handed-in state_dict: a few MB for the lab's models, 100 MB for a ResNet-50.
WEIGHT_LIMITS = CheckpointLimits(max_file_bytes=400 * MiB, max_unpacked_bytes=400 * MiB,
                                 max_entries=4096, max_pickle_bytes=4 * MiB,
                                 max_tensor_numel=50_000_000, max_total_numel=100_000_000)
# Calls whose statements are training, not definitions, when a notebook assigns their result.
TRAINING_CALLS = {"backward", "step", "fit", "train_model", "run_epoch"}
KERNEL_SEES = (
    (HERE.parent / "__init__.py", "the package of the labs"),
    (HERE / "__init__.py", "the package of this lab"),
    (HERE / "runtime.py", "the lab's shims: a stand-in CIFAR100, the model's export"),
    (HERE / "export.py", "torch.export of the model, written as JSON and plain tensors"),
)


def kernel_setup(weights: str | None) -> KernelSetup:
    return KernelSetup(runtime="labs.lowcomplexity.runtime", config={"weights": weights},
                       sees=KERNEL_SEES, sees_data=False)


def definitions_only(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with every statement that is not a definition replaced by ``pass``.

    Kept, at the top level of a cell: imports (one that fails is passed over), functions,
    classes, and assignments that call none of the notebook's own functions (``model =
    Net()`` stays, ``history = train(model)`` goes). Loops, bare calls, shell lines and
    magics go. Cells keep their places, so a failure names the cell a student sees.
    """
    trees = [parse_cell(cell.source) if cell.cell_type == "code" else None
             for cell in notebook.cells]
    own_functions = {node.name for tree in trees if tree is not None for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    copy = nbformat.from_dict(notebook)
    for cell, tree in zip(copy.cells, trees):
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        lines = cell.source.split("\n")
        kept = [] if tree is None else [node for node in tree.body if _definition(node, own_functions)]
        cell.source = "\n".join(_statement(lines, node) for node in kept) or "pass"
    return copy


def _statement(lines: list[str], node: ast.stmt) -> str:
    """A kept statement's source; an import may fail (a FLOP counter not installed here,
    thop or ptflops) without stopping the definitions after it in the cell."""
    text = "\n".join(lines[node.lineno - 1:node.end_lineno])
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
        return text
    body = "\n".join("    " + line for line in text.split("\n"))
    return f"try:\n{body}\nexcept ImportError:\n    pass"


def _definition(node: ast.stmt, own_functions: set[str]) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef)):
        return True
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
        return False
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        function = call.func
        name = function.attr if isinstance(function, ast.Attribute) else \
            function.id if isinstance(function, ast.Name) else None
        if name in own_functions or name in TRAINING_CALLS:
            return False
    return True


def find_weights(submission: Submission) -> Path | None:
    """The handed-in weights: ``model.pth`` when present, else the shallowest file with a
    weights suffix (a link or anything but a regular file is not taken)."""
    root = submission.root
    found = sorted((p for p in root.rglob("*") if p.name.lower().endswith(WEIGHT_SUFFIXES)
                    and regular_file_problem(p) is None),
                   key=lambda p: (p.name != DEFAULT_WEIGHTS, len(p.relative_to(root).parts), str(p)))
    return found[0] if found else None


def hand_in_seed(*files: Path | None) -> int:
    """The seed of a grading's test order, noise and training sample: from the bytes of the
    hand-in, so a regrade gives the same figures, and a model cannot carry answers for the
    seed its own weights decide."""
    digest = hashlib.sha256()
    for path in files:
        if path is not None:
            try:
                digest.update(read_bytes(path, WEIGHT_LIMITS.max_file_bytes))
            except UntrustedFileError:
                digest.update(b"unreadable")
    return int.from_bytes(digest.digest()[:4], "big")


def measure_export(folder: Path, base: Path, data, transforms: dict, claims,
                   train_sample: int, weights: object, seed: int) -> dict:
    """The ``measured`` and ``claim_checks`` of an evaluation, from the export in ``folder``.

    ``weights`` is the grader's own load of the handed-in weights: the export must hold
    them (the kernel ran the student's code and may have exported another model).
    ``seed`` (``hand_in_seed``, recorded) orders the test images, draws the training
    images measured and the noise added to the test images for a second accuracy, so that
    no model can know ahead which image comes where, or what the noisy images are. All the
    runs of the model share one deadline, MEASURE_SECONDS from the start.
    """
    deadline = time.monotonic() + MEASURE_SECONDS
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.test.labels))
    test_images, test_labels = data.test.images[order], data.test.labels[order]
    sample = np.sort(rng.choice(len(data.train.labels), min(train_sample, len(data.train.labels)),
                                replace=False))
    try:
        program = load_program(folder, base)
        mismatch = weights_mismatch(program, weights)
        if mismatch is not None:
            return {"measured": {
                "error": (f"the exported model holds {mismatch}, which is not in the handed-in "
                          "weights: the notebook exported another model than the one the "
                          "weights were loaded into"),
                "refused": False, "not_the_weights": True}}
        complexity = count(program, deadline)
        mean, std = transforms["used"]["mean"], transforms["used"]["std"]
        work = Work()
        test = accuracy(program, test_images, test_labels, mean, std, work=work,
                        deadline=deadline)
        complexity = complexity.with_work(work)
        noisy = accuracy(program, perturbed(test_images, seed, NOISE_LEVELS), test_labels,
                         mean, std, deadline=deadline)
        train = accuracy(program, data.train.images[sample], data.train.labels[sample],
                         mean, std, deadline=deadline)
        as_tested = None
        tested = transforms.get("test_normalize")
        if tested is not None and (tested["mean"], tested["std"]) != (mean, std):
            as_tested = accuracy(program, test_images, test_labels, tested["mean"],
                                 tested["std"], deadline=deadline)
    except MeasureError as error:
        return {"measured": {"error": str(error), "refused": isinstance(error, ExportRefused)}}
    measured = {"parameters": complexity.parameters, "parameter_kb": complexity.parameter_kb,
                "macs": complexity.macs, "flops": complexity.flops,
                "buffer_elements": complexity.buffer_elements,
                "stored_elements": complexity.stored_elements,
                "other_flops": complexity.other_flops, "accuracy_pct": test,
                "noisy_accuracy_pct": noisy, "noise_levels": NOISE_LEVELS, "seed": seed,
                "train_accuracy_pct": train, "accuracy_with_test_transform_pct": as_tested,
                "test_images": len(test_labels)}
    checks = [] if claims is None else [
        {"figure": c.figure, "claimed": c.claimed, "measured": c.measured,
         "convention": c.convention, "ok": c.ok, "evidence": c.evidence}
        for c in compare_claims(claims, complexity, test, ACCURACY_TOLERANCE_PCT)]
    return {"measured": measured, "claim_checks": checks}


class LowComplexityGrading:
    """One hand-in: the weights checked, the definitions run and exported, the model measured."""

    def __init__(self, request: GradingRequest) -> None:
        self.request = request
        self.profile: Profile = request.profile
        self.manifest = read_manifest(request.bundle.path)
        submission = request.submission
        self.notebook = submission.notebooks.get(NOTEBOOK)
        self.weights = find_weights(submission)
        self.weights_problem = None
        self.handed_weights: object = None  # the grader's own load, to check the export by
        if self.weights is not None:
            try:  # refused here, a pickle payload never reaches even the kernel
                self.handed_weights = load_checkpoint(self.weights, WEIGHT_LIMITS,
                                                      submission.root)
            except UntrustedFileError as error:
                self.weights_problem = str(error)
        usable = self.weights is not None and self.weights_problem is None
        self.kernel = kernel_setup(self.weights.name if usable else None)
        self.definitions: Path | None = None
        if self.notebook is not None:
            try:
                derived = definitions_only(read_notebook(self.notebook))
            except Exception:  # an unreadable notebook: its run says why
                derived = None
            if derived is not None:
                self.definitions = request.work_root / "definitions" / self.notebook.name
                self.definitions.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(derived, self.definitions)

    def plan(self) -> list[PlannedRun]:
        usable = self.weights is not None and self.weights_problem is None
        inputs = {self.weights.name: self.weights} if usable else {}
        return [PlannedRun(RUN, NOTEBOOK, {}, inputs, source=self.definitions)]

    def conclude(self, results: dict[str, RunResult | None]) -> Outcome:
        result = results.get(RUN)
        state = result.state if result is not None else {}
        evaluation: dict = {
            "profile": self.profile.name,
            "runs": {RUN: _run_summary(result)},
            "weights": {**_plain(state.get(WEIGHTS_KEY)),
                        "file": self.weights.name if self.weights else None,
                        "found": self.weights is not None, "refused": self.weights_problem},
            "model": _plain(state.get(MODEL_KEY)),
            "export": _plain(state.get(EXPORT_KEY)),
            "transforms": _transforms(state.get(TRANSFORMS_KEY)),
            "reference": self.manifest["reference"],
            "claims": None, "measured": None, "claim_checks": [],
            "prepare": {"refused_entries": self.request.submission.refused_entries,
                        "missing_notebooks": self.request.submission.missing},
        }
        claims = self._claims()
        if claims is not None:
            evaluation["claims"] = {"flops": claims.flops, "parameter_kb": claims.parameter_kb,
                                    "accuracy_pct": claims.accuracy_pct, "lines": claims.lines}
        if result is not None and (evaluation["export"] or {}).get("exported"):
            evaluation.update(self._measure(result, evaluation["transforms"], claims))
        failures, notes = split_failures(results, {})
        metrics = {k: v for k, v in evaluation.items() if k != "prepare"}
        return Outcome(evaluation=evaluation, diagnoses=CATALOGUE.run(evaluation),
                       failures=failures, profile_notes=notes,
                       profile_changes=self._changes(), metrics=metrics,
                       handed_in=self._handed_in(claims))

    def _claims(self):
        if self.notebook is None:
            return None
        try:
            return claims_from_outputs(read_notebook(self.notebook))
        except Exception:  # unreadable: the run says why
            return None

    def _measure(self, result: RunResult, transforms: dict, claims) -> dict:
        """The grader's own figures: complexity on the graph, accuracy from the logits."""
        work_dir = self.request.work_root / RUN
        data = load_data(self.profile, self.request.data_root)
        return measure_export(work_dir / EXPORT_DIR, work_dir, data, transforms, claims,
                              self.profile.train_sample, self.handed_weights,
                              hand_in_seed(self.notebook, self.weights))

    def _changes(self) -> dict:
        data = ("100 classes made from scikit-learn's bundled digits, in CIFAR-100's format, "
                "in place of CIFAR-100" if self.profile.dataset == "standin"
                else "CIFAR-100 from the data root")
        return {"profile": self.profile.name, "data": data, "model": "your model and weights",
                "device": self.request.device, "changes": [],
                "why": ("The grader does not train your model again: it runs your notebook's "
                        "definitions, loads your weights into your model, and measures it on "
                        "the test set with its own code.")}

    def _handed_in(self, claims) -> dict:
        submission = self.request.submission
        if self.notebook is None:
            return {NOTEBOOK: {"found": False}}
        printed = list(claims.lines.values()) if claims is not None else []
        return {NOTEBOOK: {"found": True, "path": str(self.notebook.relative_to(submission.root)),
                           "printed": printed},
                "weights": {"found": self.weights is not None,
                            "path": str(self.weights.relative_to(submission.root))
                            if self.weights else None}}


def _run_summary(result: RunResult | None) -> dict:
    if result is None:
        return {"skipped": True, "failure": None}
    failure = result.failure
    return {"notebook": result.notebook, "duration_s": round(result.duration_s, 2),
            "failure": None if failure is None else {
                "notebook": failure.notebook, "run": result.run_id, "kind": failure.kind,
                "message": failure.message, "cell_index": failure.cell_index,
                "error_tail": failure.error_tail},
            "usable": result.usable, "missing": result.missing,
            "output_truncated": result.output_truncated}


def _plain(raw: object) -> dict:
    """A kernel's report, kept only as a dict of JSON values (it is evidence, not truth)."""
    return raw if isinstance(raw, dict) else {}


def _transforms(raw: object) -> dict:
    """The notebook's transforms as the kernel recorded them, and the normalisation the
    grader feeds the test images with: the training transform's (the one with random
    steps, or named for training), else the only one there is, else none (0..1 inputs)."""
    found = {str(k)[:100]: v for k, v in raw.items() if isinstance(v, dict)} \
        if isinstance(raw, dict) else {}

    def normalize(entry: dict | None) -> dict | None:
        value = (entry or {}).get("normalize")
        if isinstance(value, dict) and all(
                isinstance(value.get(k), list) and len(value[k]) == 3
                and all(isinstance(x, (int, float)) and x == x for x in value[k])
                for k in ("mean", "std")) and all(x > 0 for x in value["std"]):
            return {"mean": [float(x) for x in value["mean"]], "std": [float(x) for x in value["std"]]}
        return None

    train = next((n for n, v in found.items() if v.get("random") is True), None) or \
        next((n for n in found if "train" in n.lower()), None)
    test = next((n for n, v in found.items() if n != train and v.get("random") is not True
                 and any(w in n.lower() for w in ("test", "val", "eval"))), None) or \
        next((n for n, v in found.items() if n != train and v.get("random") is not True), None)
    if train is None and len(found) == 1:
        train = test = next(iter(found))
    identity = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    used = (normalize(found.get(train)) if train is not None else normalize(found.get(test))) \
        or identity
    tested = normalize(found.get(test)) or identity if test is not None and test != train else None
    return {"found": found, "train": train, "test": test, "used": used, "test_normalize": tested}
