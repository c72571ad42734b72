"""Loading a student's checkpoint: tensors only, one clear sentence when it cannot be used."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from grader.untrusted import (CheckpointLimits, UntrustedFileError, load_checkpoint,
                              regular_file_problem)
from reference.model import cfg_from_state_dict, layout_problem, vgg

# What the largest model of the lab weighs (VGG-19 at full width, CIFAR-10; measured with
# reference.model): 20,046,042 numbers in its state_dict (BN running statistics included),
# the largest layer a 512x512x3x3 conv of 2,359,296. torch.save of the state_dict plus
# SGD's momentum buffers (sparsity_train's checkpoint) is 160 MB in float32.
FULL_VGG19_NUMEL = 20_046_042
FULL_VGG19_LARGEST_NUMEL = 2_359_296
FULL_CHECKPOINT_BYTES = 2 * 4 * FULL_VGG19_NUMEL
# Four times that leaves room for float64, Adam's two buffers or extra keys, while a hostile
# file stays bounded: the grader holds the file's bytes and the loaded tensors at once, so
# the worst case costs it about twice this cap (1.3 GB), not whatever the file declares.
# The quick profile's checkpoints are a few MB.
CHECKPOINT_LIMITS = CheckpointLimits(
    max_file_bytes=4 * FULL_CHECKPOINT_BYTES,
    max_unpacked_bytes=4 * FULL_CHECKPOINT_BYTES,  # torch.save stores entries uncompressed
    max_entries=4096,  # one per storage: ~150 for the full model and its optimizer
    max_pickle_bytes=8 * 1024 * 1024,  # keys and containers only: a few KB when honest
    max_tensor_numel=4 * FULL_VGG19_LARGEST_NUMEL,
    max_total_numel=4 * 2 * FULL_VGG19_NUMEL,  # weights and one optimizer buffer, x4
)


class CheckpointError(Exception):
    """A checkpoint the grader will not use; the message names the file and what to do."""


def load_student_checkpoint(path: Path, required_keys: tuple[str, ...] = ("state_dict",),
                            base: Path | None = None) -> dict:
    """``torch.load(weights_only=True)``: no code in a student's pickle ever runs.

    The file comes from a hostile work dir (``base``, when given, is that folder and every
    folder below it on the way is checked too): a link, FIFO, folder, oversized file or
    archive, or tensors larger than the lab's model are refused (grader.untrusted).
    """
    if regular_file_problem(path) == "missing":
        raise CheckpointError(f"{path.name} was not written: the notebook must save it "
                              "(check the path it saves to).")
    try:
        checkpoint = load_checkpoint(path, CHECKPOINT_LIMITS, base)
    except UntrustedFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path.name} holds a {type(checkpoint).__name__}, not a dict: "
                              "save a dict with the lab's keys.")
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path.name} lacks the key(s) {', '.join(missing)}: save the "
                              "lab's checkpoint layout.")
    return checkpoint


def state_dict_of(checkpoint: dict, name: str) -> dict[str, torch.Tensor]:
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name}: 'state_dict' is not a mapping of tensors: save "
                              "model.state_dict().")
    # Checkpoints saved from nn.DataParallel carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_layout(state: dict[str, torch.Tensor], name: str, widest: Sequence[int | str]) -> None:
    """CheckpointError unless ``state`` is laid out as the profile's VGG ``widest`` (the
    profile's full cfg, ``reference.model.scaled_cfg``) with no layer wider than there.

    Checked on shapes alone before any model is built: the memory a VGG takes grows with
    the square of its widths, so a 130 KB file declaring 12000-wide layers would otherwise
    make the grader allocate gigabytes before load_state_dict noticed anything.
    """
    problem = layout_problem(state, widest)
    if problem is not None:
        raise CheckpointError(f"{name} does not fit the lab's VGG: {problem}; save the "
                              "state_dict of the lab's model (or of its pruned copy).")


def model_from_state(state: dict[str, torch.Tensor], name: str,
                     cfg: list | None = None, *, widest: Sequence[int | str]) -> vgg:
    """A trusted ``vgg`` holding ``state``; the cfg is read from tensor shapes when absent.

    ``widest`` is the grading profile's full cfg: ``state`` must fit it (``check_layout``).
    """
    check_layout(state, name, widest)
    try:
        cfg = list(cfg) if cfg is not None else cfg_from_state_dict(state)
        model = vgg(cfg=cfg, init_weights=False)  # every tensor is overwritten just below
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0][:300]
        raise CheckpointError(f"{name} does not fit a VGG with cfg {cfg}: {first_line}") from None
    return model.eval()
