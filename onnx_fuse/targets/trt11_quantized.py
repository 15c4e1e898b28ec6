"""Quantized attention for target trt11: TRT_QuantizedAttention (trt_schema.TRT_QUANTIZED_ATTENTION).

TensorRT quantizes an IAttention when Q/DQ pairs feed all of its Q, K and V inputs and it is
given a normalization quantize scale and type for the softmax output, which must match the
pairs' type (the seed document's "Method 1" for INT8/FP8). So the source's pairs are written on
Q, K (laid out [B, N, S, H]) and V in front of the op, and the softmax output's pair becomes its
`normalization_quantize_scale` input and `normalization_quantize_to_type` attribute. The op has
Attention-23's semantics: it scales itself (`scale`) and its `is_causal` is upper-left, so a decode
step's lower-right causal mask stays an explicit mask.

The op carries a model-local function body in standard ops, which onnxruntime runs for the check:
Attention-23 giving its softmax output (qk_matmul_output_mode 3), that output through
QuantizeLinear → DequantizeLinear at the normalization scale and type (in float32), times V with its heads
repeated to the query heads.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import AttributeProto, TensorProto, helper

from ..rewrite import Rewrite
from ..specs import AttentionSpec
from ..trt_schema import DOMAIN, NORMALIZATION_QUANTIZE_TYPES, TRT_QUANTIZED_ATTENTION
from .onnx import attention_mask, finish, quantized_operands
from .trt11_functions import _Body


def refusal(spec: AttentionSpec, cp_ranks: int) -> str | None:
    """Why TRT_QuantizedAttention cannot express this quantized core, or None."""
    pairs = spec.quant.pairs()
    missing = [name for name in ("query", "key", "value", "probs") if name not in pairs]
    if missing:
        return (f"TRT_QuantizedAttention needs Q/DQ pairs on Q, K, V and the softmax output; "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not quantized")
    types = {pair.dtype for pair in pairs.values()}
    if len(types) != 1 or types.pop() not in NORMALIZATION_QUANTIZE_TYPES:
        names = sorted({TensorProto.DataType.Name(p.dtype).lower() for p in pairs.values()})
        return f"TRT_QuantizedAttention quantizes to one type, int8 or float8e4m3fn; the pairs use {', '.join(names)}"
    if any(float(pair.zero_point) != 0 for pair in pairs.values()):
        return "TensorRT's Q/DQ layers take only zero points of 0 (symmetric quantization)"
    if spec.softcap or spec.sinks is not None:
        return "TRT_QuantizedAttention has no softcap (c·tanh(s/c) on the scores) and no attention sinks"
    if cp_ranks > 1:
        return "TRT_QuantizedAttention has no nb_rank (multi-device attention)"
    return None


def emit(spec: AttentionSpec, rw: Rewrite, decomposable: bool) -> None:
    key = spec.key
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)}, dtype=key.dtype)
    probs = spec.quant.probs
    attrs = {"scale": float(spec.scale), "normalization_quantize_to_type": int(probs.dtype)}
    mask = None
    if spec.mask is not None and spec.mask.upper_left_causal:
        attrs["is_causal"] = 1
    elif spec.mask is not None and not spec.mask.hides_nothing:
        mask = attention_mask(spec, rw)
    if decomposable:
        attrs["TRT_decomposable"] = 1
    rw.function(quantized_attention_function(rw.graph.opsets.get("", 23)))
    inputs = [*quantized_operands(spec, key, rw), mask if mask is not None else gs.Variable.empty(),
              rw.const("normalization_quantize_scale", probs.scale)]
    finish(spec, TRT_QUANTIZED_ATTENTION.op_type, inputs, attrs, rw, domain=DOMAIN)


def quantized_attention_function(opset: int) -> onnx.FunctionProto:
    """TRT_QuantizedAttention's body at default-domain `opset` (23 or later: ONNX Attention)."""
    body = _Body()
    q, k, v, mask, norm_scale = TRT_QUANTIZED_ATTENTION.inputs
    attention = helper.make_node("Attention", [q, k, v, mask], ["unused", "", "", "probs"],
                                 qk_matmul_output_mode=3)
    attention.attribute.extend(AttributeProto(name=name, ref_attr_name=name, type=kind) for name, kind in
                               (("scale", AttributeProto.FLOAT), ("is_causal", AttributeProto.INT)))
    body.nodes.append(attention)
    # In float32, which divides exactly at every opset (exact_quantize.py), then back to Q's type.
    scale = body.op("Cast", norm_scale, to=TensorProto.FLOAT)
    zero_point = body.referring("Cast", [body.const(np.float32(0))],
                                {"to": ("normalization_quantize_to_type", AttributeProto.INT)})
    codes = body.op("QuantizeLinear", body.op("Cast", "probs", to=TensorProto.FLOAT), scale, zero_point)
    quantized = body.op("CastLike", body.op("DequantizeLinear", codes, scale, zero_point), "probs")
    body.op("MatMul", quantized, _heads_repeated(body, q, v))
    body.nodes[-1].output[0] = "Y"
    function = helper.make_function(DOMAIN, TRT_QUANTIZED_ATTENTION.op_type, list(TRT_QUANTIZED_ATTENTION.inputs),
                                    ["Y"], body.nodes, [helper.make_opsetid("", opset)], doc_string=__doc__)
    for name, (_, default) in TRT_QUANTIZED_ATTENTION.attributes.items():
        if default is None:
            function.attribute.append(name)
        else:
            function.attribute_proto.append(helper.make_attribute(name, default))
    return function


def _heads_repeated(body: _Body, q: str, v: str) -> str:
    """V [B, Nkv, S, H] with each head repeated next to itself up to Q's Nq heads (GQA)."""
    q_heads, kv_heads = body.op("Shape", q, start=1, end=2), body.op("Shape", v, start=1, end=2)
    batch, tail = body.op("Shape", v, start=0, end=1), body.op("Shape", v, start=2, end=4)
    wide = body.op("Unsqueeze", v, body.const([2]))
    repeats = body.op("Concat", batch, kv_heads, body.op("Div", q_heads, kv_heads), tail, axis=0)
    merged = body.op("Concat", batch, q_heads, tail, axis=0)
    return body.op("Reshape", body.op("Expand", wide, repeats), merged)
