"""VGG for CIFAR, laid out exactly as the lab's ``models/vgg.py``.

The module names (``feature.<i>``, ``classifier``) match the lab's file so that a
student's checkpoint loads straight into this class.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                              512, 512, 512, 512, "M", 512, 512, 512, 512]


def scaled_cfg(width_divisor: int = 1, base: Sequence[int | str] = VGG19_CFG) -> list[int | str]:
    """``base`` with every width divided by ``width_divisor`` (at least one channel)."""
    return [v if v == "M" else max(1, int(v) // width_divisor) for v in base]


class vgg(nn.Module):  # noqa: N801 - the lab's class name, kept so notebooks find it
    def __init__(self, dataset: str = "cifar10", init_weights: bool = True,
                 cfg: Sequence[int | str] | None = None, width_divisor: int = 1) -> None:
        super().__init__()
        if cfg is None:
            cfg = scaled_cfg(width_divisor)
        self.cfg = list(cfg)
        self.feature = make_layers(self.cfg)
        num_classes = 10 if dataset == "cifar10" else 100
        self.classifier = nn.Linear(int(self.cfg[-1]), num_classes)
        if init_weights:
            self._initialize_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature(x)
        x = nn.functional.avg_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        return self.classifier(x)

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(0.5)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()


def make_layers(cfg: Sequence[int | str]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1, bias=False),
                       nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def cfg_from_state_dict(state_dict: dict[str, torch.Tensor]) -> list[int | str]:
    """Recover ``cfg`` from tensor shapes (the fine-tune checkpoint stores none).

    Conv, BN and ReLU take three consecutive indices in ``feature``; a max-pool
    takes one index and has no tensors, so a gap of four between two convs is an 'M'.
    """
    conv_indices = sorted(_feature_index(key) for key, value in state_dict.items()
                          if key.startswith("feature.") and key.endswith(".weight")
                          and value.dim() == 4)
    if not conv_indices:
        raise ValueError("no convolution weights under 'feature.' in this state_dict")
    cfg: list[int | str] = []
    previous = -3
    for index in conv_indices:
        gap = index - previous - 3
        # A key like feature.999999999.weight would otherwise ask for a billion 'M's.
        if gap < 0 or len(cfg) + gap >= MAX_CFG_LENGTH:
            raise ValueError(f"convolution feature.{index} does not fit a VGG layout")
        cfg += ["M"] * gap
        cfg.append(int(state_dict[f"feature.{index}.weight"].shape[0]))
        previous = index
    return cfg


# No VGG of the lab has more than 20 cfg entries; a state_dict implying more is not one.
MAX_CFG_LENGTH = 64


def _feature_index(key: str) -> int:
    """The ``<i>`` of ``feature.<i>.weight``; ValueError unless it is a small plain number."""
    part = key.split(".")[1]
    if not (part.isascii() and part.isdigit() and len(part) <= 4) or key.count(".") != 2:
        raise ValueError(f"{key[:80]} is not a layer of a VGG's 'feature' block")
    return int(part)


def state_dict_shapes(cfg: Sequence[int | str], num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``vgg(cfg=cfg).state_dict()``, computed without building it."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, in_channels = 0, 3
    for v in cfg:
        if v == "M":
            index += 1
            continue
        width = int(v)
        shapes[f"feature.{index}.weight"] = (width, in_channels, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"feature.{index + 1}.{name}"] = (width,)
        shapes[f"feature.{index + 1}.num_batches_tracked"] = ()
        index, in_channels = index + 3, width
    shapes["classifier.weight"] = (num_classes, in_channels)
    shapes["classifier.bias"] = (num_classes,)
    return shapes


def layout_problem(state_dict: dict[str, torch.Tensor], widest: Sequence[int | str],
                   num_classes: int = 10) -> str | None:
    """Why ``state_dict`` is not a VGG laid out like ``widest`` and no wider, layer for layer
    (a thin model keeps the layers and pools of its original); None when it fits.

    Only shapes are read, so a state_dict declaring huge layers costs nothing here.
    """
    widths = [int(v) for v in widest if v != "M"]
    convs: list[tuple[int, str]] = []
    for key, value in state_dict.items():
        if key.startswith("feature.") and key.endswith(".weight") and value.dim() == 4:
            try:
                convs.append((_feature_index(key), key))
            except ValueError:
                return f"{key[:80]} is not a layer of the lab's VGG"
    if len(convs) != len(widths):
        return f"it has {len(convs)} convolution layers, the lab's VGG has {len(widths)}"
    convs.sort()
    expected_places = [int(key.split(".")[1]) for key, shape
                       in state_dict_shapes(widest, num_classes).items() if len(shape) == 4]
    for layer, ((place, _), expected) in enumerate(zip(convs, expected_places)):
        if place != expected:
            return (f"layer {layer} is feature.{place}, where the lab's VGG has feature."
                    f"{expected} (a max-pool missing, extra or moved)")
    cfg: list[int | str] = []
    layer = 0
    for v in widest:
        if v == "M":
            cfg.append("M")
            continue
        width = int(state_dict[convs[layer][1]].shape[0])
        if width > int(v):
            return f"layer {layer} has {width} channels, at most {int(v)}"
        cfg.append(width)
        layer += 1
    shapes = state_dict_shapes(cfg, num_classes)
    for key, value in state_dict.items():
        if key not in shapes:
            return f"it holds {key[:80]}, which the lab's VGG has not"
        if tuple(value.shape) != shapes[key]:
            return (f"{key} has shape {tuple(value.shape)[:8]}, its layout implies "
                    f"{shapes[key]}")
    missing = [k for k in shapes if k not in state_dict and not k.endswith("num_batches_tracked")]
    if missing:
        return f"it lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
    return None


def masked_state_dict(state_dict: dict[str, torch.Tensor],
                      cfg_mask: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with gamma and beta of cut channels set to zero."""
    masked = {k: v.clone() for k, v in state_dict.items()}
    bn_prefixes = [k[: -len(".running_var")] for k in state_dict if k.endswith(".running_var")]
    for prefix, mask in zip(bn_prefixes, cfg_mask, strict=True):
        keep = mask.to(masked[f"{prefix}.weight"].dtype)
        masked[f"{prefix}.weight"].mul_(keep)
        masked[f"{prefix}.bias"].mul_(keep)
    return masked
