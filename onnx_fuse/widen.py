"""bfloat16 models widened to float32, so that onnxruntime's CPU provider can run them: it has no
bfloat16 kernels for most ops (Mul, Where), and bfloat16 is how most checkpoints are shipped.

The widened copy is the same program with every bfloat16 tensor made float32: the interface,
initializers (bfloat16 → float32 is exact), Constant and ConstantOfShape values, Cast targets and
the other type attributes, value_info, If/Loop/Scan bodies and model-local functions. Only the
check's copies are widened; the fused model stays bfloat16.

What a check of widened copies proves: the rewrite computes the same function as the original
when both run in float32. It does not reproduce where the bfloat16 program rounds (every op's
result rounded to 8 bits of mantissa): the fused ops round where their kernels do, so the fused
bfloat16 model may differ from the original by bfloat16 rounding, as any two bfloat16 kernels of
the same math do.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto

from .errors import first_line

_BF16, _FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
# Attributes that name an element type (Cast's target, the random ops' dtype, Attention's
# softmax precision, QuantizeLinear's output type).
_TYPE_ATTRIBUTES = {"to", "dtype", "softmax_precision", "output_dtype"}
_PROTOBUF_LIMIT = 2**31 - 1


class WidenError(Exception):
    """The widened copy cannot be made (its weights cannot be read, or it would be too large)."""


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the model, its interface or a type attribute is bfloat16."""
    graphs = [model.graph] + [f for f in model.functions]
    return any(_graph_has_bfloat16(g) for g in graphs)


def widened(model: onnx.ModelProto, base_dir: str | None) -> onnx.ModelProto:
    """A float32 copy of a bfloat16 model; initializers in external data that are bfloat16 are
    read from `base_dir` and put inline (the others stay where they are)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _widen_graph(copy.graph, base_dir)
    for function in copy.functions:
        for node in function.node:
            _widen_node(node, base_dir)
        for value in function.value_info:
            _widen_value(value)
    if copy.ByteSize() > _PROTOBUF_LIMIT:
        raise WidenError("the model widened to float32 is over protobuf's 2 GB limit")
    return copy


def widened_inputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays for (or from) a widened model: bfloat16 ones as float32 (exact)."""
    return {name: value.astype(np.float32) if value.dtype.name == "bfloat16" else value
            for name, value in inputs.items()}


def _graph_has_bfloat16(graph) -> bool:
    values = [*getattr(graph, "input", []), *getattr(graph, "output", []), *graph.value_info]
    if any(_elem_type(v) == _BF16 for v in values if hasattr(v, "type")):
        return True
    if any(t.data_type == _BF16 for t in getattr(graph, "initializer", [])):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if _attribute_has_bfloat16(attr):
                return True
    return False


def _attribute_has_bfloat16(attr: onnx.AttributeProto) -> bool:
    if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i == _BF16:
        return True
    if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _BF16:
        return True
    bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    return any(_graph_has_bfloat16(body) for body in bodies)


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0


def _widen_graph(graph: onnx.GraphProto, base_dir: str | None) -> None:
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _widen_value(value)
    for tensor in graph.initializer:
        if tensor.data_type == _BF16:
            _widen_tensor(tensor, base_dir)
    for node in graph.node:
        _widen_node(node, base_dir)


def _widen_value(value: onnx.ValueInfoProto) -> None:
    if _elem_type(value) == _BF16:
        value.type.tensor_type.elem_type = _FLOAT


def _widen_node(node: onnx.NodeProto, base_dir: str | None) -> None:
    for attr in node.attribute:
        if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i == _BF16:
            attr.i = _FLOAT
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _BF16:
            _widen_tensor(attr.t, base_dir)
        elif attr.type == onnx.AttributeProto.GRAPH:
            _widen_graph(attr.g, base_dir)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for body in attr.graphs:
                _widen_graph(body, base_dir)


def _widen_tensor(tensor: onnx.TensorProto, base_dir: str | None) -> None:
    """The tensor's values as float32, in place (bfloat16 is the top half of a float32)."""
    bits = _bfloat16_bits(tensor, base_dir)
    values = (bits.astype(np.uint32) << 16).view(np.float32)
    name, dims = tensor.name, list(tensor.dims)
    tensor.Clear()
    tensor.CopyFrom(onnx.numpy_helper.from_array(values.reshape(dims), name))


def _bfloat16_bits(tensor: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_location == TensorProto.EXTERNAL:
        return np.frombuffer(_external_bytes(tensor, base_dir, 2 * count), dtype="<u2")
    if tensor.raw_data:
        return np.frombuffer(tensor.raw_data, dtype="<u2")
    return np.asarray(tensor.int32_data, dtype=np.uint16)  # one value per int32 entry


def _external_bytes(tensor: onnx.TensorProto, base_dir: str | None, size: int) -> bytes:
    info = {entry.key: entry.value for entry in tensor.external_data}
    if base_dir is None:
        raise WidenError(f"tensor '{tensor.name}' is in external data and the model's directory "
                         "is unknown")
    path = os.path.join(base_dir, info["location"])
    try:
        with open(path, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info.get("length", size)))
    except OSError as exc:
        raise WidenError(f"cannot read '{tensor.name}' from {path}: {first_line(exc)}") from None
    if len(data) != size:
        raise WidenError(f"external data of '{tensor.name}' is {len(data)} bytes, not {size}")
    return data
