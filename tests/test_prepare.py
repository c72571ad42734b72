"""Finding notebooks in folders and zips; refusing entries that escape."""
from __future__ import annotations

import os
import zipfile

import nbformat
import pytest

import grader.prepare as prepare_module
from labs.slimming.lab import LAB, NOTEBOOKS
from grader.prepare import (MAX_DEPTH, MAX_ENTRIES, MAX_LABEL_CHARS, PrepareError,
                            lab_notebooks_in, prepare, safe_extract, several_submissions)
from grader.untrusted import remove_tree


def write_notebook(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), path)


def test_notebooks_are_found_loosely_and_deep(tmp_path):
    folder = tmp_path / "alice"
    write_notebook(folder / "Lab4" / "Sparsity-Train.ipynb")
    write_notebook(folder / "Lab4" / "VGGPrune.ipynb")
    write_notebook(folder / "Lab4" / ".ipynb_checkpoints" / "train_prune_model-checkpoint.ipynb")
    submission = prepare(folder, tmp_path / "work", NOTEBOOKS)
    assert submission.notebooks["sparsity_train"].name == "Sparsity-Train.ipynb"
    assert submission.notebooks["vggprune"].name == "VGGPrune.ipynb"
    assert submission.missing == ["train_prune_model"]
    assert submission.root.is_relative_to(tmp_path / "work")


def test_zip_entries_outside_the_folder_are_refused(tmp_path):
    archive = tmp_path / "bob.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("bob/sparsity_train.ipynb", nbformat.writes(nbformat.v4.new_notebook()))
        bundle.writestr("../escaped.txt", "x")
        bundle.writestr("/tmp/absolute-escape.txt", "x")
    submission = prepare(archive, tmp_path / "work", NOTEBOOKS)
    assert sorted(submission.refused_entries) == ["../escaped.txt", "/tmp/absolute-escape.txt"]
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "work" / "escaped.txt").exists()
    assert submission.notebooks["sparsity_train"] is not None


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "neither a folder nor a .zip"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds none of the lab's notebooks"),
])
def test_unusable_submissions_are_one_sentence(tmp_path, make, message):
    with pytest.raises(PrepareError, match=message):
        prepare(make(tmp_path), tmp_path / "work", NOTEBOOKS)


def test_links_and_checkpoints_are_not_copied(tmp_path):
    folder = tmp_path / "carol"
    write_notebook(folder / "vggprune.ipynb")
    (folder / "model_best.pth").write_bytes(b"x")
    secret = tmp_path / "secret.txt"
    secret.write_text("expected results")
    (folder / "link.txt").symlink_to(secret)
    submission = prepare(folder, tmp_path / "work", NOTEBOOKS, LAB.hand_in_skips)
    assert not (submission.root / "link.txt").exists()
    assert not (submission.root / "model_best.pth").exists()


def test_fifos_in_a_submission_folder_are_skipped_not_waited_on(tmp_path):
    folder = tmp_path / "dave"
    write_notebook(folder / "vggprune.ipynb")
    os.mkfifo(folder / "model_notes.txt")  # copying it would block on open()
    submission = prepare(folder, tmp_path / "work", NOTEBOOKS)
    assert submission.notebooks["vggprune"] is not None
    assert not os.path.lexists(submission.root / "model_notes.txt")


# ---------------------------------------------------------------- hostile shapes of a hand-in

def zip_with(path, entries):
    """A .zip of the lab's notebook plus ``entries`` (name -> text), in that order."""
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("erin/vggprune.ipynb", nbformat.writes(nbformat.v4.new_notebook()))
        for name, text in entries:
            bundle.writestr(name, text)
    return path


@pytest.mark.parametrize("entries", [
    [("erin/x", "a file"), ("erin/x/y.txt", "below the file")],  # FileExistsError
    [("erin/x/y.txt", "a folder's file"), ("erin/x", "a file over the folder")],  # IsADirectoryError
])
def test_a_file_and_folder_of_one_name_refuse_the_later_entry(tmp_path, entries):
    submission = prepare(zip_with(tmp_path / "erin.zip", entries), tmp_path / "work", NOTEBOOKS)
    assert submission.refused_entries == [entries[1][0]]
    assert submission.notebooks["vggprune"] is not None
    assert (submission.root / entries[0][0]).exists()


def test_an_entry_1500_folders_deep_is_refused(tmp_path):
    deep = "erin/" + "d/" * 1500 + "deep.txt"  # Path.mkdir recursed once per level
    submission = prepare(zip_with(tmp_path / "erin.zip", [(deep, "x")]), tmp_path / "work", NOTEBOOKS)
    assert len(submission.refused_entries) == 1
    assert submission.refused_entries[0].startswith("erin/d/d/")
    assert len(submission.refused_entries[0]) <= MAX_LABEL_CHARS + 1
    assert submission.notebooks["vggprune"] is not None


def test_entries_at_the_depth_limit_are_unpacked(tmp_path):
    at_limit = "/".join(["d"] * (MAX_DEPTH - 1)) + "/ok.txt"
    past = "/".join(["d"] * MAX_DEPTH) + "/deep.txt"
    submission = prepare(zip_with(tmp_path / "erin.zip", [(at_limit, "x"), (past, "y")]),
                         tmp_path / "work", NOTEBOOKS)
    assert submission.refused_entries == [past]
    assert (submission.root / at_limit).read_text() == "x"


def test_a_name_longer_than_the_file_system_takes_is_refused(tmp_path):
    long_name = "erin/" + "n" * 300 + ".txt"  # OSError: File name too long
    submission = prepare(zip_with(tmp_path / "erin.zip", [(long_name, "x")]), tmp_path / "work", NOTEBOOKS)
    assert submission.refused_entries == [long_name[:MAX_LABEL_CHARS] + "…"]


def test_a_zip_of_too_many_entries_is_one_sentence(tmp_path):
    entries = [(f"erin/{i}.txt", "") for i in range(MAX_ENTRIES + 1)]
    with pytest.raises(PrepareError, match=f"more than {MAX_ENTRIES} files"):
        prepare(zip_with(tmp_path / "erin.zip", entries), tmp_path / "work", NOTEBOOKS)


def test_an_entry_that_cannot_be_written_is_one_sentence(tmp_path):
    archive = zip_with(tmp_path / "erin.zip", [("erin/notes.txt", "x")])
    target = tmp_path / "target"
    target.mkdir()
    (target / "erin").write_text("a file where the zip's folder goes")  # mkdir: OSError
    with pytest.raises(PrepareError, match=r"^erin.zip could not be unpacked \((FileExists|NotADirectory)Error"):
        safe_extract(archive, target)


@pytest.fixture(autouse=True)
def _remove_deep_folders(tmp_path):
    """pytest's own clean-up of old temporary folders is a recursive rmtree."""
    yield
    remove_tree(tmp_path)


def deep_folder(top, levels):
    """``levels`` nested folders below ``top``, made one level at a time (no recursion)."""
    os.makedirs(top, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)


def test_a_folder_1100_levels_deep_in_a_hand_in_is_cut_off(tmp_path):
    folder = tmp_path / "frank"
    write_notebook(folder / "vggprune.ipynb")
    deep_folder(folder / "junk", 1100)  # rglob and copytree raised RecursionError
    assert lab_notebooks_in(folder, NOTEBOOKS) == {"vggprune"}
    submission = prepare(folder, tmp_path / "work", NOTEBOOKS)
    assert submission.notebooks["vggprune"] is not None
    assert submission.refused_entries == ["junk/" + "d/" * (MAX_DEPTH - 1)]
    assert not (submission.root / "junk" / ("d/" * MAX_DEPTH)).exists()


def test_a_folder_of_too_many_entries_or_bytes_is_one_sentence(tmp_path, monkeypatch):
    folder = tmp_path / "gina"
    write_notebook(folder / "vggprune.ipynb")
    for i in range(30):
        (folder / f"{i}.txt").write_bytes(b"x" * 100)
    monkeypatch.setattr(prepare_module, "MAX_ENTRIES", 20)
    with pytest.raises(PrepareError, match="more than 20 files"):
        prepare(folder, tmp_path / "work", NOTEBOOKS)
    monkeypatch.setattr(prepare_module, "MAX_ENTRIES", 10_000)
    monkeypatch.setattr(prepare_module, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(PrepareError, match="more than 0 MiB"):
        prepare(folder, tmp_path / "work2", NOTEBOOKS)


def test_a_tree_thousands_deep_is_removed_without_recursion_or_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the work dir's")
    work = tmp_path / "work"
    deep_folder(work / "a", 3000)  # shutil.rmtree (3.11): RecursionError despite ignore_errors
    (work / "a" / "link").symlink_to(outside)
    (work / "b.txt").write_text("x")
    remove_tree(work)
    assert not os.path.lexists(work)
    assert (outside / "keep.txt").read_text() == "not the work dir's"


def test_a_deep_hand_in_does_not_stop_a_class_listing(tmp_path):
    from grader.batch import Entry, no_submission

    deep = tmp_path / "class" / "hank"
    write_notebook(deep / "vggprune.ipynb")
    deep_folder(deep / "junk", 1100)
    empty = tmp_path / "class" / "ivy"
    deep_folder(empty, 1100)
    assert not no_submission(Entry("hank", deep), NOTEBOOKS)
    assert no_submission(Entry("ivy", empty), NOTEBOOKS)
    assert several_submissions(tmp_path / "class", NOTEBOOKS) == []
