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

from .. import trt_contract
from ..graph import Tensor, broadcast_shape, onnx_dtype
from ..masks import mask_identity
from ..rewrite import Rewrite
from ..specs import HIDDEN_AT_OR_BELOW, AttentionSpec, KVCacheWriteSpec, MaskSpec, RotarySpec
from .base import Target
from .qdq import fake_quantized


def emit_attention(spec: AttentionSpec, rw: Rewrite) -> None:
    key = spec.key
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)}, dtype=key.dtype)
    inputs = quantized_operands(spec, key, rw)
    attrs = {"scale": float(spec.scale)}
    if spec.mask is not None and spec.mask.upper_left_causal:
        attrs["is_causal"] = 1  # proven upper-left causal: the kernel needs no mask tensor
    elif spec.mask is not None and not spec.mask.hides_nothing:
        inputs.append(attention_mask(spec, rw))
    if spec.softcap:
        attrs["softcap"] = float(spec.softcap)
    if spec.softmax_dtype is not None:
        attrs["softmax_precision"] = int(spec.softmax_dtype)
    finish(spec, "Attention", inputs, attrs, rw)


def scaled(x: Tensor, scale: float, dtype: int, rw: Rewrite) -> Tensor:
    """x · scale, the way TensorRT wants Q pre-scaled. In float16 and bfloat16 the product is
    taken in float32 and rounded once: a scale constant of x's own type would be rounded first
    (the exports' sqrt(scale) on Q and on K, squared, is not a bfloat16 number)."""
    if dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        return rw.op("Mul", [x, rw.const("q_scale", np.array(scale, np_type))], dtype=np_type)
    wide = rw.op("Cast", [x], {"to": onnx.TensorProto.FLOAT}, dtype=np.float32)
    wide = rw.op("Mul", [wide, rw.const("q_scale", np.array(scale, np.float32))], dtype=np.float32)
    return rw.op("Cast", [wide], {"to": dtype})


def quantized_operands(spec: AttentionSpec, key: Tensor, rw: Rewrite) -> list[Tensor]:
    """Q, K (laid out [B, N, S, H]) and V, each through its Q/DQ pair where the source had one."""
    quant = spec.quant
    if quant is None:
        return [spec.query, key, spec.value]
    return [fake_quantized(t, pair, rw) for t, pair in ((spec.query, quant.query), (key, quant.key),
                                                         (spec.value, quant.value))]


def finish(spec: AttentionSpec, op_type: str, inputs: list, attrs: dict, rw: Rewrite, *,
           domain: str = "", dtype: int | None = None) -> None:
    """The last op of an attention (of `domain`, computing in `dtype`, default Q's), then what
    makes its result the original's output tensor (which the last node emitted takes over): a
    Cast where the original's product has another type, a Reshape to [B*N, S, H] where it was 3-D."""
    steps = []
    computed = spec.dtype if dtype is None else dtype
    if spec.output_dtype is not None and spec.output_dtype != computed:
        steps.append(("Cast", {"to": spec.output_dtype}))
    if spec.flat_output:
        steps.append(("Reshape", None))
    if not steps:
        rw.op(op_type, inputs, attrs, domain=domain, outputs=[spec.output])
        return
    output = rw.op(op_type, inputs, attrs, domain=domain)
    for i, (step, step_attrs) in enumerate(steps):
        last = [spec.output] if i == len(steps) - 1 else None
        if step == "Reshape":
            tail = rw.op("Shape", [output], {"start": 2})
            shape = rw.op("Concat", [rw.const("minus_one", np.array([-1], np.int64)), tail], {"axis": 0})
            output = rw.op("Reshape", [output, shape], outputs=last)
        else:
            output = rw.op(step, [output], step_attrs, outputs=last)


def attention_mask(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """The mask as Attention takes it: boolean (True = attend) or additive in Q's type, 4-D,
    with dims -2 and -1 equal to the query and key lengths."""
    mask: MaskSpec = spec.mask
    shapes = [t.shape for t in (mask.tensor, mask.bias) if t is not None]
    shape = () if any(s is None for s in shapes) else broadcast_shape([tuple(s) for s in shapes])
    # Layers whose masks compute the same values share one (the first layer's).
    identity = mask_identity(rw.graph, mask.tensor) if mask.bias is None else None
    key = ("attention_mask", mask.kind, identity or id(mask.tensor), mask.fill, id(mask.bias),
           mask.boolean_exact, spec.dtype)
    tensor = rw.shared(key, lambda: _mask_4d(spec, rw))
    shape = (1,) * (4 - len(shape)) + shape
    q_len, k_len = spec.query.shape[2], spec.value.shape[2]
    if not (same_dim(shape[2], q_len) and same_dim(shape[3], k_len)):
        q_dim = rw.op("Shape", [spec.query], {"start": 2, "end": 3})
        k_dim = rw.op("Shape", [spec.value], {"start": 2, "end": 3})
        ones = rw.const("mask_ones", np.ones(2, dtype=np.int64))
        target = rw.op("Concat", [ones, q_dim, k_dim], {"axis": 0})
        tensor = rw.op("Expand", [tensor, target])
    return tensor


def _mask_4d(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    mask: MaskSpec = spec.mask
    np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
    # onnxruntime's Attention treats the lowest float like -inf: a row whose keys are all masked
    # gives 0, where the original softmax over equal huge negatives is uniform. Where such rows
    # may occur, finite hidden values are raised to half the lowest float, which keeps both the
    # masking and the uniform rows; -inf stays -inf (torch's SDPA export zeroes those rows too).
    floor = rw.const("mask_floor", np.array(ml_dtypes.finfo(np_type).min / 2, np_type))
    if mask.kind in ("keep", "drop"):
        visible = mask.tensor if mask.kind == "keep" else rw.op("Not", [mask.tensor], dtype=np.bool_)
        if mask.fill == -np.inf or mask.boolean_exact:
            tensor = visible
        else:
            tensor = rw.op("Where", [visible, rw.const("mask_zero", np.zeros((), np_type)), floor])
    else:
        tensor = mask.tensor if mask.bias is None else rw.op("Add", [mask.bias, mask.tensor])
        mask_type = onnx_dtype(tensor) or spec.dtype
        if mask_type != spec.dtype and not mask.boolean_exact:
            tensor = _in_type(tensor, mask_type, spec.dtype, rw)
        if mask.boolean_exact:
            # Proven to hold only 0 (visible) and huge negatives (hidden), with no query row
            # all hidden: a boolean mask is exact, and what TensorRT's kernels prefer.
            threshold = rw.const("mask_threshold", np.array(HIDDEN_AT_OR_BELOW,
                                                            onnx.helper.tensor_dtype_to_np_dtype(mask_type)))
            tensor = rw.op("Greater", [tensor, threshold], dtype=np.bool_)
        else:
            is_minus_inf = rw.op("IsInf", [tensor], {"detect_positive": 0})
            tensor = rw.op("Where", [is_minus_inf, tensor, rw.op("Max", [tensor, floor])])
    rank = max(len(t.shape or ()) for t in (mask.tensor, mask.bias) if t is not None)
    if rank < 4:
        axes = rw.const("mask_axes", np.arange(4 - rank, dtype=np.int64))
        tensor = rw.op("Unsqueeze", [tensor, axes])
    return tensor


def _in_type(tensor: Tensor, mask_type: int, dtype: int, rw: Rewrite) -> Tensor:
    """An additive mask of another float type in the attention's: a narrower one (float16 for a
    float32 softmax) cast up, which is exact; a wider one (float32 for float16 attention) clipped
    to the narrower range first, or its lowest value would become -inf and change what fully
    masked rows compute."""
    given, wanted = (onnx.helper.tensor_dtype_to_np_dtype(t) for t in (mask_type, dtype))
    if ml_dtypes.finfo(given).max <= ml_dtypes.finfo(wanted).max:
        return rw.op("Cast", [tensor], {"to": dtype})
    lowest = rw.const("mask_lowest", np.array(ml_dtypes.finfo(wanted).min, given))
    clipped = rw.op("Where", [rw.op("IsInf", [tensor], {"detect_positive": 0}), tensor,
                              rw.op("Max", [tensor, lowest])])
    return rw.op("Cast", [clipped], {"to": dtype})


def same_dim(a, b) -> bool:
    return a is not None and a == b


def emit_rotary(spec: RotarySpec, rw: Rewrite, rotation=None) -> None:
    """The rotation on 4-D [batch, heads, seq, head] input, the form TensorRT takes: x before the
    head transpose is transposed there and back, a 3-D single head gets a heads axis.
    `rotation(spec, x, rw, outputs)` writes the op on such an x (default: RotaryEmbedding)."""
    rotate = rotation or rotary_embedding
    x = _deinterleaved(spec.input, rw) if spec.deinterleave else spec.input
    last = None if spec.around else [spec.output]  # the Concat around it takes the output over
    if spec.layout == "bnsh":
        y = rotate(spec, x, rw, last)
    elif spec.layout == "bsnh":
        x = rw.op("Transpose", [x], {"perm": [0, 2, 1, 3]}, dtype=spec.input.dtype)
        y = rw.op("Transpose", [rotate(spec, x, rw, None)], {"perm": [0, 2, 1, 3]},
                  dtype=spec.input.dtype, outputs=last)
    else:
        heads_axis = rw.const("rope_heads_axis", np.array([1], dtype=np.int64))
        x = rw.op("Unsqueeze", [x, heads_axis], dtype=spec.input.dtype)
        y = rw.op("Squeeze", [rotate(spec, x, rw, None), heads_axis], dtype=spec.input.dtype,
                  outputs=last)
    if spec.around:
        before, after = spec.around
        rw.op("Concat", [*before, y, *after], {"axis": -1}, outputs=[spec.output])


def rotary_embedding(spec: RotarySpec, x: Tensor, rw: Rewrite, outputs: list | None) -> Tensor:
    """RotaryEmbedding of 4-D x. The tables (caches and [batch, seq] position ids, or per-token
    cos/sin [batch, seq, rotary/2] of the computed form) are built once and shared by every layer."""
    attrs = {"interleaved": int(spec.interleaved),
             "rotary_embedding_dim": 0 if spec.rotary_dim == spec.head_size else spec.rotary_dim}
    return rw.op("RotaryEmbedding", [x, *rotary_tables(spec, rw)], attrs, dtype=spec.input.dtype,
                 outputs=outputs)


def _deinterleaved(x: Tensor, rw: Rewrite) -> Tensor:
    """x's even channels, then its odd ones."""
    axis, step = rw.const("rope_last_axis", np.array([-1], np.int64)), rw.const("rope_two", np.array([2], np.int64))
    end = rw.const("rope_end", np.array([np.iinfo(np.int64).max], np.int64))
    even, odd = (rw.op("Slice", [x, rw.const("rope_start", np.array([start], np.int64)), end, axis, step],
                       dtype=x.dtype) for start in (0, 1))
    return rw.op("Concat", [even, odd], {"axis": -1}, dtype=x.dtype)


def rotary_tables(spec: RotarySpec, rw: Rewrite) -> list[Tensor]:
    """RotaryEmbedding's inputs after x: (cos_cache, sin_cache, position_ids) of the table form,
    (cos, sin) per token of the computed form."""
    if spec.form == "computed":
        # A 3-D x may fold the heads into its batch (q's and k's differ under GQA): tables per batch.
        key = ("rope_per_token", spec.cache_key, spec.layout, _batch_of(spec, rw) if spec.layout == "bsh" else None)
        return [rw.shared((*key, which), lambda t=table: _per_token(spec, t, rw))
                for which, table in (("cos", spec.cos), ("sin", spec.sin))]
    cos = rw.shared(("rope_cos", spec.cache_key), lambda: _cache(rw, "rope_cos_cache", spec.cos_cache, spec))
    sin = rw.shared(("rope_sin", spec.cache_key), lambda: _cache(rw, "rope_sin_cache", spec.sin_cache, spec))
    # A 3-D x folds the heads into its batch, so q and k need position ids of their own.
    batch_of = id(spec.input) if spec.layout == "bsh" else None
    positions = rw.shared(("rope_positions", id(spec.positions), batch_of), lambda: _position_ids(spec, rw))
    return [cos, sin, positions]


def _batch_of(spec: RotarySpec, rw: Rewrite):
    """x's batch dim where the graph knows it (equal dims share tables), else x itself."""
    shape = rw.graph.shape(spec.input)
    return shape[0] if shape and shape[0] is not None else id(spec.input)


def _per_token(spec: RotarySpec, table: Tensor, rw: Rewrite) -> Tensor:
    """[batch, seq, rotary_dim / 2] from the graph's cos or sin as multiplied with x: the other
    axes are 1 (proven when the tables were evaluated), one angle per pair of channels, the
    batch broadcast to x's."""
    seq_axis = {"bnsh": 2, "bsnh": 1, "bsh": 1}[spec.layout]
    seq = rw.op("Shape", [spec.input], {"start": seq_axis, "end": seq_axis + 1}, dtype=np.int64)
    channels = spec.rotary_dim // 2 if spec.tables_halved else spec.rotary_dim
    flat = rw.op("Concat", [rw.const("rope_batch_any", np.array([-1], np.int64)), seq,
                            rw.const("rope_channels", np.array([channels], np.int64))], {"axis": 0},
                 dtype=np.int64)
    pairs = rw.op("Reshape", [table, flat], dtype=table.dtype)
    if not spec.tables_halved:
        half = spec.rotary_dim // 2
        starts, ends, steps = ([0], [spec.rotary_dim], [2]) if spec.interleaved else ([0], [half], [1])
        pairs = rw.op("Slice", [pairs, rw.const("rope_start", np.array(starts, np.int64)),
                                rw.const("rope_end", np.array(ends, np.int64)),
                                rw.const("rope_last_axis", np.array([-1], np.int64)),
                                rw.const("rope_step", np.array(steps, np.int64))], dtype=table.dtype)
    batch = rw.op("Shape", [spec.input], {"start": 0, "end": 1}, dtype=np.int64)
    target = rw.op("Concat", [batch, rw.const("rope_ones", np.ones(2, np.int64))], {"axis": 0}, dtype=np.int64)
    return rw.op("Expand", [pairs, target], dtype=table.dtype)


def _cache(rw: Rewrite, name: str, table: np.ndarray, spec: RotarySpec) -> Tensor:
    """A cos/sin cache of x's type. Tables evaluated wider than x (bfloat16 subgraphs are
    evaluated in float32) are kept so and cast once in the graph, rounding where the original
    rounded its float32 cos/sin."""
    cache = rw.const(name, table)
    if onnx.helper.np_dtype_to_tensor_dtype(table.dtype) == spec.dtype:
        return cache
    return rw.op("Cast", [cache], {"to": spec.dtype}, dtype=onnx.helper.tensor_dtype_to_np_dtype(spec.dtype))


def _position_ids(spec: RotarySpec, rw: Rewrite) -> Tensor:
    """The graph's positions as RotaryEmbedding wants them: INT64 [batch, seq]."""
    positions = spec.positions
    if onnx_dtype(positions) != onnx.TensorProto.INT64:
        positions = rw.op("Cast", [positions], {"to": onnx.TensorProto.INT64}, dtype=np.int64)
    if len(spec.positions.shape) == 1:
        positions = rw.op("Unsqueeze", [positions, rw.const("rope_batch_axis", np.array([0], dtype=np.int64))],
                          dtype=np.int64)
    batch = rw.op("Shape", [spec.input], {"start": 0, "end": 1}, dtype=np.int64)
    seq = rw.op("Shape", [positions], {"start": -1}, dtype=np.int64)
    shape = rw.op("Concat", [batch, seq], {"axis": 0}, dtype=np.int64)
    return rw.op("Expand", [positions, shape], dtype=np.int64)


def emit_kv_cache_write(spec: KVCacheWriteSpec, rw: Rewrite) -> None:
    """TensorScatter (opset 24; TensorRT's IKVCacheUpdateLayer): the update written into the
    cache along axis -2 at write_indices[b] = positions[0] for every batch row b. The write
    indices are built once per positions tensor (and batch) and shared by every layer."""
    indices = shared_write_indices(spec, rw)
    update = spec.update
    if spec.update_perm is not None:
        update = rw.op("Transpose", [update], {"perm": list(spec.update_perm)}, dtype=update.dtype)
    rw.op("TensorScatter", [spec.past, update, indices], {"axis": -2, "mode": "linear"},
          outputs=[spec.output])


def shared_write_indices(spec: KVCacheWriteSpec, rw: Rewrite) -> Tensor:
    """The write indices of `spec`, built once per positions tensor and batch."""
    batch = rw.graph.shape(spec.past)
    batch = batch[0] if batch is not None and batch[0] is not None else id(spec.past)
    return rw.shared(("kv_write_indices", id(spec.positions), batch), lambda: _write_indices(spec, rw))


def _write_indices(spec: KVCacheWriteSpec, rw: Rewrite) -> Tensor:
    """INT64 [B]: the first position, broadcast over the cache's batch."""
    first = rw.op("Gather", [spec.positions, rw.const("kv_first", np.array(0, dtype=np.int64))],
                  {"axis": 0}, dtype=spec.positions.dtype, shape=[])
    if onnx_dtype(spec.positions) != onnx.TensorProto.INT64:
        first = rw.op("Cast", [first], {"to": onnx.TensorProto.INT64}, dtype=np.int64, shape=[])
    shape = rw.graph.shape(spec.past)
    batch = rw.op("Shape", [spec.past], {"start": 0, "end": 1}, dtype=np.int64, shape=[1])
    return rw.op("Expand", [first, batch], dtype=np.int64, shape=[shape[0] if shape else None])


class OnnxTarget(Target):
    name = "onnx"
    floor_opset = 23  # Attention, RotaryEmbedding (TensorScatter: 24, its spec's min_opset)
    static_cache = True
    keeps_quantization = True  # Q/DQ pairs on Q, K and V stay in front of Attention
    own_ops = frozenset({("", "Attention"), ("", "RotaryEmbedding"), ("", "TensorScatter")})
    emitters = {AttentionSpec: emit_attention, RotarySpec: emit_rotary,
                KVCacheWriteSpec: emit_kv_cache_write}

    def refusal(self, spec) -> str | None:
        if isinstance(spec, AttentionSpec) and spec.sinks is not None:
            return ("ONNX Attention cannot express learned attention sinks (an extra logit in "
                    "every softmax row); target ort's GroupQueryAttention takes them as head_sink")
        if isinstance(spec, AttentionSpec) and spec.quant is not None and spec.quant.probs is not None:
            return ("ONNX Attention cannot quantize its softmax output (the Q/DQ pair before the "
                    "product with V): the quantized core is left as it is")
        return super().refusal(spec)

    def contract(self, model: onnx.ModelProto) -> list[dict]:
        return trt_contract.check_model(model)
