"""Attention for target "ort": which onnxruntime contrib op expresses an AttentionSpec (`plan`),
and the emitters of GroupQueryAttention and MultiHeadAttention.

GroupQueryAttention (GQA) is causal self-attention over new tokens and an optional cache. What
its CPU kernel computes (onnxruntime 1.32, measured against float64 numpy; tests/test_target_ort.py):
- Q/K/V are [B, S, N·H]; the past and present caches [B, Nkv, L, H] (BNSH).
- Row b holds seqlens_k[b] + 1 keys after the step; its new K/V are written at rows
  seqlens_k[b] + 1 - S onward of `present`, query s sits at key position seqlens_k[b] + 1 - S + s
  (lower-right causal), and keys from seqlens_k[b] + 1 on are hidden.
- With a past and S > 1 it refuses a batch above 1 unless `query_seqlens` (valid query rows per
  entry) is given. With `query_seqlens` it also rotates by `position_ids` row by row (without,
  a first prompt uses only their first element). So every GQA here gets a past (of length 0 for
  a model without a cache) and query_seqlens = S: one kernel path at every batch and length.
The exported models grow every row's cache alike by Concat(past, new) and keep the padding in
attention_mask. So seqlens_k = past + S - 1 for every row (the cache layout is the model's own,
and `present` comes out equal to the Concat), query_seqlens = S, and the padding becomes an
additive attention_bias built from attention_mask. onnxruntime-genai's ReduceSum(mask) - 1 is right
only for right-padded rows: for a left-padded one it writes the new K/V at the wrong row and hides
the row's last keys.

MultiHeadAttention (MHA) takes everything else whose K/V heads equal the query heads (encoders,
cross-attention): K/V as [B, N, T, H] directly, the padding as key_padding_mask, other masks and
biases (T5, ALiBi) as attention_bias. What neither expresses becomes ONNX Attention, and the
report says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import Tensor, onnx_dtype
from ..rewrite import Reject, Rewrite
from ..specs import AttentionSpec
from . import onnx as standard
from .ort_kernels import CONTRIB, runs_on_cpu

GQA, MHA, ATTENTION = "GroupQueryAttention", "MultiHeadAttention", "Attention"
_GQA_INPUTS = 17  # query .. query_seqlens


@dataclass(frozen=True)
class CacheGrowth:
    """K and V as a decode step computes them: Concat(past input, new, axis 2) each."""

    past_key: Tensor
    new_key: Tensor
    present_key: Tensor  # the Concat's output (often the model's `present` output)
    past_value: Tensor
    new_value: Tensor
    present_value: Tensor


@dataclass(frozen=True)
class Plan:
    """The op an attention becomes, and why not a more specific one (empty for GQA)."""

    op: str | None  # None: refused (`why` is the reason)
    why: str = ""
    cache: CacheGrowth | None = None


Shapes = Callable[[Tensor], "tuple | None"]  # Graph.shape, or the tensors' own shapes


def plan(spec: AttentionSpec, shape: Shapes) -> Plan:
    gqa_misfit = _gqa_misfit(spec, shape)
    if gqa_misfit is None:
        return Plan(GQA, cache=cache_growth(spec))
    if spec.sinks is not None:
        return Plan(None, "learned attention sinks need GroupQueryAttention's head_sink, and "
                          f"GroupQueryAttention does not fit: {gqa_misfit}")
    mha_misfit = _mha_misfit(spec)
    if mha_misfit is None:
        return Plan(MHA, f"not {GQA}: {gqa_misfit}")
    return Plan(ATTENTION, f"not {GQA}: {gqa_misfit}; not {MHA}: {mha_misfit}")


def _gqa_misfit(spec: AttentionSpec, shape: Shapes) -> str | None:
    """Why GroupQueryAttention cannot compute `spec`, or None."""
    shared = _heads_misfit(spec)
    if shared is not None:
        return shared
    if spec.head_size % 8:
        return f"head size {spec.head_size} is not a multiple of 8"
    mask = spec.mask
    if mask is None or mask.klass is None or not mask.klass.causal:
        kind = "absent" if mask is None or mask.klass is None else mask.klass.kind
        return f"it is causal attention only, and this mask is {kind}"
    if mask.bias is not None:
        return "the scores have an additive bias besides the causal mask"
    if mask.klass.padding and mask.klass.padding_input is None:
        return "the padding is not read from a graph input"
    cache = cache_growth(spec)
    if cache is not None:
        if mask.klass.alignment != "lower_right":
            return "a decode step's queries must be the last positions (lower-right causal)"
        return None
    if not (_same_dim(shape(spec.query), shape(spec.value), 2) or _self_attention(mask.klass)):
        return ("K/V are neither the queries' own tokens nor Concat(past input, new tokens): "
                "no cache layout GroupQueryAttention takes")
    return None


def _self_attention(klass) -> bool:
    """Keys as many as queries wherever the model runs: the mask was proven causal at sizes whose
    key length always equalled the query length, which is how masks.py sizes a model without a
    cache input. (Should the lengths still differ at run time, GroupQueryAttention fails with an
    error: it checks them; it never computes a wrong result from them.)"""
    return bool(klass.sizes) and all(query == key for _, query, key in klass.sizes)


def _mha_misfit(spec: AttentionSpec) -> str | None:
    shared = _heads_misfit(spec)
    if shared is not None:
        return shared
    if spec.kv_heads != spec.q_heads:
        return f"{spec.kv_heads} K/V heads for {spec.q_heads} query heads (it needs as many)"
    return None


def _heads_misfit(spec: AttentionSpec) -> str | None:
    if not all(isinstance(d, int) for d in (spec.q_heads, spec.kv_heads, spec.head_size)):
        return "the head counts or the head size are not static"
    if spec.value_head_size not in (None, spec.head_size):
        return f"V's head size {spec.value_head_size} differs from Q's {spec.head_size}"
    return None


def cache_growth(spec: AttentionSpec) -> CacheGrowth | None:
    """K and V as Concat(past graph input, new) along the sequence axis, if they are that."""
    if spec.key_perm is not None:
        return None
    grown = [_concat_of_past(t) for t in (spec.key, spec.value)]
    if None in grown:
        return None
    (past_key, new_key), (past_value, new_value) = grown
    return CacheGrowth(past_key, new_key, spec.key, past_value, new_value, spec.value)


def _concat_of_past(tensor: Tensor) -> tuple[Tensor, Tensor] | None:
    """(past, new) of a Concat(past, new) along axis 2 behind no-op Casts (GPT-J's TorchScript
    export casts the present to its own type), past a graph input."""
    tensor = _before_noop_casts(tensor)
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "Concat" or len(node.inputs) != 2:
        return None  # (K and V are 4-D: the attention rule proved it)
    if node.attrs.get("axis") not in (2, -2):
        return None
    past, new = node.inputs
    past = _before_noop_casts(past)
    if past.inputs or isinstance(past, gs.Constant):  # the past must be the model's input
        return None
    return past, new


def _before_noop_casts(tensor: Tensor) -> Tensor:
    while tensor.inputs and tensor.inputs[0].op == "Cast" \
            and onnx_dtype(tensor.inputs[0].inputs[0]) == onnx_dtype(tensor) is not None:
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _same_dim(a, b, axis: int) -> bool:
    return a is not None and b is not None and a[axis] is not None and a[axis] == b[axis]


# --- emission ----------------------------------------------------------------------------------

def emit_attention(spec: AttentionSpec, rw: Rewrite) -> None:
    chosen = plan(spec, rw.graph.shape)
    rw.graph.memo[("ort plan", id(spec))] = chosen  # the report's: the emitted graph no longer shows it
    if chosen.op is None:
        raise Reject(chosen.why)
    _require_checkable(chosen.op, spec, rw)
    if chosen.op == ATTENTION:
        standard.emit_attention(spec, rw)
    elif chosen.op == GQA:
        _emit_gqa(spec, chosen.cache, rw)
    else:
        _emit_mha(spec, rw)


def _require_checkable(op: str, spec: AttentionSpec, rw: Rewrite) -> None:
    if rw.graph.options.check and not runs_on_cpu(op, "" if op == ATTENTION else CONTRIB, spec.dtype):
        kind = onnx.TensorProto.DataType.Name(spec.dtype).lower()
        raise Reject(f"{op} has no CPU kernel for {kind} in this onnxruntime, so the CPU check "
                     "cannot run it; fuse with --no-check to write it unchecked")


def _emit_gqa(spec: AttentionSpec, cache: CacheGrowth | None, rw: Rewrite) -> None:
    klass = spec.mask.klass
    new_key, new_value = (cache.new_key, cache.new_value) if cache else (spec.key, spec.value)
    key_perm = None if cache else spec.key_perm
    inputs = {0: to_bsd(spec.query, rw), 1: to_bsd(new_key, rw, key_perm), 2: to_bsd(new_value, rw)}
    if cache is not None:
        inputs[3], inputs[4] = cache.past_key, cache.past_value
    else:
        inputs[3] = inputs[4] = _empty_past(spec, rw)
    inputs.update(_lengths(spec, inputs[3], rw))
    if klass.padding:
        inputs[10] = _padding_bias(spec, inputs[3], rw)
    if spec.sinks is not None:  # one logit per query head, however the export shaped it
        inputs[11] = rw.op("Reshape", [spec.sinks, rw.const("ort_flat", np.array([-1], np.int64))])
    attrs = {"num_heads": spec.q_heads, "kv_num_heads": spec.kv_heads, "scale": float(spec.scale)}
    if spec.softcap:
        attrs["softcap"] = float(spec.softcap)
    if klass.window is not None:  # both: a query sees the `window` most recent keys, itself included
        attrs["local_window_size"] = int(klass.window)
    presents = [cache.present_key, cache.present_value] if cache else [None, None]
    output = rw.op(GQA, _positional(inputs, _GQA_INPUTS), attrs, domain=CONTRIB,
                   outputs=[None, *presents])
    _from_bsd(spec, output, rw)


def _emit_mha(spec: AttentionSpec, rw: Rewrite) -> None:
    key = spec.key
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)}, dtype=key.dtype)
    inputs = {0: to_bsd(spec.query, rw), 1: key, 2: spec.value}  # K/V in BNSH, as MHA allows
    attrs = {"num_heads": spec.q_heads, "scale": float(spec.scale)}
    mask = spec.mask
    if mask is None or mask.hides_nothing:
        pass
    elif mask.upper_left_causal and _same_dim(rw.graph.shape(spec.query), rw.graph.shape(spec.value), 2):
        attrs["unidirectional"] = 1
    elif mask.bias is None and mask.klass is not None and mask.klass.kind == "padding" \
            and mask.klass.padding_input is not None and _spans_keys(spec, mask.klass.padding_input, rw):
        padding = _graph_input(rw, mask.klass.padding_input)
        inputs[4] = rw.shared(("ort_key_padding", padding.name),
                              lambda: rw.op("Cast", [padding], {"to": onnx.TensorProto.INT32}))
    else:
        inputs[5] = additive_mask(spec, rw)
    output = rw.op(MHA, _positional(inputs, 6), attrs, domain=CONTRIB)
    _from_bsd(spec, output, rw)


def _spans_keys(spec: AttentionSpec, padding_input: str, rw: Rewrite) -> bool:
    """Self-attention whose padding input [B, T] has the keys' length: then a key_padding_mask
    (otherwise the mask goes as attention_bias, which broadcasts it as the original did; the
    CPU kernel rejected a 2-D key_padding_mask on BART's cross-attention with BNSH keys)."""
    shape, keys = rw.graph.shape(_graph_input(rw, padding_input)), rw.graph.shape(spec.value)
    own_tokens = _same_dim(rw.graph.shape(spec.query), keys, 2)  # cross-attention's is refused
    return own_tokens and shape is not None and len(shape) == 2 and shape[1] is not None \
        and shape[1] == keys[2]


def _positional(inputs: dict[int, Tensor], count: int) -> list[Tensor]:
    """Inputs by index; the optional ones left out are empty names, trailing ones dropped."""
    last = max(inputs)
    assert last < count
    return [inputs.get(i, gs.Variable.empty()) for i in range(last + 1)]


def to_bsd(tensor: Tensor, rw: Rewrite, perm: tuple[int, ...] | None = None) -> Tensor:
    """[B, N, S, H] (`tensor`, or `tensor` transposed by `perm`) as [B, S, N·H]. A tensor that
    is itself the head transpose of [B, S, N, H] is read before it (the transposes would cancel)."""
    to_bsnh = [0, 2, 1, 3] if perm is None else [perm[i] for i in (0, 2, 1, 3)]
    node = tensor.inputs[0] if tensor.inputs else None
    if to_bsnh == [0, 1, 2, 3]:
        bsnh = tensor
    elif node is not None and node.op == "Transpose" and to_bsnh == [0, 2, 1, 3] \
            and list(node.attrs.get("perm", [])) == [0, 2, 1, 3]:
        bsnh = node.inputs[0]
    else:
        bsnh = rw.op("Transpose", [tensor], {"perm": to_bsnh}, dtype=tensor.dtype)
    merge = rw.const("ort_merge_heads", np.array([0, 0, -1], np.int64))
    return rw.op("Reshape", [bsnh, merge], dtype=tensor.dtype)


def _from_bsd(spec: AttentionSpec, output: Tensor, rw: Rewrite) -> None:
    """The op's [B, S, N·Hv] output as the original's [B, N, S, Hv] tensor (it takes it over)."""
    value_head = spec.value_head_size or spec.head_size
    split = rw.const("ort_split_heads", np.array([0, 0, spec.q_heads, value_head], np.int64))
    bsnh = rw.op("Reshape", [output, split])
    standard.finish(spec, "Transpose", [bsnh], {"perm": [0, 2, 1, 3]}, rw)


def _lengths(spec: AttentionSpec, past: Tensor, rw: Rewrite) -> dict[int, Tensor]:
    """seqlens_k (5), total_sequence_length (6) and query_seqlens (16), int32, built once for all
    layers whose dims are the same."""
    query = spec.query
    key = (_dim_key(query, 0, rw), _dim_key(query, 2, rw), _dim_key(past, 2, rw))

    def build():
        batch = rw.op("Shape", [query], {"start": 0, "end": 1}, dtype=np.int64)
        new = rw.op("Shape", [query], {"start": 2, "end": 3}, dtype=np.int64)
        total = rw.op("Add", [rw.op("Shape", [past], {"start": 2, "end": 3}, dtype=np.int64), new])
        total = rw.op("Cast", [total], {"to": onnx.TensorProto.INT32}, dtype=np.int32)
        last = rw.op("Sub", [total, rw.const("ort_one", np.array([1], np.int32))], dtype=np.int32)
        seqlens = rw.op("Expand", [last, batch], dtype=np.int32)
        rows = rw.op("Expand", [rw.op("Cast", [new], {"to": onnx.TensorProto.INT32}), batch],
                     dtype=np.int32)
        return seqlens, total, rows

    seqlens, total, rows = rw.shared(("ort_gqa_lengths", key), build)
    return {5: seqlens, 6: total, 16: rows}


def _empty_past(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """A cache of length 0, [B, Nkv, 0, H], for a model without one."""
    def build():
        np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
        empty = rw.const("ort_empty_past", np.zeros((1, spec.kv_heads, 0, spec.head_size), np_type))
        batch = rw.op("Shape", [spec.query], {"start": 0, "end": 1}, dtype=np.int64)
        shape = rw.op("Concat", [batch, rw.const("ort_ones3", np.ones(3, np.int64))], {"axis": 0})
        return rw.op("Expand", [empty, shape])

    key = ("ort_empty_past", spec.kv_heads, spec.head_size, spec.dtype, _dim_key(spec.query, 0, rw))
    return rw.shared(key, build)


def _dim_key(tensor: Tensor, axis: int, rw: Rewrite):
    shape = rw.graph.shape(tensor)
    dim = shape[axis] if shape is not None and len(shape) > axis else None
    return dim if isinstance(dim, (int, str)) else ("tensor", id(tensor))


def _graph_input(rw: Rewrite, name: str) -> Tensor:
    found = next((t for t in rw.graph.gs.inputs if t.name == name), None)
    if found is None:
        raise Reject(f"the padding input '{name}' is not a graph input")
    return found


def hidden_score(dtype: int) -> np.ndarray:
    """The additive value for a hidden key: half the lowest float, so that adding a score never
    overflows and a row whose keys are all hidden stays finite (a mean, at a padded token)."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return np.array(ml_dtypes.finfo(np_type).min / 2, np_type)


def _padding_bias(spec: AttentionSpec, past: Tensor, rw: Rewrite) -> Tensor:
    """attention_bias [B, 1, S, past + S]: 0 where attention_mask[b, j] is 1, hidden elsewhere,
    over the mask's last past + S columns: all of it where the mask spans the keys, the keys' own
    where it is longer (Hugging Face's sliding-window cache holds the last W - 1 tokens while the
    mask grows with every token; onnxruntime takes no longer bias). The mask class proves that
    this, with GQA's causal mask and window, is the original's visibility."""
    padding = _graph_input(rw, spec.mask.klass.padding_input)

    def build():
        np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
        past_len = rw.op("Shape", [past], {"start": 2, "end": 3}, dtype=np.int64)
        keys = rw.op("Add", [past_len, rw.op("Shape", [spec.query], {"start": 2, "end": 3}, dtype=np.int64)])
        last = rw.op("Slice", [padding, rw.op("Neg", [keys], dtype=np.int64),
                               rw.const("ort_to_end", np.array([np.iinfo(np.int64).max])),
                               rw.const("ort_axis1", np.array([1], np.int64))])
        valid = rw.op("Cast", [last], {"to": onnx.TensorProto.BOOL}, dtype=np.bool_)
        bias = rw.op("Where", [valid, rw.const("ort_zero", np.zeros((), np_type)),
                               rw.const("ort_hidden", hidden_score(spec.dtype))])
        bias = rw.op("Unsqueeze", [bias, rw.const("ort_axes12", np.array([1, 2], np.int64))])
        return _expand_to_scores(spec, bias, rw, keys=None)  # K/V are the cache GQA writes

    key = ("ort_padding_bias", padding.name, spec.dtype, _dim_key(spec.query, 2, rw), _dim_key(past, 2, rw))
    return rw.shared(key, build)


def additive_mask(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """The mask (plus the bias) as one additive tensor [B|1, N|1, Sq, Skv] in Q's type, hidden
    entries raised to the finite floor (see hidden_score)."""
    mask = spec.mask

    def build():
        np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
        floor = rw.const("ort_hidden", hidden_score(spec.dtype))
        if mask.kind in ("keep", "drop"):
            visible = mask.tensor if mask.kind == "keep" else rw.op("Not", [mask.tensor])
            tensor = rw.op("Where", [visible, rw.const("ort_zero", np.zeros((), np_type)), floor])
        else:
            tensor = mask.tensor if mask.bias is None else rw.op("Add", [mask.bias, mask.tensor])
            if onnx_dtype(tensor) not in (None, spec.dtype):
                lowest = rw.const("ort_lowest", hidden_score(spec.dtype).astype(np.float32))
                tensor = rw.op("Cast", [rw.op("Max", [tensor, lowest])], {"to": spec.dtype})
            tensor = rw.op("Max", [tensor, floor])
        rank = max(len(t.shape or ()) for t in (mask.tensor, mask.bias) if t is not None)
        if rank < 4:
            tensor = rw.op("Unsqueeze", [tensor, rw.const("ort_axes", np.arange(4 - rank, dtype=np.int64))])
        return _expand_to_scores(spec, tensor, rw, keys=spec.value)

    key = ("ort_additive_mask", id(mask.tensor), id(mask.bias), spec.dtype,
           _dim_key(spec.query, 2, rw), _dim_key(spec.value, 2, rw))
    return rw.shared(key, build)


def _expand_to_scores(spec: AttentionSpec, tensor: Tensor, rw: Rewrite, keys: Tensor | None) -> Tensor:
    """Broadcast dim 2 out to the query length and dim 3 to that of `keys` (None: the tensor
    already spans the keys): the kernels take no broadcast there."""
    q_len = rw.op("Shape", [spec.query], {"start": 2, "end": 3}, dtype=np.int64)
    one = rw.const("ort_one64", np.ones(1, np.int64))
    k_len = one if keys is None else rw.op("Shape", [keys], {"start": 2, "end": 3}, dtype=np.int64)
    return rw.op("Expand", [tensor, rw.op("Concat", [one, one, q_len, k_len], {"axis": 0})])
