"""Quantized attention: QuantizeLinear → DequantizeLinear pairs on the operands of its products.

NVIDIA ModelOpt's ONNX quantizer (int8 and fp8 modes) writes one Q/DQ pair on each input of the
two attention MatMuls: Q and Kᵀ (after their head transposes) and the softmax output and V. That
is also where TensorRT's MHA fusion takes them (one pair per Q, K and V input and a quantize of
the normalized scores). The attention pattern matches each operand plain or through a pair
(`operand`); `describe_quantization` turns the pairs into an AttentionQuant and refuses pairs
anywhere else (on the scores) and dynamic quantization (DynamicQuantizeLinear, Sage-style), which
no target re-expresses: those cores stay as they are, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fuse.graph import Graph, onnx_dtype
from onnx_fuse.pattern import Match, either, op
from onnx_fuse.rewrite import Reject
from onnx_fuse.specs import AttentionQuant, QuantSpec

# The operands a pair may quantize, by capture name, and how reasons name them.
OPERANDS = {"q": "Q", "k": "K", "v": "V", "probs": "the softmax output"}
# Pairs the pattern accepts only to refuse them with a precise reason (capture name: where).
MISPLACED = {
    "qk_product": "on the Q·Kᵀ product before its scale",
    "scaled_scores": "on the scaled scores before the mask",
    "masked_scores": "on the scores right before the Softmax",
}


def dequantized(x, name: str):
    """x through a QuantizeLinear → DequantizeLinear pair, captured as `name`_quantize and
    `name`_dequantize."""
    return op.DequantizeLinear(op.QuantizeLinear(x, name=f"{name}_quantize"), name=f"{name}_dequantize")


def quantized(x, name: str):
    """x, or x through a Q/DQ pair."""
    return either(dequantized(x, name), x)


def operand(plain, inner, name: str):
    """A MatMul operand: `inner` through a Q/DQ pair, or through DynamicQuantizeLinear and its
    DequantizeLinear (Sage-style), or `plain`. A factor inside a pair is part of what it rounds,
    so `inner` matches no scale: such a factor stays in the operand, out of the attention's scale."""
    dynamic = op.DequantizeLinear(op.DynamicQuantizeLinear(inner, name=f"{name}_dynamic"))
    return either(dequantized(inner, name), dynamic, plain)


def describe_quantization(graph: Graph, m: Match) -> AttentionQuant | None:
    """The match's Q/DQ pairs as an AttentionQuant (None for an unquantized core); Reject for
    pairs TensorRT's MHA fusion does not take and for dynamic quantization."""
    for name, where in MISPLACED.items():
        if f"{name}_quantize" in m.captures:
            raise Reject(f"a Q/DQ pair sits {where}: TensorRT's MHA fusion takes them only on Q, K, V "
                         "and the softmax output, so the quantized core is left as it is")
    dynamic = [what for name, what in OPERANDS.items() if f"{name}_dynamic" in m.captures]
    if dynamic:
        raise Reject(f"{', '.join(dynamic)} quantized dynamically (DynamicQuantizeLinear, Sage-style "
                     "attention): left as it is, since TensorRT's parser takes no DynamicQuantizeLinear")
    pairs = {name: _pair(graph, m, name) for name in OPERANDS}
    if not any(pairs.values()):
        return None
    return AttentionQuant(query=pairs["q"], key=pairs["k"], value=pairs["v"], probs=pairs["probs"])


def _pair(graph: Graph, m: Match, name: str) -> QuantSpec | None:
    if f"{name}_quantize" not in m.captures:
        return None
    what = OPERANDS[name]
    quantize, dequantize = m[f"{name}_quantize"], m[f"{name}_dequantize"]
    q_params, dq_params = _parameters(graph, quantize, what), _parameters(graph, dequantize, what)
    if not _same_parameters(q_params, dq_params):
        raise Reject(f"the Q/DQ pair on {what} quantizes and dequantizes with different scales or zero points")
    scale, zero_point = q_params
    if onnx_dtype(quantize.inputs[0]) != onnx_dtype(dequantize.outputs[0]):
        raise Reject(f"the Q/DQ pair on {what} also changes its float type")
    return QuantSpec(scale=scale.reshape(()), zero_point=zero_point.reshape(()),
                     saturate=bool(quantize.attrs.get("saturate", 1)), tensor=quantize.inputs[0].name)


def _parameters(graph: Graph, node, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of a QuantizeLinear or DequantizeLinear, both constant scalars."""
    scale = graph.value(node.inputs[1])
    if scale is None:
        raise Reject(f"the Q/DQ scale of {what} is computed, not a constant")
    if scale.size != 1 or node.attrs.get("block_size", 0):
        raise Reject(f"{what} is quantized per channel or per block: only per-tensor Q/DQ pairs are "
                     "fused (they commute with the transposes and head repetition moved around them)")
    has_zero_point = len(node.inputs) > 2 and node.inputs[2].name
    zero_point = graph.value(node.inputs[2]) if has_zero_point else _default_zero_point(node)
    if zero_point is None:
        raise Reject(f"the Q/DQ zero point of {what} is computed, not a constant")
    return np.asarray(scale), np.asarray(zero_point)


def _default_zero_point(node) -> np.ndarray:
    """ONNX's zero point when none is given: 0 of `output_dtype` (QuantizeLinear, opset 21+), else uint8."""
    dtype = node.attrs.get("output_dtype", 0) or onnx.TensorProto.UINT8
    return np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(dtype))


def _same_parameters(a: tuple, b: tuple) -> bool:
    return all(x.dtype == y.dtype and x.reshape(-1).tobytes() == y.reshape(-1).tobytes() for x, y in zip(a, b))
