"""Expected bundles: the shipped one, its content hash, --bundle folders and archives, drift."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from grader import cli
from reference.drift import (LAYER_MIN, LAYER_SHARE, MASK_CHANCE, compare_bundles, compare_manifests,
                             drift_table, within_tolerance)
from reference.profiles import FULL, QUICK
from grader.bundles import (BUNDLE_HASH, MANIFEST, SHIPPED, BundleError, content_hash,
                            recorded_hash, unpack_bundle, write_bundle_hash)
from labs.slimming.lab import LAB, shipped_bundle_dir

resolve_bundle = LAB.resolve_bundle

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_QUICK = shipped_bundle_dir(QUICK.name)


def one_sentence(text: str) -> bool:
    text = text.strip()
    return "\n" not in text and text.endswith(".") and text.count(". ") == 0


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the shipped quick bundle."""
    folder = tmp_path / "bundle"
    shutil.copytree(SHIPPED_QUICK, folder)
    return folder


# ---------------------------------------------------------------- the shipped bundle

def test_the_shipped_quick_bundle_matches_its_hash_and_the_profile():
    recorded = recorded_hash(SHIPPED_QUICK)
    assert len(recorded) == 64
    assert content_hash(SHIPPED_QUICK) == recorded
    assert json.loads((SHIPPED_QUICK / MANIFEST).read_text())["fingerprint"] == QUICK.fingerprint()
    found = resolve_bundle(QUICK)
    assert (found.path, found.hash, found.source) == (SHIPPED_QUICK, recorded, SHIPPED)
    assert found.to_dict() == {"hash": recorded, "profile": "quick", "source": "shipped"}


def test_the_shipped_bundle_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"bundles/*/*"' in text
    # git must not ignore its checkpoints (*.pth is ignored elsewhere)
    assert "!reference/bundles/**/*.pth" in (ROOT / ".gitignore").read_text()


def test_the_hash_is_sha256sum_of_the_sorted_file_list(copy):
    import hashlib

    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                    for p in sorted(copy.iterdir(), key=lambda p: p.name) if p.name != BUNDLE_HASH)
    assert content_hash(copy) == hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("tamper", ["byte", "extra", "missing", "no-hash"])
def test_a_tampered_copy_is_refused(copy, tamper):
    if tamper == "byte":
        data = bytearray((copy / "sparse.pth").read_bytes())
        data[-100] ^= 1
        (copy / "sparse.pth").write_bytes(bytes(data))
    elif tamper == "extra":
        (copy / "notes.txt").write_text("hello")
    elif tamper == "missing":
        (copy / "finetune.pth").unlink()
    else:
        (copy / BUNDLE_HASH).unlink()
    with pytest.raises(BundleError) as caught:
        resolve_bundle(QUICK, copy)
    assert one_sentence(str(caught.value)), str(caught.value)
    assert "BUNDLE-HASH" in str(caught.value)


def test_a_link_inside_a_bundle_folder_is_refused(copy):
    (copy / "curves.png").unlink()
    (copy / "curves.png").symlink_to(SHIPPED_QUICK / "curves.png")
    with pytest.raises(BundleError, match="link"):
        resolve_bundle(QUICK, copy)


def test_an_intact_copy_is_used_and_named_by_its_path(copy):
    found = resolve_bundle(QUICK, copy)
    assert found.path == copy and found.source == str(copy) and found.hash == recorded_hash(SHIPPED_QUICK)


def test_another_profiles_bundle_is_refused(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["fingerprint"] = "0123456789ab"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    write_bundle_hash(copy)
    with pytest.raises(BundleError, match="not of the quick profile") as caught:
        resolve_bundle(QUICK, copy)
    assert one_sentence(str(caught.value))


def test_nothing_is_ever_built_when_no_bundle_matches(monkeypatch, tmp_path):
    import reference.bundle

    monkeypatch.setattr(reference.bundle, "build_bundle", lambda *a, **k: pytest.fail("built"))
    monkeypatch.setenv("SLIMGRADE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BundleError) as caught:
        resolve_bundle(FULL)
    message = str(caught.value)
    assert one_sentence(message)
    assert "slimgrade reference --profile full --out DIR" in message and "--bundle DIR" in message
    changed = replace(QUICK, epochs=QUICK.epochs + 1)
    with pytest.raises(BundleError, match="never retrains") as caught:
        resolve_bundle(changed)
    assert one_sentence(str(caught.value))
    assert resolve_bundle(QUICK).source == SHIPPED  # the cache plays no part in it


# ---------------------------------------------------------------- archives

def make_tar(folder: Path, archive: Path, top: str | None = "bundle") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=top or ".")
    return archive


def test_a_tar_gz_and_a_zip_are_unpacked_by_hash_and_used(copy, tmp_path):
    cache = tmp_path / "cache"
    archive = make_tar(copy, tmp_path / "bundle.tar.gz")
    found = resolve_bundle(QUICK, archive, cache)
    assert found.source == str(archive) and found.hash == recorded_hash(SHIPPED_QUICK)
    assert found.path == cache / f"bundle-{found.hash}" and (found.path / MANIFEST).is_file()
    again = resolve_bundle(QUICK, make_tar(copy, tmp_path / "flat.tar.gz", top=None), cache)
    assert again.path == found.path  # the same bundle, the same folder
    zipped = tmp_path / "bundle.zip"
    with zipfile.ZipFile(zipped, "w") as archive_file:
        for path in sorted(copy.iterdir()):
            archive_file.write(path, f"quick/{path.name}")
    assert resolve_bundle(QUICK, zipped, cache).path == found.path
    assert sorted(p.name for p in cache.iterdir()) == [f"bundle-{found.hash}"]


def test_a_tampered_archive_is_refused(copy, tmp_path):
    (copy / "gamma_hist.png").write_bytes(b"not the plot")
    with pytest.raises(BundleError, match="does not match its BUNDLE-HASH"):
        resolve_bundle(QUICK, make_tar(copy, tmp_path / "b.tar.gz"), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("bundle-*"))


def tar_with(archive: Path, copy: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(copy.iterdir()):
            tar.add(path, arcname=path.name)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return archive


@pytest.mark.parametrize("entry", ["symlink", "hardlink", "parent", "absolute", "fifo"])
def test_an_archive_entry_that_escapes_or_links_is_refused(copy, tmp_path, entry):
    info = tarfile.TarInfo({"parent": "../escaped.txt", "absolute": "/tmp/slimgrade-abs.txt"}
                           .get(entry, "inside"))
    if entry == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif entry == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif entry == "fifo":
        info.type = tarfile.FIFOTYPE
    else:
        info.size = 1
    archive = tar_with(tmp_path / "evil.tar.gz", copy, info, b"x" if info.size else b"")
    cache = tmp_path / "cache"
    with pytest.raises(BundleError) as caught:
        unpack_bundle(archive, cache)
    assert one_sentence(str(caught.value)), str(caught.value)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/slimgrade-abs.txt").exists()
    assert list(cache.iterdir()) == []  # nothing left behind


def test_a_zip_symlink_entry_is_refused(copy, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(copy.iterdir()):
            zipped.write(path, path.name)
        link = zipfile.ZipInfo("link")
        link.external_attr = (0o120777 << 16)
        zipped.writestr(link, "/etc/passwd")
    with pytest.raises(BundleError, match="link"):
        unpack_bundle(archive, tmp_path / "cache")


# ---------------------------------------------------------------- the command line

def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_error(err: str) -> str:
    line = [line for line in err.splitlines() if line.strip()][-1]
    return line.split("error: ", 1)[1]


@pytest.mark.parametrize("command", ["grade", "check", "batch"])
def test_bundle_with_a_wrong_hash_is_refused_before_grading(copy, tmp_path, capsys, monkeypatch,
                                                            command):
    import grader.pipeline

    monkeypatch.setattr(grader.pipeline, "grade", lambda *a, **k: pytest.fail("graded"))
    (copy / BUNDLE_HASH).write_text("0" * 64 + "\n")
    target = ROOT / "fixtures" / "solution"
    argv = [command, str(target), "--bundle", str(copy)]
    if command == "batch":
        (tmp_path / "class").mkdir()
        shutil.copytree(target, tmp_path / "class" / "alice")
        argv = [command, str(tmp_path / "class"), "--out", str(tmp_path / "out"),
                "--bundle", str(copy)]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    message = last_error(err)
    assert one_sentence(message) and "does not match its BUNDLE-HASH" in message, err
    assert not (tmp_path / "out" / "gradebook.csv").exists()


def test_reference_needs_out_unless_it_verifies(capsys):
    code, _, err = run_cli(["reference", "--profile", "quick"], capsys)
    assert code == 2 and "--out" in last_error(err)


# ---------------------------------------------------------------- drift

def test_a_bundle_has_no_drift_from_itself():
    rows = compare_bundles(SHIPPED_QUICK, SHIPPED_QUICK)
    assert within_tolerance(rows)
    judged = [r.figure for r in rows if r.ok is not None]
    for figure in ("sparsity/lambda/best_prec1", "sparsity/lambda/gamma/median_abs",
                   "prune/0.5/threshold", "prune/0.5/cfg_mask", "prune/0.9/kept_per_layer",
                   "prune/0.9/accuracy_recalibrated", "finetune/best_prec1", "fingerprint"):
        assert figure in judged
    assert "figure" in drift_table(rows).splitlines()[0]


def test_drift_past_a_tolerance_is_reported():
    shipped = json.loads((SHIPPED_QUICK / MANIFEST).read_text())
    rebuilt = json.loads(json.dumps(shipped))
    rebuilt["prune"]["0.5"]["cfg_mask"] = [[1 - v for v in layer]
                                           for layer in shipped["prune"]["0.5"]["cfg_mask"]]
    rebuilt["prune"]["0.9"]["kept_per_layer"][4] += max(LAYER_MIN, LAYER_SHARE * 32) + 1  # width 32
    rebuilt["sparsity"]["lambda"]["best_prec1"] -= 30
    rebuilt["environment"]["torch"] = "another"  # not compared
    rows = {r.figure: r for r in compare_manifests(shipped, rebuilt)}
    assert not within_tolerance(list(rows.values()))
    assert {f for f, r in rows.items() if r.ok is False} == {
        "prune/0.5/cfg_mask", "prune/0.9/kept_per_layer", "sparsity/lambda/best_prec1"}
    assert "688 differ" in rows["prune/0.5/cfg_mask"].drift and MASK_CHANCE < 2


@pytest.mark.slow
def test_a_rebuilt_quick_bundle_stays_within_the_documented_drift(tmp_path, capsys):
    """`slimgrade reference --profile quick --verify`: rebuild, compare, exit 0 (not bit equality)."""
    code, out, _ = run_cli(["reference", "--profile", "quick", "--verify", "--device", "cpu",
                            "--out", str(tmp_path / "rebuilt")], capsys)
    assert code == 0, out
    assert "all within tolerance" in out
    assert recorded_hash(tmp_path / "rebuilt") == content_hash(tmp_path / "rebuilt")
    assert within_tolerance(compare_bundles(SHIPPED_QUICK, tmp_path / "rebuilt"))


def test_verify_exits_3_when_a_rebuild_drifts(tmp_path, capsys, monkeypatch):
    import reference.bundle

    def drifting_build(profile, out, *args, **kwargs):
        shutil.copytree(SHIPPED_QUICK, out, dirs_exist_ok=True)
        manifest = json.loads((Path(out) / MANIFEST).read_text())
        manifest["finetune"]["best_prec1"] += 40
        (Path(out) / MANIFEST).write_text(json.dumps(manifest))
        write_bundle_hash(out)
        return manifest

    monkeypatch.setattr(reference.bundle, "build_bundle", drifting_build)
    code, out, _ = run_cli(["reference", "--profile", "quick", "--verify"], capsys)
    assert code == cli.DRIFT_FOUND == 3
    assert "DRIFT" in out and "1 past their tolerance (finetune/best_prec1)" in out


REBUILDS = sorted((ROOT / "tests" / "data" / "rebuilds").glob("*.json"))


@pytest.mark.parametrize("manifest", REBUILDS, ids=[p.stem for p in REBUILDS])
def test_the_measured_rebuilds_stay_within_the_documented_drift(manifest):
    """The manifests of the quick bundle rebuilt five ways (docs/design.md, "Bundles"): none
    is bit-equal to the shipped one, every one is within tolerance."""
    shipped = json.loads((SHIPPED_QUICK / MANIFEST).read_text())
    rebuilt = json.loads(manifest.read_text())
    assert rebuilt["sparsity"]["lambda"]["gamma"] != shipped["sparsity"]["lambda"]["gamma"]
    rows = compare_manifests(shipped, rebuilt)
    assert within_tolerance(rows), [(r.figure, r.drift) for r in rows if r.ok is False]
