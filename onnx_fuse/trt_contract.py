"""What TensorRT's ONNX parser accepts for the fused ops we emit, checked statically.

TensorRT cannot run here, so its contract (../shared/reference/tensorrt-onnx-contract.md and the
MHA fusion rules in tensorrt-working-with-transformers.txt) is checked on the written model: every
`Attention`, `RotaryEmbedding` and `TensorScatter` node gets the list of reasons TensorRT's parser
would reject it or would not give it a fused kernel. An empty list means the node meets the
documented contract.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

# Types with fused MHA kernels (the FP16/BF16/FP8 columns of the MHA fusion tables).
_FUSED_MHA_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN}
_UNSUPPORTED_ATTENTION_ATTRS = {"softcap": 0.0, "softmax_precision": None,
                                "qk_matmul_output_mode": 0}


def check_model(model: onnx.ModelProto) -> list[dict]:
    """One entry per fused-op node: {node, op, problems}."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: _initializer_type(t) for t in inferred.graph.initializer})
    io = ({v.name: v for v in model.graph.input}, {v.name for v in model.graph.output})
    checks = {"Attention": _attention, "RotaryEmbedding": _rotary,
              "TensorScatter": lambda node, types: _scatter(node, types, *io)}
    entries = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in checks:
            problems = checks[node.op_type](node, types)
            entries.append({"node": node.name, "op": node.op_type, "problems": problems})
    return entries


def _initializer_type(tensor: TensorProto):
    value = onnx.TypeProto.Tensor(elem_type=tensor.data_type)
    for dim in tensor.dims:
        value.shape.dim.add().dim_value = dim
    return value


def _rank(types, name):
    t = types.get(name)
    return len(t.shape.dim) if t is not None and t.HasField("shape") else None


def _elem(types, name):
    t = types.get(name)
    return t.elem_type if t is not None else None


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _attention(node, types) -> list[str]:
    problems = []
    inputs = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask, past_key, past_value, nonpad = inputs[:7]
    ranks = {_rank(types, name) for name in (q, k, v)}
    if ranks != {4}:
        problems.append(f"Q/K/V ranks {sorted(map(str, ranks))}: TensorRT documents 4-D inputs")
    if mask and _rank(types, mask) not in (None, 4):
        problems.append("the mask's rank differs from Q's")
    if mask and _elem(types, mask) not in (TensorProto.BOOL, _elem(types, q)):
        problems.append("the mask is neither boolean nor in Q's type")
    if past_key or past_value or nonpad:
        problems.append("past_key/past_value/nonpad_kv_seqlen inputs are unsupported")
    if len([o for o in node.output if o]) != 1:
        problems.append("only one output (no present_key/present_value/qk_matmul_output) is supported")
    attrs = _attrs(node)
    for name, default in _UNSUPPORTED_ATTRS_ITEMS:
        if name in attrs and attrs[name] != default:
            problems.append(f"attribute {name}={attrs[name]} is unsupported")
    if attrs.get("is_causal") and mask:
        problems.append("is_causal and a mask cannot both be set")
    if _elem(types, q) not in _FUSED_MHA_TYPES:
        name = TensorProto.DataType.Name(_elem(types, q) or 0).lower()
        problems.append(f"no fused MHA kernel for {name} (the build needs a decomposable attention)")
    return problems


_UNSUPPORTED_ATTRS_ITEMS = tuple(_UNSUPPORTED_ATTENTION_ATTRS.items())


def _rotary(node, types) -> list[str]:
    problems = []
    if _rank(types, node.input[0]) != 4:
        problems.append("the input is not 4-D (B, N, S, H), the form TensorRT's layer takes")
    if len(node.input) > 3 and node.input[3] and _elem(types, node.input[3]) != TensorProto.INT64:
        problems.append("position_ids are not INT64")
    rotary_dim = _attrs(node).get("rotary_embedding_dim", 0)
    if rotary_dim % 2:
        problems.append(f"rotary_embedding_dim {rotary_dim} is odd")
    return problems


def _scatter(node, types, graph_inputs: dict | None = None, graph_outputs: set | None = None) -> list[str]:
    problems = []
    if _rank(types, node.input[0]) != 4 or _rank(types, node.input[1]) != 4:
        problems.append("cache and update must be 4-D")
    attrs = _attrs(node)
    if attrs.get("axis", -2) != -2:
        problems.append(f"axis {attrs.get('axis')} (TensorRT takes -2)")
    mode = attrs.get("mode", "linear")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "linear":
        problems.append("only linear mode is supported")
    indices = node.input[2] if len(node.input) > 2 else ""
    if not indices:
        problems.append("no write indices (TensorRT takes write indices of shape [B])")
    elif _rank(types, indices) not in (None, 1):
        problems.append("write indices must have shape [B]")
    if graph_inputs is not None:
        cache = graph_inputs.get(node.input[0])
        if cache is None:
            problems.append("the cache is not a network input (TensorRT updates an input buffer in place)")
        else:
            dims = cache.type.tensor_type.shape.dim
            if len(dims) != 4 or not dims[2].HasField("dim_value"):
                problems.append("the cache's sequence length (axis -2) is not static")
    if graph_outputs is not None and node.output[0] not in graph_outputs:
        problems.append("the updated cache is not a network output (it must share the input's memory)")
    return problems


# Ops TensorRT accepts in a mask subgraph it can exploit: pointwise ops, position expressions
# and broadcasts (plus the shape arithmetic that sizes them).
_MASK_SUBGRAPH_OPS = {
    "Range", "Trilu", "Expand", "Reshape", "Tile", "Unsqueeze", "Squeeze", "Shape", "Cast",
    "Constant", "Add", "Sub", "Mul", "Div", "Where", "And", "Or", "Not", "Xor", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "Neg", "Abs", "Min", "Max", "Identity",
}
_MASKING_OPS = {"Where", "Add", "Sub"}


def causal_form_problems(model: onnx.ModelProto) -> list[dict]:
    """For each primitive attention (MatMul → ... → Softmax → MatMul): the reasons it is not in
    the form whose causal mask TensorRT can exploit; an empty list means it is."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")})
    entries = []
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        problems, masking = [], []
        node = producer.get(softmax.input[0])
        while node is not None and node.op_type != "MatMul":
            if node.op_type in _MASKING_OPS:
                masking.append(node)
            scores_input = next((i for i in node.input if i in producer and _reaches_matmul(i, producer)), None)
            node = producer.get(scores_input) if scores_input else None
        if node is None:
            continue
        if len(masking) != 1:
            problems.append(f"{len(masking)} masking ops between the MatMul and the Softmax, not 1")
        else:
            where = masking[0]
            fill = constants.get(where.input[2]) if where.op_type == "Where" else None
            if fill is None or not np.all(np.isneginf(onnx.numpy_helper.to_array(fill))):
                problems.append("the masking op is not Where(mask, scores, -inf)")
            else:
                outside = _subgraph_ops(where.input[0], producer) - _MASK_SUBGRAPH_OPS
                if outside:
                    problems.append(f"the mask subgraph uses {sorted(outside)}")
                if "Range" not in _subgraph_ops(where.input[0], producer):
                    problems.append("the mask is not built from Range positions")
        q_scale = producer.get(node.input[0])
        if q_scale is None or q_scale.op_type != "Mul":
            problems.append("Q is not scaled before the first MatMul")
        entries.append({"node": softmax.name, "problems": problems})
    return entries


def _reaches_matmul(name: str, producer: dict, depth: int = 8) -> bool:
    node = producer.get(name)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type == "MatMul":
            return True
        node = producer.get(node.input[0]) if node.input else None
    return False


def _subgraph_ops(name: str, producer: dict) -> set[str]:
    ops, stack, seen = set(), [name], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        ops.add(node.op_type)
        if node.op_type != "Shape":  # a Shape reads only its input's dims, not its values
            stack.extend(node.input)
    return ops
