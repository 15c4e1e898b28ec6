"""Target "onnx": standard ONNX ops (Attention, opset 23), which onnxruntime runs and TensorRT's
parser (10.14+) maps to IAttention.

Masks are emitted 4-D with their query and key dims spelled out, because onnxruntime requires
the mask's last two dims to equal the query and key lengths and TensorRT requires the mask to have
Q's rank.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx

from ..graph import Tensor
from ..rewrite import Rewrite
from ..specs import AttentionSpec, MaskSpec

MIN_OPSET = 23


def emit(spec, rw: Rewrite) -> None:
    if isinstance(spec, AttentionSpec):
        emit_attention(spec, rw)
    else:
        raise TypeError(f"target onnx cannot emit {type(spec).__name__}")


def emit_attention(spec: AttentionSpec, rw: Rewrite) -> None:
    key = spec.key
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)}, dtype=key.dtype)
    inputs = [spec.query, key, spec.value]
    if spec.mask is not None:
        inputs.append(attention_mask(spec, rw))
    attrs = {"scale": float(spec.scale)}
    if spec.softcap:
        attrs["softcap"] = float(spec.softcap)
    if spec.softmax_dtype is not None:
        attrs["softmax_precision"] = int(spec.softmax_dtype)
    rw.op("Attention", inputs, attrs, outputs=[spec.output])


def attention_mask(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """The mask as Attention takes it: boolean (True = attend) or additive in Q's type, 4-D,
    with dims -2 and -1 equal to the query and key lengths."""
    mask: MaskSpec = spec.mask
    shape = tuple(mask.tensor.shape or ())
    tensor = rw.shared(("attention_mask", mask.kind, id(mask.tensor), mask.fill),
                       lambda: _mask_4d(spec, rw))
    shape = (1,) * (4 - len(shape)) + shape
    q_len, k_len = spec.query.shape[2], spec.value.shape[2]
    if not (_same_dim(shape[2], q_len) and _same_dim(shape[3], k_len)):
        q_dim = rw.op("Shape", [spec.query], {"start": 2, "end": 3})
        k_dim = rw.op("Shape", [spec.value], {"start": 2, "end": 3})
        ones = rw.const("mask_ones", np.ones(2, dtype=np.int64))
        target = rw.op("Concat", [ones, q_dim, k_dim], {"axis": 0})
        tensor = rw.op("Expand", [tensor, target])
    return tensor


def _mask_4d(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    mask: MaskSpec = spec.mask
    tensor = mask.tensor
    if mask.kind == "drop":
        tensor = rw.op("Not", [tensor], dtype=np.bool_)
    if mask.kind == "additive" or mask.fill != -np.inf:
        # onnxruntime's Attention treats the lowest float like -inf: a row whose keys are all
        # masked gives 0, where the original softmax over equal huge negatives is uniform.
        # Raising finite values to half the lowest float keeps both the masking and the uniform
        # rows; -inf stays -inf (such rows are 0 in torch's SDPA export too).
        np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
        floor = rw.const("mask_floor", np.array(ml_dtypes.finfo(np_type).min / 2, np_type))
        if mask.kind == "additive":
            is_minus_inf = rw.op("IsInf", [tensor], {"detect_positive": 0})
            tensor = rw.op("Where", [is_minus_inf, tensor, rw.op("Max", [tensor, floor])])
        else:
            tensor = rw.op("Where", [tensor, rw.const("mask_zero", np.zeros((), np_type)), floor])
    rank = len(mask.tensor.shape or ())
    if rank < 4:
        axes = rw.const("mask_axes", np.arange(4 - rank, dtype=np.int64))
        tensor = rw.op("Unsqueeze", [tensor, axes])
    return tensor


def _same_dim(a, b) -> bool:
    return a is not None and a == b
