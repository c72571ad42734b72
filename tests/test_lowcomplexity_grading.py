"""Lab 5's grading without a kernel: what runs in the sandbox, what it sees, which normalisation."""
from __future__ import annotations

import nbformat

from grader.lab import get_lab, lab_of
from grader.sandbox import kernel_files, package_dirs
from labs.lowcomplexity.grading import _transforms, definitions_only, kernel_setup

TRAINING_CELL = '''import torch
from thop import (profile,
    clever_format)
!pip install thop
class Net(torch.nn.Module):
    pass
def train(model):
    return 1
model = Net()
history = train(model)
for epoch in range(3):
    print(epoch)
'''


def test_definitions_only_keeps_definitions_and_drops_training():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Lab 5"), nbformat.v4.new_code_cell(TRAINING_CELL),
                nbformat.v4.new_code_cell("train(model)\nprint('done')"),
                nbformat.v4.new_code_cell("def broken(:\n    pass")]
    cells = definitions_only(nb).cells
    assert len(cells) == 4 and cells[0].source == "# Lab 5"  # every cell keeps its place
    kept = cells[1].source
    assert "class Net" in kept and "model = Net()" in kept and "def train" in kept
    assert "history" not in kept and "range(3)" not in kept and "pip" not in kept
    assert "try:\n    from thop import (profile,\n        clever_format)\nexcept ImportError:" in kept
    compile(kept, "cell", "exec")  # what is kept still parses
    assert cells[2].source == "pass" and cells[3].source == "pass"


def test_the_grader_feeds_test_images_as_the_model_was_trained():
    recorded = {
        "train_tf": {"steps": ["RandomCrop", "ToTensor", "Normalize"], "random": True,
                     "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}},
        "test_tf": {"steps": ["ToTensor"], "random": False, "normalize": None},
    }
    found = _transforms(recorded)
    assert (found["train"], found["test"]) == ("train_tf", "test_tf")
    assert found["used"] == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    assert found["test_normalize"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    hostile = _transforms({"t": {"normalize": {"mean": [1, 2, 3], "std": [0, 1, 1]}}})
    assert hostile["used"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # std 0 refused
    assert _transforms("not a dict")["used"]["std"] == [1.0, 1.0, 1.0]


def test_the_kernel_sees_the_runtime_and_the_export_never_the_measurement():
    sees = tuple(path for path, _ in kernel_setup("model.pth").sees)
    names = {path.name for path in kernel_files(sees)}
    assert {"runtime.py", "export.py"} <= names
    assert not names & {"measure.py", "grading.py", "diagnoses.py", "checks.py", "bundle.py",
                        "reference_model.py", "data.py", "rubric.json"}
    assert {folder.name for folder in package_dirs(sees)} == {"grader", "labs"}


def test_a_hand_in_says_which_lab_it_is(tmp_path):
    lab5, slimming = tmp_path / "lab5", tmp_path / "slim"
    lab5.mkdir()
    slimming.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), lab5 / "lowcomplexity.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), slimming / "vggprune.ipynb")
    assert lab_of(lab5).name == "lowcomplexity"
    assert lab_of(slimming).name == "slimming"
    assert lab_of(tmp_path, several=True).name == "slimming"  # a tie: the default lab
    assert get_lab("lowcomplexity").hand_in_skips == ()  # the weights are handed in


def test_the_test_set_stays_out_of_the_sandbox_and_a_regrade_measures_the_same(tmp_path):
    from labs.lowcomplexity.grading import hand_in_seed

    assert kernel_setup("model.pth").sees_data is False  # CIFAR-100's test labels never mounted
    notebook, weights = tmp_path / "lowcomplexity.ipynb", tmp_path / "model.pth"
    notebook.write_text("{}")
    weights.write_bytes(b"weights")
    first = hand_in_seed(notebook, weights)
    assert hand_in_seed(notebook, weights) == first
    weights.write_bytes(b"other weights")
    assert hand_in_seed(notebook, weights) != first


def test_every_lab5_diagnosis_is_documented():
    import re
    from pathlib import Path

    from labs.lowcomplexity.diagnoses import CATALOGUE

    docs = (Path(__file__).resolve().parents[1] / "docs" / "lab5-diagnoses.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", docs, flags=re.M))
    assert documented == {entry.id for entry in CATALOGUE.entries}
