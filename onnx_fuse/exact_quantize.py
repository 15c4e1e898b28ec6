"""QuantizeLinear as ONNX defines it, for the checker: round(x / scale) with x / scale exact.

onnxruntime's CPU QuantizeLinear divides float16 inputs in float32 at opset 19 and in float16
from opset 21 on (measured with onnxruntime 1.32: 1.5% of the int8 codes of random float16
values differ between the two). A quantized float16 model (ModelOpt's default) therefore computes
other codes, and outputs that differ by whole quantization steps, when the pass raises its opset
to 23, although the conversion changed nothing ONNX defines. The checker runs every model with
each float16 or bfloat16 QuantizeLinear fed in float32 (x and scale cast up, which divides as
exactly as float32 can at every opset), so that source and result are compared on what they mean,
not on which kernel an opset picks. Such models also run without onnxruntime's graph
optimizations, whose QDQ fusions replace DequantizeLinear → MatMul → QuantizeLinear by integer
kernels that round their requantization otherwise (and fire on some structures and opsets, not
others). Only the models the checker runs are changed; nothing is written this way.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

_NARROW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
# The relative size of one unit in the last place (at 1.0) of the float types a Q/DQ pair rounds.
_EPSILON = {TensorProto.FLOAT: 2.0 ** -23, TensorProto.FLOAT16: 2.0 ** -10, TensorProto.BFLOAT16: 2.0 ** -7}


def exactly_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its narrow-float QuantizeLinear nodes fed in float32 (the model itself when it
    has none). Nodes inside If/Loop/Scan bodies and functions are left as they are."""
    return _quantizers_rewritten(model, _NARROW, lambda node, index, dtype, nodes: _fed_in_float32(node, nodes))


def nudged(model: onnx.ModelProto, direction: int) -> onnx.ModelProto:
    """`model` with every QuantizeLinear's input x moved by one unit in the last place of its float
    type, up (direction 1) or down (-1), in float32: what a rewrite that only reorders float
    arithmetic does to the values a quantizer rounds. The check's tolerance for quantized models
    is the output change it causes (check.quantization_noise)."""
    return _quantizers_rewritten(model, tuple(_EPSILON), lambda node, index, dtype, nodes: _moved(
        node, index, 1.0 + direction * _EPSILON[dtype], nodes))


def has_quantize(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def _quantizers_rewritten(model: onnx.ModelProto, types: tuple, rewrite) -> onnx.ModelProto:
    """A copy of `model` whose default-domain QuantizeLinear nodes with an input x of one of `types`
    are replaced by rewrite(node, index, x's type, nodes), which appends the nodes it needs before
    them; `model` itself when there are none."""
    if not has_quantize(model):
        return model
    known = _value_types(model)
    nodes, changed = [], False
    for index, node in enumerate(model.graph.node):
        dtype = known.get(node.input[0]) if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") else None
        if dtype in types:
            node, changed = rewrite(node, index, dtype, nodes), True
        nodes.append(node)
    if not changed:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _fed_in_float32(node: onnx.NodeProto, nodes: list) -> onnx.NodeProto:
    """A copy of the QuantizeLinear reading x and y_scale through Casts to float32 (appended to
    `nodes`); the zero point keeps the quantized type."""
    wide = onnx.NodeProto()
    wide.CopyFrom(node)
    for index in (0, 1):
        name = f"{node.input[index]}__float32_for_{node.output[0]}"
        nodes.append(helper.make_node("Cast", [node.input[index]], [name], to=TensorProto.FLOAT))
        wide.input[index] = name
    return wide


def _moved(node: onnx.NodeProto, index: int, factor: float, nodes: list) -> onnx.NodeProto:
    """A copy of the QuantizeLinear reading float32(x) · factor (its scale in float32 too)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    wide, scale, by = (f"{name}__moved_{index}" for name in ("x", "scale", "factor"))
    nodes.append(helper.make_node("Cast", [node.input[0]], [wide], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Cast", [node.input[1]], [scale], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Constant", [], [by], value=helper.make_tensor(by, TensorProto.FLOAT, [], [factor])))
    nodes.append(helper.make_node("Mul", [wide, by], [wide + "_times"]))
    copy.input[0], copy.input[1] = wide + "_times", scale
    return copy


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the graph's inputs, initializers, Constants and inferred values."""
    graph = onnx.shape_inference.infer_shapes(model, data_prop=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types
