"""Writes the student's model as files the grader can measure without running pickle.

This module runs INSIDE the student's sandboxed kernel, so it imports only torch and the
standard library. ``torch.export`` turns the model into an aten graph; the graph goes to
JSON (torch's own schema), the tensors to a torch.save file of plain tensors in plain
dicts, which ``torch.load(weights_only=True)`` reads. ``torch.export.save`` is not used:
its loader falls back to full pickle, and the grader must never do that on these files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

FORMAT = "slimgrade-export-1"
PROGRAM_FILE = "program.json"
TENSORS_FILE = "tensors.pt"
MANIFEST_FILE = "manifest.json"  # written last: its presence means the export finished
INPUT_SHAPE = (3, 32, 32)


def _why(error: BaseException) -> str:
    """``ExceptionType: first line of the message``, short enough for a report."""
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _export(model: Any) -> tuple[Any, str | None]:
    """The exported program, and why the batch size is fixed to 1 (None if it is dynamic).

    A dynamic batch lets the grader test thousands of images per call; a model that
    cannot be traced that way (say, it reshapes with a hard-coded batch) still gets
    measured, one image at a time. Tracing runs without autograd: the grader only
    infers, and a ``torch.no_grad()`` inside forward then changes nothing instead of
    becoming a higher-order operator the grader refuses.
    """
    import torch

    batch = torch.export.Dim("batch", min=1)
    # A failed dynamic trace makes torch log a traceback at ERROR level; the static
    # retry is the answer to it, so the student's notebook is spared the noise.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad():
            # A batch of 2: an example batch of 1 would be specialised to the constant 1.
            program = torch.export.export(model, (torch.zeros(2, *INPUT_SHAPE),),
                                          dynamic_shapes=({0: batch},))
        return program, None
    except Exception as error:  # any tracing failure: try the static shape below
        static_reason = _why(error)
    finally:
        fake_log.setLevel(level)
    with torch.no_grad():
        return torch.export.export(model, (torch.zeros(1, *INPUT_SHAPE),)), static_reason


def _plain_tensors(values: dict[str, Any], what: str) -> dict[str, Any]:
    """Detached, contiguous CPU copies; anything that is not a tensor is refused here."""
    import torch

    out = {}
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the program holds {what} {name} of type {type(value).__name__}, "
                            "not a tensor")
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def export_model(model: Any, out_dir: str | Path) -> dict[str, Any]:
    """Exports ``model`` (called on a float batch of N x 3 x 32 x 32) into ``out_dir``.

    Returns ``{"exported": True, "dynamic_batch": bool, "why_static": str | None,
    "folder": str, "files": [...]}``, or ``{"exported": False, "why": "<Type>: <line>"}``
    when the model cannot be exported; nothing is raised. The model is exported in eval
    mode on the CPU and left as it was found (mode and device).
    """
    import torch
    from torch._export.serde.serialize import serialize

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, PROGRAM_FILE, TENSORS_FILE):  # never leave an older export
        (folder / name).unlink(missing_ok=True)
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        model.to("cpu")
        program, why_static = _export(model)
        tensors = {"state_dict": _plain_tensors(program.state_dict, "state entry"),
                   "constants": _plain_tensors(program.constants, "constant")}
        # Only the graph is serialised by torch; its pickled parts are switched off.
        artifact = serialize(program, serialize_state_dict=False, serialize_constants=False,
                             serialize_example_inputs=False)
        (folder / PROGRAM_FILE).write_bytes(artifact.exported_program)
        torch.save(tensors, folder / TENSORS_FILE)
    except Exception as error:  # the student's model may fail in any way
        return {"exported": False, "why": _why(error)}
    finally:
        model.train(was_training)
        model.to(device)
    manifest = {"format": FORMAT, "torch": torch.__version__, "dynamic_batch": why_static is None,
                "why_static": why_static, "input_shape": list(INPUT_SHAPE),
                "files": [PROGRAM_FILE, TENSORS_FILE]}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return {"exported": True, "dynamic_batch": why_static is None, "why_static": why_static,
            "folder": str(folder), "files": [PROGRAM_FILE, TENSORS_FILE, MANIFEST_FILE]}
