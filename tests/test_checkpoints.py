"""A student's checkpoint is checked against the profile's VGG before any model is built,
and whatever an evaluation step meets becomes an ``error`` fact, never a crashed grading.

Fast and kernel-free: every case builds the hostile checkpoint itself.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

import labs.slimming.checkpoints as checkpoints
from labs.slimming.checkpoints import (CHECKPOINT_LIMITS, CheckpointError, check_layout,
                                load_student_checkpoint, model_from_state, state_dict_of)
from labs.slimming.evaluate import TrustedData, copied_from, finetune_facts, safely, sparsity_facts
from grader.untrusted import UntrustedFileError, load_checkpoint_bytes
from reference.model import cfg_from_state_dict, layout_problem, scaled_cfg, vgg
from reference.profiles import QUICK

WIDEST = scaled_cfg(QUICK.width_divisor)  # [8, 8, 'M', 16, 16, 'M', 32, ...]


def thin_cfg(divisor: int = 2) -> list:
    return [v if v == "M" else max(1, int(v) // divisor) for v in WIDEST]


def trusted_data() -> TrustedData:
    """What an evaluation needs up to the point where a checkpoint is refused (no data)."""
    return TrustedData(QUICK, {}, Path("."), None, None)  # type: ignore[arg-type]


def save(path: Path, state: dict, **extra) -> Path:
    torch.save({"state_dict": state, **extra}, path)
    return path


def wide_state() -> dict[str, torch.Tensor]:
    """A thin model whose layer 3 declares 12000 channels: a 130 KB file, while the VGG it
    describes would take gigabytes (memory grows with the square of the width)."""
    state = vgg(cfg=thin_cfg(), init_weights=False).state_dict()
    conv = [k for k, v in state.items() if k.startswith("feature.") and v.dim() == 4][3]
    bn = f"feature.{int(conv.split('.')[1]) + 1}"
    state[conv] = torch.zeros(12000, 1, 1, 1)
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"{bn}.{name}"] = torch.zeros(12000)
    return state


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if a VGG is built at all: the check must come before any allocation."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a VGG was built for a checkpoint that should be refused: {kwargs}")
    monkeypatch.setattr(checkpoints, "vgg", refuse)


def test_a_huge_width_checkpoint_is_refused_before_a_model_is_built(tmp_path, no_model_built):
    path = save(tmp_path / "model_prune.pth", wide_state(), cfg=[])
    assert path.stat().st_size < 1_000_000  # the model it declares: gigabytes
    state = state_dict_of(load_student_checkpoint(path, ("cfg", "state_dict")), path.name)
    with pytest.raises(CheckpointError) as refused:
        model_from_state(state, path.name, widest=WIDEST)
    message = str(refused.value)
    assert message.startswith("model_prune.pth does not fit the lab's VGG: layer 3 has 12000 "
                              "channels, at most 16")
    assert "\n" not in message


def test_the_chained_original_is_checked_too(tmp_path, no_model_built):
    from labs.slimming.grading import _own_state

    assert _own_state(save(tmp_path / "model_best.pth", wide_state()), WIDEST) is None


def test_a_thin_or_full_checkpoint_of_the_profile_loads(tmp_path):
    for cfg in (thin_cfg(), WIDEST):
        state = vgg(cfg=cfg).state_dict()
        model = model_from_state(state, "m.pth", widest=WIDEST)
        assert model.cfg == cfg
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("edit, reason", [
    (lambda cfg: [v for v in cfg if v != "M"], r"layer 2 is feature.6, where the lab's VGG has "
                                               r"feature.7 \(a max-pool missing"),
    (lambda cfg: cfg[:-1], "it has 15 convolution layers, the lab's VGG has 16"),
    (lambda cfg: [*cfg, 8], "it has 17 convolution layers"),
])
def test_another_layout_is_refused_in_one_sentence(edit, reason, no_model_built):
    with torch.device("meta"):  # shapes only: nothing is allocated for the hostile layout
        state = vgg(cfg=edit(thin_cfg()), init_weights=False).state_dict()
    with pytest.raises(CheckpointError, match=f"^m.pth does not fit the lab's VGG: {reason}"):
        check_layout(state, "m.pth", WIDEST)


def test_every_tensor_must_have_the_shape_its_layout_implies():
    state = vgg(cfg=thin_cfg(), init_weights=False).state_dict()
    assert layout_problem(state, WIDEST) is None
    state["feature.1.running_var"] = torch.ones(3)
    assert layout_problem(state, WIDEST) == ("feature.1.running_var has shape (3,), its layout "
                                             "implies (4,)")
    del state["classifier.bias"]
    state["feature.1.running_var"] = torch.ones(4)
    assert layout_problem(state, WIDEST) == "it lacks classifier.bias"
    state["classifier.bias"], state["extra.weight"] = torch.zeros(10), torch.zeros(1)
    assert layout_problem(state, WIDEST) == "it holds extra.weight, which the lab's VGG has not"


def test_a_far_away_layer_index_does_not_build_a_huge_cfg():
    state = vgg(cfg=thin_cfg(), init_weights=False).state_dict()
    state["feature.999999999.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="not a layer"):
        cfg_from_state_dict(state)
    state = {"feature.0.weight": torch.zeros(1, 3, 3, 3), "feature.9000.weight": torch.zeros(1, 1, 3, 3)}
    with pytest.raises(ValueError, match="does not fit a VGG layout"):
        cfg_from_state_dict(state)


def test_a_vgg_without_max_pools_becomes_an_error_fact(tmp_path):
    path = save(tmp_path / "model_best.pth",
                vgg(cfg=[v for v in WIDEST if v != "M"], init_weights=False).state_dict())
    facts = safely(lambda: sparsity_facts(path, trusted_data()), "model_best.pth of the sparsity run")
    assert set(facts) == {"error"}
    assert facts["error"].startswith("model_best.pth does not fit the lab's VGG: layer 2 is")
    tuned = safely(lambda: finetune_facts(path, None, None, trusted_data()), "x")
    assert tuned["error"] == facts["error"]


def test_any_exception_of_a_step_becomes_one_sentence_and_a_debug_traceback(caplog):
    sparse = torch.eye(3).to_sparse()

    def step() -> dict:  # what a sparse tensor did to torch.equal in copied_from
        return {"copied_from": copied_from({"a": sparse}, {"ref": {"a": sparse.clone()}})}

    with caplog.at_level(logging.DEBUG, logger="labs.slimming.evaluate"):
        facts = safely(step, "model_best.pth of the sparsity run")
    assert set(facts) == {"error"}
    assert facts["error"].startswith("model_best.pth of the sparsity run could not be evaluated "
                                     "(NotImplementedError: ")
    assert "\n" not in facts["error"] and len(facts["error"]) < 400
    assert "Traceback" in caplog.text and "copied_from" in caplog.text

    def boom() -> dict:
        raise RuntimeError("Given input size: (64x1x1). Calculated output size: (64x0x0).\nmore")

    assert safely(boom, "m.pth")["error"] == (
        "m.pth could not be evaluated (RuntimeError: Given input size: (64x1x1). Calculated "
        "output size: (64x0x0).), so its checks are not scored.")


def saved(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"feature.0.weight": tensor}}, buffer)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make, kind", [
    (lambda: torch.eye(3).to_sparse(), r"a tensor of layout sparse_coo \(not dense\)"),
    (lambda: torch.eye(3).to_sparse_csr(), r"a tensor of layout sparse_csr \(not dense\)"),
    (lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8), "a quantized tensor"),
    (lambda: torch.ones(3, dtype=torch.complex64), "a tensor of dtype complex64"),
    (lambda: torch.ones(3, dtype=torch.int16), "a tensor of dtype int16"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "a nested tensor"),
])
def test_tensors_that_are_not_plain_dense_are_refused(make, kind):
    with pytest.raises(UntrustedFileError, match=f"^m.pth holds {kind}: a checkpoint of the lab "
                                                 "holds plain dense tensors only"):
        load_checkpoint_bytes(saved(make()), "m.pth", CHECKPOINT_LIMITS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.int64, torch.int32, torch.uint8, torch.bool])
def test_the_dtypes_of_a_state_dict_load(dtype):
    loaded = load_checkpoint_bytes(saved(torch.ones(3).to(dtype)), "m.pth", CHECKPOINT_LIMITS)
    assert loaded["state_dict"]["feature.0.weight"].dtype == dtype
