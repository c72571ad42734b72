"""Real hand-ins graded as the course graded them: the profile changes budgets, never a verdict.

The reference input of the pruning runs keeps every layer as the full model does, the grader
injects no path or flag, a cell that raised does not stop the others, and a mistake is
recognised by its evidence in every form a student writes it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from labs.slimming.evaluate import (balanced_prune_state, copy_differences, disguised_state,
                             edge_case_state,
                             mask_strategies, matching_strategy, inverted_by_evidence)
from grader.execute import Failure, RunResult, RunSpec, run_notebook
from grader.pipeline import split_failures
from labs.slimming.kernel import kernel_setup
from labs.slimming.grading import excused_runs, own_paths, profile_parameters
from reference.model import bn_layers, vgg
from reference.profiles import QUICK
from reference.prune import compute_masks, global_threshold, prune
from test_execute import write_notebook


def sparse_model(seed: int = 0) -> vgg:
    """A narrow VGG whose gammas look trained with L1: most near 0, a few whole layers tiny."""
    torch.manual_seed(seed)
    model = vgg(width_divisor=8).eval()
    for index, bn in enumerate(bn_layers(model)):
        scale = 1e-4 if index in (9, 10, 11, 12) else 1.0
        bn.weight.data = torch.rand_like(bn.weight) * scale * torch.where(
            torch.rand_like(bn.weight) < 0.7, 0.01, 1.0)
        bn.bias.data = torch.randn_like(bn.bias) * 0.1
        bn.running_mean = torch.randn_like(bn.running_mean) * 0.1
        bn.running_var = torch.rand_like(bn.running_var) + 0.5
    return model


def test_balanced_input_keeps_three_channels_everywhere_and_the_same_function():
    model = sparse_model()
    assert min(compute_masks(model, 0.9, 0).kept_per_layer) < 3  # the short-profile problem
    state = balanced_prune_state(model.state_dict(), 0.9)
    balanced = vgg(width_divisor=8).eval()
    balanced.load_state_dict(state)
    for ratio in (0.5, 0.9):
        assert min(compute_masks(balanced, ratio, 0).kept_per_layer) >= 3
        assert compute_masks(balanced, ratio, 0).cfg == compute_masks(balanced, ratio, 3).cfg
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(balanced(x), model(x), rtol=1e-4, atol=1e-4)


def test_disguised_input_computes_the_same_and_differs_per_seed():
    model = sparse_model(4)
    state = model.state_dict()
    one, again, other = (disguised_state(state, seed) for seed in (7, 7, 8))
    assert all(torch.equal(one[k], again[k]) for k in one)  # a regrade meets the same input
    assert not torch.equal(one["feature.1.weight"], other["feature.1.weight"])
    assert not torch.equal(one["feature.1.weight"], state["feature.1.weight"])
    disguised = vgg(width_divisor=8).eval()
    disguised.load_state_dict(one)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(disguised(x), model(x), rtol=1e-4, atol=1e-5)


def test_edge_input_plants_a_large_negative_gamma_that_a_signed_threshold_cuts():
    model = sparse_model(1)
    state, _ = edge_case_state(model.state_dict())
    edge = vgg(width_divisor=8).eval()
    edge.load_state_dict(state)
    strategies = mask_strategies(edge, 0.5, 3)
    assert not any(all(np.array_equal(a, b) for a, b in zip(signed, strategies["correct"][0]))
                   for signed in strategies["signed"])


def test_inverted_masks_are_recognised_with_strict_and_non_strict_comparisons():
    model = sparse_model(2)
    threshold = global_threshold(model, 0.5)
    strategies = mask_strategies(model, 0.5, 3)
    gammas = [bn.weight.detach().abs().numpy() for bn in bn_layers(model)]
    strict = [(g < threshold).astype(np.int64) for g in gammas]
    assert matching_strategy(strict, strategies) == "inverted"
    # A variant outside the scripted forms (one more layer trimmed) is still inverted by evidence.
    trimmed = [m.copy() for m in strict]
    trimmed[3][np.flatnonzero(trimmed[3])[:1]] = 0
    assert matching_strategy(trimmed, strategies) is None
    assert inverted_by_evidence(trimmed, model, threshold)
    assert not inverted_by_evidence(strategies["correct"][0], model, threshold)


def test_running_var_copied_from_running_mean_is_named_as_such_not_train_mode():
    model = sparse_model(3)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    thin, result = prune(model, 0.5, 3)
    state = {k: v.clone() for k, v in thin.state_dict().items()}
    state["feature.4.running_var"] = state["feature.4.running_mean"].clone()
    masks = [m.numpy().astype(np.int64) for m in result.cfg_mask]
    found = copy_differences(original, state, masks)
    assert [(d["tensor"], d["kind"]) for d in found] == [("running_var", "swapped")]
    assert "running_mean" in found[0]["detail"]


def test_only_budgets_data_and_device_are_injected():
    injected = profile_parameters(QUICK, "cpu")
    assert set(injected) == {"EPOCHS", "TRAIN_BATCH_SIZE", "TEST_BATCH_SIZE", "DEVICE", "CUDA"}


def test_own_paths_follow_drive_paths_and_loads(tmp_path):
    notebook = write_notebook(tmp_path / "vggprune.ipynb", [
        "WEIGHT_PATH = '/content/drive/MyDrive/Colab Notebooks/model_best_1e-4.pth'\n"
        "PRUNE_PATH = '/content/drive/MyDrive/Colab Notebooks/pruned/model_prune.pth'",
        "checkpoint = torch.load(WEIGHT_PATH)\nother = torch.load('ckpt/extra.pth.tar')",
        "torch.save({}, PRUNE_PATH)"])
    paths = own_paths(notebook, "vggprune")
    assert paths.reads == ("model_best_1e-4.pth", "extra.pth.tar", "ckpt/extra.pth.tar")
    assert paths.writes == ("model_prune.pth",)


def _result(run_id: str, failure: Failure | None, errors: list[Failure] = ()) -> RunResult:
    return RunResult(run_id, "vggprune.ipynb", Path("x"), failure, {}, "", [], 0.0, False, [],
                     list(errors) or ([failure] if failure else []))


def test_failures_only_in_probe_or_short_chain_runs_are_notes_not_failures():
    crash = Failure("vggprune.ipynb", "exception", "cell 14 raised ZeroDivisionError.", 13)
    plot = Failure("sparsity_train.ipynb", "exception", "cell 9 raised ValueError.", 8,
                   profile_cause="this cell writes 120, the notebook's own EPOCHS")
    zero = Failure("vggprune.ipynb", "exception", "cell 15 raised ZeroDivisionError.", 14)
    results = {"prune-0.5": _result("prune-0.5", None), "prune-edge": _result("prune-edge", crash),
               "chained-prune-0.9": _result("chained-prune-0.9", zero),
               "sparsity": _result("sparsity", None, [plot])}
    # The student's own short-profile checkpoint left a layer with no channel at 0.9.
    excused = excused_runs({"chained": {"prune": {"0.9": {"student_kept": [3, 0, 4]}}}})
    failures, notes = split_failures(results, excused)
    assert failures == []
    assert {n["cause"] for n in notes} == {"probe", "profile", "chained"}
    # Without that evidence a failure of the student's own chain counts (e.g. a pickle payload).
    failures, _ = split_failures(results, excused_runs({}))
    assert [f["run"] for f in failures] == ["chained-prune-0.9"]
    results["prune-0.9"] = _result("prune-0.9", crash)
    failures, _ = split_failures(results, excused)  # it fails on the reference input too
    assert [f["message"] for f in failures] == [crash.message]
    timeout = Failure("vggprune.ipynb", "timeout", "cell 8 used up the time budget.", 7)
    failures, _ = split_failures({"chained-prune-0.9": _result("chained-prune-0.9", timeout)},
                                 excused)
    assert [f["kind"] for f in failures] == ["timeout"]  # a budget failure counts anywhere


@pytest.mark.slow
def test_cells_run_past_an_error_and_a_hard_coded_budget_is_the_profiles_doing(tmp_path):
    """``range(120)`` beside ``EPOCHS = 120`` fails only because the profile changed EPOCHS;
    the next cells still run, and a Drive path outside the %cd folder lands in the work dir."""
    notebook = write_notebook(tmp_path / "lab.ipynb", [
        "import torch\n%cd /content/drive/MyDrive/Colab Notebooks/AI_lab4\nEPOCHS = 120\n"
        "RESUME = True\nPATH = '/content/drive/MyDrive/Colab Notebooks/best_model.pth'",
        "history = [0.5] * EPOCHS\ntorch.save({'n': torch.tensor(len(history))}, PATH)",
        "import numpy as np\nnp.zeros(120) + np.array(history)",
        "assert RESUME is True\nprint('after the error')"])
    spec = RunSpec(run_id="t", notebook=notebook, work_dir=tmp_path / "work",
                   parameters={"EPOCHS": 3}, profile=replace(QUICK, run_timeout_s=120),
                   expected_artifacts=["model_best.pth"],
                   artifact_aliases={"model_best.pth": ["best_model.pth"]},
                   kernel=kernel_setup(QUICK))
    result = run_notebook(spec)
    assert result.failure is None and len(result.errors) == 1
    assert "EPOCHS" in result.errors[0].profile_cause and result.errors[0].cell_index == 2
    assert "after the error" in result.stdout_text
    assert result.artifacts == {"model_best.pth": "best_model.pth"} and result.usable


def test_update_bn_probe_tells_the_l1_step_from_its_mistakes():
    from torch import nn

    from labs.slimming.runtime import probe_update_bn

    def notebook(body: str) -> dict:
        namespace = {"torch": torch, "nn": nn, "LAMBDA": 5e-3, "model": "the notebook's model"}
        exec(f"def updateBN():\n    for m in model.modules():\n{body}", namespace)
        return namespace

    right = notebook("        if isinstance(m, nn.BatchNorm2d):\n"
                     "            m.weight.grad.data.add_(LAMBDA * torch.sign(m.weight.data))\n")
    assert probe_update_bn(right) == {"ran": True, "bn_grad_ok": True, "others_untouched": True,
                                      "weights_untouched": True}
    assert right["model"] == "the notebook's model"  # restored after the call
    l2 = notebook("        if isinstance(m, nn.BatchNorm2d):\n"
                  "            m.weight.grad.data.add_(LAMBDA * m.weight.data)\n")
    assert probe_update_bn(l2)["bn_grad_ok"] is False
    everything = notebook("        for p in m.parameters(recurse=False):\n"
                          "            p.grad.data.add_(LAMBDA * torch.sign(p.data))\n")
    assert probe_update_bn(everything)["others_untouched"] is False
    on_weights = notebook("        if isinstance(m, nn.BatchNorm2d):\n"
                          "            m.weight.data.sub_(LAMBDA * torch.sign(m.weight.data))\n")
    assert probe_update_bn(on_weights)["weights_untouched"] is False
    assert probe_update_bn({"LAMBDA": 1e-4}) is None


def test_a_mistake_is_recognised_with_a_min_channel_rule_on_top():
    """The signed-threshold mutant keeps its min-channel rule, which picks the top-3 *signed*
    gammas of the edge probe's gutted layer: still a signed threshold, not an unknown mask."""
    model = sparse_model(5)
    edge = vgg(width_divisor=8).eval()
    edge.load_state_dict(edge_case_state(model.state_dict())[0])
    strategies = mask_strategies(edge, 0.5, 3)
    gammas = [bn.weight.detach().numpy() for bn in bn_layers(edge)]
    cut = float(np.sort(np.concatenate(gammas))[int(sum(g.size for g in gammas) * 0.5)])
    masks = []
    for g in gammas:
        mask = (g > cut).astype(np.int64)
        if mask.sum() < 3:
            mask[np.argsort(-g)[:3]] = 1
        masks.append(mask)
    assert matching_strategy(masks, strategies) == "signed"
