"""Lab 5's trusted core: the CIFAR-100 reader, export in the kernel, measurement outside it."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # an editable install made before labs/ existed misses it
    sys.path.insert(0, str(REPO))

from labs.lowcomplexity import data, measure  # noqa: E402
from labs.lowcomplexity.export import (MANIFEST_FILE, PROGRAM_FILE, TENSORS_FILE,  # noqa: E402
                                       export_model)
from labs.lowcomplexity.reference_model import build_reference, train_reference  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def small_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 100, n).astype(np.int64))


# ------------------------------------------------------------------------------- data

def test_reader_round_trips_the_real_format(tmp_path):
    train_x, train_y = small_images(7, 0)
    test_x, test_y = small_images(3, 1)
    folder = data.write_cifar100_folder(tmp_path, train_x, train_y, test_x, test_y)
    assert folder == tmp_path / "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    written = pickle.loads((folder / "train").read_bytes(), encoding="bytes")  # our own file
    assert set(written) == {b"data", b"fine_labels", b"coarse_labels", b"filenames",
                            b"batch_label"}
    assert written[b"data"].shape == (7, 3072)
    for root in (tmp_path, folder):
        dataset = data.load_cifar100(root)
        assert dataset.train.images.dtype == np.uint8
        assert dataset.train.images.shape == (7, 32, 32, 3)
        assert dataset.train.labels.dtype == np.int64
        np.testing.assert_array_equal(dataset.train.images, train_x)
        np.testing.assert_array_equal(dataset.train.labels, train_y)
        np.testing.assert_array_equal(dataset.test.images, test_x)
        np.testing.assert_array_equal(dataset.test.labels, test_y)


def test_reader_takes_numpy_1_module_names(tmp_path):
    """The real files were pickled by numpy 1, which names numpy.core, not numpy._core."""
    images, labels = small_images(3, 0)
    folder = data.write_cifar100_folder(tmp_path, images, labels, images, labels)
    written = (folder / "test").read_bytes()
    assert b"numpy._core.multiarray" in written
    (folder / "test").write_bytes(written.replace(b"numpy._core.multiarray",
                                                  b"numpy.core.multiarray"))
    np.testing.assert_array_equal(data.load_cifar100(tmp_path).test.images, images)


def test_reader_refuses_a_pickle_that_runs_code(tmp_path):
    folder = data.write_cifar100_folder(tmp_path, *small_images(4, 0), *small_images(2, 1))
    marker = tmp_path / "ran"
    (folder / "test").write_bytes(pickle.dumps({b"data": Payload(marker), b"fine_labels": []},
                                               protocol=2))
    with pytest.raises(data.DataError, match=r"test is not a readable CIFAR-100 file \(it names"):
        data.load_cifar100(tmp_path)
    assert not marker.exists()


def test_reader_names_a_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match="holds no CIFAR-100 python files"):
        data.load_cifar100(tmp_path)


def test_standin_has_100_classes_and_is_deterministic():
    first = data.standin_cifar100(seed=0, train=300, test=100)
    again = data.standin_cifar100(seed=0, train=300, test=100)
    other = data.standin_cifar100(seed=1, train=300, test=100)
    assert first.train.images.shape == (300, 32, 32, 3) and first.train.images.dtype == np.uint8
    assert first.test.labels.min() >= 0 and first.test.labels.max() < 100
    assert len(np.unique(first.train.labels)) > 90
    np.testing.assert_array_equal(first.train.images, again.train.images)
    np.testing.assert_array_equal(first.test.labels, again.test.labels)
    assert not np.array_equal(first.train.labels, other.train.labels)


# ------------------------------------------------------------------------------- reference

def test_reference_training_is_deterministic():
    dataset = data.standin_cifar100(seed=0, train=128, test=32)
    state, facts = train_reference(dataset, epochs=1, seed=3, batch_size=64, width=4)
    again, facts_again = train_reference(dataset, epochs=1, seed=3, batch_size=64, width=4)
    assert facts == facts_again
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert facts["parameters"] == sum(p.numel() for p in build_reference(4).parameters())
    assert 0.0 <= facts["test_accuracy_pct"] <= 100.0


# ------------------------------------------------------------------------------- export

def reference_model(width: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_reference(width)
    # Non-trivial BN statistics, so that buffers matter in the comparison below.
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = reference_model()
    folder = tmp_path_factory.mktemp("work") / "export"
    result = export_model(model, folder)
    assert result["exported"] and result["dynamic_batch"], result
    return model, folder


def copy_export(source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(source, folder)
    return folder


def test_export_load_count_reference(exported):
    model, folder = exported
    program = measure.load_program(folder)
    complexity = measure.count(program)
    assert complexity.parameters == sum(p.numel() for p in model.parameters())
    assert complexity.parameter_kb == complexity.parameters * 4 / 1024
    assert complexity.buffer_elements == sum(b.numel() for b in model.buffers())
    assert complexity.flops == 2 * complexity.macs > 0
    with torch.no_grad():
        torch.testing.assert_close(program.module(check_guards=False)(torch.ones(5, 3, 32, 32)),
                                   model(torch.ones(5, 3, 32, 32)))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_flops_are_twice_a_hand_count_of_macs(tmp_path):
    assert export_model(TinyNet(), tmp_path / "export")["exported"]
    complexity = measure.count(measure.load_program(tmp_path / "export"))
    conv_macs = (4 * 32 * 32) * (3 * 3 * 3)  # one MAC per output element per kernel weight
    fc_macs = 1024 * 10
    assert complexity.macs == conv_macs + fc_macs == 120_832
    assert complexity.flops == 2 * (conv_macs + fc_macs)
    assert complexity.parameters == (4 * 3 * 3 * 3 + 4) + (1024 * 10 + 10)


class GradMode(TinyNet):
    def __init__(self, switch) -> None:
        super().__init__()
        self.switch = switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.switch():
            x = torch.relu(self.conv(x))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


def test_no_grad_in_forward_is_measured_but_a_grad_switch_is_refused(tmp_path):
    assert export_model(GradMode(torch.no_grad), tmp_path / "no_grad")["exported"]
    assert measure.count(measure.load_program(tmp_path / "no_grad")).macs == 120_832
    assert export_model(GradMode(torch.enable_grad), tmp_path / "enable_grad")["exported"]
    with pytest.raises(measure.ExportRefused, match="higher-order operator"):
        measure.load_program(tmp_path / "enable_grad")


def plain_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean, std) -> float:
    with torch.no_grad():
        logits = torch.cat([model(data.to_tensor(images[i:i + 1], mean, std))
                            for i in range(len(images))])
    return 100.0 * float((logits.argmax(1) == torch.from_numpy(labels)).float().mean())


def test_accuracy_equals_plain_forward(exported):
    model, folder = exported
    dataset = data.standin_cifar100(seed=0, train=50, test=45)
    mean, std = data.channel_stats(dataset.train.images)
    expected = plain_accuracy(model, dataset.test.images, dataset.test.labels, mean, std)
    program = measure.load_program(folder)
    got = measure.accuracy(program, dataset.test.images, dataset.test.labels, mean, std,
                           batch_size=16)
    assert got == pytest.approx(expected)
    assert measure.accuracy(model, dataset.test.images, dataset.test.labels, mean, std, 16) \
        == pytest.approx(expected)


class FixedBatch(TinyNet):
    """Reshapes with a hard-coded batch of 1: exportable only with a static batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).reshape(1, -1))


def test_a_fixed_batch_model_is_exported_static_and_measured_image_by_image(tmp_path):
    torch.manual_seed(0)
    model = FixedBatch().eval()
    result = export_model(model, tmp_path / "export")
    assert result["exported"] and not result["dynamic_batch"] and result["why_static"]
    program = measure.load_program(tmp_path / "export")
    images, labels = small_images(5, 2)
    labels %= 10
    expected = plain_accuracy(model, images, labels, (0.5,) * 3, (0.25,) * 3)
    assert measure.accuracy(program, images, labels, (0.5,) * 3, (0.25,) * 3, 4) \
        == pytest.approx(expected)


class NumpyForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.from_numpy(x.detach().numpy()).flatten(1))


def test_a_numpy_forward_cannot_be_exported_and_says_why(tmp_path):
    model = NumpyForward()
    result = export_model(model, tmp_path / "export")
    assert result["exported"] is False
    assert result["why"].split(":")[0].isidentifier() and ": " in result["why"]
    assert "\n" not in result["why"]
    assert not (tmp_path / "export" / MANIFEST_FILE).exists()
    assert model.training  # left as it was found


# ------------------------------------------------------------------------------- refusals

def test_a_planted_pickle_is_refused_and_never_runs(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"conv1.0.weight": Payload(marker)}, "constants": {}},
               folder / TENSORS_FILE)
    with pytest.raises(measure.ExportRefused, match="Python objects other than tensors"):
        measure.load_program(folder)
    assert not marker.exists()


CUSTOM_OP_EXPORT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from labs.lowcomplexity.export import export_model

    @torch.library.custom_op("slimtest::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 100)

        def forward(self, x):
            return self.fc(double(x).flatten(1))

    result = export_model(Net(), sys.argv[2])
    assert result["exported"], result
""")


def test_a_custom_op_from_another_process_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", CUSTOM_OP_EXPORT, str(REPO), str(tmp_path / "export")],
                   check=True, env=env, timeout=120, capture_output=True)
    assert "slimtest" in (tmp_path / "export" / PROGRAM_FILE).read_text()
    with pytest.raises(measure.ExportRefused, match=r"custom operator torch\.ops\.slimtest"):
        measure.load_program(tmp_path / "export")


def _user_input(program: dict) -> str:
    specs = program["graph_module"]["signature"]["input_specs"]
    return next(s["user_input"]["arg"]["as_tensor"]["name"] for s in specs if "user_input" in s)


def _plant_expression(program: dict, code: str) -> None:
    graph = program["graph_module"]["graph"]
    graph["tensor_values"][_user_input(program)]["sizes"][0] = {
        "as_expr": {"expr_str": code, "hint": {"as_int": 2}}}


def _plant_input_name(program: dict, code: str) -> None:
    # Renamed wherever it occurs: torch's deserializer alone would run it while building
    # the graph module (the name becomes a default argument of the generated forward).
    renamed = json.loads(json.dumps(program).replace('"x"', json.dumps(f"x={code}")))
    program.clear()
    program.update(renamed)


def _plant_target(program: dict, code: str) -> None:
    # os.system reached by getattr from the torch module, called with a string argument
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.serialization.os.system"
    node["inputs"] = [{"name": "command", "arg": {"as_string": code}, "kind": 1}]


def _plant_enum_import(program: dict, code: str) -> None:
    entry = program["graph_module"]["module_call_graph"][0]["signature"]
    entry["in_spec"] = json.dumps([1, {"type": "builtins.dict", "children_spec": [], "context":
                                       json.dumps({"__enum__": True, "fqn": "os:system",
                                                   "name": code})}])


@pytest.mark.parametrize("plant", [_plant_expression, _plant_input_name, _plant_target,
                                   _plant_enum_import])
def test_code_planted_in_the_graph_json_is_refused(exported, tmp_path, plant):
    folder = copy_export(exported[1], tmp_path)
    marker = tmp_path / "ran"
    program = json.loads((folder / PROGRAM_FILE).read_text())
    plant(program, f"__import__('pathlib').Path({str(marker)!r}).touch()")
    (folder / PROGRAM_FILE).write_text(json.dumps(program))
    with pytest.raises(measure.ExportRefused, match="which the grader does not load or run"):
        measure.load_program(folder)
    assert not marker.exists()


def test_guard_code_is_dropped_not_run(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    marker = tmp_path / "ran"
    program = json.loads((folder / PROGRAM_FILE).read_text())
    program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch()"]
    (folder / PROGRAM_FILE).write_text(json.dumps(program))
    loaded = measure.load_program(folder)
    loaded.module()(torch.zeros(2, 3, 32, 32))  # even with guards checked
    assert not marker.exists()


def test_a_linked_program_file_is_not_followed(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    real = tmp_path / "elsewhere.json"
    (folder / PROGRAM_FILE).rename(real)
    (folder / PROGRAM_FILE).symlink_to(real)
    with pytest.raises(measure.MeasureError, match="symbolic link"):
        measure.load_program(folder)


# ------------------------------------------------------------------------------- claims

def notebook(*outputs: dict) -> dict:
    return {"cells": [{"cell_type": "markdown", "source": "Accuracy = 99.99 %"},
                      {"cell_type": "code", "source": "", "outputs": list(outputs)}]}


def stream(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


def test_claims_from_the_lab5_lines():
    nb = notebook(stream("flops = 3671096\nModel parameter size = 7211.203 kB\n"
                         "Accuracy = 68.19 %\n"),  # ShuffleNet first: the last print wins
                  stream("flops = 31269888\n"),
                  stream(["Model parameter size = 8677.812 kB\n", "Accuracy = 90.39 %\n"]))
    claims = measure.claims_from_outputs(nb)
    assert claims.flops == 31269888
    assert claims.parameter_kb == pytest.approx(8677.812)
    assert round(claims.parameter_kb * 1024 / 4) == 2_221_520
    assert claims.accuracy_pct == pytest.approx(90.39)
    assert claims.lines == {"flops": "flops = 31269888",
                            "parameter_kb": "Model parameter size = 8677.812 kB",
                            "accuracy_pct": "Accuracy = 90.39 %"}


@pytest.mark.parametrize("line, figure, value", [
    ("FLOPs: 31,269,888", "flops", 31_269_888),
    ("FLOPs: 31.27M", "flops", 31.27e6),
    ("Total FLOPs = 0.03 G", "flops", 0.03e9),
    ("MFLOPs = 31.27", "flops", 31.27e6),
    ("Params size (MB): 8.47", "parameter_kb", 8.47 * 1024),
    ("Total params: 2,221,520", "parameter_kb", 2_221_520 * 4 / 1024),
    ("Params: 2.22M", "parameter_kb", 2.22e6 * 4 / 1024),
    ("Test acc: 0.9039", "accuracy_pct", 90.39),
    ("epoch 9 train acc 95.1% test acc 61.2%", "accuracy_pct", 61.2),
    ("Accuracy of the network on the 10000 test images: 90 %", "accuracy_pct", 90.0),
])
def test_claim_variants(line, figure, value):
    claims = measure.claims_from_outputs(notebook(
        {"output_type": "execute_result", "data": {"text/plain": line}}))
    assert getattr(claims, figure) == pytest.approx(value)
    assert claims.lines[figure] == line


def test_claims_ignore_non_trainable_counts_and_markdown():
    claims = measure.claims_from_outputs(notebook(stream("Non-trainable params: 0\n")))
    assert claims == measure.Claims(None, None, None, {})


def test_compare_claims_names_the_flop_convention():
    complexity = measure.Complexity(parameters=2_221_520, parameter_kb=8677.8125,
                                    macs=15_634_944, flops=31_269_888, buffer_elements=0)

    def check(flops, kb, acc):
        return measure.compare_claims(measure.Claims(flops, kb, acc, {}), complexity, 61.0, 1.0)

    flops, size, accuracy = check(31_269_888, 8677.812, 90.39)
    assert flops.ok and flops.convention == measure.FLOPS_CONVENTION
    assert size.ok and size.measured == 8677.8125
    assert not accuracy.ok and accuracy.measured == 61.0
    flops, _, accuracy = check(15.63e6, None, 61.5)
    assert flops.ok and flops.convention == measure.MACS_CONVENTION and accuracy.ok
    flops, size, _ = check(10e6, None, None)
    assert not flops.ok and flops.convention is None and not size.ok and size.claimed is None
