"""The expected bundle of a Lab 5 profile: the small trusted reference model, measured.

Layout::

    manifest.json    the profile, its fingerprint, and the reference's figures
    reference.pth    the reference model's state_dict
    BUNDLE-HASH      the content hash of the other files (grader.bundles)

The rubric places a student's model against this point: its parameters, MACs and
top-1 accuracy on the profile's test set, measured by the same code that measures a
hand-in (``labs.lowcomplexity.measure``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from grader.bundles import MANIFEST
from labs.lowcomplexity.data import Dataset, load_cifar100, standin_cifar100
from labs.lowcomplexity.measure import accuracy, count
from labs.lowcomplexity.profiles import Profile
from labs.lowcomplexity.reference_model import build_reference, train_reference

WEIGHTS = "reference.pth"


def load_data(profile: Profile, data_root: Path | None) -> Dataset:
    """The profile's images: the digits stand-in, or CIFAR-100 from the data root."""
    if profile.dataset == "standin":
        return standin_cifar100(profile.seed, profile.standin_train, profile.standin_test,
                                profile.standin_test_shift)
    return load_cifar100(data_root)


def build_bundle(profile: Profile, out: Path, data_root: Path | None = None) -> dict:
    """Train and measure the reference model into ``out`` (on the CPU: it is small)."""
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(profile, data_root)
    state, facts = train_reference(data, profile.reference_epochs, profile.seed,
                                   width=profile.reference_width)
    model = build_reference(profile.reference_width)
    model.load_state_dict(state)
    model.eval()
    program = torch.export.export(model, (torch.zeros(1, 3, 32, 32),))
    complexity = count(program)
    mean, std = facts["mean"], facts["std"]
    manifest = {
        "fingerprint": profile.fingerprint(), "profile": profile.to_dict(),
        "reference": {**facts, "parameters": complexity.parameters,
                      "parameter_kb": complexity.parameter_kb, "macs": complexity.macs,
                      "flops": complexity.flops,
                      "accuracy_pct": accuracy(model, data.test.images, data.test.labels,
                                               mean, std)},
    }
    torch.save(state, out / WEIGHTS)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
