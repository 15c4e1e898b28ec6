"""Attention left as MatMul → ... → Softmax → MatMul, which TensorRT fuses into one MHA kernel
itself when the seed's restrictions hold (tensorrt-working-with-transformers.txt, "Multi-Head
Attention Fusion" and "Exploiting Sparsity in Attention Masks"):

- a type with fused kernels (FP16, BF16, FP8);
- only pointwise ops between the first MatMul and the Softmax;
- the scale on Q (or K) before the first MatMul;
- to skip masked blocks: exactly one masking op (Where, Add or Sub) that leaves visible scores
  as they are and makes hidden ones -inf, its mask built from Range positions by pointwise ops,
  position expressions and broadcasts;
- quantized (INT8/FP8, any Q/DQ pair in the core): a pair on each input of both MatMuls and none
  on the scores (trt_qdq.py).
"""

from __future__ import annotations

import onnx

from . import trt_qdq
from .trt_facts import FUSED_MHA_TYPES, KERNEL, Facts, Finding, type_name
from .trt_layers import scaled_by_constant

LAYER = "MHA fusion (MatMul-Softmax-MatMul)"
# The rules of the causal form TensorRT can exploit (target primitive-trt's contract).
CAUSAL_FORM_RULES = ("masking", "mask_form", "scale")

_POINTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Tanh", "Relu", "Sigmoid", "Neg", "Abs", "Exp",
              "Log", "Sqrt", "Pow", "Max", "Min", "Erf", "Clip", "Identity", "Constant", "Not",
              "And", "Or", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Softplus"}
# Ops a mask subgraph TensorRT can exploit may use: pointwise ops, position expressions and
# broadcasts (plus the shape arithmetic that sizes them).
_MASK_SUBGRAPH_OPS = _POINTWISE | {"Range", "Trilu", "Expand", "Reshape", "Tile", "Unsqueeze",
                                   "Squeeze", "Shape", "Cast", "Xor"}
_MASKING_OPS = {"Where", "Add", "Sub"}
# Slice: a sink column dropped; a Q/DQ pair: the quantized softmax output
_BETWEEN_SOFTMAX_AND_MATMUL = {"Cast", "Where", "IsNaN", "Slice", "QuantizeLinear", "DequantizeLinear"}


def primitive_attentions(facts: Facts, model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list, onnx.NodeProto]]:
    """(Softmax, the ops between it and the first MatMul, that MatMul) for every Softmax that sits
    between two MatMuls."""
    found = []
    for softmax in (n for n in facts.nodes if n.op_type == "Softmax"):
        chain, matmul = _scores_chain(facts, softmax)
        if matmul is not None and _product_with_v(facts, softmax.output[0]) is not None:
            found.append((softmax, chain, matmul))
    return found


def primitive_findings(facts: Facts, chain: list, matmul: onnx.NodeProto,
                       softmax: onnx.NodeProto | None = None) -> list[Finding]:
    found = _quantization(facts, chain, matmul, softmax) if softmax is not None else []
    dtype = facts.elem(matmul.input[0])
    if dtype is not None and dtype not in FUSED_MHA_TYPES:
        found.append(Finding("dtype", f"no fused MHA kernel for {type_name(dtype)}", KERNEL))
    others = sorted({n.op_type for n in chain} - _POINTWISE)
    if others:
        found.append(Finding("pointwise", f"{', '.join(others)} between the first MatMul and the Softmax: "
                                          "MHA fusion takes pointwise ops only", KERNEL))
    found += _masking(facts, chain)
    if not (scaled_by_constant(facts, matmul.input[0]) or scaled_by_constant(facts, matmul.input[1])):
        found.append(Finding("scale", "Q is not scaled before the first MatMul", KERNEL))
    return found


def _quantization(facts: Facts, chain: list, matmul: onnx.NodeProto, softmax: onnx.NodeProto) -> list[Finding]:
    """Where the Q/DQ pairs of a quantized core sit (none: not quantized, nothing to say)."""
    product = _product_with_v(facts, softmax.output[0])
    operands = {"Q": matmul.input[0], "Kᵀ": matmul.input[1], "the softmax output": product.input[0],
                "V": product.input[1]}
    scores = trt_qdq.scores_findings(chain)
    if not scores and all(trt_qdq.pair_at(facts, name) is None for name in operands.values()):
        return []
    found, _ = trt_qdq.operand_findings(facts, operands)
    return scores + found


def _masking(facts: Facts, chain: list) -> list[Finding]:
    masking = [n for n in chain if n.op_type in _MASKING_OPS]
    if len(masking) != 1:
        return [Finding("masking", f"{len(masking)} masking ops between the MatMul and the Softmax, not 1",
                        KERNEL)]
    mask = _minus_inf_mask(facts, masking[0])
    if mask is None:
        return [Finding("masking", "the masking op is not Where(mask, scores, -inf)", KERNEL)]
    found = []
    ops = _subgraph_ops(facts, mask)
    outside = sorted(ops - _MASK_SUBGRAPH_OPS)
    if outside:
        found.append(Finding("mask_form", f"the mask subgraph uses {outside}", KERNEL))
    if "Range" not in ops:
        found.append(Finding("mask_form", "the mask is not built from Range positions", KERNEL))
    return found


def _minus_inf_mask(facts: Facts, node: onnx.NodeProto) -> str | None:
    """The boolean mask of Where(mask, scores, -inf), or of scores + Where(mask, 0, -inf)."""
    if node.op_type == "Where" and _all_minus_inf(facts, node.input[2]):
        return node.input[0]
    if node.op_type == "Add":
        for operand in node.input:
            where = facts.producer.get(operand)
            if where is not None and where.op_type == "Where" and _all_minus_inf(facts, where.input[2]):
                value = facts.value(where.input[1])
                if value is not None and not value.any():
                    return where.input[0]
    return None


def _all_minus_inf(facts: Facts, name: str) -> bool:
    value = facts.value(name)
    return value is not None and value.size > 0 and bool((value == float("-inf")).all())


def _scores_chain(facts: Facts, softmax: onnx.NodeProto) -> tuple[list, onnx.NodeProto | None]:
    """The nodes from the Softmax's input back to the MatMul of Q and Kᵀ (following the input
    that leads there), and that MatMul; None if there is none within a few ops."""
    chain, node = [], facts.producer.get(softmax.input[0])
    for _ in range(12):
        if node is None:
            return chain, None
        if node.op_type == "MatMul":
            return chain, node
        chain.append(node)
        node = next((facts.producer[i] for i in node.input if i in facts.producer
                     and _leads_to_matmul(facts, i)), None)
    return chain, None


def _leads_to_matmul(facts: Facts, name: str, depth: int = 8) -> bool:
    """A MatMul produces `name` within `depth` ops, through any of their inputs (the scores are
    Where's second input, not its first)."""
    frontier = [name]
    for _ in range(depth):
        nodes = [facts.producer[t] for t in frontier if t in facts.producer]
        if any(n.op_type == "MatMul" for n in nodes):
            return True
        frontier = [i for n in nodes if n.op_type not in ("Shape", "Size") for i in n.input if i][:64]
    return False


def _product_with_v(facts: Facts, name: str) -> onnx.NodeProto | None:
    """The MatMul whose first input the Softmax's output reaches through Casts, a NaN guard, a
    Q/DQ pair and the Slice that drops a learned sink's column; None if there is none."""
    frontier = [name]
    for _ in range(6):
        following = []
        for tensor in frontier:
            for user in facts.consumers.get(tensor, []):
                if user.op_type == "MatMul" and user.input[0] == tensor:
                    return user
                if user.op_type in _BETWEEN_SOFTMAX_AND_MATMUL:
                    following.append(user.output[0])
        frontier = following
    return None


def _subgraph_ops(facts: Facts, name: str) -> set[str]:
    ops, stack, seen = set(), [name], set()
    while stack:
        node = facts.producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        ops.add(node.op_type)
        if node.op_type != "Shape":  # a Shape reads only its input's dims, not its values
            stack.extend(node.input)
    return ops
