"""Attention the exporter already wrote as the standard ONNX `Attention` op (opsets 23 and 24),
described as the AttentionSpec a primitive core gives (patterns/attention.py), so that every
target's emitter takes it as it is.

Who writes it: torch.onnx's dynamo exporter at opset 23 and 24 writes
scaled_dot_product_attention as `Attention` (torchlib): 4-D Q, K, V [B, N, S, H], K and V already
repeated to the query heads for grouped-query attention (Unsqueeze, Expand, Reshape), the mask
expanded to [B, 1, S, T] (boolean or additive), is_causal 0, the scale given. The op's 3-D form
(Q, K, V [B, S, N·H] with q_num_heads and kv_num_heads) is accepted too.

What the op computes (ONNX, opsets 23-24), and how the spec says it:
- softmax(scale · Q Kᵀ, softcapped, plus the mask) V, with scale 1/√H by default, K/V head h // rep
  for query head h: the spec's scale, softcap, heads; the GQA repetition in front of K/V is
  looked through as the primitive rule does.
- attn_mask boolean (True = attend) or additive of Q's type: the spec's mask, its class proven by
  evaluation exactly as the primitive rule's (masks.py). is_causal=1 without past_key: query i
  sees keys j <= i (upper left), a proven class by definition; its mask is a stand-in the emission
  builds (specs.OperandViews).
- softmax_precision: the spec's softmax type. A query row that sees no key gives 0 when its mask
  hides with -inf or False (the op's fully-masked-row rule), and the mean of V when its hidden
  entries are finite (the softmax over them is uniform). onnxruntime gives 0 for a finite fill
  equal to the lowest float too: such rows are padded tokens, which the check allows to differ.
What the spec cannot say is refused with the reason: past_key/past_value (the op's own cache
concatenation), nonpad_kv_seqlen (24), qk_matmul_output_mode other than 0, an output besides Y
that is read, is_causal together with attn_mask, a mask shorter than the keys (the op pads it
with -inf), attributes of a later opset (25's windows).

A target whose own op is ONNX Attention (Target.own_ops: target onnx) keeps these nodes as they
are (Rule.written_op); the others rewrite them into their op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fuse.graph import Graph, Node, Tensor, onnx_dtype
from onnx_fuse.masks import classify_mask_spec
from onnx_fuse.pattern import Match, op, var
from onnx_fuse.rewrite import Reject, Rule
from onnx_fuse.specs import AttentionSpec, MaskClass, MaskSpec, OperandViews

from .attention import without_head_repetition

_BOOL = 9  # onnx.TensorProto.BOOL
_ATTRIBUTES = {"is_causal", "kv_num_heads", "q_num_heads", "qk_matmul_output_mode", "scale", "softcap",
               "softmax_precision"}  # Attention-23 and -24
_UNSAID_INPUTS = {
    4: "past_key (the op concatenates its own cache)",
    5: "past_value (the op concatenates its own cache)",
    6: "nonpad_kv_seqlen (keys past each row's length hidden)",
}
_EXTRA_OUTPUTS = {1: "present_key", 2: "present_value", 3: "qk_matmul_output"}
_IS_CAUSAL = MaskClass("causal_upper_left", alignment="upper_left",
                       reason="is_causal=1 without past_key: query i sees keys j <= i (the op's definition)")

attention_op = op.Attention(var("q"), var("k"), var("v"), name="attention")


@dataclass(frozen=True)
class _Operands:
    """Q, K, V and the output as the spec takes them ([B, N, S, H]), and their head counts."""

    query: Tensor
    key: Tensor
    value: Tensor
    output: Tensor
    q_heads: int | str | None
    kv_heads: int | str | None
    head_size: int | str | None
    value_head_size: int | str | None
    views: OperandViews | None = None


def is_standard_attention(graph: Graph, node: Node) -> bool:
    """com.microsoft's Attention (packed QKV weights) is another op of the same name."""
    return (node.domain or "") == ""


def describe_attention_op(graph: Graph, m: Match) -> AttentionSpec:
    node: Node = m["attention"]
    _require_expressible(graph, node)
    dtypes = {onnx_dtype(t) for t in node.inputs[:3]}
    if len(dtypes) != 1 or None in dtypes:
        raise Reject("Q, K and V do not share one known float type")
    dtype = dtypes.pop()
    operands = _operands(graph, node)
    scale = node.attrs.get("scale")
    if scale is None:
        if not isinstance(operands.head_size, int):
            raise Reject("the default scale 1/sqrt(head size) needs a static head size")
        scale = 1.0 / math.sqrt(operands.head_size)
    if not scale > 0:  # onnxruntime's and TensorRT's attention take only a positive scale
        raise Reject(f"the scores are scaled by {scale}, not a positive factor")
    softcap = float(node.attrs.get("softcap", 0.0))
    if softcap < 0:
        raise Reject(f"softcap {softcap} is negative")
    mask, views = _mask(graph, node, operands)
    softmax_dtype = node.attrs.get("softmax_precision")
    return AttentionSpec(
        query=operands.query, key=operands.key, key_perm=None, value=operands.value,
        output=operands.output, scale=float(scale), softcap=softcap, mask=mask,
        softmax_dtype=softmax_dtype if softmax_dtype not in (None, dtype) else None,
        empty_row_output=_empty_row_output(mask), flat_output=False,
        output_dtype=onnx_dtype(node.outputs[0]) or dtype, dtype=dtype,
        q_heads=operands.q_heads, kv_heads=operands.kv_heads, head_size=operands.head_size,
        value_head_size=operands.value_head_size, written_as="Attention", views=views,
    )


def _require_expressible(graph: Graph, node: Node) -> None:
    """Reject what an AttentionSpec cannot say: inputs, outputs and attributes beyond the core."""
    unknown = sorted(set(node.attrs) - _ATTRIBUTES)
    if unknown:
        raise Reject(f"attribute {unknown[0]} is not Attention's at opsets 23-24")
    for index, what in _UNSAID_INPUTS.items():
        if len(node.inputs) > index and node.inputs[index].name:
            raise Reject(f"it takes {what}, which an attention spec does not say")
    mode = node.attrs.get("qk_matmul_output_mode", 0)
    if mode:
        raise Reject(f"qk_matmul_output_mode={mode}: the op exposes its scores, which no target writes")
    for index, what in _EXTRA_OUTPUTS.items():
        tensor = node.outputs[index] if len(node.outputs) > index else None
        if tensor is not None and tensor.name and (graph.consumers(tensor) or graph.is_graph_output(tensor)):
            raise Reject(f"its output {what} is read, and only Y is taken over")


def _operands(graph: Graph, node: Node) -> _Operands:
    q, k, v = node.inputs[:3]
    ranks = {graph.rank(t) for t in (q, k, v)}
    if ranks == {4}:
        return _operands_4d(graph, q, k, v, node.outputs[0])
    if ranks == {3}:
        return _operands_3d(graph, node, q, k, v)
    raise Reject(f"Q/K/V ranks are {sorted(r for r in ranks if r) or 'unknown'}; the op takes 3-D or 4-D")


def _operands_4d(graph: Graph, q: Tensor, k: Tensor, v: Tensor, output: Tensor) -> _Operands:
    q_heads, head_size = graph.shape(q)[1], graph.shape(q)[3]
    key, value = without_head_repetition(graph, k, v, q_heads)  # exact either way
    kv_heads, value_head_size = graph.shape(key)[1], graph.shape(value)[3]
    if isinstance(q_heads, int) and isinstance(kv_heads, int) and q_heads % kv_heads:
        raise Reject(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    return _Operands(q, key, value, output, q_heads, kv_heads, head_size,
                     value_head_size if value_head_size != head_size else None)


def _operands_3d(graph: Graph, node: Node, q: Tensor, k: Tensor, v: Tensor) -> _Operands:
    """[B, S, N·H] inputs: 4-D stand-ins for Q, K, V and Y, split and merged as the op does."""
    q_heads, kv_heads = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
    if not (isinstance(q_heads, int) and isinstance(kv_heads, int) and q_heads > 0 and kv_heads > 0):
        raise Reject("3-D attention without positive q_num_heads and kv_num_heads")
    if q_heads % kv_heads:
        raise Reject(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    (batch, queries, q_width), (_, keys, k_width), (_, _, v_width) = (graph.shape(t) for t in (q, k, v))
    widths = (q_width, k_width, v_width)
    if not all(isinstance(w, int) for w in widths) or q_width % q_heads or k_width % kv_heads \
            or v_width % kv_heads or q_width // q_heads != k_width // kv_heads:
        raise Reject(f"hidden sizes {widths} do not split into {q_heads} and {kv_heads} heads of one size")
    head_size, value_head_size = q_width // q_heads, v_width // kv_heads
    output = node.outputs[0]
    stand_ins = [_stand_in(graph, t, shape) for t, shape in (
        (q, [batch, q_heads, queries, head_size]), (k, [batch, kv_heads, keys, head_size]),
        (v, [batch, kv_heads, keys, value_head_size]), (output, [batch, q_heads, queries, value_head_size]))]
    return _Operands(*stand_ins, q_heads, kv_heads, head_size,
                     value_head_size if value_head_size != head_size else None,
                     OperandViews(packed=(q, k, v, output)))


def _stand_in(graph: Graph, tensor: Tensor, shape: list, what: str = "heads", dtype=None) -> gs.Variable:
    """A tensor the emission computes (targets/views.py), named after the one it stands for."""
    return gs.Variable(graph.fresh_name(f"{tensor.name}/{what}"), dtype or tensor.dtype, shape)


def _mask(graph: Graph, node: Node, operands: _Operands) -> tuple[MaskSpec | None, OperandViews | None]:
    """The mask (its class proven by evaluation, or is_causal's by definition) and the views."""
    views = operands.views
    given = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if node.attrs.get("is_causal", 0):
        if given is not None:
            raise Reject("is_causal=1 together with attn_mask: the spec's mask is one tensor")
        lengths = [graph.shape(operands.query)[2], graph.shape(operands.key)[2]]
        triangle = _stand_in(graph, node.outputs[0], lengths, "causal", np.bool_)
        views = OperandViews(packed=views.packed if views else None, causal_mask=True)
        return MaskSpec("keep", triangle, -np.inf, klass=_IS_CAUSAL), views
    if given is None:
        return None, views
    dtype = onnx_dtype(node.inputs[0])
    if onnx_dtype(given) == _BOOL:
        spec = MaskSpec("keep", given, -np.inf)
    elif onnx_dtype(given) == dtype:
        spec = MaskSpec("additive", given)
    else:
        raise Reject("attn_mask is neither boolean nor of Q's type")
    shape = graph.shape(given)
    if shape is None or len(shape) > 4:
        raise Reject("the mask's rank is unknown or above 4")
    q, k = node.inputs[:2]  # their dim -2 is the query and the key length, 3-D or 4-D
    keys = graph.shape(k)[-2]
    if isinstance(shape[-1], int) and isinstance(keys, int) and shape[-1] not in (1, keys):
        raise Reject(f"attn_mask covers {shape[-1]} of {keys} keys (the op hides the rest), "
                     "which the spec's mask does not say")
    spec.klass = classify_mask_spec(graph, spec, query_len=q, key_len=k)
    return spec, views


def _empty_row_output(mask: MaskSpec | None) -> str:
    """What the op gives a query row whose keys are all hidden (see the module docstring)."""
    if mask is None or mask.kind == "keep":
        return "zero"
    return "zero" if mask.klass is not None and mask.klass.hides_with_minus_inf else "mean"


RULES = [
    Rule(
        name="attention",
        anchor="Attention",
        pattern=attention_op,
        root=lambda graph, node: node.outputs[0],
        describe=describe_attention_op,
        candidate=is_standard_attention,
        written_op=True,
    )
]
