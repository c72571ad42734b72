"""The trusted reference: counts, exact copies, the penalty, determinism, data."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from reference.data import DataError, ImageSet, TensorLoader, load_cifar10, load_digits_standin
from reference.metrics import count_macs, count_parameters
from reference.model import bn_layers, cfg_from_state_dict, masked_state_dict, scaled_cfg, vgg
from reference.prune import PruneResult, build_pruned, compute_masks, prune, zero_cut_channels_
from reference.train import accuracy, predict, recalibrate_bn, train, update_bn


def distinct_gammas(model: torch.nn.Module, seed: int = 0) -> None:
    """Every |gamma| different (no ties), signs mixed, as after sparsity training."""
    generator = torch.Generator().manual_seed(seed)
    for bn in bn_layers(model):
        n = bn.weight.numel()
        bn.weight.data = (torch.rand(n, generator=generator) + 1e-3) * torch.where(
            torch.rand(n, generator=generator) < 0.2, -1.0, 1.0)
        bn.bias.data = torch.randn(n, generator=generator) * 0.1
        bn.running_mean = torch.randn(n, generator=generator) * 0.1
        bn.running_var = torch.rand(n, generator=generator) + 0.5


@pytest.fixture(scope="module")
def standin():
    return load_digits_standin()


def test_full_vgg19_counts_parameters_and_macs():
    model = vgg()
    assert len(bn_layers(model)) == 16
    assert sum(bn.num_features for bn in bn_layers(model)) == 5504
    assert count_parameters(model) == 20_035_018
    assert abs(count_macs(model) - 398e6) / 398e6 < 0.01


@pytest.mark.parametrize("ratio, kept, printed", [(0.5, 2751, 0.5001816749572754),
                                                   (0.9, 550, 0.9000726938247681)])
def test_global_threshold_on_full_vgg19(ratio, kept, printed):
    model = vgg()
    distinct_gammas(model)
    result = compute_masks(model, ratio)
    assert sum(result.kept_per_layer) == kept
    assert result.prune_ratio == pytest.approx(printed, abs=1e-7)
    # The lab accumulates the cut count in a float32 tensor; that is the line it prints.
    cut = torch.tensor(float(5504 - kept), dtype=torch.float32)
    assert float(cut / 5504) == printed
    assert result.cfg.count("M") == 4 and len(result.cfg) == 20


def masked_and_thin(model: vgg, result: PruneResult) -> tuple[vgg, vgg]:
    thin = build_pruned(model, result)
    masked = vgg(cfg=model.cfg)
    masked.load_state_dict(masked_state_dict(model.state_dict(), result.cfg_mask))
    return masked.eval(), thin.eval()


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_thin_model_equals_masked_original(ratio):
    torch.manual_seed(0)
    model = vgg(width_divisor=8)
    distinct_gammas(model)
    result = compute_masks(model, ratio, min_channels=1)
    masked, thin = masked_and_thin(model, result)
    x = torch.randn(16, 3, 32, 32)
    assert (thin(x) - masked(x)).abs().max() < 1e-4
    assert_every_tensor_is_its_slice(model.state_dict(), thin.state_dict(), result)


def test_a_layer_cut_to_one_channel_is_copied_with_its_dimensions():
    torch.manual_seed(1)
    model = vgg(width_divisor=8)
    distinct_gammas(model)
    lonely = bn_layers(model)[3]
    lonely.weight.data = torch.full_like(lonely.weight, 1e-4)
    lonely.weight.data[5] = 5.0
    result = compute_masks(model, 0.5)
    assert result.kept_per_layer[3] == 1
    masked, thin = masked_and_thin(model, result)
    assert thin.feature[10].weight.shape[0] == 1  # conv of BN layer 3 (indices 0,3,7,10)
    x = torch.randn(8, 3, 32, 32)
    assert (thin(x) - masked(x)).abs().max() < 1e-4
    assert_every_tensor_is_its_slice(model.state_dict(), thin.state_dict(), result)


def assert_every_tensor_is_its_slice(original: dict, thin: dict, result: PruneResult) -> None:
    conv_keys = [k for k, v in original.items() if k.startswith("feature.") and v.dim() == 4]
    bn_keys = [k[: -len(".running_var")] for k in original if k.endswith(".running_var")]
    in_idx = torch.arange(3)
    for conv, bn, mask in zip(conv_keys, bn_keys, result.cfg_mask):
        out_idx = torch.nonzero(mask).flatten()
        assert torch.equal(thin[conv], original[conv][out_idx][:, in_idx])
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(thin[f"{bn}.{name}"], original[f"{bn}.{name}"][out_idx])
        in_idx = out_idx
    assert torch.equal(thin["classifier.weight"], original["classifier.weight"][:, in_idx])
    assert torch.equal(thin["classifier.bias"], original["classifier.bias"])


def small_training(standin, epochs: int) -> tuple[vgg, TensorLoader, TensorLoader]:
    torch.manual_seed(0)
    model = vgg(width_divisor=8)
    train_loader = TensorLoader(standin.train, 64, True, seed=0)
    test_loader = TensorLoader(standin.test, 500, False)
    train(model, train_loader, test_loader, epochs=epochs, lr=0.1, momentum=0.9,
          weight_decay=1e-4)
    return model.eval(), train_loader, test_loader


@pytest.fixture(scope="module")
def trained(standin):
    return small_training(standin, epochs=6)


def test_skipping_the_running_statistics_copy_predicts_one_class(trained):
    model, _, test_loader = trained
    thin, _ = prune(copy.deepcopy(model), 0.0, min_channels=1)
    for bn in bn_layers(thin):
        bn.reset_running_stats()  # the mistake: running_mean 0 and running_var 1 left as built
    preds = predict(thin, test_loader)
    assert torch.bincount(preds).max() == len(preds)


def test_recalibration_recovers_a_statistics_shift(trained):
    model, train_loader, test_loader = trained
    model = copy.deepcopy(model)
    before = accuracy(model, test_loader)
    assert before > 50.0
    # A shift of the statistics alone (no copy bug): every running mean moved far off.
    for bn in bn_layers(model):
        bn.running_mean += 50.0
    collapsed = predict(model, test_loader)
    assert torch.bincount(collapsed).max() >= 0.9 * len(collapsed)
    recalibrate_bn(model, train_loader, max_batches=20)
    assert accuracy(model, test_loader) > before - 10.0


def test_one_step_moves_each_gamma_by_lr_lambda_sign():
    lr, lam = 0.1, 0.01
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def one_step(penalty: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = vgg(width_divisor=8)
        distinct_gammas(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0, weight_decay=0)
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        update_bn(model, penalty)
        optimizer.step()
        return torch.cat([bn.weight.detach() for bn in bn_layers(model)])

    torch.manual_seed(0)
    signs = torch.cat([bn.weight.detach().sign() for bn in bn_layers(
        (lambda m: (distinct_gammas(m), m)[1])(vgg(width_divisor=8)))])
    moved = one_step(0.0) - one_step(lam)
    assert torch.allclose(moved, lr * lam * signs, atol=1e-6)


def test_same_seed_same_gammas_on_cpu(standin):
    first, _, _ = small_training(standin, epochs=1)
    second, _, _ = small_training(standin, epochs=1)
    for a, b in zip(bn_layers(first), bn_layers(second)):
        assert torch.equal(a.weight, b.weight)


def test_cfg_is_recovered_from_tensor_shapes():
    cfg = scaled_cfg(8)
    cfg[3] = 5
    assert cfg_from_state_dict(vgg(cfg=cfg).state_dict()) == cfg


def test_zeroing_cut_channels_leaves_kept_ones():
    model = vgg(width_divisor=8)
    distinct_gammas(model)
    before = [bn.weight.detach().clone() for bn in bn_layers(model)]
    result = compute_masks(model, 0.5)
    zero_cut_channels_(model, result.cfg_mask)
    for bn, old, mask in zip(bn_layers(model), before, result.cfg_mask):
        assert torch.equal(bn.weight.detach(), old * mask)
        assert torch.all(bn.bias.detach()[mask == 0] == 0)


def write_cifar_folder(root, n_train_per_batch: int = 20, n_test: int = 30) -> tuple[np.ndarray, list]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name, n in [*[(f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
        if first is None:
            first = (data, labels)
    return first


def test_cifar_reader_on_a_small_folder(tmp_path):
    data, labels = write_cifar_folder(tmp_path)
    dataset = load_cifar10(tmp_path)
    assert dataset.train.images.shape == (100, 32, 32, 3) and len(dataset.test) == 30
    # CIFAR stores planes R, G, B of 1024 bytes each; the reader gives HWC.
    assert dataset.train.images[0, 0, 1, 0] == data[0, 1]
    assert dataset.train.images[0, 0, 0, 2] == data[0, 2048]
    assert dataset.train.labels[:20].tolist() == labels


def test_missing_or_wrong_data_root_is_one_sentence(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no CIFAR-10"):
        load_cifar10(tmp_path / "empty")


def test_batched_augmentation_keeps_shapes_and_crops(standin):
    images = ImageSet(standin.train.images[:10], standin.train.labels[:10])
    loader = TensorLoader(images, 10, train=True, seed=0)
    x, _ = next(iter(loader))
    assert x.shape == (10, 3, 32, 32)
    plain = TensorLoader(images, 10, train=False)
    assert not torch.equal(x, next(iter(plain))[0])  # cropped/flipped differ from the originals
    assert x.min() >= -1.0 and x.max() <= 1.0
