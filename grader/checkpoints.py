"""Loading a student's checkpoint: tensors only, one clear sentence when it cannot be used."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from reference.model import cfg_from_state_dict, vgg


class CheckpointError(Exception):
    """A checkpoint the grader will not use; the message names the file and what to do."""


def load_student_checkpoint(path: Path, required_keys: tuple[str, ...] = ("state_dict",)) -> dict:
    """``torch.load(weights_only=True)``: no code in a student's pickle ever runs."""
    if not path.is_file():
        raise CheckpointError(f"{path.name} was not written: the notebook must save it "
                              "(check the path it saves to).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path.name} holds Python objects other than tensors and plain containers, so it "
            "was not loaded (loading it could run code): save only tensors, numbers and lists."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({error}): "
                              "save it again with torch.save.") from None
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


def model_from_state(state: dict[str, torch.Tensor], name: str,
                     cfg: list | None = None) -> vgg:
    """A trusted ``vgg`` holding ``state``; the cfg is read from tensor shapes when absent."""
    try:
        cfg = list(cfg) if cfg is not None else cfg_from_state_dict(state)
        model = vgg(cfg=cfg)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0][:300]
        raise CheckpointError(f"{name} does not fit a VGG with cfg {cfg}: {first_line}") from None
    return model.eval()
