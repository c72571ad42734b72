"""The expected bundle of a profile: what a correct lab produces, computed by trusted code.

Layout of a bundle folder::

    manifest.json               every number below, plus the profile and environment
    sparse_lambda0.pth          sparsity training with lambda 0 (lab checkpoint format)
    sparse.pth                  sparsity training with the profile's lambda
    prune_<ratio>.pth           {cfg, state_dict} of the thin model, per ratio
    finetune.pth                the fine-tuned thin model of the largest ratio
    gamma_hist.png, curves.png  plots
    BUNDLE-HASH                 the content hash of every other file (``content_hash``)

A bundle is identified by its content hash, and a grading never trains one: the quick
profile's bundle ships with the package (``reference/bundles/quick/``), any other is built
once with ``slimgrade reference --profile P --out DIR`` and given as ``--bundle DIR`` (or a
.tar.gz/.zip archive of that folder). ``grader.bundles.resolve_bundle`` finds, checks and
names it; the slimming lab writes its BUNDLE-HASH after ``build_bundle``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from reference.data import Dataset, TensorLoader, load_dataset
from reference.metrics import checkpoint_bytes, gamma_stats, model_summary
from reference.model import vgg
from reference.profiles import Profile
from reference.prune import all_gammas, compute_masks, prune
from reference.train import (accuracy, predict, recalibrate_bn, seed_everything, select_device,
                             train)

MANIFEST = "manifest.json"
SPARSE_LAMBDA0 = "sparse_lambda0.pth"
SPARSE = "sparse.pth"
FINETUNE = "finetune.pth"


def prune_file(ratio: float) -> str:
    return f"prune_{ratio}.pth"


def load_manifest(bundle_dir: str | Path) -> dict:
    return json.loads((Path(bundle_dir) / MANIFEST).read_text())


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint as plain tensors and containers; nothing in it is ever executed."""
    return torch.load(path, map_location=device, weights_only=True)


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.cuda.is_available(),
            "cpu_threads": torch.get_num_threads()}


def loaders(profile: Profile, data: Dataset, device: torch.device,
            seed: int) -> tuple[TensorLoader, TensorLoader]:
    return (TensorLoader(data.train, profile.train_batch_size, True, device, seed),
            TensorLoader(data.test, profile.test_batch_size, False, device, seed))


def majority_fraction(preds: torch.Tensor) -> float:
    """Share of the most predicted class: 1.0 means the network answers one class."""
    return float(torch.bincount(preds).max()) / len(preds)


def sparsity_run(profile: Profile, data: Dataset, device: torch.device, lam: float,
                 on_epoch: Callable[[dict], None] | None = None) -> tuple[vgg, dict, dict]:
    seed_everything(profile.seed, device)
    model = vgg(width_divisor=profile.width_divisor).to(device)
    train_loader, test_loader = loaders(profile, data, device, profile.seed)
    result = train(model, train_loader, test_loader, epochs=profile.epochs,
                   lr=profile.learning_rate, momentum=profile.momentum,
                   weight_decay=profile.weight_decay, lam=lam, on_epoch=on_epoch)
    model.load_state_dict(result.best_state)
    summary = {"lambda": lam, "best_prec1": result.best_prec1, "best_epoch": result.best_epoch,
               "history": result.history, "gamma": gamma_stats(all_gammas(model))}
    return model, result.checkpoint(), summary


def build_bundle(profile: Profile, out_dir: str | Path, data_root: str | Path | None = None,
                 device: str | None = None, progress: bool | None = None) -> dict:
    """Run the whole lab with trusted code and write the expected bundle; returns the manifest."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    data = load_dataset(profile.dataset, data_root)
    total_epochs = 2 * profile.epochs + profile.finetune_epochs
    bar = tqdm(total=total_epochs, desc=f"reference {profile.name}", unit="epoch",
               disable=not (sys.stderr.isatty() if progress is None else progress))
    step = lambda record: bar.update(1)  # noqa: E731

    manifest: dict = {"profile": profile.to_dict(), "fingerprint": profile.fingerprint(),
                      "device": str(dev), "environment": environment(), "sparsity": {},
                      "prune": {}}
    _, checkpoint0, summary0 = sparsity_run(profile, data, dev, 0.0, step)
    torch.save(checkpoint0, out / SPARSE_LAMBDA0)
    manifest["sparsity"]["lambda0"] = summary0
    model, checkpoint, summary = sparsity_run(profile, data, dev, profile.sparsity_lambda, step)
    torch.save(checkpoint, out / SPARSE)
    manifest["sparsity"]["lambda"] = summary

    train_loader, test_loader = loaders(profile, data, dev, profile.seed)
    for ratio in profile.prune_ratios:
        original = vgg(width_divisor=profile.width_divisor).to(dev)
        original.load_state_dict(checkpoint["state_dict"])
        thin, result = prune(original, ratio, profile.min_channels)
        plain_cfg = _cfg_without_min_rule(checkpoint, profile, ratio, dev)
        pruned_ckpt = {"cfg": result.cfg, "state_dict": thin.state_dict()}
        torch.save(pruned_ckpt, out / prune_file(ratio))
        preds = predict(thin, test_loader)
        entry = {
            "ratio": ratio, "threshold": result.threshold, "cfg": result.cfg,
            "cfg_mask": [m.int().tolist() for m in result.cfg_mask],
            "kept_per_layer": result.kept_per_layer, "prune_ratio": result.prune_ratio,
            "cfg_without_min_rule": plain_cfg,
            "accuracy_masked": accuracy(original, test_loader),
            "accuracy_pruned": accuracy(thin, test_loader),
            "majority_fraction": majority_fraction(preds),
            "checkpoint_bytes": checkpoint_bytes(pruned_ckpt),
            **model_summary(thin),
        }
        recalibrate_bn(thin, train_loader, profile.recalibration_batches)
        entry["accuracy_recalibrated"] = accuracy(thin, test_loader)
        manifest["prune"][str(ratio)] = entry

    ratio = profile.finetune_ratio
    pruned_ckpt = load_checkpoint(out / prune_file(ratio), dev)
    seed_everything(profile.seed, dev)
    thin = vgg(cfg=pruned_ckpt["cfg"]).to(dev)
    thin.load_state_dict(pruned_ckpt["state_dict"])
    tuned = train(thin, train_loader, test_loader, epochs=profile.finetune_epochs,
                  lr=profile.learning_rate, momentum=profile.momentum,
                  weight_decay=profile.weight_decay, on_epoch=step)
    torch.save(tuned.checkpoint(), out / FINETUNE)
    thin.load_state_dict(tuned.best_state)
    manifest["finetune"] = {"ratio": ratio, "best_prec1": tuned.best_prec1,
                            "history": tuned.history, "cfg": pruned_ckpt["cfg"],
                            **model_summary(thin)}
    manifest["original"] = model_summary(vgg(width_divisor=profile.width_divisor))
    bar.close()

    from reference.plots import save_bundle_plots
    save_bundle_plots(manifest, out)
    _write_json_atomically(out / MANIFEST, manifest)
    return manifest


def _cfg_without_min_rule(checkpoint: dict, profile: Profile, ratio: float,
                          device: torch.device) -> list:
    model = vgg(width_divisor=profile.width_divisor).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return compute_masks(model, ratio, 0).cfg


def _write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
