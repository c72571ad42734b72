"""Every fixture submission gets the grade its manifest promises."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from grader.pipeline import grade
from reference.profiles import QUICK
from grader.bundles import SHIPPED, recorded_hash
from labs.slimming.lab import shipped_bundle_dir

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# The host file the hostile-work-dir fixtures link to (make_fixtures.WORK_DIR_DECOY), and the
# secrets that must never reach an output: the decoy's content, and a variable of the
# grader's own environment (a link to /proc/self/environ would carry it).
DECOY = Path("/tmp/slimgrade-decoy-secret.txt")
DECOY_SECRET = "slimgrade-decoy-secret-4b1d9e0c"
ENV_SECRET = "slimgrade-env-secret-93c2a7f1"
os.environ["SLIMGRADE_TEST_ENV_SECRET"] = ENV_SECRET


def corpus() -> list[tuple[str, Path, Path]]:
    cases = [(p.name, p, p / "expected.json") for p in sorted(FIXTURES.iterdir())
             if (p / "expected.json").is_file()]
    cases += [(p.stem, p, p.with_name(f"{p.stem}.expected.json")) for p in sorted(FIXTURES.glob("*.zip"))]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("name, submission, manifest", corpus(), ids=[c[0] for c in corpus()])
def test_fixture_gets_its_expected_grade(name, submission, manifest, tmp_path, run_cache):
    expected = json.loads(manifest.read_text())
    place_decoy()
    before = outside_files()
    # Two xdist workers grade at once on two cores: one run and one thread each.
    result = grade(submission, tmp_path / "out", QUICK, workers=1, run_cache=run_cache, threads=1)
    # Graded against the bundle shipped with the package, never one trained here.
    assert result["bundle"] == {"hash": recorded_hash(shipped_bundle_dir(QUICK.name)),
                                "profile": QUICK.name, "source": SHIPPED}

    found_errors = {d["id"] for d in result["diagnoses"] if d["severity"] == "error"}
    found_all = {d["id"] for d in result["diagnoses"]}
    wanted = set(expected["diagnoses"])
    assert wanted <= found_all, f"{name}: missing diagnoses {wanted - found_all}"
    assert found_errors <= wanted, f"{name}: unexpected diagnoses {found_errors - wanted}"
    severity = {d["id"]: d["severity"] for d in result["diagnoses"]}
    for warning in expected.get("warnings", []):
        assert severity.get(warning) == "warning", f"{name}: no warning {warning} in {severity}"

    statuses = {c["id"]: c["status"] for c in result["checks"]}
    for check_id in expected["failing_checks"]:
        assert statuses[check_id] != "pass", f"{name}: {check_id} passed"

    kinds = {(f["notebook"], f["kind"]) for f in result["failures"]}
    for failure in expected["failures"]:
        assert (failure["notebook"], failure["kind"]) in kinds, f"{name}: no {failure} in {kinds}"
    if not expected["failures"]:
        assert not result["failures"], f"{name}: unexpected failures {result['failures']}"

    low, high = expected["score_band"]
    assert low <= result["score"] <= high, f"{name}: score {result['score']} outside {low}..{high}"
    assert (tmp_path / "out" / "report.html").is_file()
    assert_nothing_escaped(name, tmp_path, before)


def place_decoy() -> None:
    if DECOY.is_symlink() or not DECOY.is_file() or DECOY.read_text() != DECOY_SECRET:
        staged = DECOY.with_name(f"{DECOY.name}.{os.getpid()}")
        staged.write_text(DECOY_SECRET)
        os.replace(staged, DECOY)  # xdist workers may race: same content either way


def outside_files() -> dict[Path, str]:
    """Digests of the files outside any work dir that hostile notebooks aim at: the decoy
    and the expected bundle shipped with the package (a few MB)."""
    bundle = shipped_bundle_dir(QUICK.name)
    files = [DECOY, *sorted(p for p in bundle.glob("*") if p.is_file())]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_nothing_escaped(name: str, tmp_path: Path, before: dict[Path, str]) -> None:
    """Hostile notebooks aim at marker files outside their work dir, at the expected bundle and
    at the decoy; no output may carry the decoy's secret or the grader's environment."""
    after = outside_files()
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    place_decoy()  # for the next test, whatever happened here
    assert not changed, f"{name}: changed files outside its work dir: {changed}"
    for output in (p for p in (tmp_path / "out").rglob("*") if p.is_file()):
        text = output.read_bytes()
        for secret in (DECOY_SECRET, ENV_SECRET):
            assert secret.encode() not in text, f"{name}: {output.name} holds {secret}"
    markers = [p for p in Path("/tmp").glob("slimgrade-escape-marker*")] + \
        [p for p in (Path("/tmp/slimgrade-zip-abs"), tmp_path.parent / "slimgrade-zip-escape") if p.exists()]
    assert not markers, f"{name}: wrote outside its work dir: {markers}"
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "report.html").exists()
    bundle_name = str(shipped_bundle_dir(QUICK.name))
    for executed in (tmp_path / "out" / "notebooks").glob("*.ipynb"):
        assert bundle_name not in executed.read_text(), f"{name}: {executed.name} saw the expected bundle"
