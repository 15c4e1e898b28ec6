"""The kinds of model `onnx_fuse.fuse` takes and gives back: a path, an onnx.ModelProto, an
onnx_ir.Model, or a torch.onnx.ONNXProgram (what `torch.onnx.export(..., dynamo=True)` returns).

The pass works on a ModelProto; `accept` turns what it was given into one (a SourceModel) and
returns how to turn the result back, so that `result.model` is of the kind given (`result.proto`
is always the ModelProto). Neither onnx_ir nor torch is imported here: an IR model or an
ONNXProgram can only be given by a caller who imported them already, and they are recognised by
their type's module and name.

Weights are not copied into the result: tensors in external data stay references to their files,
and every initializer of the result that holds the same bytes as one of the given IR model is that
same tensor object. (The pass itself reads a serialized copy of in-memory IR tensors while it
runs; tensors in external data are never read.)
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import onnx

from .errors import BadInput
from .model_io import SourceModel, as_source, validate
from .result import FuseResult

GiveBack = Callable[[FuseResult], FuseResult]


def accept(model: Any) -> tuple[SourceModel, GiveBack]:
    """The SourceModel the pass reads, and the function that gives a result back as `model`'s kind."""
    if _is_onnx_program(model):
        source, back = _accept_ir(model.model)
        return source, lambda result: _as_program(back(result), model)
    if _is_ir_model(model):
        return _accept_ir(model)
    if isinstance(model, (onnx.ModelProto, SourceModel, str, bytes)) or hasattr(model, "__fspath__"):
        return as_source(model), _unchanged_kind
    raise BadInput(f"expected a path, an onnx.ModelProto, an onnx_ir.Model or a "
                   f"torch.onnx.ONNXProgram, got {type(model).__name__}")


def _unchanged_kind(result: FuseResult) -> FuseResult:
    return result


def _is_onnx_program(model) -> bool:
    kind = type(model)
    return (kind.__name__ == "ONNXProgram" and kind.__module__.startswith("torch.onnx")
            and _is_ir_model(getattr(model, "model", None)))


def _is_ir_model(model) -> bool:
    kind = type(model)
    return kind.__name__ == "Model" and kind.__module__.startswith("onnx_ir")


def _accept_ir(model) -> tuple[SourceModel, GiveBack]:
    ir = sys.modules["onnx_ir"]  # imported by whoever made `model`
    base_dir = _external_base_dir(model, ir)
    proto = ir.serde.serialize_model(model)
    validate(proto, base_dir, "model")
    return SourceModel(proto, base_dir), lambda result: _as_ir(result, model, ir)


def _external_base_dir(model, ir) -> str | None:
    """The one directory the model's external tensors are relative to (None without any)."""
    dirs = {os.path.abspath(str(value.const_value.base_dir))
            for value in model.graph.initializers.values()
            if isinstance(value.const_value, ir.ExternalTensor)}
    if len(dirs) > 1:
        raise BadInput(f"the model's external data lives in {len(dirs)} directories "
                       f"({', '.join(sorted(dirs))}); onnx-fuse needs them in one")
    return dirs.pop() if dirs else None


def _as_ir(result: FuseResult, given, ir) -> FuseResult:
    """`result` with its model as an onnx_ir.Model: the given one when nothing changed, else the
    rewritten graph with every initializer that kept its bytes taken from the given model."""
    if not result.changed:
        return replace(result, model=given, proto=result.proto)
    fused = ir.serde.deserialize_model(result.proto)
    if result.base_dir is not None:  # external tensors are read relative to the given model's
        ir.external_data.set_base_dir(fused.graph, result.base_dir)
    originals = given.graph.initializers
    for name, value in fused.graph.initializers.items():
        original = originals.get(name)
        if original is not None and _same_tensor(original.const_value, value.const_value, ir):
            value.const_value = original.const_value
    return replace(result, model=fused, proto=result.proto)


def _same_tensor(original, candidate, ir) -> bool:
    """Whether `candidate` (read back from the result) holds what `original` holds."""
    if original is None or candidate is None:
        return False
    if original.dtype != candidate.dtype or tuple(original.shape) != tuple(candidate.shape):
        return False
    if isinstance(original, ir.ExternalTensor) or isinstance(candidate, ir.ExternalTensor):
        return (isinstance(original, ir.ExternalTensor) and isinstance(candidate, ir.ExternalTensor)
                and (original.location, original.offset, original.length)
                == (candidate.location, candidate.offset, candidate.length))
    return _same_bytes(original.numpy(), candidate.numpy())


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:  # strings: no bytes to compare, the values are the data
        return bool(np.array_equal(a, b))
    flat_a = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    flat_b = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return bool(np.array_equal(flat_a, flat_b))


def _as_program(result: FuseResult, program) -> FuseResult:
    """`result` as an ONNXProgram of the same class, around the fused IR model and the given
    program's ExportedProgram (the given program itself when nothing changed)."""
    if not result.changed:
        return replace(result, model=program)
    return replace(result, model=type(program)(result.model, program.exported_program))
