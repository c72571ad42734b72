"""Lab 5, a low-complexity CIFAR-100 model, as a plug-in (grader/lab.py): ``LAB``, entry point
``lowcomplexity``.

Cheap to import (no torch): the grading (``labs.lowcomplexity.grading``), the checks and
the report section load when first used.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from grader.bundles import Bundle, resolve_bundle, write_bundle_hash
from grader.lab import GradingRequest, imported
from labs.lowcomplexity.profiles import PROFILES, Profile

HERE = Path(__file__).resolve().parent
SHIPPED_BUNDLES = HERE / "bundles"  # one folder per profile (package data)


class LowComplexityLab:
    name = "lowcomplexity"
    title = "Lab 5: a low-complexity CIFAR-100 model (trusted FLOPs, parameters, accuracy)"
    notebooks = ("lowcomplexity",)
    hand_in_skips = ()  # the weights are part of the hand-in
    profiles = PROFILES
    default_profile = "quick"
    rubric = HERE / "rubric.json"
    checks = imported("labs.lowcomplexity.checks", "CHECKS")
    report = imported("labs.lowcomplexity.report", "REPORT")

    @cached_property
    def user_errors(self) -> tuple[type[Exception], ...]:
        from labs.lowcomplexity.data import DataError

        return (DataError,)

    def planned_runs(self, profile: Profile) -> int:
        return 1  # the notebook's definitions, and the export of the model

    def data_problem(self, profile: Profile, data_root: Path | None) -> str | None:
        from labs.lowcomplexity.data import DataError, find_cifar100_folder

        if profile.dataset != "cifar100":
            return None
        if data_root is None:
            return (f"the {profile.name} profile measures on CIFAR-100: give --data-root, the "
                    "folder that holds cifar-100-python/ (python version).")
        try:
            find_cifar100_folder(data_root)
        except DataError as error:
            return str(error)
        return None

    def data_folder(self, profile: Profile, data_root: Path | None) -> Path | None:
        from labs.lowcomplexity.data import find_cifar100_folder

        return find_cifar100_folder(data_root) if profile.dataset == "cifar100" and data_root else None

    def rubric_problem(self, rubric: dict) -> str:
        """The checks read their thresholds from the rubric: they must be numbers."""
        for key in ("accuracy_threshold_pct", "max_parameters", "max_macs"):
            values = rubric.get(key)
            if not isinstance(values, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
                return f'"{key}" must map each profile to a number (see the lab\'s rubric.json).'
        return ""

    def resolve_bundle(self, profile: Profile, bundle: Bundle | Path | str | None = None,
                       cache_root: Path | None = None) -> Bundle:
        return resolve_bundle(profile, bundle, cache_root, SHIPPED_BUNDLES)

    def start(self, request: GradingRequest):
        from labs.lowcomplexity.grading import LowComplexityGrading

        return LowComplexityGrading(request)

    def build_reference(self, profile: Profile, out: Path, data_root: Path | None,
                        device: str | None) -> str:
        """Train and measure the reference model into ``out`` and record its content hash."""
        from labs.lowcomplexity.bundle import build_bundle

        reference = build_bundle(profile, out, data_root)["reference"]
        digest = write_bundle_hash(out)
        return (f"Expected bundle of Lab 5, profile {profile.name}, in {out}: the reference "
                f"model has {reference['parameters']:,} parameters and {reference['macs']:,} "
                f"MACs, and reaches {reference['accuracy_pct']:.2f} % top-1.\n"
                f"Its hash is {digest}: grade with --lab {self.name} --profile {profile.name} "
                f"--bundle {out}; never change a file in it.")

    def verify_reference(self, profile: Profile, baseline: Bundle, out: Path | None,
                         data_root: Path | None, device: str | None) -> tuple[str, bool]:
        """Rebuild the reference and compare its figures: complexity must be equal (it
        depends on the layout only), accuracy within 5 points."""
        import shutil
        import tempfile

        from grader.bundles import read_manifest
        from labs.lowcomplexity.bundle import build_bundle

        rebuilt = out or Path(tempfile.mkdtemp(prefix="slimgrade-verify-"))
        try:
            new = build_bundle(profile, rebuilt, data_root)["reference"]
            write_bundle_hash(rebuilt)  # a kept rebuild is a bundle too
        finally:
            if out is None:
                shutil.rmtree(rebuilt, ignore_errors=True)
        old = read_manifest(baseline.path)["reference"]
        rows, drifted = [], False
        for figure in ("parameters", "macs", "flops", "accuracy_pct"):
            allowed = 5.0 if figure == "accuracy_pct" else 0
            ok = abs(float(new[figure]) - float(old[figure])) <= allowed
            drifted |= not ok
            rows.append(f"{figure:14} {old[figure]!s:>14} {new[figure]!s:>14}  "
                        f"{'ok' if ok else 'DRIFTED'}")
        return "\n".join([f"{'figure':14} {'shipped':>14} {'rebuilt':>14}", *rows]), drifted


LAB = LowComplexityLab()
