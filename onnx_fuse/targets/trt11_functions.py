"""Model-local function bodies for TRT_Attention and TRT_KVCacheUpdate, in standard ops.

TensorRT's parser imports these ops by op_type and never looks at the bodies; onnxruntime, which
has no such ops, runs the bodies instead, which is how the check proves a trt11 model (Proof
"functions"). One body serves every node of the model, so it computes the op's semantics from
the node's attributes (referenced, with the schema's defaults) and from which optional inputs the
node gives:

- TRT_Attention (trt_schema.TRT_ATTENTION, padded form): softmax(Q Kᵀ masked) V, no scaling.
  With an attn_mask: the mask alone (TensorRT takes no causal kind beside a mask). Without one:
  key j of row b is visible from query i iff j < kv_lengths[b] (every key when kv_lengths is
  absent) and, by causal_kind, j <= i ("upper_left") or j <= i + end_b - Sq ("lower_right",
  end_b as trt_schema.LOWER_RIGHT_ALIGNS_TO says). Packed forms, query_lengths and
  TRT_normalization_op "none" are not computed: the trt11 target does not write them.
- TRT_KVCacheUpdate (trt_schema.TRT_KV_CACHE_UPDATE, padded form): TensorScatter of the update
  into the cache at write_indices[b] along axis -2.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from ..trt_schema import DOMAIN, LOWER_RIGHT_ALIGNS_TO, TRT_ATTENTION, TRT_KV_CACHE_UPDATE, OpSchema

class _Body:
    """The nodes of a function body, written one op at a time."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        name = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const(self, value) -> str:
        array = np.asarray(value)
        name = f"const_{len(self.nodes)}"
        self.nodes.append(helper.make_node("Constant", [], [name],
                                           value=numpy_helper.from_array(array, name)))
        return name

    def referring(self, op_type: str, inputs: list[str], refs: dict[str, tuple[str, int]]) -> str:
        """A node whose attributes are the calling node's: {attribute: (its name there, type)}."""
        name = self.op(op_type, *inputs)
        self.nodes[-1].attribute.extend(AttributeProto(name=attribute, ref_attr_name=ref, type=kind)
                                        for attribute, (ref, kind) in refs.items())
        return name


def _function(schema: OpSchema, body: _Body, opset: int, doc: str) -> onnx.FunctionProto:
    """The body's last node computes the output, Y."""
    body.nodes[-1].output[0] = "Y"
    function = helper.make_function(DOMAIN, schema.op_type, list(schema.inputs), ["Y"], body.nodes,
                                    [helper.make_opsetid("", opset)], doc_string=doc)
    for name, (_, default) in schema.attributes.items():
        function.attribute_proto.append(helper.make_attribute(name, default))
    return function


def attention_function(opset: int) -> onnx.FunctionProto:
    """TRT_Attention's body at default-domain `opset` (23 or later: ONNX Attention)."""
    body = _Body()
    q, k, v, mask, _, kv_lengths = TRT_ATTENTION.inputs
    visible = _visibility(body, q, k, kv_lengths)
    by_kind = body.op("Attention", q, k, v, visible, scale=1.0)
    by_mask = body.op("Attention", q, k, v, mask, scale=1.0)  # an absent mask: no masking
    body.op("Where", body.op("OptionalHasElement", mask), by_mask, by_kind)
    return _function(TRT_ATTENTION, body, opset, __doc__)


def _visibility(body: _Body, q: str, k: str, kv_lengths: str) -> str:
    """Boolean [B, 1, Sq, Skv]: what causal_kind and kv_lengths let query i of row b see."""
    q_len = body.op("Shape", q, start=2, end=3)
    k_len = body.op("Shape", k, start=2, end=3)
    valid = _valid_keys(body, k_len, body.op("Shape", q, start=0, end=1), kv_lengths)
    lengths = body.op("Cast", body.op("ReduceSum", valid, body.const([1]), keepdims=1),
                      to=TensorProto.INT64)  # [B, 1]: valid keys per row
    zero, one = body.const(np.int64(0)), body.const(np.int64(1))
    rows = body.op("Unsqueeze", body.op("Range", zero, body.op("Squeeze", q_len), one), body.const([0, 2]))
    cols = body.op("Unsqueeze", body.op("Range", zero, body.op("Squeeze", k_len), one), body.const([0, 1]))
    end = lengths if LOWER_RIGHT_ALIGNS_TO == "kv_lengths" else k_len
    shift = body.op("Reshape", body.op("Sub", end, q_len), body.const([-1, 1, 1]))
    lower_right = body.op("LessOrEqual", cols, body.op("Add", rows, shift))  # [B, Sq, Skv]
    upper_left = body.op("LessOrEqual", cols, rows)  # [1, Sq, Skv]
    kind = body.referring("Constant", [], {"value_string": ("causal_kind", AttributeProto.STRING)})
    is_upper_left = body.op("Equal", kind, body.const(np.array("upper_left", dtype=object)))
    is_lower_right = body.op("Equal", kind, body.const(np.array("lower_right", dtype=object)))
    # (Where has no boolean kernel in onnxruntime: the choice is written in logic ops.)
    causal = body.op("Or", body.op("And", is_upper_left, upper_left),
                     body.op("And", is_lower_right, lower_right))
    causal = body.op("Or", causal, body.op("Not", body.op("Or", is_upper_left, is_lower_right)))
    in_row = body.op("Unsqueeze", body.op("Cast", valid, to=TensorProto.BOOL), body.const([1]))
    return body.op("Unsqueeze", body.op("And", causal, in_row), body.const([1]))


def _valid_keys(body: _Body, k_len: str, batch: str, kv_lengths: str) -> str:
    """Float [B, Skv]: 1 where key j < kv_lengths[b], 1 everywhere when kv_lengths is absent.

    ONNX has no op that reads an optional input's value when it is given and a default when it
    is not, except ops with such an input of their own. RNN's sequence_lens is one, with exactly
    this meaning (per-row int32 lengths; steps past a row's length output 0; absent: all steps):
    a one-unit RNN whose every step outputs relu(0 + 1) = 1 yields the valid keys."""
    steps = body.op("ConstantOfShape", body.op("Concat", k_len, batch, body.const([1]), axis=0),
                    value=numpy_helper.from_array(np.zeros(1, np.float32)))
    weights = body.const(np.zeros((1, 1, 1), np.float32))
    bias = body.const(np.array([[1.0, 0.0]], np.float32))
    outputs = body.op("RNN", steps, weights, weights, bias, kv_lengths, hidden_size=1,
                      activations=["Relu"])  # [Skv, 1, B, 1]
    return body.op("Transpose", body.op("Squeeze", outputs, body.const([1, 3])), perm=[1, 0])


def kv_cache_update_function(opset: int) -> onnx.FunctionProto:
    """TRT_KVCacheUpdate's body at default-domain `opset` (24 or later: TensorScatter)."""
    body = _Body()
    cache, update, write_indices, _ = TRT_KV_CACHE_UPDATE.inputs
    indices = body.op("Cast", write_indices, to=TensorProto.INT64)  # TensorScatter takes int64
    body.referring("TensorScatter", [cache, update, indices],
                   {"axis": ("axis", AttributeProto.INT), "mode": ("mode", AttributeProto.STRING)})
    return _function(TRT_KV_CACHE_UPDATE, body, opset,
                     "TRT_KVCacheUpdate in standard ops: TensorScatter at write_indices (int32 [B]) "
                     "along the cache's axis -2.")
