"""What the slimming lab puts in each kernel: its runtime, the trusted models/ folder, and
which of its files the sandbox shows (grader.lab.KernelSetup)."""
from __future__ import annotations

from pathlib import Path

import reference
from grader.lab import KernelSetup
from reference.profiles import Profile

HERE = Path(__file__).resolve().parent
REFERENCE = Path(reference.__file__).resolve().parent

MODEL_CODE_INIT = "from .vgg import vgg, defaultcfg\n\n__all__ = ['vgg', 'defaultcfg']\n"
MODEL_CODE = '''"""The lab's VGG, supplied by the grader in place of the submitted models/ folder.

It is reference.model.vgg; only the default layout follows the grading profile
(every width divided by {width_divisor}), so vgg() builds the network the expected bundle used.
"""
from reference.model import scaled_cfg
from reference.model import vgg as _ReferenceVGG

__all__ = ['vgg', 'defaultcfg']

defaultcfg = scaled_cfg({width_divisor})


class vgg(_ReferenceVGG):
    def __init__(self, dataset='cifar10', init_weights=True, cfg=None):
        super().__init__(dataset=dataset, init_weights=init_weights,
                         cfg=list(defaultcfg) if cfg is None else cfg)
'''
# Names the course's notebooks assign among their settings: the profile's values follow
# the cells that assign them when no cell is tagged ``parameters``.
KNOWN_PARAMETERS = ("LAMBDA", "SPARSITY_REGULARIZATION", "SEED", "TRAIN_BATCH_SIZE",
                    "TEST_BATCH_SIZE", "EPOCHS", "LEARNING_RATE", "MOMENTUM", "WEIGHT_DECAY",
                    "CUDA", "PRUNE_PERCENT", "DATA_ROOT", "DEVICE", "MIN_CHANNELS")
# What of the lab the kernel sees, read-only, and why (grader/sandbox.py).
KERNEL_SEES = (
    (Path(__file__).resolve().parent.parent / "__init__.py", "the package of the labs"),
    (HERE / "__init__.py", "the package that holds the lab's runtime"),
    (HERE / "runtime.py", "the lab's shims: CIFAR10 served, hist() and updateBN recorded"),
    (REFERENCE / "__init__.py", "the package that holds the two modules below"),
    (REFERENCE / "model.py", "the trusted VGG: the models/vgg.py the executor writes imports it"),
    (REFERENCE / "data.py", "the profile's images, which the runtime serves as CIFAR10"),
)


def kernel_setup(profile: Profile) -> KernelSetup:
    """The lab's runtime, the trusted models/ folder and the files the sandbox shows."""
    return KernelSetup(
        runtime="labs.slimming.runtime",
        config={"dataset": profile.dataset, "width_divisor": profile.width_divisor},
        files={"models/__init__.py": MODEL_CODE_INIT,
               "models/vgg.py": MODEL_CODE.format(width_divisor=int(profile.width_divisor))},
        known_parameters=KNOWN_PARAMETERS, sees=KERNEL_SEES)
