"""Where TensorRT takes the Q/DQ pairs of a quantized attention (the seed document
tensorrt-working-with-transformers.txt, "Multi-Head Attention Fusion"):

- Method 1, IAttention (TRT_QuantizedAttention): "Q/DQ pairs following Explicit Quantization rules
  must be used for all query, key and value inputs", with a normalization quantize scale and type
  that "have to match the data types of the Q/DQ pairs".
- Method 2, MatMul-Softmax-MatMul: "Specify Q/DQ layers in the MHA pattern for FP8 and INT8": one
  pair on each input of both MatMuls (Q, Kᵀ, the softmax output, V) and only pointwise ops between
  the first MatMul and the Softmax, so no pair on the scores.

Each pair is per tensor, int8 or float8e4m3fn, zero point 0 (TensorRT's Q/DQ layers are
symmetric), the same scale on both nodes. A pair means a DequantizeLinear reading a
QuantizeLinear, directly in front of the input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .trt_facts import KERNEL, Facts, Finding, type_name

RULE = "quantization"
QUANTIZED_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)


def pair_at(facts: Facts, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(QuantizeLinear, DequantizeLinear) whose DequantizeLinear produces `name`, or None."""
    dequantize = facts.producer.get(name)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    quantize = facts.producer.get(dequantize.input[0])
    return (quantize, dequantize) if quantize is not None and quantize.op_type == "QuantizeLinear" else None


def pair_type(facts: Facts, pair) -> int | None:
    """The quantized type of a pair (its zero point's; uint8 without one)."""
    quantize, _ = pair
    if len(quantize.input) > 2 and quantize.input[2]:
        return facts.elem(quantize.input[2])
    return TensorProto.UINT8


def operand_findings(facts: Facts, names: dict[str, str]) -> tuple[list[Finding], set[int]]:
    """Findings for inputs that each need a Q/DQ pair ({what: tensor name}), and the quantized
    types of those that have one."""
    found, types = [], set()
    for what, name in names.items():
        pair = pair_at(facts, name)
        if pair is None:
            found.append(Finding(RULE, f"{what} has no Q/DQ pair in front of it: a quantized attention "
                                       "needs one on each of Q, K, V and the softmax output", KERNEL))
            continue
        types.add(pair_type(facts, pair))
        found += [Finding(RULE, f"the Q/DQ pair on {what}: {problem}", KERNEL) for problem in _problems(facts, pair)]
    if len(types) > 1:
        found.append(Finding(RULE, "the Q/DQ pairs quantize to different types "
                                   f"({', '.join(sorted(type_name(t) for t in types))})", KERNEL))
    return found, types


def _problems(facts: Facts, pair) -> list[str]:
    quantize, dequantize = pair
    problems = []
    if pair_type(facts, pair) not in QUANTIZED_TYPES:
        problems.append(f"type {type_name(pair_type(facts, pair))}, not int8 or float8e4m3fn")
    scales = [facts.value(node.input[1]) for node in pair]
    if any(s is None or s.size != 1 for s in scales):
        problems.append("its scale is not one constant (per-tensor) value")
    elif float(scales[0].reshape(-1)[0]) != float(scales[1].reshape(-1)[0]):
        problems.append("QuantizeLinear and DequantizeLinear have different scales")
    zero_points = [facts.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
                   for node in pair]
    if any(z is None or np.any(z.astype(np.float64) != 0) for z in zero_points):
        problems.append("its zero point is not 0")
    return problems


def scores_findings(chain: list) -> list[Finding]:
    """A pair among the ops between the first MatMul and the Softmax."""
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in chain):
        return [Finding(RULE, "a Q/DQ pair sits on the scores (between the first MatMul and the "
                              "Softmax): MHA fusion takes Q/DQ only on Q, K, V and the softmax output", KERNEL)]
    return []
