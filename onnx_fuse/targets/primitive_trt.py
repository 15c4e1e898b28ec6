"""Target "primitive-trt": attention stays MatMul/Softmax/MatMul, written in the canonical form
TensorRT's own MHA fusion recognises and can skip the masked half of (see "Exploiting Sparsity
in Attention Masks" in the TensorRT transformers guide):

- the scale is applied to Q before the first MatMul;
- the causal mask is a Range-based `q >= kv` comparison built from pointwise, Range and Expand
  ops only (sliding windows and padding are further pointwise conditions on the same mask);
- exactly one masking op, a Where with -inf where masked, sits between the first MatMul and
  the Softmax (a softcap, c · tanh(s / c), is pointwise and may precede it).

Only attentions whose mask was proven causal (masks.py) are rewritten. -inf masking makes a
query row whose keys are all hidden (left padding) NaN; a pointwise Where after the Softmax gives
such rows what the original gave them: zeros (torch's SDPA export) or uniform weights (eager
exports, whose finite fill makes the softmax uniform).

Quantized attention (the seed's Method 2 for INT8/FP8): each Q/DQ pair of the source goes straight
onto the MatMul input TensorRT's MHA fusion wants it on: Q (the scale moved into it, and into its
pair's scale, so the same integers are rounded), Kᵀ, V (after the head repetition) and the softmax
output. Any mask is rewritten then, since the fusion takes any masking for INT8/FP8: causal ones
into the form above, the others kept as the source wrote them.
"""

from __future__ import annotations

import numpy as np
import onnx

from .. import trt_contract
from ..graph import Tensor, onnx_dtype
from ..rewrite import Reject, Rewrite
from ..specs import AttentionQuant, AttentionSpec
from .base import Target
from .onnx import finish, scaled
from .qdq import fake_quantized, rescaled


def emit_attention(spec: AttentionSpec, rw: Rewrite) -> None:
    klass = spec.mask.klass if spec.mask is not None else None
    quant = spec.quant or AttentionQuant(None, None, None, None)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
    query = scaled(spec.query, spec.scale, spec.dtype, rw)
    query = fake_quantized(query, rescaled(quant.query, spec.scale), rw)
    key, value = spec.key, spec.value
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)})
    key, value = (_repeat_heads(spec, t, rw) for t in (key, value))
    key_t = fake_quantized(rw.op("Transpose", [key], {"perm": [0, 1, 3, 2]}), quant.key, rw)
    scores = rw.op("MatMul", [query, key_t])
    if spec.softcap:  # c · tanh(s / c): pointwise ops, which the MHA pattern allows in series
        cap = rw.const("softcap", np.array(spec.softcap, np_type))
        scores = rw.op("Mul", [rw.op("Tanh", [rw.op("Div", [scores, cap])]), cap])
    masked = _masked(spec, scores, rw)
    if spec.softmax_dtype is not None:
        masked = rw.op("Cast", [masked], {"to": spec.softmax_dtype})
    probs = rw.op("Softmax", [masked], {"axis": -1})
    if spec.softmax_dtype is not None:
        probs = rw.op("Cast", [probs], {"to": spec.dtype})
    if klass is not None and klass.empty_rows and spec.empty_row_output != "nan":
        # -inf masking makes an all-hidden row NaN: give it what the original gave, zeros or
        # the uniform weights 1/Skv that average V.
        if spec.empty_row_output == "zero":
            fill = rw.const("zero", np.zeros((), np_type))
        else:
            keys = rw.op("Cast", [rw.op("Shape", [value], {"start": 2, "end": 3})], {"to": spec.dtype})
            fill = rw.op("Reciprocal", [keys])
        probs = rw.op("Where", [rw.op("IsNaN", [probs]), fill, probs])
    probs = fake_quantized(probs, quant.probs, rw)
    finish(spec, "MatMul", [probs, fake_quantized(value, quant.value, rw)], {}, rw)


def _masked(spec: AttentionSpec, scores: Tensor, rw: Rewrite) -> Tensor:
    """The scores masked: one -inf Where of the Range-built visibility for a causal mask, else
    (a quantized core; refusal() lets no other through) as the source masked them."""
    mask, np_type = spec.mask, onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
    if mask is None or mask.hides_nothing:
        return scores
    if mask.klass is not None and mask.klass.causal and mask.bias is None:
        visible = rw.shared(("trt_causal_mask", id(mask.tensor), mask.klass),
                            lambda: _causal_visibility(spec, rw))
        return rw.op("Where", [visible, scores, rw.const("minus_inf", np.array(-np.inf, np_type))])
    if mask.kind == "additive":
        if mask.bias is not None:
            scores = rw.op("Add", [scores, mask.bias])
        if onnx_dtype(mask.tensor) != spec.dtype:  # added in the softmax's type
            scores = rw.op("Cast", [scores], {"to": onnx_dtype(mask.tensor)})
        return rw.op("Add", [scores, mask.tensor])
    fill = rw.const("mask_fill", np.array(mask.fill, np_type))
    return rw.op("Where", [mask.tensor, scores, fill] if mask.kind == "keep" else [mask.tensor, fill, scores])


def _repeat_heads(spec: AttentionSpec, tensor: Tensor, rw: Rewrite) -> Tensor:
    """K/V heads repeated next to each other up to the query heads (grouped-query attention)."""
    if spec.kv_heads == spec.q_heads:
        return tensor
    shape = rw.graph.shape(tensor)
    head_size = shape[3] if shape is not None and len(shape) == 4 else None
    if not all(isinstance(d, int) for d in (spec.q_heads, spec.kv_heads, head_size)):
        raise Reject("grouped-query attention with unknown head counts or head size")
    rep = spec.q_heads // spec.kv_heads
    wide = rw.op("Unsqueeze", [tensor, rw.const("head_axis", np.array([2], np.int64))])
    wide = rw.op("Expand", [wide, rw.const("repeat", np.array([1, 1, rep, 1, 1], np.int64))])
    merged = rw.const("merged", np.array([0, spec.q_heads, -1, head_size], np.int64))
    return rw.op("Reshape", [wide, merged])


def _causal_visibility(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """Boolean [.., Sq, Skv]: key j visible from query i, from Range positions."""
    klass = spec.mask.klass
    one = rw.const("one", np.array(1, np.int64))
    zero = rw.const("zero", np.array(0, np.int64))
    q_len = rw.op("Squeeze", [rw.op("Shape", [spec.query], {"start": 2, "end": 3})])
    k_len = rw.op("Squeeze", [rw.op("Shape", [spec.value], {"start": 2, "end": 3})])
    q_pos = rw.op("Range", [zero, q_len, one])
    if klass.alignment == "lower_right":  # queries are the last Sq of the Skv positions
        q_pos = rw.op("Add", [q_pos, rw.op("Sub", [k_len, q_len])])
    kv_pos = rw.op("Range", [zero, k_len, one])
    rows = rw.op("Unsqueeze", [q_pos, rw.const("axis1", np.array([1], np.int64))])
    cols = rw.op("Unsqueeze", [kv_pos, rw.const("axis0", np.array([0], np.int64))])
    visible = rw.op("GreaterOrEqual", [rows, cols])
    if klass.window is not None:
        window = rw.const("window", np.array(klass.window, np.int64))
        visible = rw.op("And", [visible, rw.op("Greater", [cols, rw.op("Sub", [rows, window])])])
    if klass.padding:
        padding = next((t for t in rw.graph.gs.inputs if t.name == klass.padding_input), None)
        if padding is None:
            raise Reject(f"the padding input '{klass.padding_input}' is not a graph input")
        valid = rw.op("Cast", [padding], {"to": onnx.TensorProto.BOOL})
        valid = rw.op("Unsqueeze", [valid, rw.const("axes12", np.array([1, 2], np.int64))])
        visible = rw.op("And", [visible, valid])
    return visible


class PrimitiveTrtTarget(Target):
    name = "primitive-trt"
    floor_opset = 13  # Softmax over one axis, Unsqueeze with axes as an input
    keeps_quantization = True  # the Q/DQ pairs go onto the MatMul inputs (Method 2)
    emitters = {AttentionSpec: emit_attention}

    def refusal(self, spec) -> str | None:
        reason = super().refusal(spec)
        if reason is None and spec.quant is None:  # quantized cores are rewritten with any mask
            klass = spec.mask.klass if spec.mask is not None else None
            if klass is None or not klass.causal or spec.mask.bias is not None:
                reason = ("target primitive-trt rewrites causal attention only; this mask is "
                          f"{klass.kind if klass else 'absent'}")
        if reason is None and spec.quant is not None and spec.sinks is not None:
            reason = "target primitive-trt does not write attention sinks"
        return reason

    def contract(self, model: onnx.ModelProto) -> list[dict]:
        return trt_contract.causal_form_problems(model)
