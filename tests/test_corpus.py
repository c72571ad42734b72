"""Every fixture submission gets the grade its manifest promises."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from grader.pipeline import grade
from reference.profiles import QUICK

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def corpus() -> list[tuple[str, Path, Path]]:
    cases = [(p.name, p, p / "expected.json") for p in sorted(FIXTURES.iterdir())
             if (p / "expected.json").is_file()]
    cases += [(p.stem, p, p.with_name(f"{p.stem}.expected.json")) for p in sorted(FIXTURES.glob("*.zip"))]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("name, submission, manifest", corpus(), ids=[c[0] for c in corpus()])
def test_fixture_gets_its_expected_grade(name, submission, manifest, tmp_path, run_cache):
    expected = json.loads(manifest.read_text())
    # Two xdist workers grade at once on two cores: one run and one thread each.
    result = grade(submission, tmp_path / "out", QUICK, workers=1, run_cache=run_cache, threads=1)

    found_errors = {d["id"] for d in result["diagnoses"] if d["severity"] == "error"}
    found_all = {d["id"] for d in result["diagnoses"]}
    wanted = set(expected["diagnoses"])
    assert wanted <= found_all, f"{name}: missing diagnoses {wanted - found_all}"
    assert found_errors <= wanted, f"{name}: unexpected diagnoses {found_errors - wanted}"

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
    assert_nothing_escaped(name, tmp_path)


def assert_nothing_escaped(name: str, tmp_path: Path) -> None:
    """Hostile notebooks aim at marker files outside their work dir and at the expected bundle."""
    markers = [p for p in Path("/tmp").glob("slimgrade-escape-marker*")] + \
        [p for p in (Path("/tmp/slimgrade-zip-abs"), tmp_path.parent / "slimgrade-zip-escape") if p.exists()]
    assert not markers, f"{name}: wrote outside its work dir: {markers}"
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "report.html").exists()
    bundle_name = f"{QUICK.name}-{QUICK.fingerprint()}"
    for executed in (tmp_path / "out" / "notebooks").glob("*.ipynb"):
        assert bundle_name not in executed.read_text(), f"{name}: {executed.name} saw the expected bundle"
