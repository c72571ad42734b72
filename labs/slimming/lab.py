"""The network-slimming lab as a plug-in (grader/lab.py): ``LAB``, entry point ``slimming``.

Cheap to import (no torch): a batch's parent process only lists notebooks, resolves the
bundle and reads the rubric; the grading itself (``labs.slimming.grading``), the checks
and the report section load when first used.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import reference
from grader.bundles import Bundle, resolve_bundle, write_bundle_hash
from grader.lab import GradingRequest, imported
from reference.profiles import PROFILES, Profile

HERE = Path(__file__).resolve().parent
SHIPPED_BUNDLES = Path(reference.__file__).resolve().parent / "bundles"  # one folder per profile
NOTEBOOKS = ("sparsity_train", "vggprune", "train_prune_model")


def shipped_bundle_dir(profile_name: str) -> Path:
    return SHIPPED_BUNDLES / profile_name


# ---------------------------------------------------------------- the lab

class SlimmingLab:
    name = "slimming"
    title = "Network slimming (VGG, L1 on BatchNorm scales, pruning, fine-tuning)"
    notebooks = NOTEBOOKS
    # Every checkpoint a grading reads comes from its own runs: a handed-in one is not copied.
    hand_in_skips = (".pth", ".pt", ".tar")
    profiles = PROFILES
    default_profile = "quick"
    rubric = HERE / "rubric.json"
    checks = imported("labs.slimming.checks", "CHECKS")
    report = imported("labs.slimming.report", "REPORT")

    def planned_runs(self, profile: Profile) -> int:
        """Runs of one grading (docs/design.md): sparsity with lambda 0 and with the
        profile's, one pruning per ratio and the probe, fine-tuning, and the chained runs."""
        return 2 * len(profile.prune_ratios) + 6

    def data_problem(self, profile: Profile, data_root: Path | None) -> str | None:
        from reference.data import DataError, find_cifar_folder

        if profile.dataset != "cifar10":
            return None
        if data_root is None:
            return (f"the {profile.name} profile trains on CIFAR-10: give --data-root, the "
                    "folder that holds cifar-10-batches-py/ (python version).")
        try:
            find_cifar_folder(data_root)
        except DataError as error:
            return str(error)
        return None

    def resolve_bundle(self, profile: Profile, bundle: Bundle | Path | str | None = None,
                       cache_root: Path | None = None) -> Bundle:
        return resolve_bundle(profile, bundle, cache_root, SHIPPED_BUNDLES)

    def start(self, request: GradingRequest):
        from labs.slimming.grading import SlimmingGrading

        return SlimmingGrading(request)

    def data_folder(self, profile: Profile, data_root: Path | None) -> Path | None:
        """The folder a cluster's workers get as their data: CIFAR-10's, for the full profile."""
        from reference.data import find_cifar_folder

        return find_cifar_folder(data_root) if profile.dataset == "cifar10" and data_root else None

    @cached_property
    def user_errors(self) -> tuple[type[Exception], ...]:
        """What a user can fix (a data folder, a checkpoint): one sentence, never a traceback."""
        from labs.slimming.checkpoints import CheckpointError
        from reference.data import DataError

        return DataError, CheckpointError

    def rubric_problem(self, rubric: dict) -> str:
        """What the lab's checks need of a rubric beyond its items: blank-lambda's range."""
        ids = [item.get("id") for item in rubric.get("items", [])]
        low_high = rubric.get("lambda_range")
        if "blank-lambda" in ids and not (isinstance(low_high, list) and len(low_high) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high)):
            return '"lambda_range" must be [low, high] (numbers) when the rubric grades blank-lambda.'
        return ""

    def build_reference(self, profile: Profile, out: Path, data_root: Path | None,
                        device: str | None) -> str:
        """Train the profile's expected bundle into ``out``, record its content hash, and
        say what it holds."""
        from reference.bundle import build_bundle

        manifest = build_bundle(profile, out, data_root, device)
        digest = write_bundle_hash(out)
        sparse = manifest["sparsity"]
        return (f"Expected bundle of profile {profile.name} in {out}: sparse accuracy "
                f"{sparse['lambda']['best_prec1']:.1f}% (lambda 0: "
                f"{sparse['lambda0']['best_prec1']:.1f}%), "
                + ", ".join(f"pruned {r}: {e['accuracy_pruned']:.1f}% (recalibrated "
                            f"{e['accuracy_recalibrated']:.1f}%)"
                            for r, e in manifest["prune"].items())
                + f", fine-tuned {manifest['finetune']['best_prec1']:.1f}%.\n"
                f"Its hash is {digest} (in {out / 'BUNDLE-HASH'}): grade with "
                f"--profile {profile.name} --bundle {out}, or give that flag a .tar.gz of the "
                "folder; never change a file in it.")

    def verify_reference(self, profile: Profile, baseline: Bundle, out: Path | None,
                         data_root: Path | None, device: str | None) -> tuple[str, bool]:
        """Rebuild the profile's bundle and report its drift from ``baseline``: the report,
        and whether a figure drifted past its tolerance (reference/drift.py)."""
        import shutil
        import tempfile

        from reference.bundle import build_bundle
        from reference.drift import compare_bundles, drift_table

        rebuilt = out or Path(tempfile.mkdtemp(prefix="slimgrade-verify-"))
        try:
            build_bundle(profile, rebuilt, data_root, device)
            same = write_bundle_hash(rebuilt) == baseline.hash  # a kept rebuild is a bundle too
            rows = compare_bundles(baseline.path, rebuilt)
        finally:
            if out is None:
                shutil.rmtree(rebuilt, ignore_errors=True)
        drifted = [row.figure for row in rows if row.ok is False]
        unjudged = sum(1 for row in rows if row.ok is None)
        name = "the shipped bundle" if baseline.source == "shipped" else baseline.source
        lines = [drift_table(rows, judged_only=True), "",
                 f"Rebuilt the {profile.name} bundle and compared it with {name} "
                 f"({baseline.hash[:12]}): {len(rows) - unjudged} figures judged, {unjudged} not "
                 "compared (environment, per-epoch histories, histograms); " + (
                     f"{len(drifted)} past their tolerance ({', '.join(drifted[:6])}"
                     f"{', ...' if len(drifted) > 6 else ''})." if drifted else
                     "all within tolerance (docs/design.md, \"Bundles\").")]
        if same:
            lines.append("The rebuild is bit-identical to it (same hash).")
        return "\n".join(lines), bool(drifted)


LAB = SlimmingLab()
