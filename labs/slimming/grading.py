"""One grading of the network-slimming lab: the runs it plans and what they show.

``SlimmingGrading`` plans the runs of docs/design.md ("Runs of one grading"): every
notebook on reference inputs, the probes, and the student's own chain; it then turns
what they wrote into facts (``labs.slimming.evaluate``), findings
(``labs.slimming.diagnoses``) and what result.json shows. The model-specific parts
(VGG's cfg, the copy rules) stay in ``reference`` and ``labs.slimming.evaluate``: a
ResNet variant of the lab replaces those.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import torch

from grader.bundles import read_manifest
from grader.execute import RunResult, literal_assignments, parse_cell, read_notebook
from grader.lab import GradingRequest, Outcome
from grader.pipeline import Excuse, failure_fields, split_failures
from grader.prepare import Submission
from grader.schedule import PlannedRun
from grader.untrusted import MAX_NOTEBOOK_BYTES, UntrustedFileError, read_bytes
from labs.slimming.checkpoints import (CheckpointError, check_layout, load_student_checkpoint,
                                       state_dict_of)
from labs.slimming.diagnoses import diagnose, kept_channels
from labs.slimming.evaluate import (EDGE_RATIO, TrustedData, balanced_prune_state,
                                    compare_sparsity, disguised_state, edge_case_state,
                                    finetune_facts, prune_facts, safely, sparsity_facts)
from labs.slimming.kernel import kernel_setup
from labs.slimming.runtime import HISTOGRAMS_KEY, MAX_HISTOGRAMS, UPDATE_BN_KEY
from reference.bundle import FINETUNE, SPARSE, SPARSE_LAMBDA0, load_checkpoint, loaders, prune_file
from reference.data import load_dataset
from reference.model import scaled_cfg
from reference.profiles import Profile

WEIGHT_PATH, PRUNE_PATH, FINETUNE_PATH = "model_best.pth", "model_prune.pth", "model_prune_finetune.pth"
KNOWN_PRINTED = ("Test set: Accuracy", "PRUNE RATIO", "LOADING CHECKPOINT", "layer index",
                 "PREPROCESSING SUCCESSFUL", "RESUME PRUNE MODEL", "TRAIN PRUNED MODEL DONE",
                 "NO CHECKPOINT FOUND")


def profile_parameters(profile: Profile, device: str) -> dict:
    """What the profile must change, and nothing else: budgets and the device.

    Never a path or a control flag: the same name means different things in different
    notebooks (``RESUME`` resumes training in sparsity_train and loads the pruned model in
    train_prune_model), and a notebook's own paths resolve into its work dir by themselves.
    """
    return {"EPOCHS": profile.epochs, "TRAIN_BATCH_SIZE": profile.train_batch_size,
            "TEST_BATCH_SIZE": profile.test_batch_size, "DEVICE": device,
            "CUDA": device.startswith("cuda")}


def student_lambda(notebook: Path | None) -> float | None:
    """The last literal ``LAMBDA = <number>`` of the handed-in notebook, read without running it."""
    if notebook is None:
        return None
    try:
        values = literal_assignments(read_notebook(notebook).cells).get("LAMBDA", [])
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        # float() of an int of 400 digits overflows; 1e400 is a literal for inf.
        value = float(numbers[-1]) if numbers else None
    except Exception:  # an unreadable notebook (its runs say why), or a LAMBDA no float holds
        return None
    return value if value is not None and math.isfinite(value) else None


def probe_seed(notebook: Path | None) -> int:
    """The seed that disguises the pruning runs' input: from the bytes of the notebook that
    reads it, so answers cannot be precomputed into it and a regrade gives the same input."""
    digest = hashlib.sha256()
    if notebook is not None:
        try:
            digest.update(read_bytes(notebook, MAX_NOTEBOOK_BYTES))
        except UntrustedFileError:
            pass
    return int.from_bytes(digest.digest()[:8], "big")


# The course's names of the checkpoint each notebook reads and writes (LAB.md section 1).
READS = {"vggprune": "WEIGHT_PATH", "train_prune_model": "PRUNE_PATH"}
WRITES = {"sparsity_train": "WEIGHT_PATH", "vggprune": "PRUNE_PATH",
          "train_prune_model": "PRUNE_FINETUNE_PATH"}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt")


@dataclass(frozen=True)
class OwnPaths:
    """Where a notebook's own (never injected) paths put its checkpoints, relative to its work
    dir: an absolute path lands on its basename there (grader.runtime.drive_path)."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


def own_paths(notebook: Path | None, key: str) -> OwnPaths:
    """The checkpoint paths a notebook names: those it assigns to the course's variable for
    its input or passes to ``torch.load`` (reads), and every other one (writes)."""
    if notebook is None:
        return OwnPaths()
    try:
        cells = read_notebook(notebook).cells
    except Exception:
        return OwnPaths()
    reads: list[str] = []
    everything: list[str] = []
    for cell in cells:
        tree = parse_cell(cell.source) if cell.cell_type == "code" else None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == READS.get(key)
                                                    for t in node.targets):
                reads += _checkpoint_strings(node.value)
            elif isinstance(node, ast.Call) and _called(node) == "load":
                reads += [s for arg in node.args[:1] for s in _checkpoint_strings(arg)]
            elif isinstance(node, ast.Constant):
                everything += _checkpoint_strings(node)
    read_places = _places(reads)
    return OwnPaths(read_places, tuple(p for p in _places(everything) if p not in read_places))


def _called(call: ast.Call) -> str | None:
    function = call.func
    return function.attr if isinstance(function, ast.Attribute) else \
        function.id if isinstance(function, ast.Name) else None


def _checkpoint_strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and n.value.endswith(CHECKPOINT_SUFFIXES)
            and len(n.value) < 500]


def _places(paths: list[str]) -> tuple[str, ...]:
    """Each path's basename, and a plain relative path itself; in order, without repeats."""
    places: list[str] = []
    for path in paths:
        normal = posixpath.normpath(path.replace("\\", "/"))
        candidates = [posixpath.basename(normal)]
        if not posixpath.isabs(normal) and not normal.startswith(".."):
            candidates.append(normal)
        places += [c for c in candidates if c and c not in places and c not in (".", "..")]
    return tuple(places)


def plan_runs(profile: Profile, bundle: Path, device: str, prune_input: Callable[[], Path],
              edge_input: Callable[[], Path], own_lambda: float | None,
              paths: dict[str, OwnPaths]) -> list[PlannedRun]:
    base = profile_parameters(profile, device)
    tune = {**base, "EPOCHS": profile.finetune_epochs}
    ratio = profile.finetune_ratio
    train, tune_cost = float(profile.epochs), float(profile.finetune_epochs)  # a pruning: ~1
    canonical = {"sparsity_train": WEIGHT_PATH, "vggprune": PRUNE_PATH,
                 "train_prune_model": FINETUNE_PATH}

    def run(run_id: str, notebook: str, parameters: dict, source: object = None,
            **options: object) -> PlannedRun:
        """A run whose input (if any) is placed under the name the course uses and wherever
        the notebook itself reads it, and whose output is looked for where it writes it."""
        own = paths.get(notebook, OwnPaths())
        inputs = {}
        if source is not None:
            read_name = WEIGHT_PATH if notebook == "vggprune" else PRUNE_PATH
            inputs = {name: source for name in (read_name, *own.reads)}
        output = canonical[notebook]
        return PlannedRun(run_id, notebook, parameters, inputs, expected=(output,),
                          aliases={output: tuple(p for p in own.writes if p not in inputs)},
                          **options)

    runs = [
        run("sparsity-lambda0", "sparsity_train", {**base, "LAMBDA": 0.0}, cost=train),
        run("sparsity", "sparsity_train", {**base, "LAMBDA": profile.sparsity_lambda}, cost=train),
        *[run(f"prune-{r}", "vggprune", {**base, "PRUNE_PERCENT": r}, prune_input)
          for r in profile.prune_ratios],
        run("prune-edge", "vggprune", {**base, "PRUNE_PERCENT": EDGE_RATIO}, edge_input),
        run("finetune", "train_prune_model", tune, bundle / prune_file(ratio), cost=tune_cost),
    ]
    # The chained run trains with the student's own LAMBDA (scaled to the profile's length);
    # when that equals the profile's lambda the isolated sparsity run already is that run.
    sparse_run = "sparsity"
    if own_lambda is None or abs(own_lambda * profile.lambda_scale - profile.sparsity_lambda) > 1e-12:
        sparse_run = "chained-sparsity"
        runs.append(run(sparse_run, "sparsity_train", dict(base),
                        scale={"LAMBDA": profile.lambda_scale}, cost=train))
    for r in profile.prune_ratios:
        runs.append(run(f"chained-prune-{r}", "vggprune", {**base, "PRUNE_PERCENT": r},
                        Path(sparse_run) / WEIGHT_PATH, after=(sparse_run,)))
    runs.append(run("chained-finetune", "train_prune_model", tune,
                    Path(f"chained-prune-{ratio}") / PRUNE_PATH,
                    after=(f"chained-prune-{ratio}",), cost=tune_cost))
    return runs


def evaluate_all(results: dict[str, RunResult | None], work_root: Path, data: TrustedData,
                 prune_state: dict, edge_state: dict, own_lambda: float | None) -> dict:
    """The facts of every run that ran, keyed the way diagnose and score read them."""
    profile, manifest = data.profile, data.manifest

    def written(run_id: str, name: str) -> Path | None:
        """Where a run that was not cut short wrote ``name``."""
        result = results.get(run_id)
        if result is None or not result.usable:
            return None
        return work_root / run_id / result.artifacts[name]

    def sparsity(run_id: str) -> dict | None:
        path = written(run_id, WEIGHT_PATH)
        return safely(lambda: sparsity_facts(path, data),
                      f"{path.name} of the {run_id} run") if path else None

    def pruned(run_id: str, original: dict, ratio: float) -> dict | None:
        result = results.get(run_id)
        if result is None:
            return None
        name = result.artifacts.get(PRUNE_PATH, PRUNE_PATH)
        facts = safely(lambda: prune_facts(work_root / run_id, result.state, result.stdout_text,
                                           original, ratio, data, name),
                       f"{name} of the {run_id} run")
        if result.failure:
            facts["run_failure"] = result.failure.message
        return facts

    def tuned(run_id: str, start: dict | None, start_state: dict | None) -> dict | None:
        path = written(run_id, FINETUNE_PATH)
        if path is None:
            return None
        start = start or {}
        cfg = start.get("cfg_from_shapes") or start.get("cfg")
        return safely(lambda: finetune_facts(path, cfg, start.get("accuracy"), data, start_state),
                      f"{path.name} of the {run_id} run")

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
        facts = pruned(f"prune-{ratio}", prune_state, ratio)
        if facts is not None:
            evaluation["prune"][str(ratio)] = facts
    edge = pruned("prune-edge", edge_state, EDGE_RATIO)
    if edge is not None:
        evaluation["prune"]["edge"] = edge
    reference_prune = manifest["prune"][str(profile.finetune_ratio)]
    reference_start = {"cfg": reference_prune["cfg"], "accuracy": reference_prune["accuracy_pruned"]}
    finetune = tuned("finetune", reference_start,
                     data.references.get(prune_file(profile.finetune_ratio)))
    if finetune is not None:
        evaluation["finetune"] = finetune

    chained = evaluation["chained"]
    own_sparse = "chained-sparsity" if "chained-sparsity" in results else "sparsity"
    chained["sparsity"] = sparsity(own_sparse) if own_sparse != "sparsity" else lam
    chained["prune"] = {}
    own_checkpoint = written(own_sparse, WEIGHT_PATH)
    own_state = _own_state(own_checkpoint, data.widest) if own_checkpoint else None
    for ratio in profile.prune_ratios:
        facts = pruned(f"chained-prune-{ratio}", own_state, ratio) if own_state else None
        if facts is not None:
            chained["prune"][str(ratio)] = facts
    own_pruned = written(f"chained-prune-{profile.finetune_ratio}", PRUNE_PATH)
    chained_finetune = tuned("chained-finetune", chained["prune"].get(str(profile.finetune_ratio)),
                             _own_state(own_pruned, data.widest) if own_pruned else None)
    if chained_finetune is not None:
        chained["finetune"] = chained_finetune
    evaluation["reference"] = reference_summary(manifest, profile)
    evaluation["gamma_quantiles"] = gamma_quantiles({
        "sparsity": (lam or {}).get("gammas"), "sparsity-lambda0": (lam0 or {}).get("gammas"),
        **{f"prune-{r}": _bn_weights(prune_state) for r in profile.prune_ratios}})
    return evaluation


def _bn_weights(state: dict) -> list[float]:
    return [float(v) for k, t in state.items() if k.endswith(".weight") and
            f"{k[:-len('.weight')]}.running_var" in state for v in t.flatten()]


def gamma_quantiles(gammas: dict[str, list[float] | None]) -> dict[str, list[float]]:
    """Quantiles (0, 0.5, 0.9, 1) of |gamma| of the model each run plotted or should plot,
    as the kernel's record of a hist() call gives them (grader.runtime)."""
    return {run_id: np.quantile(np.abs(np.asarray(values, dtype=float)), [0, 0.5, 0.9, 1]).tolist()
            for run_id, values in gammas.items() if values}


def _own_state(path: Path, widest: list) -> dict | None:
    """The student's own sparse weights, the original of the chained pruning runs; None
    unless laid out as the profile's VGG (``widest``, its full cfg) or thinner."""
    try:
        state = state_dict_of(load_student_checkpoint(path), path.name)
        check_layout(state, path.name, widest)
        return state
    except CheckpointError:
        return None


def _run_summary(result: RunResult | None) -> dict:
    if result is None:
        return {"skipped": True, "failure": None}
    return {"notebook": result.notebook, "duration_s": round(result.duration_s, 2),
            "failure": _failure_dict(result), "usable": result.usable,
            "missing": result.missing, "images": result.images,
            "histograms": _histograms(result.state.get(HISTOGRAMS_KEY)),
            "update_bn_probe": _update_bn_probe(result.state.get(UPDATE_BN_KEY)),
            "output_truncated": result.output_truncated}


def _update_bn_probe(raw: object) -> dict | None:
    """The kernel's report of updateBN on a probe network, kept only as plain booleans."""
    if not isinstance(raw, dict) or not isinstance(raw.get("ran"), bool):
        return None
    if not raw["ran"]:
        return {"ran": False, "why": str(raw.get("why", ""))[:300]}
    flags = ("bn_grad_ok", "others_untouched", "weights_untouched")
    return {"ran": True, **{flag: raw.get(flag) is True for flag in flags}}


def _histograms(raw: object) -> list[dict]:
    """What the kernel says its hist() calls plotted, kept only where it is plain numbers."""
    kept = []
    for entry in raw[:MAX_HISTOGRAMS] if isinstance(raw, list) else []:
        values = entry.get("values") if isinstance(entry, dict) else None
        quantiles = entry.get("quantiles") if isinstance(entry, dict) else None
        if type(values) is int and isinstance(quantiles, list) and len(quantiles) == 4 \
                and all(type(q) in (int, float) for q in quantiles):
            kept.append({"values": values, "quantiles": [float(q) for q in quantiles]})
    return kept


def _failure_dict(result: RunResult) -> dict | None:
    return failure_fields(result.run_id, result.failure) if result.failure else None


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
        "bn_channels": sum(int(v) for v in scaled_cfg(profile.width_divisor) if v != "M"),
    }


# Runs whose failures are findings about the profile's inputs, not the student's own run:
# the edge probe meets a situation a full-scale model never shows it, and the chained runs
# start from the student's own short-profile checkpoints.
PROBE_RUNS = ("prune-edge",)


PROBE_NOTE = "This happened only on a probe input the grader built on purpose."
SHORT_CHAIN_NOTE = ("This happened only on your own checkpoint as this short grading profile "
                    "trained it: pruned here, a layer kept no channel, which a full-scale model "
                    "does not do; the same notebook ran through on the reference input.")


def excused_runs(evaluation: dict) -> dict[str, Excuse]:
    """Runs whose failures the student's own full-scale run would not have had, and why: the
    edge probe, and chained prunings (and what follows them) where the student's short-profile
    checkpoint left a layer with no channel."""
    excused = dict.fromkeys(PROBE_RUNS, Excuse("probe", PROBE_NOTE))
    chain = Excuse("chained", SHORT_CHAIN_NOTE)
    for ratio, facts in evaluation.get("chained", {}).get("prune", {}).items():
        if 0 in kept_channels(facts):
            excused[f"chained-prune-{ratio}"] = chain
            excused["chained-finetune"] = chain
    return excused


def profile_changes(submission: Submission, plan: list[PlannedRun], profile: Profile,
                    device: str) -> dict:
    """What the grading profile changed, beside what each notebook itself sets."""
    changes = []
    seen: set[tuple[str, str]] = set()
    for run in plan:
        path = submission.notebooks.get(run.notebook)
        if path is None or run.run_id.startswith("chained-") or run.run_id in PROBE_RUNS:
            continue
        try:
            own = literal_assignments(read_notebook(path).cells)
        except Exception:
            own = {}
        for name, value in run.parameters.items():
            if (run.notebook, name) in seen or name in ("LAMBDA", "PRUNE_PERCENT"):
                continue
            seen.add((run.notebook, name))
            mine = [v for v in own.get(name, []) if isinstance(v, (int, float, str))]
            if not mine or all(v == value for v in mine):
                continue  # the notebook does not set it as a number, or sets what we inject
            changes.append({"notebook": f"{run.notebook}.ipynb", "name": name,
                            "notebook_value": mine[-1] if mine else None, "graded_with": value})
    data = ("scikit-learn's bundled digits, upsampled to 32x32x3, in place of CIFAR-10"
            if profile.dataset == "digits" else "CIFAR-10 from the data root")
    width = ("VGG-19" if profile.width_divisor == 1 else
             f"VGG-19 with every layer's width divided by {profile.width_divisor}")
    return {"profile": profile.name, "data": data, "model": width, "device": device,
            "epochs": profile.epochs, "finetune_epochs": profile.finetune_epochs,
            "changes": changes,
            "why": ("Accuracies here are not your Colab numbers: the profile trains a smaller "
                    "network on other data for fewer epochs. Each stage is judged against the "
                    "reference run of the same profile, and your code's verdict does not "
                    "depend on the scale." if profile.name != "full" else
                    "The full profile runs the lab as the course does.")}


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
        except UntrustedFileError as error:  # not UTF-8, not JSON, too deep, too large, ...
            summary[name] = {"found": True, "path": str(path.relative_to(submission.root)),
                             "unreadable": str(error)}
            continue
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




# ---------------------------------------------------------------- one grading

class SlimmingGrading:
    """One submission: the reference inputs built, the runs planned, their facts concluded."""

    def __init__(self, request: GradingRequest) -> None:
        self.request = request
        profile, bundle, work_root = request.profile, request.bundle.path, request.work_root
        submission = request.submission
        self.kernel = kernel_setup(profile)
        manifest = read_manifest(bundle)
        dataset = load_dataset(profile.dataset, request.data_root)
        train_loader, test_loader = loaders(profile, dataset, torch.device(request.device),
                                            profile.seed)
        references = {name: load_checkpoint(bundle / name)["state_dict"] for name in
                      (SPARSE, SPARSE_LAMBDA0, FINETUNE, *map(prune_file, profile.prune_ratios))}
        self.data = TrustedData(profile, manifest, bundle, train_loader, test_loader, references)
        sparse_checkpoint = load_checkpoint(bundle / SPARSE)
        disguised = disguised_state(sparse_checkpoint["state_dict"],
                                    probe_seed(submission.notebooks.get("vggprune")))
        self.prune_state = balanced_prune_state(disguised, max(profile.prune_ratios))
        self.edge_state, _ = edge_case_state(disguised)

        def probe_input(name: str, checkpoint: dict) -> Callable[[], Path]:
            def path() -> Path:
                target = work_root / name
                if not target.exists():
                    torch.save(checkpoint, target)
                return target
            return path

        self.prune_input = probe_input("prune_input.pth",
                                       {**sparse_checkpoint, "state_dict": self.prune_state})
        self.edge_input = probe_input("edge_input.pth",
                                      {"epoch": 0, "state_dict": self.edge_state, "best_prec1": 0.0})
        self.own_lambda = student_lambda(submission.notebooks["sparsity_train"])
        self.paths = {name: own_paths(path, name) for name, path in submission.notebooks.items()}
        self.runs: list[PlannedRun] = []

    def plan(self) -> list[PlannedRun]:
        request = self.request
        self.runs = plan_runs(request.profile, request.bundle.path, request.device,
                              self.prune_input, self.edge_input, self.own_lambda, self.paths)
        return self.runs

    def conclude(self, results: dict[str, RunResult | None]) -> Outcome:
        request = self.request
        submission = request.submission
        evaluation = evaluate_all(results, request.work_root, self.data, self.prune_state,
                                  self.edge_state, self.own_lambda)
        evaluation["prepare"] = {"refused_entries": submission.refused_entries,
                                 "missing_notebooks": submission.missing}
        failures, notes = split_failures(results, excused_runs(evaluation))
        return Outcome(
            evaluation=evaluation, diagnoses=diagnose(evaluation), failures=failures,
            profile_notes=notes,
            profile_changes=profile_changes(submission, self.runs, request.profile,
                                            request.device),
            metrics=_strip_private({k: v for k, v in evaluation.items() if k != "prepare"}),
            handed_in=handed_in(submission))
