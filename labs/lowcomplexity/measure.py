"""The grader's own figures for Lab 5, from the files ``export.py`` wrote in the student's kernel.

Those files are hostile: the kernel that wrote them ran the student's code. Nothing in
them is unpickled beyond tensors, and nothing in them becomes code before it is checked:

* every file is read by ``grader.untrusted`` (no links, regular files, sizes capped);
* the tensors come from ``torch.load(weights_only=True)`` inside
  ``grader.untrusted.load_checkpoint_bytes`` (zip sizes checked first, dense tensors only);
* the graph JSON is read with its depth bounded, then checked field by field before
  torch's JSON deserializer sees it, because that deserializer is not written for hostile
  input: it ``sympify``-s expression strings (sympy evaluates them as Python), imports
  any module a tree-spec enum names, ``exec``-s ``guards_code``, resolves node targets by
  ``getattr`` from the ``torch`` module down, and pastes names into generated Python
  source. So: node targets must be aten operators of this torch (or a few ``_operator``
  and ``torch.sym_*`` shape functions), names must be plain identifiers or dotted
  attribute paths, expressions are parsed with ``ast`` (not run) and may only call sympy
  constructors and torch's shape functions on shape symbols and numbers, the
  input/output tree specs must be exactly "one tensor in, one tensor out", subgraphs,
  custom objects and effect tokens are refused, and debug metadata and guard code are
  dropped;
* the deserializer is handed the tensors as dicts, which it uses as they are
  (``deserialize_torch_artifact`` returns a dict untouched), so it never calls
  ``torch.load`` itself; ``torch.export.load`` (which falls back to full pickle) is
  never used.

Running the checked program could still cost memory and time (an aten op may allocate a
huge tensor, a matrix product may take hours), and the program may try to be measured as
something else than it is. Every run goes through ``_Meter`` and ``_Runner``: each
operation is sized on the meta device before it runs, a call past ``MAX_CALL_BYTES`` or
``MAX_CALL_WORK`` and a pass past ``MEASURE_SECONDS`` are stopped, operations whose work
is not counted are refused, and so is a model whose parameters, buffers or constants
change as it runs. The figures count what flop_counter's convention leaves out
(``Complexity.stored_elements``, ``other_flops``) and what a pass over real images cost.
"""
from __future__ import annotations

import ast
import json
import keyword
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grader.untrusted import (MiB, CheckpointLimits, UntrustedFileError, load_checkpoint_bytes,
                              parse_json, read_bytes)
from labs.lowcomplexity.data import to_tensor
from labs.lowcomplexity.export import (FORMAT, INPUT_SHAPE, MANIFEST_FILE, PROGRAM_FILE,
                                       TENSORS_FILE)

MAX_MANIFEST_BYTES = 64 * 1024
# A CNN's graph with its debug metadata is well under 1 MB; ResNet-50's is a few MB.
MAX_PROGRAM_BYTES = 32 * MiB
MAX_GRAPH_NODES = 20_000
# Up to 128 M elements (512 MB of float32): fifty times the lab's models, ResNet-50 fits.
TENSOR_LIMITS = CheckpointLimits(
    max_file_bytes=600 * MiB, max_unpacked_bytes=600 * MiB, max_entries=20_000,
    max_pickle_bytes=8 * MiB, max_tensor_numel=64 * 1024 * 1024,
    max_total_numel=128 * 1024 * 1024)
# Relative gap within which a FLOP or parameter-size claim matches the measurement.
COMPLEXITY_TOLERANCE = 0.02


class MeasureError(Exception):
    """The model could not be measured; the message is one sentence for the report."""


class ExportRefused(MeasureError):
    """The exported files hold something the grader will not load or run."""


def _why(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# ------------------------------------------------------------------------------- checks

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}\Z")
_ATTRIBUTE_PATH = re.compile(r"(?:[A-Za-z0-9_]{1,255}(?:\.[A-Za-z0-9_]{1,255}){0,63})?\Z")
_SHAPE_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{1,8}\Z")
# What a shape expression may call. torch writes them with sympy's srepr, e.g.
# ``Mul(Integer(3072), Symbol('s77', positive=True, integer=True))``; these are sympy's
# constructors and relations and the shape functions torch's deserializer passes to
# sympify, less those that can build huge numbers from small ones (Pow, PowByNatural,
# FloatPow, LShift).
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Add", "Mul", "Max", "Min", "Mod", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "FloorDiv", "ModularIndexing",
    "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "RShift",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
_EXPRESSION_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword,
                     ast.BinOp, ast.UnaryOp, ast.Compare, ast.Add, ast.Sub, ast.Mult, ast.Div,
                     ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Lt, ast.LtE, ast.Gt,
                     ast.GtE, ast.Eq, ast.NotEq)
MAX_EXPRESSION_CHARS = 2048
MAX_EXPRESSION_NODES = 400
# Shape arithmetic that export emits around sym_size and getitem on multi-output ops.
_PYTHON_TARGETS = frozenset(
    [f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv",
                                      "mod", "neg", "eq", "ne", "lt", "le", "gt", "ge")]
    + [f"torch.sym_{name}" for name in ("max", "min", "float", "int", "not")])
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\Z")
# aten operators that reach past tensor arithmetic: reading a file, printing, swapping or
# resizing storage. (The ``unsafe`` ops, such as _unsafe_view, are unsafe for autograd
# aliasing only, and export emits some of them for ordinary models.)
_ATEN_DENIED = frozenset({"from_file", "_print", "set_", "resize_", "resize_as_",
                          "_resize_output_", "_functionalize_unsafe_set"})
# Argument and spec kinds that carry code, objects or side effects rather than tensors.
_FORBIDDEN_KEYS = {
    "as_graph": "a subgraph (control flow or a higher-order operator)",
    "as_operator": "an operator passed as an argument",
    "as_custom_obj": "a custom-class (torchbind) object",
    "custom_obj": "a custom-class (torchbind) object",
    "as_string_to_argument": "a dict argument of a higher-order operator",
    "token": "an effect token (an operator with side effects)",
}
_NAME_KEYS = frozenset({"name", "as_name"})
_PATH_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name",
                        "user_input_name", "fqn"})
_VALUE_TABLES = frozenset({"tensor_values", "sym_int_values", "sym_bool_values",
                           "sym_float_values"})
_MUST_BE_EMPTY = frozenset({"custom_obj_values", "treespec_namedtuple_fields"})


def _target_problem(target: Any) -> str | None:
    """Why a node target is refused, or None for an operator the grader will run."""
    if not isinstance(target, str):
        return "a node whose target is not a name"
    if target in _PYTHON_TARGETS:
        return None
    match = _ATEN_TARGET.match(target)
    if match is None:
        if target.startswith("torch.ops.higher_order."):
            return (f"the higher-order operator {target} (control flow such as torch.cond, "
                    "or a grad-mode switch such as torch.enable_grad() inside forward)")
        if target.startswith("torch.ops."):
            return (f"the custom operator {target} (registered with torch.library, not "
                    "part of torch)")
        return f"a call to {target[:100]} (not an aten operator)"
    name, overload = match.groups()
    if name in _ATEN_DENIED:
        return f"the aten operator {target} (it reaches past tensor arithmetic)"
    # Resolved in the grader's own registry: an op the kernel defined is not there.
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        return f"a call to {target} (not an aten operator of this torch)"
    return None


def _expression_problem(expr: Any) -> str | None:
    """Why a shape expression is refused: sympify evaluates it as Python, so it is parsed
    (never run) here and may only call ``_SYMPY_CALLS`` on shape symbols and numbers."""
    refused = "a shape expression that is not plain sympy arithmetic on shape symbols"
    if not isinstance(expr, str) or len(expr) > MAX_EXPRESSION_CHARS:
        return refused
    try:
        nodes = list(ast.walk(ast.parse(expr, mode="eval")))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return refused
    if len(nodes) > MAX_EXPRESSION_NODES:
        return refused
    for node in nodes:
        if not isinstance(node, _EXPRESSION_NODES):
            return refused
        if isinstance(node, ast.Call) and not (
                isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
                and all(isinstance(k.value, ast.Constant) and isinstance(k.value.value, bool)
                        for k in node.keywords)):
            return refused
        if isinstance(node, ast.Name) and node.id not in _SYMPY_CALLS \
                and not _SHAPE_SYMBOL.match(node.id):
            return f"a shape expression naming {node.id[:40]}"
        if isinstance(node, ast.Constant) and not (
                isinstance(node.value, (bool, float))
                or (isinstance(node.value, int) and abs(node.value) < 2 ** 63)
                or (isinstance(node.value, str) and _SHAPE_SYMBOL.match(node.value))):
            return refused
    return None


def _spec(value: Any) -> Any:
    """A tree spec as torch's JSON (protocol, tree), to compare without string details."""
    return json.loads(torch.utils._pytree.treespec_dumps(value))


def _expected_specs() -> dict[str, Any]:
    tensor = torch.empty(0)
    return {"in_spec": _spec(torch.utils._pytree.tree_structure(((tensor,), {}))),
            "out_spec": _spec(torch.utils._pytree.tree_structure(tensor))}


def _check_program_json(program: Any, label: str) -> None:
    """Refuses anything torch's deserializer would turn into code; drops metadata in place.

    One pass over every object of the (depth-bounded) JSON, by key: the schema's
    dangerous fields have distinct names, and fields the schema does not know are
    ignored by the deserializer.
    """
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ExportRefused(f"{label} is not an exported program (no graph_module).")
    expected = _expected_specs()
    nodes = 0
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in list(item.items()):
            problem = None
            if key in _FORBIDDEN_KEYS:
                problem = _FORBIDDEN_KEYS[key]
            elif key in ("metadata", "guards_code"):
                # Debug text (stack traces, module paths) and guard code that torch would
                # exec; measuring needs neither.
                item[key] = {} if key == "metadata" else []
                continue
            elif key == "target":
                nodes += 1
                problem = _target_problem(value)
            elif key in _NAME_KEYS:
                # A named argument of an operator may be empty; value names never are.
                if not (value is None or (isinstance(value, str) and (
                        _IDENTIFIER.match(value) or (value == "" and "arg" in item)))):
                    problem = "a name that is not a plain identifier"
            elif key in _PATH_KEYS:
                if not isinstance(value, str) or not _ATTRIBUTE_PATH.match(value):
                    problem = "an attribute path that is not plain dotted identifiers"
            elif key == "forward_arg_names":
                # These become the parameters of a generated ``def forward``.
                if value is not None and not (isinstance(value, list) and all(
                        isinstance(v, str) and _IDENTIFIER.match(v)
                        and not keyword.iskeyword(v) for v in value)):
                    problem = "argument names that are not plain identifiers"
            elif key == "expr_str":
                problem = _expression_problem(value)
            elif key in _VALUE_TABLES:
                if not isinstance(value, dict) or not all(_IDENTIFIER.match(k) for k in value):
                    problem = "a value table keyed by something other than identifiers"
            elif key == "range_constraints":
                if not isinstance(value, dict) or not all(_SHAPE_SYMBOL.match(k) for k in value):
                    problem = "range constraints on something other than shape symbols"
            elif key in _MUST_BE_EMPTY:
                if value not in ({}, None):
                    problem = "custom objects or named tuples"
            elif key in expected:
                try:
                    matches = isinstance(value, str) and len(value) <= 4096 and \
                        parse_json(value.encode(), label, max_depth=16) == expected[key]
                except UntrustedFileError:
                    matches = False
                if not matches:
                    problem = ("an input or output structure other than one tensor in, "
                               "one tensor out")
            if problem is not None:
                raise ExportRefused(f"{label} holds {problem}, which the grader does not "
                                    "load or run.")
            if nodes > MAX_GRAPH_NODES:
                raise ExportRefused(f"{label} has more than {MAX_GRAPH_NODES} graph nodes.")
            stack.append(value)


def _parameter_names(program: dict, label: str) -> set[str]:
    try:
        specs = program["graph_module"]["signature"]["input_specs"]
        return {spec["parameter"]["parameter_name"] for spec in specs if "parameter" in spec}
    except (KeyError, TypeError) as error:
        raise ExportRefused(f"{label} is not an exported program ({_why(error)}).") from None


def _load_tensors(data: bytes, label: str) -> tuple[dict[str, torch.Tensor],
                                                     dict[str, torch.Tensor]]:
    try:
        loaded = load_checkpoint_bytes(data, label, TENSOR_LIMITS)
    except UntrustedFileError as error:
        raise ExportRefused(str(error)) from None
    parts = []
    for key in ("state_dict", "constants"):
        part = loaded.get(key) if isinstance(loaded, dict) else None
        if not isinstance(part, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()):
            raise ExportRefused(f"{label} is not the dict of tensors export_model writes "
                                f"(no dict of tensors under {key!r}).")
        parts.append(part)
    return parts[0], parts[1]


def _check_tensor_shapes(program: torch.export.ExportedProgram, label: str) -> None:
    """Each lifted tensor as the graph declares it, so a mismatch is named, not crashed on."""
    kinds = (torch.export.graph_signature.InputKind.PARAMETER,
             torch.export.graph_signature.InputKind.BUFFER,
             torch.export.graph_signature.InputKind.CONSTANT_TENSOR)
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    for spec in program.graph_signature.input_specs:
        if spec.kind not in kinds:
            continue
        tensor = program.state_dict.get(spec.target, program.constants.get(spec.target))
        declared = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(tensor, torch.Tensor) or declared is None \
                or tuple(tensor.shape) != tuple(declared.shape) or tensor.dtype != declared.dtype:
            raise ExportRefused(f"{label} holds {spec.target} in another shape or dtype than "
                                "its graph declares.")


def load_program(folder: str | Path,
                 base: str | Path | None = None) -> torch.export.ExportedProgram:
    """The exported program in ``folder``, checked as described above, on the CPU.

    ``base`` is a folder the grader trusts (the work dir it made); every path component
    below it is opened without following links. It defaults to ``folder``'s parent.
    Raises ``ExportRefused`` for content the grader will not load, ``MeasureError`` for
    files that are missing or unreadable.
    """
    folder = Path(folder)
    base = Path(base) if base is not None else folder.parent

    def read(name: str, max_bytes: int) -> bytes:
        try:
            return read_bytes(folder / name, max_bytes, base)
        except UntrustedFileError as error:
            raise MeasureError(str(error)) from None

    try:
        manifest = parse_json(read(MANIFEST_FILE, MAX_MANIFEST_BYTES), MANIFEST_FILE)
    except UntrustedFileError as error:
        raise MeasureError(str(error)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MeasureError(f"{MANIFEST_FILE} is not from this grader's export_model (format "
                           f"{FORMAT} expected): export the model again.")
    try:
        program_json = parse_json(read(PROGRAM_FILE, MAX_PROGRAM_BYTES), PROGRAM_FILE)
    except UntrustedFileError as error:
        raise ExportRefused(str(error)) from None
    _check_program_json(program_json, PROGRAM_FILE)
    parameter_names = _parameter_names(program_json, PROGRAM_FILE)
    state_dict, constants = _load_tensors(read(TENSORS_FILE, TENSOR_LIMITS.max_file_bytes),
                                          TENSORS_FILE)
    # The verifier wants parameters as nn.Parameter; weights_only loading gives tensors.
    state_dict = {name: torch.nn.Parameter(t, requires_grad=False) if name in parameter_names
                  else t for name, t in state_dict.items()}
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    artifact = SerializedArtifact(json.dumps(program_json).encode(), state_dict, constants, b"")
    try:
        program = deserialize(artifact)  # type: ignore[arg-type]  # dicts are used as given
    except Exception as error:  # torch raises many kinds on malformed graphs
        raise MeasureError(f"{PROGRAM_FILE} could not be rebuilt ({_why(error)}).") from None
    _check_tensor_shapes(program, TENSORS_FILE)
    return program


# ------------------------------------------------------------------------------- running

# What one call of the model may cost before the grader stops it: the tensors it allocates
# (all of them, as if none were freed) and its work (counted FLOPs plus the elements the
# other operations touch; a minute or two of one core at most). A CIFAR-size ResNet-50 needs
# about 100 MB and 3 GFLOPs per image; the batch is chosen so that a call stays well inside
# both.
MAX_CALL_BYTES = 2 * 1024 ** 3
MAX_CALL_WORK = 5 * 10 ** 11
# A measurement (count, or accuracy over one set of images) unless its caller gives one
# deadline for all of them; checked before every operation.
MEASURE_SECONDS = 1800.0
# Operations whose output size depends on tensor values, so that it is not known before
# they run; each returns at most as many elements as it reads. Anything else the grader
# cannot size ahead is not run (say, an operation that repeats by counts held in a tensor).
_SIZED_BY_VALUES = frozenset({"nonzero", "masked_select", "index", "_unique", "_unique2",
                              "unique_dim", "unique_consecutive", "_local_scalar_dense"})
_METADATA_OPS = frozenset({
    torch.ops.aten.sym_is_contiguous.default, torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format, torch.ops.aten.is_strides_like_format.default,
    torch.ops.aten.is_non_overlapping_and_dense.default, torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default, torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default, torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default, torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default, torch.ops.prim.layout.default})


# Operations whose work is not bounded by the elements they read and write (a matrix
# product reads n*m + m*k numbers and does n*m*k multiply-adds): those flop_counter counts,
# those with a formula below, and these, which no lab model needs and the grader does not
# run (a matrix product by another name, a solver, a backend's private convolution).
_DENIED_WORDS = frozenset({"mm", "bmm", "mv", "dot", "conv", "convolution", "solve", "cholesky",
                           "svd", "qr", "eig", "eigh", "eigvals", "eigvalsh", "inverse", "inv",
                           "det", "slogdet", "logdet", "lstsq", "pinv", "lu", "matrix",
                           "trilinear", "bilinear", "linalg", "pack", "sparse", "mkldnn",
                           "nnpack", "fbgemm", "cudnn", "miopen", "tensordot", "kron",
                           "einsum", "cdist", "pdist", "attention"})
_ALLOWED_NAMES = frozenset({"linalg_vector_norm"})


def _work_of(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, bool]:
    """(work, counted): flop_counter's FLOPs for what it counts (``counted``), else a FLOP
    equivalent: 2 per multiply-add of a matrix-vector product, a pooling window's elements
    per output, and for the rest the most elements the operation reads or writes."""
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    name = packet.__name__
    base = getattr(torch.ops.aten, name.rstrip("_"), None) if name.endswith("_") else packet
    if base in flop_registry:  # addmm_ is addmm's work, though flop_counter misses it
        return int(flop_registry[base](*args, **kwargs, out_val=out)), base is packet
    outputs, inputs = _tensors(out), _tensors((args, kwargs))
    core = name.strip("_")
    if core in ("mv", "dot", "vdot"):
        return 2 * max(t.numel() for t in inputs), False
    if core == "addmv":
        return 2 * args[1].numel(), False
    if core in ("int_mm", "addmm_activation"):
        a, b = (args[0], args[1]) if core == "int_mm" else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1], False
    if core == "addbmm":
        return 2 * args[1].shape[0] * args[1].shape[1] * args[1].shape[2] * args[2].shape[2], False
    if core.startswith("scaled_dot_product") and "backward" not in core:
        # CPU attention, which flop_counter misses: the work its GPU kernels are counted at
        formula = flop_registry[torch.ops.aten._scaled_dot_product_flash_attention]
        return int(formula(*args[:3], out_val=out)), False
    if core in ("cdist_forward", "pdist_forward", "euclidean_dist"):
        return 3 * outputs[0].numel() * args[0].shape[-1], False
    pool = re.fullmatch(r"(?:max|avg)_pool([123])d(?:_with_indices)?", core)
    if pool:
        size, dims = list(args[1]), int(pool.group(1))
        area = math.prod(size) if len(size) == dims else size[0] ** dims
        return outputs[0].numel() * max(1, area), False
    words = set(core.split("_")) | {core}
    if name not in _ALLOWED_NAMES and (words & _DENIED_WORDS or "conv" in core or "mm" in core):
        raise ExportRefused(f"The model runs {func}, whose work the grader does not count; "
                            "use convolutions, matrix products (@, nn.Linear) and elementwise "
                            "operations.")
    if name.startswith("empty"):
        return 0, False  # memory only
    return max((t.numel() for t in inputs + outputs), default=0), False


@dataclass
class Work:
    """What runs of a model cost, summed: ``flops`` as ``torch.utils.flop_counter`` counts
    them (convolutions and matrix products), ``other`` the elements every other operation
    touched (the largest of its inputs and outputs: an elementwise product, a sum, a
    matrix-vector product ...), over ``images`` images."""

    flops: int = 0
    other: int = 0
    images: int = 0

    def per_image(self) -> tuple[int, int]:
        """(flops, other) per image, rounded up."""
        n = max(1, self.images)
        return -(-self.flops // n), -(-self.other // n)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values once ``a`` is cast to ``b``'s dtype (NaN equal to NaN)."""
    if a.shape != b.shape:
        return False
    a = a.detach().to(b.dtype)
    if not b.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


class _Meter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts and bounds every aten operation of a model's run, as flop_counter sees them.

    Operations flop_counter does not count are decomposed first, as it does; what then
    runs is sized on the meta device before it runs (shapes only, no memory), so that an
    operation that would allocate past the call's budget, or a matrix product past its
    work budget, is refused before it starts, not after it has taken the machine's memory.
    """

    def __init__(self, work: Work, deadline: float) -> None:
        super().__init__()
        self.work, self.deadline = work, deadline
        self.call_bytes = self.call_work = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import time

        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return NotImplemented
        if not isinstance(func, torch._ops.OpOverload):
            raise ExportRefused(f"The model runs {func} (not an aten operator), which the "
                                "grader does not run.")
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        if time.monotonic() > self.deadline:
            raise MeasureError(f"Measuring the model took longer than {MEASURE_SECONDS:.0f} s.")
        returns = func._schema.returns
        if any(r.alias_info is not None and not r.alias_info.is_write for r in returns) \
                or not any("Tensor" in str(r.type) for r in returns):
            return func(*args, **kwargs)  # a view or an assertion: no memory, no work
        planned = self._planned(func, args, kwargs)
        if planned is None and packet.__name__ not in _SIZED_BY_VALUES:
            raise MeasureError(f"The model runs {func} in a way whose cost the grader cannot "
                               "know before running it.")
        if planned is not None:
            self._charge(func, args, kwargs, planned)
        out = func(*args, **kwargs)
        if planned is None:
            self._charge(func, args, kwargs, out)
        return out

    @staticmethod
    def _planned(func, args, kwargs):
        """The operation's output on the meta device (shapes without data), or None."""
        meta = torch.device("meta")
        margs, mkwargs = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(meta), (list(args), dict(kwargs)))
        for index, argument in enumerate(func._schema.arguments):
            if argument.name == "device":
                if index < len(margs) and not argument.kwarg_only:
                    margs[index] = meta
                else:
                    mkwargs["device"] = meta
            elif argument.name == "pin_memory" and argument.name in mkwargs:
                mkwargs["pin_memory"] = False
        try:
            return func(*margs, **mkwargs)
        except Exception:  # noqa: BLE001 - no meta kernel, or a size that depends on values
            return None

    def _charge(self, func, args, kwargs, out) -> None:
        inplace = any(r.alias_info is not None for r in func._schema.returns)
        allocated = 0 if inplace else sum(t.numel() * t.element_size() for t in _tensors(out))
        work, counted = _work_of(func, args, kwargs, out)
        if counted:
            self.work.flops += work
        else:
            self.work.other += work
        self.call_bytes += allocated
        self.call_work += work
        if self.call_bytes > MAX_CALL_BYTES:
            raise MeasureError(f"One call of the model would allocate more than "
                               f"{MAX_CALL_BYTES // MiB} MB of tensors (at {func}).")
        if self.call_work > MAX_CALL_WORK:
            raise MeasureError(f"One call of the model would do more than {MAX_CALL_WORK:.0e} "
                               f"operations (at {func}).")


class _Runner:
    """Calls a model under a ``_Meter``: without autograd, each call within its budgets,
    and the model's parameters, buffers and constants the same after each call as before
    (a model that changes as it runs, say one that counts its calls, is refused)."""

    def __init__(self, program: torch.export.ExportedProgram | Callable[[torch.Tensor], Any],
                 work: Work | None = None, deadline: float | None = None) -> None:
        import time

        self.module = _runnable(program)
        self.work = work if work is not None else Work()
        self.meter = _Meter(self.work, deadline if deadline is not None
                            else time.monotonic() + MEASURE_SECONDS)
        state = self.module.state_dict(keep_vars=True) \
            if isinstance(self.module, torch.nn.Module) else {}
        if isinstance(program, torch.export.ExportedProgram):
            state = {**program.state_dict, **program.constants, **state}
        self.state = {name: (t, t.detach().clone()) for name, t in state.items()
                      if isinstance(t, torch.Tensor)}

    def __call__(self, x: torch.Tensor) -> Any:
        self.meter.call_bytes = self.meter.call_work = 0
        with torch.no_grad(), self.meter:
            out = self.module(x)
        changed = next((name for name, (now, before) in self.state.items()
                        if now.dtype != before.dtype or not _same_values(now, before)), None)
        if changed is not None:
            raise ExportRefused(f"The model changes its own {changed} when it runs; the grader "
                                "measures models whose forward leaves them as they were.")
        self.work.images += len(x)
        return out


# ------------------------------------------------------------------------------- figures

@dataclass(frozen=True)
class Complexity:
    """The grader's complexity figures of one model.

    ``parameters`` counts the model's parameters (what an optimizer trains), not its
    buffers: BatchNorm's running statistics are not parameters, as in ``sum(p.numel() for
    p in model.parameters())``. ``parameter_kb`` is ``parameters * 4 / 1024`` (float32 kB,
    the lab's "Model parameter size"). ``flops`` is ``torch.utils.flop_counter`` on one
    1x3x32x32 image: convolutions and matrix products only, 2 FLOPs per multiply-accumulate;
    ``macs`` is ``flops // 2``, the number thop/ptflops/fvcore print and call "FLOPs".
    ``buffer_elements`` counts buffers and constants, reported so that a table kept
    outside the parameters does not go unseen.

    What the conventions leave out, so that a model cannot hide in it: ``stored_elements``
    are the elements of the buffers and constants the model's forward reads, other than
    BatchNorm's running statistics (of a BatchNorm with its own weight); ``other_flops``
    counts, per image, the elements touched by operations flop_counter does not count
    (elementwise products and sums, matrix-vector products, ...). ``with_work`` raises the
    per-image figures to what a pass over real images cost, for a model that is cheap on
    one blank image only.
    """

    parameters: int
    parameter_kb: float
    macs: int
    flops: int
    buffer_elements: int
    stored_elements: int = 0
    other_flops: int = 0

    def with_work(self, work: Work) -> Complexity:
        flops, other = work.per_image()
        flops = max(self.flops, flops)
        return replace(self, flops=flops, macs=flops // 2,
                       other_flops=max(self.other_flops, other))


def _runnable(program: torch.export.ExportedProgram | Callable[[torch.Tensor], Any]
              ) -> Callable[[torch.Tensor], Any]:
    if not isinstance(program, torch.export.ExportedProgram):
        return program
    try:
        return program.module(check_guards=False)
    except Exception as error:  # generated code from a checked but odd graph may not compile
        raise MeasureError(f"The exported program could not be made runnable "
                           f"({_why(error)}).") from None


# Batch norms whose arguments 3 and 4 are the running mean and variance.
_BATCH_NORMS = frozenset({"batch_norm", "_native_batch_norm_legit_no_training",
                          "_native_batch_norm_legit", "native_batch_norm",
                          "_batch_norm_with_update", "_batch_norm_no_update"})


def _stored_elements(program: torch.export.ExportedProgram) -> int:
    """Elements of the buffers and constants the graph reads, less BatchNorm's running
    statistics: a buffer read only as the running mean or variance of a batch norm whose
    weight is a parameter of the same size (a lookup table fed to the statistics of a
    weightless batch norm is counted)."""
    from torch.export.graph_signature import InputKind

    signature = program.graph_signature
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    parameters = {spec.arg.name for spec in signature.input_specs
                  if spec.kind == InputKind.PARAMETER}

    def statistic(user: torch.fx.Node, node: torch.fx.Node, numel: int) -> bool:
        target = user.target
        if not isinstance(target, torch._ops.OpOverload) \
                or target._overloadpacket.__name__ not in _BATCH_NORMS:
            return False
        args = list(user.args)
        weight = args[1] if len(args) > 1 else None
        return len(args) > 4 and node in args[3:5] and node not in args[:3] + args[5:] \
            and not any(node is v for v in user.kwargs.values()) \
            and isinstance(weight, torch.fx.Node) and weight.name in parameters \
            and weight.meta["val"].numel() == numel

    stored = 0
    for spec in signature.input_specs:
        if spec.kind not in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        node = placeholders[spec.arg.name]
        numel = int(node.meta["val"].numel())
        if node.users and not all(statistic(user, node, numel) for user in node.users):
            stored += numel
    return stored


def count(program: torch.export.ExportedProgram, deadline: float | None = None) -> Complexity:
    """Parameters, buffers and FLOPs of an exported program (conventions on ``Complexity``);
    ``deadline`` (time.monotonic()) defaults to MEASURE_SECONDS from now."""
    signature = program.graph_signature
    parameters = sum(program.state_dict[name].numel() for name in signature.parameters)
    buffers = sum(t.numel() for name, t in {**program.state_dict, **program.constants}.items()
                  if name not in signature.parameters)
    runner = _Runner(program, deadline=deadline)
    try:
        runner(torch.zeros(1, *INPUT_SHAPE))
    except MeasureError:
        raise
    except Exception as error:  # the student's graph may fail on the grader's input
        raise MeasureError(f"The model failed on one 1x3x32x32 image ({_why(error)}).") from None
    flops, other = runner.work.per_image()
    return Complexity(parameters=parameters, parameter_kb=parameters * 4 / 1024,
                      macs=flops // 2, flops=flops, buffer_elements=buffers,
                      stored_elements=_stored_elements(program), other_flops=other)


def _fixed_batch(program: Any) -> int | None:
    """The batch size an exported program was specialised to, or None if it is dynamic."""
    if not isinstance(program, torch.export.ExportedProgram):
        return None
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.find_nodes(op="placeholder"):
        if node.name in user_inputs:
            size = node.meta["val"].shape[0]
            return size if isinstance(size, int) else None
    return None


def accuracy(program: torch.export.ExportedProgram | Callable[[torch.Tensor], Any],
             images_uint8: np.ndarray, labels: np.ndarray, mean: Sequence[float],
             std: Sequence[float], batch_size: int = 256, work: Work | None = None,
             deadline: float | None = None) -> float:
    """Top-1 accuracy in percent: argmax of the logits against ``labels``.

    Images are uint8 NHWC, normalised with ``mean``/``std`` (the notebook's training
    normalisation, on the 0..1 scale). A program exported with a fixed batch size runs in
    batches of that size, the last one padded with zeros whose predictions are dropped.
    Otherwise the batch is at most ``batch_size``, less for a model whose one image already
    costs a good part of a call's budget. ``work`` (if given) adds up what the pass cost;
    ``deadline`` (time.monotonic()) defaults to MEASURE_SECONDS from now.
    """
    fixed = _fixed_batch(program)
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    correct = 0
    try:
        runner = _Runner(program, Work(), deadline)
        step = fixed or batch_size
        if not fixed and len(targets):  # one image first: what a call costs per image
            runner(to_tensor(images_uint8[:1], mean, std))
            meter = runner.meter
            step = max(1, min(batch_size, MAX_CALL_BYTES // (4 * max(1, meter.call_bytes)),
                              MAX_CALL_WORK // (4 * max(1, meter.call_work))))
        runner.work = runner.meter.work = work if work is not None else Work()
        for start in range(0, len(targets), step):
            x = to_tensor(images_uint8[start:start + step], mean, std)
            real = len(x)
            if fixed and real < fixed:
                x = torch.cat([x, x.new_zeros(fixed - real, *x.shape[1:])])
            logits = runner(x)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 \
                    or logits.shape[0] != len(x):
                raise MeasureError("The model does not return logits of shape (batch, "
                                   "classes) for a batch of images.")
            correct += int((logits[:real].argmax(1) == targets[start:start + real]).sum())
    except MeasureError:
        raise
    except Exception as error:  # the student's graph may fail on real images
        raise MeasureError(f"The model failed on the test images ({_why(error)}).") from None
    return 100.0 * correct / max(1, len(targets))


def perturbed(images_uint8: np.ndarray, seed: int, levels: int) -> np.ndarray:
    """The images with every pixel moved by a random -levels..+levels of 255 (clipped)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-levels, levels + 1, size=images_uint8.shape, dtype=np.int16)
    return np.clip(images_uint8.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def weights_mismatch(program: torch.export.ExportedProgram, weights: Any) -> str | None:
    """The first tensor of the exported model that is none of the handed-in weights (by its
    name, else by its value), or None when the export holds the handed-in weights.

    The kernel that exported the model ran the student's code, which may have exported
    something else than the model the weights were loaded into; the grader holds its own
    copy of the weights file and compares."""
    for key in ("state_dict", "model_state_dict", "model"):  # as runtime._weights unwraps
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
            break
    handed = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)} \
        if isinstance(weights, dict) else {}
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for tensor in handed.values():
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor)

    for name, tensor in program.state_dict.items():
        tensor = tensor.detach()
        if name in handed and _same_values(handed[name], tensor):
            continue
        if not any(_same_values(other, tensor) for other in by_shape.get(tuple(tensor.shape), [])):
            return f"{name} {tuple(tensor.shape)}"
    return None


# ------------------------------------------------------------------------------- claims

_NUMBER = r"(?P<num>\d[\d,_]*(?:\.\d+)?(?:e[+-]?\d+)?)"
_GAP = r"\s*(?:\([^)\n]{0,20}\))?\s*(?:[:=]|is)?\s*"
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_FLOPS = re.compile(r"\b(?P<prefix>[kmgt]?)flops?\b" + _GAP + _NUMBER
                    + r"\s*(?P<suffix>[kmgt](?=(?:flops?|macs?)?\b))?", re.I)
_PARAM_SIZE = re.compile(r"\bparam(?:eter)?s?\s+size\s*(?:\((?P<unit1>[kmg]?i?b)\))?"
                         r"\s*[:=]?\s*" + _NUMBER + r"\s*(?P<unit2>[kmg]?i?b\b)?", re.I)
_PARAM_COUNT = re.compile(r"\bparam(?:eter)?s?\s*[:=]\s*" + _NUMBER
                          + r"\s*(?P<suffix>[kmg](?=\b))?", re.I)
_ACCURACY = re.compile(r"\bacc(?:uracy)?\b" + _GAP + _NUMBER + r"\s*(?P<pct>%)?", re.I)
_ACCURACY_WORD = re.compile(r"\bacc(?:uracy)?\b", re.I)
_PERCENT = re.compile(_NUMBER + r"\s*%")
# kB as the lab means it (1024 bytes); MB likewise 1024 kB (torchsummary's "Params size (MB)").
_KB_PER_UNIT = {"b": 1 / 1024, "kb": 1.0, "kib": 1.0, "mb": 1024.0, "mib": 1024.0,
                "gb": 1024.0 ** 2, "gib": 1024.0 ** 2}
_EVIDENCE_CHARS = 200


@dataclass(frozen=True)
class Claims:
    """The figures the notebook printed (None when absent), with the line each came from."""

    flops: float | None
    parameter_kb: float | None
    accuracy_pct: float | None
    lines: dict[str, str]


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("_", ""))


def _line_claims(line: str) -> dict[str, float]:
    """The figures one output line states; within a line, the last mention wins."""
    found: dict[str, float] = {}
    for match in _FLOPS.finditer(line):
        scale = _SCALE[(match["suffix"] or match["prefix"] or "").lower()]
        found["flops"] = _number(match["num"]) * scale
    if "non-trainable" not in line.lower():
        for match in _PARAM_COUNT.finditer(line):
            found["parameter_kb"] = (_number(match["num"]) * _SCALE[(match["suffix"] or "").lower()]
                                     * 4 / 1024)
    for match in _PARAM_SIZE.finditer(line):
        unit = (match["unit1"] or match["unit2"] or "kb").lower()
        found["parameter_kb"] = _number(match["num"]) * _KB_PER_UNIT[unit]
    if _ACCURACY_WORD.search(line):
        keyed = list(_ACCURACY.finditer(line))
        percents = list(_PERCENT.finditer(line))
        if keyed:
            value = _number(keyed[-1]["num"])
            found["accuracy_pct"] = value if keyed[-1]["pct"] or value > 1 else value * 100
        elif percents:  # "Accuracy of the network on the 10000 test images: 90 %"
            found["accuracy_pct"] = _number(percents[-1]["num"])
    return found


def _output_texts(notebook_node: Any) -> list[str]:
    """Printed text of every code cell's outputs, in order: streams and text/plain results."""
    texts = []
    for cell in notebook_node.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text = output.get("text", "")
            elif output.get("output_type") in ("execute_result", "display_data"):
                text = output.get("data", {}).get("text/plain", "")
            else:
                continue
            texts.append("".join(text) if isinstance(text, list) else str(text))
    return texts


def claims_from_outputs(notebook_node: Any) -> Claims:
    """The FLOPs, parameter size (kB) and accuracy (%) the notebook printed; last one wins.

    Tolerated: ``flops = 31269888``, ``FLOPs: 31,269,888``, ``FLOPs: 31.27M``, ``MFLOPs =
    31.27``; ``Model parameter size = 8677.812 kB``, ``Params size (MB): 8.47``, ``Total
    params: 2,221,520`` (a count becomes count x 4 / 1024 kB); ``Accuracy = 90.39 %``,
    ``acc: 0.9039`` (a value of at most 1 without % is a fraction). Only outputs count,
    never the source or markdown.
    """
    values: dict[str, float] = {}
    lines: dict[str, str] = {}
    for text in _output_texts(notebook_node):
        for line in text.splitlines():
            for figure, value in _line_claims(line).items():
                values[figure] = value
                lines[figure] = line.strip()[:_EVIDENCE_CHARS]
    return Claims(flops=values.get("flops"), parameter_kb=values.get("parameter_kb"),
                  accuracy_pct=values.get("accuracy_pct"), lines=lines)


@dataclass(frozen=True)
class ClaimCheck:
    """One printed figure against the grader's measurement."""

    figure: str  # "flops", "parameter_kb" or "accuracy_pct"
    claimed: float | None  # None: the notebook did not print it
    measured: float
    convention: str | None  # for FLOPs: which counting convention the claim matches
    ok: bool
    evidence: str | None  # the output line the claim was read from


FLOPS_CONVENTION = "FLOPs = 2 x MACs (torch.utils.flop_counter)"
MACS_CONVENTION = "MACs called FLOPs (thop, ptflops, fvcore)"


def _close(claimed: float, measured: float, relative: float) -> bool:
    return abs(claimed - measured) <= relative * abs(measured)


def compare_claims(claims: Claims, complexity: Complexity, accuracy: float,
                   tolerance_pct: float = 1.0) -> list[ClaimCheck]:
    """Each claim against the measurement.

    FLOPs match if within 2 % of either convention (``convention`` names which); the
    parameter size if within 2 % of ``parameter_kb``; accuracy if within ``tolerance_pct``
    percentage points of the re-measured top-1 accuracy.
    """
    checks = []
    convention = None
    if claims.flops is not None:
        for name, measured in ((FLOPS_CONVENTION, complexity.flops),
                               (MACS_CONVENTION, complexity.macs)):
            if _close(claims.flops, measured, COMPLEXITY_TOLERANCE):
                convention = name
                break
    checks.append(ClaimCheck("flops", claims.flops, float(complexity.flops), convention,
                             convention is not None, claims.lines.get("flops")))
    size_ok = claims.parameter_kb is not None and _close(
        claims.parameter_kb, complexity.parameter_kb, COMPLEXITY_TOLERANCE)
    checks.append(ClaimCheck("parameter_kb", claims.parameter_kb, complexity.parameter_kb, None,
                             size_ok, claims.lines.get("parameter_kb")))
    accuracy_ok = claims.accuracy_pct is not None and \
        abs(claims.accuracy_pct - accuracy) <= tolerance_pct
    checks.append(ClaimCheck("accuracy_pct", claims.accuracy_pct, accuracy, None, accuracy_ok,
                             claims.lines.get("accuracy_pct")))
    return checks
