"""Lab 5 against students who want the points without the lab, or want to break the grader.

Each test is one attack, built in tmp_path: a model exported with the lab's own
``export_model`` (what the kernel does), then measured and judged as a grading does
(``grading.measure_export``, the diagnoses, the checks), with no kernel. The cheater is
assumed to print exactly what the grader measures, so that ``claims-match`` is theirs:
what is tested is whether the measurement, the diagnoses and the checks see through the
model. Before these tests, each attack marked "was 60/60" got full marks. Two tests at the
end grade a real hand-in in the sandbox (slow).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from grader.score import load_rubric, score  # noqa: E402
from grader.untrusted import UntrustedFileError, load_checkpoint  # noqa: E402
from labs.lowcomplexity import measure  # noqa: E402
from labs.lowcomplexity.checks import CHECKS  # noqa: E402
from labs.lowcomplexity.data import standin_cifar100  # noqa: E402
from labs.lowcomplexity.diagnoses import CATALOGUE, budget_figures  # noqa: E402
from labs.lowcomplexity.export import export_model  # noqa: E402
from labs.lowcomplexity.grading import (WEIGHT_LIMITS, _transforms,  # noqa: E402
                                        measure_export)
from labs.lowcomplexity.lab import LAB, SHIPPED_BUNDLES  # noqa: E402
from labs.lowcomplexity.measure import FLOPS_CONVENTION  # noqa: E402
from labs.lowcomplexity.runtime import _model  # noqa: E402

RUBRIC = load_rubric(LAB.rubric)
REFERENCE = json.loads((SHIPPED_BUNDLES / "quick" / "manifest.json").read_text())["reference"]
IDENTITY = _transforms({})  # no Normalize recorded: the grader feeds 0..1 images
SEED = 20240613


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    """The quick profile's kind of data, smaller: 300 training and 200 shifted test digits."""
    return standin_cifar100(seed=0, train=300, test=200, test_shift=6)


def judge(model: nn.Module, tmp_path: Path, data, weights=None, **measured_changes) -> dict:
    """Export ``model`` as the kernel would, measure it as a grading does, and judge it.

    The notebook printed exactly what the grader measures (a cheater can compute it).
    ``measured_changes`` overwrite measured figures (say, an accuracy the model would have
    if it were trained) to look at one check in isolation. Returns the evaluation with
    ``ids`` (the diagnoses), ``fractions`` (the checks) and ``score``.
    """
    model.eval()
    folder = tmp_path / "export"
    result = export_model(model, folder)
    assert result["exported"], result
    weights = model.state_dict() if weights is None else weights
    evaluation = {"profile": "quick", "reference": dict(REFERENCE), "claims": None,
                  "runs": {"export": {"usable": True, "failure": None, "missing": []}},
                  **measure_export(folder, tmp_path, data, IDENTITY, None, len(data.train.labels),
                                   weights, SEED)}
    measured = evaluation["measured"]
    if "error" not in measured:
        measured.update(measured_changes)
        claimed = {"flops": float(measured["flops"]), "parameter_kb": measured["parameter_kb"],
                   "accuracy_pct": measured["accuracy_pct"]}
        lines = {"flops": f"flops = {measured['flops']}",
                 "parameter_kb": f"Model parameter size = {measured['parameter_kb']:.3f} kB",
                 "accuracy_pct": f"Accuracy = {measured['accuracy_pct']:.2f} %"}
        evaluation["claims"] = {**claimed, "lines": lines}
        evaluation["claim_checks"] = [
            {"figure": f, "claimed": claimed[f], "measured": claimed[f],
             "convention": FLOPS_CONVENTION if f == "flops" else None, "ok": True,
             "evidence": lines[f]} for f in claimed]
    diagnoses = CATALOGUE.run(evaluation)
    evaluation["ids"] = [d.id for d in diagnoses]
    evaluation["fractions"] = {item: CHECKS[item][1](evaluation, diagnoses, RUBRIC)[0]
                               for item in CHECKS}
    evaluation["score"] = score(evaluation, diagnoses, RUBRIC, CHECKS)[1]
    return evaluation


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels.long(), 100).float()


def as_input(images: np.ndarray) -> torch.Tensor:
    """Images as the grader feeds them with no Normalize: NCHW floats on 0..1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


# ------------------------------------------------------------- the model's size, hidden

class Buffers(nn.Module):
    """A linear classifier whose weights are a buffer, a non-persistent buffer, or a plain
    tensor attribute (an export constant): 0 parameters for flop_counter's convention."""

    def __init__(self, where: str) -> None:
        super().__init__()
        weight = torch.randn(100, 3 * 32 * 32) * 0.01
        if where == "constant":
            self.weight = weight
        else:
            self.register_buffer("weight", weight, persistent=where == "buffer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.t()


@pytest.mark.parametrize("where", ["buffer", "non-persistent buffer", "constant"])
def test_weights_kept_outside_the_parameters_count_against_the_budget(where, tmp_path, data):
    """Was 60/60: 0 parameters, so any table fits the parameter budget."""
    model = Buffers(where)  # 307,200 numbers, parameters or not
    # As if it classified: the complexity item is what is looked at.
    evaluation = judge(model, tmp_path, data, accuracy_pct=50.0, noisy_accuracy_pct=50.0,
                       train_accuracy_pct=95.0)
    measured = evaluation["measured"]
    assert measured["parameters"] == 0
    assert measured["stored_elements"] == 100 * 3072
    assert budget_figures(measured)[0] == 100 * 3072
    assert "hidden-parameters" in evaluation["ids"]
    # Over a budget of 1 M the same way as parameters would be:
    evaluation["measured"]["stored_elements"] = 2_000_000
    diagnoses = CATALOGUE.run(evaluation)
    assert CHECKS["complexity"][1](evaluation, diagnoses, RUBRIC)[0] == 0.5


class StatisticsTable(nn.Module):
    """A BatchNorm without weight whose running mean is a table of 'prototypes', read by
    feeding the batch norm the image repeated once per class: a nearest-prototype
    classifier with no parameter at all."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.BatchNorm1d(prototypes.numel(), affine=False)
        self.table.running_mean.copy_(prototypes.flatten())
        self.classes = len(prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(x, 8).flatten(1)  # 48 numbers per image
        centred = self.table(small.repeat(1, self.classes)).view(len(x), self.classes, -1)
        return -(centred ** 2).sum(-1)


def test_batchnorm_statistics_are_free_but_a_table_in_them_is_not(tmp_path, data):
    honest = judge(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 100)),
                   tmp_path / "honest", data)
    assert honest["measured"]["stored_elements"] == 0  # running mean and var of 8 channels
    table = judge(StatisticsTable(torch.rand(100, 48)), tmp_path / "table", data)
    assert table["measured"]["parameters"] == 0
    assert table["measured"]["stored_elements"] == 2 * 100 * 48


# ------------------------------------------------------------- the model's work, hidden

class ElementwiseLinear(nn.Module):
    """nn.Linear(768, 100) as an elementwise product and a sum: 0 FLOPs to flop_counter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(100, 768) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(x, 2).flatten(1)[:, None, :] * self.weight[None]).sum(-1)


class UnfoldConv(nn.Module):
    """A 3x3 convolution 3 -> 16 as unfold, an elementwise product and a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 27) * 0.1)
        self.fc = nn.Parameter(torch.randn(100, 16) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, 3, padding=1)  # N x 27 x 1024
        y = (patches[:, None] * self.weight[None, :, :, None]).sum(2).relu().mean(-1)
        return (y[:, None, :] * self.fc[None]).sum(-1)


class MatrixVector(nn.Module):
    """nn.Linear(768, 100) as one matrix-vector product per image (aten.mv)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(100, 768) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2).flatten(1)
        return torch.stack([self.weight @ x[i] for i in range(x.shape[0])])


class InPlaceProduct(nn.Module):
    """nn.Linear(768, 100) as an in-place addmm_ (flop_counter counts addmm, not addmm_)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(768, 100) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2).flatten(1)
        return torch.zeros(x.shape[0], 100).addmm_(x, self.weight)


@pytest.mark.parametrize("model, true_macs", [
    (ElementwiseLinear(), 768 * 100),
    (UnfoldConv(), 16 * 27 * 1024 + 16 * 100),
    (MatrixVector(), 768 * 100),
    (InPlaceProduct(), 768 * 100),
], ids=["mul-and-sum", "unfold", "mv", "addmm_"])
def test_matrix_products_flop_counter_misses_are_counted(model, true_macs, tmp_path, data):
    """Was 60/60 at any size: 0 MACs against the budget."""
    evaluation = judge(model, tmp_path, data)
    measured = evaluation["measured"]
    assert measured["macs"] == 0  # flop_counter's own count, which the claims are held to
    assert budget_figures(measured)[1] >= 0.9 * true_macs
    assert "uncounted-compute" in evaluation["ids"]


def test_uncounted_work_over_the_budget_costs_the_macs_half():
    evaluation = {"profile": "quick", "measured": {
        "parameters": 1000, "parameter_kb": 3.9, "macs": 0, "flops": 0,
        "other_flops": 2 * 50_000_000, "accuracy_pct": 50.0, "noisy_accuracy_pct": 50.0,
        "train_accuracy_pct": 90.0}}
    assert budget_figures(evaluation["measured"]) == (1000, 50_000_000)
    assert CHECKS["complexity"][1](evaluation, CATALOGUE.run(evaluation), RUBRIC)[0] == 0.5


def test_ordinary_models_have_no_uncounted_work_to_speak_of(tmp_path):
    """The allowance leaves real layers alone: BatchNorm, ReLU, pooling, a residual add."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=100).eval()
    assert export_model(model, tmp_path / "export")["exported"]
    complexity = measure.count(measure.load_program(tmp_path / "export"))
    measured = {"parameters": complexity.parameters, "macs": complexity.macs,
                "flops": complexity.flops, "other_flops": complexity.other_flops,
                "stored_elements": complexity.stored_elements}
    assert complexity.stored_elements == 0
    assert budget_figures(measured) == (complexity.parameters, complexity.macs)


# ------------------------------------------------------------- cheap on the grader's input

class CheapOnBlank(nn.Module):
    """A 64-channel convolution that runs only on images that are not blank: the grader
    counted FLOPs on one blank (zero) image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.fc = nn.Linear(64, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x.flatten(1).abs().sum(1) > 0).nonzero().squeeze(1)
        out = torch.zeros(x.shape[0], 100)
        return out.index_put((rows,), self.fc(self.conv(x[rows]).mean((2, 3))))


class CheapOnFirstRow(CheapOnBlank):
    """The convolution for every image of a batch but the first: the grader counted FLOPs
    on a batch of one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (torch.arange(x.shape[0]) > 0).nonzero().squeeze(1)
        out = torch.zeros(x.shape[0], 100)
        return out.index_put((rows,), self.fc(self.conv(x[rows]).mean((2, 3))))


@pytest.mark.parametrize("cls", [CheapOnBlank, CheapOnFirstRow])
def test_flops_are_those_of_the_test_images_not_of_one_blank_image(cls, tmp_path, data):
    """Was 0 FLOPs: a convolution of 1.77 M MACs per image went unseen."""
    model = cls()
    assert export_model(model, tmp_path / "alone")["exported"]
    blank = measure.count(measure.load_program(tmp_path / "alone"))
    assert blank.macs < 10_000  # one blank image: what the grader used to report
    evaluation = judge(model, tmp_path, data)
    conv_macs = 64 * 27 * 32 * 32
    assert evaluation["measured"]["macs"] >= 0.95 * (conv_macs + 6400)


# ------------------------------------------------------------- logits from the test set

class CallCounter(nn.Module):
    """Answers from a table of labels by the number of times it was called: the grader calls
    it in a known order (one blank image, then the test images in batches of 256)."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("table", one_hot(torch.from_numpy(labels)))
        self.fc = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        start = (self.calls - 2).clamp(min=0) * 256
        rows = torch.arange(x.shape[0]) + start
        return self.table[rows.clamp(max=len(self.table) - 1)] + 0 * self.fc.weight


class BatchNormCounter(nn.Module):
    """A batch norm in training mode on a constant input counts calls in its running mean."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("var", torch.ones(1))
        self.fc = nn.Linear(3 * 32 * 32, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F.batch_norm(torch.ones(2, 1), self.mean, self.var, training=True, momentum=0.5)
        return self.fc(x.flatten(1)) * self.mean


def test_a_model_that_changes_as_it_runs_is_refused(tmp_path, data):
    for name, model in (("counter", CallCounter(data.test.labels)),
                        ("batchnorm", BatchNormCounter())):
        evaluation = judge(model, tmp_path / name, data)
        assert evaluation["measured"]["refused"] is True, name
        assert "changes its own" in evaluation["measured"]["error"]
        assert "export-refused" in evaluation["ids"]
        assert evaluation["score"] == 0


class PositionTable(nn.Module):
    """Logits by position in the batch: the test labels in the order the grader used to
    feed them (200 test images are one batch)."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("table", one_hot(torch.from_numpy(labels)))
        self.fc = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0]).clamp(max=len(self.table) - 1)
        return self.table[rows] + 0 * self.fc.weight


def test_the_test_images_come_in_an_order_no_model_knows(tmp_path, data):
    """Was 100 % with a table of 200 labels."""
    model = PositionTable(data.test.labels)
    with torch.no_grad():
        assert (model(as_input(data.test.images)).argmax(1).numpy() == data.test.labels).all()
    evaluation = judge(model, tmp_path, data)
    assert evaluation["measured"]["accuracy_pct"] < 10
    assert evaluation["fractions"]["accuracy"] == 0.0


class PixelHash(nn.Module):
    """Knows each test image by an exact hash of its pixels, and answers from a table."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randint(0, 1000, (3 * 32 * 32,)))
        self.register_buffer("keys", self.key(as_input(images)))
        self.register_buffer("answers", one_hot(torch.from_numpy(labels)))
        self.fc = nn.Linear(1, 1)

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Integer arithmetic on the 0..255 levels: exact, in any order of summation."""
        return ((x.flatten(1) * 255).round().long() * self.projection).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hits = (self.key(x)[:, None] == self.keys[None]).float()
        return (hits[:, :, None] * self.answers[None]).sum(1) + 0 * self.fc.weight


def test_a_model_that_knows_the_exact_test_images_is_fragile(tmp_path, data):
    """Was 60/60: 100 % top-1 with one parameter and no FLOPs."""
    evaluation = judge(PixelHash(data.test.images, data.test.labels), tmp_path, data)
    measured = evaluation["measured"]
    assert measured["accuracy_pct"] == 100.0
    assert measured["noisy_accuracy_pct"] < 10
    assert "fragile-accuracy" in evaluation["ids"]
    assert evaluation["fractions"]["accuracy"] == 0.0
    assert evaluation["fractions"]["honest-evaluation"] == 0.0
    assert evaluation["fractions"]["complexity"] == 0.0  # it does not classify
    assert evaluation["score"] <= 25  # measured, and its printed figures hold


class NearestTestImage(nn.Module):
    """Nearest neighbour among the test images, shrunk to 8x8 (192 numbers each), answering
    with their labels: robust to noise, and small enough for any budget."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("keys", F.avg_pool2d(as_input(images), 4).flatten(1))
        self.register_buffer("answers", one_hot(torch.from_numpy(labels)))
        self.fc = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = F.avg_pool2d(x, 4).flatten(1)
        distances = ((query[:, None, :] - self.keys[None]) ** 2).sum(-1)
        return self.answers[distances.argmin(1)] + 0 * self.fc.weight


def test_a_model_that_memorised_the_test_set_is_credited_what_it_does_on_other_images(
        tmp_path, data):
    """Was 60/60 with 100 % top-1 from 58,400 numbers in buffers and no FLOPs counted. The
    test images are its training set: the rubric now credits its accuracy on the training
    images, which it never saw (a nearest-neighbour classifier does classify digits), and
    the printed accuracy is not a test accuracy."""
    evaluation = judge(NearestTestImage(data.test.images, data.test.labels), tmp_path, data)
    measured = evaluation["measured"]
    assert measured["accuracy_pct"] == 100.0 and measured["noisy_accuracy_pct"] > 90
    assert measured["train_accuracy_pct"] < 60
    assert measured["stored_elements"] == 200 * 192 + 200 * 100
    assert {"learnt-the-test-set", "hidden-parameters"} <= set(evaluation["ids"])
    diagnoses = CATALOGUE.run(evaluation)
    message = CHECKS["accuracy"][1](evaluation, diagnoses, RUBRIC)[1]
    assert message.startswith(f"{measured['train_accuracy_pct']:.2f} % top-1 credited")
    assert evaluation["fractions"]["honest-evaluation"] == 0.0
    assert evaluation["score"] < 60


# ------------------------------------------------------------- the export is not the model

def test_an_export_of_other_weights_than_the_handed_in_ones_is_not_measured(tmp_path, data):
    torch.manual_seed(0)
    handed_in = nn.Sequential(nn.Flatten(), nn.Linear(3072, 100))
    exported = nn.Sequential(nn.Flatten(), nn.Linear(3072, 100))  # other values, same names
    evaluation = judge(exported, tmp_path, data, weights=handed_in.state_dict())
    assert evaluation["measured"]["not_the_weights"] is True
    assert "export-not-the-weights" in evaluation["ids"]
    assert "measure-failed" not in evaluation["ids"]
    assert evaluation["score"] == 0
    # The model the weights were loaded into, saved in a checkpoint dict in half precision:
    # measured.
    with torch.no_grad():
        for parameter in exported.parameters():
            parameter.copy_(parameter.half().float())
    same = judge(exported, tmp_path / "same", data,
                 weights={"state_dict": {k: v.half() for k, v in exported.state_dict().items()}})
    assert "error" not in same["measured"]


def test_the_first_model_the_weights_fit_is_the_one_measured():
    """Two classes with the same layout: the notebook's object first, then its classes in
    order, each named in the evidence; whichever forward is chosen is what is measured."""

    class Honest(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 100)

    class Other(Honest):
        pass

    Honest.__module__ = Other.__module__ = "__main__"
    weights = Honest().state_dict()
    model, fact = _model({"Other": Other, "Honest": Honest}, weights)
    assert isinstance(model, Other) and fact["chosen"] == "the class Other"
    model, fact = _model({"Other": Other, "Honest": Honest, "model": Honest()}, weights)
    assert type(model) is Honest and fact["chosen"] == "the object model"


# ------------------------------------------------------------- breaking the grader

class Allocates(nn.Module):
    def __init__(self, elements: int) -> None:
        super().__init__()
        self.elements = elements
        self.fc = nn.Linear(3072, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # empty: even unguarded, the pages are never touched
        huge = torch.empty(self.elements).narrow(0, 0, 1)
        return self.fc(x.flatten(1)) + huge


class Works(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1024, 1024))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ones(1024, 1024)
        for _ in range(8):
            y = y @ self.weight  # 17 GFLOPs in all
        return x.flatten(1)[:, :100] + y[0, :100]


def test_a_model_is_stopped_before_it_takes_the_graders_memory_or_time(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "MAX_CALL_BYTES", 256 * 1024 ** 2)
    assert export_model(Allocates(2 ** 28), tmp_path / "memory")["exported"]  # 1 GiB
    with pytest.raises(measure.MeasureError, match="allocate more than 256 MB"):
        measure.count(measure.load_program(tmp_path / "memory"))
    monkeypatch.setattr(measure, "MAX_CALL_WORK", 10 ** 9)
    assert export_model(Works(), tmp_path / "time")["exported"]
    with pytest.raises(measure.MeasureError, match="more than 1e\\+09 operations"):
        measure.count(measure.load_program(tmp_path / "time"))
    monkeypatch.setattr(measure, "MEASURE_SECONDS", -1.0)
    assert export_model(Allocates(1), tmp_path / "slow")["exported"]
    with pytest.raises(measure.MeasureError, match="took longer than"):
        measure.count(measure.load_program(tmp_path / "slow"))


class Solves(nn.Module):
    """A layer as a linear solve: its work is not bounded by what it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.eye(3072) + 0.01 * torch.randn(3072, 3072))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.a, x.flatten(1).t()).t()[:, :100]


def test_operations_whose_work_is_not_counted_are_refused(tmp_path):
    assert export_model(Solves(), tmp_path / "export")["exported"]
    with pytest.raises(measure.ExportRefused, match="whose work the grader does not count"):
        measure.count(measure.load_program(tmp_path / "export"))


def test_a_weights_file_that_claims_a_huge_tensor_is_refused_before_the_kernel(tmp_path):
    """A stride-0 view saves one number and claims 60 M: refused by the grader itself, so
    neither it nor the kernel ever builds it; the file stays a few hundred bytes."""
    path = tmp_path / "model.pth"
    torch.save({"fc.weight": torch.zeros(1).expand(60_000_000)}, path)
    assert path.stat().st_size < 2000
    with pytest.raises(UntrustedFileError, match="60000000 elements"):
        load_checkpoint(path, WEIGHT_LIMITS, tmp_path)
    many = torch.zeros(40_000_000)
    torch.save({f"w{i}": many[i:] for i in range(4)}, path)  # one storage, four big views
    with pytest.raises(UntrustedFileError, match="tensor elements in all"):
        load_checkpoint(path, WEIGHT_LIMITS, tmp_path)


def test_a_claim_line_is_read_as_printed_and_shown_whole():
    """The last figure of a line is the claim (an honest epoch line prints the test accuracy
    last); a line that buries a true figure behind a false one is shown to the TA whole."""
    line = "Accuracy = 90.39 % (measured: top-1 accuracy 49.80 %)"
    claims = measure.claims_from_outputs({"cells": [{"cell_type": "code", "source": "",
                                                     "outputs": [{"output_type": "stream",
                                                                  "text": line}]}]})
    assert claims.accuracy_pct == pytest.approx(49.8)
    assert claims.lines["accuracy_pct"] == line


# ------------------------------------------------------------- in the sandbox

HONEST = REPO / "fixtures" / "lowcomplexity" / "honest"
PLANT = '''class Planted(nn.Module):
    """Runs when the class is defined: exports an untrained Net where the grader's export
    goes, and makes the grader's export do nothing."""
    import os as _os
    from grader import runtime as _runtime
    import labs.lowcomplexity.export as _export
    _export.export_model(Net(), _os.path.join(_runtime.settings["work_dir"], "export"))
    _export.export_model = lambda model, out_dir: {
        "exported": True, "dynamic_batch": True, "why_static": None, "folder": str(out_dir),
        "files": ["program.json", "tensors.pt", "manifest.json"]}
'''


@pytest.mark.slow
def test_a_class_body_that_swaps_the_export_is_caught(tmp_path, run_cache):
    from grader.pipeline import grade

    hand_in = tmp_path / "hand-in"
    shutil.copytree(HONEST, hand_in)
    notebook = nbformat.read(hand_in / "lowcomplexity.ipynb", as_version=4)
    after = next(i for i, c in enumerate(notebook.cells) if "class Net" in c.source)
    notebook.cells.insert(after + 1, nbformat.v4.new_code_cell(PLANT))
    nbformat.write(notebook, hand_in / "lowcomplexity.ipynb")
    result = grade(hand_in, tmp_path / "out", LAB.profiles["quick"], workers=1, threads=1,
                   run_cache=run_cache, lab=LAB)
    found = {d["id"] for d in result["diagnoses"]}
    assert "export-not-the-weights" in found, result["diagnoses"]
    assert result["score"] == 0
