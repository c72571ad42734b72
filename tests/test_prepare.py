"""Finding notebooks in folders and zips; refusing entries that escape."""
from __future__ import annotations

import os
import zipfile

import nbformat
import pytest

from grader.prepare import PrepareError, prepare


def write_notebook(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), path)


def test_notebooks_are_found_loosely_and_deep(tmp_path):
    folder = tmp_path / "alice"
    write_notebook(folder / "Lab4" / "Sparsity-Train.ipynb")
    write_notebook(folder / "Lab4" / "VGGPrune.ipynb")
    write_notebook(folder / "Lab4" / ".ipynb_checkpoints" / "train_prune_model-checkpoint.ipynb")
    submission = prepare(folder, tmp_path / "work")
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
    submission = prepare(archive, tmp_path / "work")
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
        prepare(make(tmp_path), tmp_path / "work")


def test_links_and_checkpoints_are_not_copied(tmp_path):
    folder = tmp_path / "carol"
    write_notebook(folder / "vggprune.ipynb")
    (folder / "model_best.pth").write_bytes(b"x")
    secret = tmp_path / "secret.txt"
    secret.write_text("expected results")
    (folder / "link.txt").symlink_to(secret)
    submission = prepare(folder, tmp_path / "work")
    assert not (submission.root / "link.txt").exists()
    assert not (submission.root / "model_best.pth").exists()


def test_fifos_in_a_submission_folder_are_skipped_not_waited_on(tmp_path):
    folder = tmp_path / "dave"
    write_notebook(folder / "vggprune.ipynb")
    os.mkfifo(folder / "model_notes.txt")  # copying it would block on open()
    submission = prepare(folder, tmp_path / "work")
    assert submission.notebooks["vggprune"] is not None
    assert not os.path.lexists(submission.root / "model_notes.txt")
