"""Lab 5's code inside the student's kernel, on top of ``grader.runtime``.

The kernel runs the notebook's definitions only (``labs.lowcomplexity.grading`` drops the
training), then ``dump_state`` finds the model, loads the handed-in weights into it and
exports it with ``labs.lowcomplexity.export``. Nothing here is trusted by the grader: the
export is checked op by op outside (``labs.lowcomplexity.measure``), and what this module
reports (the candidates, the transforms) is evidence for the report, not a measurement.

``install`` adds to the harness's shims:

* ``torchvision.datasets.CIFAR100`` serves a few random images and never downloads or
  reads the data root (the harness still mounts the data root, read-only, for the full
  profile: CIFAR-100 is public, and the grader's measurement does not rely on the kernel
  not knowing it);
* ``transforms.Compose`` records what it was built from, so the report can say whether the
  test transform normalises as the training one does.
"""
from __future__ import annotations

import os
from typing import Any

from grader import runtime

EXPORT_DIR = "export"
EXPORT_KEY = "_export"
MODEL_KEY = "_model"
TRANSFORMS_KEY = "_transforms"
WEIGHTS_KEY = "_weights"
MAX_CANDIDATES = 20
MAX_TRANSFORMS = 20
FAKE_IMAGES = 64  # what the stand-in CIFAR100 serves: enough for a loader to be built
RANDOM_OPS = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment",
              "AugMix", "Cutout", "Erasing")


def install(config: dict) -> None:
    """The harness's shims, then the stand-in CIFAR100 and the transform records.
    ``config["weights"]`` names the handed-in weights in the work dir (None: none)."""
    runtime.install(config)
    _install_cifar100()


def _install_cifar100() -> None:
    import numpy as np
    import torchvision
    from PIL import Image
    from torch.utils.data import Dataset

    class CIFAR100(Dataset):
        """torchvision's CIFAR100 interface over a few random images; never downloads."""

        def __init__(self, root: Any, train: bool = True, transform: Any = None,
                     target_transform: Any = None, download: bool = False) -> None:
            rng = np.random.default_rng(0 if train else 1)
            self.root, self.train = root, train
            self.transform, self.target_transform = transform, target_transform
            self.data = rng.integers(0, 256, (FAKE_IMAGES, 32, 32, 3), dtype=np.uint8)
            self.targets = [int(t) for t in rng.integers(0, 100, FAKE_IMAGES)]
            self.classes = [f"class_{i}" for i in range(100)]

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            image, target = Image.fromarray(self.data[index]), self.targets[index]
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target

    torchvision.datasets.CIFAR100 = CIFAR100


def dump_state(namespace: dict, state_file: str) -> None:
    """Export the model the weights fit, and say what was found; never raises."""
    runtime.dump_state(namespace, state_file, extra=lambda: _measurable(namespace))


def _measurable(namespace: dict) -> dict[str, Any]:
    weights, weights_fact = _weights()
    model, model_fact = _model(namespace, weights)
    exported = None
    if model is not None:
        from labs.lowcomplexity.export import export_model

        exported = export_model(model, os.path.join(runtime.settings["work_dir"], EXPORT_DIR))
    return {WEIGHTS_KEY: weights_fact, MODEL_KEY: model_fact, EXPORT_KEY: exported,
            TRANSFORMS_KEY: _transforms(namespace)}


def _weights() -> tuple[dict | None, dict]:
    """The handed-in state_dict, loaded as plain tensors only (``weights_only=True``)."""
    import torch

    name = runtime.settings.get("weights")
    if not name:
        return None, {"loaded": False, "why": "no weights were handed in"}
    try:
        loaded = torch.load(os.path.join(runtime.settings["work_dir"], name),
                            map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle payload, a text file, a truncated zip
        return None, {"loaded": False, "why": f"{type(error).__name__}: {str(error)[:300]}"}
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return None, {"loaded": False, "why": f"{name} holds no state_dict of tensors"}
    return loaded, {"loaded": True, "tensors": len(loaded),
                    "elements": int(sum(v.numel() for v in loaded.values()))}


def _model(namespace: dict, weights: dict | None) -> tuple[Any, dict]:
    """The notebook's model that the weights fit exactly: a model object of the notebook
    first, then each ``nn.Module`` class it defines, built without arguments."""
    import torch

    candidates: list[dict] = []
    if weights is None:
        return None, {"chosen": None, "candidates": candidates}
    objects = [(f"the object {name}", value) for name, value in namespace.items()
               if isinstance(value, torch.nn.Module) and not name.startswith("_")]
    classes = [(f"the class {name}", value) for name, value in namespace.items()
               if isinstance(value, type) and issubclass(value, torch.nn.Module)
               and value.__module__ == "__main__"]
    for label, value in (objects + classes)[:MAX_CANDIDATES]:
        try:
            model = value() if isinstance(value, type) else value
            model.load_state_dict(weights, strict=True)
        except Exception as error:  # the weights do not fit this one: say why, try the next
            candidates.append({"name": label, "why": f"{type(error).__name__}: "
                                                     f"{' '.join(str(error).split())[:400]}"})
            continue
        candidates.append({"name": label, "why": None})
        return model, {"chosen": label, "candidates": candidates}
    return None, {"chosen": None, "candidates": candidates}


def _transforms(namespace: dict) -> dict[str, dict]:
    """Each ``transforms.Compose`` the notebook keeps under a name: its steps, whether one of
    them is random (augmentation: a training transform), and its Normalize."""
    try:
        from torchvision import transforms
    except Exception:  # noqa: BLE001 - without torchvision there is nothing to record
        return {}
    found: dict[str, dict] = {}
    for name, value in namespace.items():
        if not isinstance(value, transforms.Compose) or len(found) >= MAX_TRANSFORMS:
            continue
        steps = [type(step).__name__ for step in value.transforms][:30]
        normalize = next((step for step in value.transforms
                          if isinstance(step, transforms.Normalize)), None)
        found[name[:100]] = {
            "steps": steps, "random": any(s.startswith(RANDOM_OPS) for s in steps),
            "normalize": None if normalize is None else {
                "mean": [float(v) for v in list(normalize.mean)[:4]],
                "std": [float(v) for v in list(normalize.std)[:4]]}}
    return found
