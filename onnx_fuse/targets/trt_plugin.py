"""Target "trt-plugin": the project's own custom ops (plugin_ops.py: FusedAttention, FusedRotary,
FusedKVWrite), which TensorRT runs through the plugins of onnx_fuse.trt_plugins (Triton kernels,
TensorRT 10.9+) and onnxruntime through their model-local function bodies (Proof "functions").

What FusedAttention is given follows from the mask class the pass proved (masks.py): no mask,
`causal` 1 (upper-left) or 2 (lower-right, aligned to the key length: kv_lengths = Skv for every
row), `window` for a sliding window, and for padding a `key_mask` [B, Skv] read off the mask
the graph computes (see _key_mask). A mask that none of these says (an
arbitrary one, or an additive bias such as T5's relative positions) is refused. Learned sinks
are the op's `sinks` input, the original's output for a query row that sees no key its
`masked_row`. The op runs its softmax in float32 whatever Q's type.

RoPE in the table form is FusedRotary as RotaryEmbedding would be written (caches and position
ids); the computed form (cos/sin per token, no positions) becomes a table of one row per token,
[batch * seq, rotary/2], read at position b * seq + s. KV-cache writes are FusedKVWrite, whose
plugin writes the cache in place.

No emitted op needs a standard op newer than its function body, so the model keeps its opset
from 18 on (the bodies' floor; TensorRT 10.6-10.14 predates opsets 23 and 24) and every body is
written at the model's opset.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
from onnx import TensorProto, helper

from .. import plugin_ops, trt_contract
from ..graph import Tensor, onnx_dtype
from ..masks import mask_identity
from ..rewrite import Reject, Rewrite
from ..specs import HIDDEN_AT_OR_BELOW, AttentionSpec, KVCacheWriteSpec, MaskSpec, RotarySpec
from .base import Proof, Target
from .onnx import emit_rotary, finish, rotary_tables, same_dim, shared_write_indices
from .trt_plugin_static import TrtPluginStaticForm

_ALIGNMENT = {"upper_left": 1, "lower_right": 2}  # FusedAttention's `causal`
_PLUGIN_OPS = {f"{plugin_ops.DOMAIN}::{name}" for name in plugin_ops.OPS}  # as lint names them
LINT_VERSION = "10.15"  # the contract is checked for the oldest TensorRT the lint knows


@dataclass(frozen=True)
class Masking:
    """A proven mask as FusedAttention's attributes and key mask say it."""

    causal: int = 0
    window: int = 0
    padding: bool = False  # keys are hidden per batch row too: the op needs a key mask


def masking(mask: MaskSpec | None) -> Masking:
    """What FusedAttention is given for `mask`; Reject for a mask it cannot say."""
    if mask is None:
        return Masking()
    if mask.bias is not None:
        raise Reject("FusedAttention takes no additive bias on the scores (here a second term "
                     "besides the mask, such as T5's relative-position bias)")
    klass = mask.klass
    if klass is None or klass.kind == "arbitrary":
        why = klass.reason if klass is not None else "it was not classified"
        raise Reject("FusedAttention says causal, sliding-window and key-padding masks only; "
                     f"this mask is arbitrary: {why}")
    return Masking(causal=_ALIGNMENT[klass.alignment] if klass.causal else 0,
                   window=klass.window or 0, padding=klass.padding)


def body_opset(rw: Rewrite) -> int:
    """The opset the function bodies are written at: the model's."""
    opset = rw.graph.opsets.get("", TrtPluginTarget.floor_opset)
    if opset not in plugin_ops.OPSETS:
        raise Reject(f"the plugin ops' function bodies are written for opsets "
                     f"{plugin_ops.OPSETS.start}-{plugin_ops.OPSETS.stop - 1}, the model has {opset}")
    return opset


def attributes(op_name: str, **values) -> dict:
    """plugin_ops.attributes, a value the op's contract refuses being a Reject of the match."""
    try:
        return plugin_ops.attributes(op_name, **values)
    except ValueError as exc:
        raise Reject(f"{op_name}: {exc}") from None


def plugin_op(op_name: str, inputs: list, rw: Rewrite, outputs: list | None = None, **values) -> Tensor:
    """A node of op `op_name`, its function body registered with the rewrite."""
    rw.function(plugin_ops.function(op_name, body_opset(rw)))
    return rw.op(op_name, inputs, attributes(op_name, **values), domain=plugin_ops.DOMAIN,
                 outputs=outputs)


# --------------------------------------------------------------------------- attention


def emit_attention(spec: AttentionSpec, rw: Rewrite) -> None:
    said = masking(spec.mask)
    key = spec.key
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)}, dtype=key.dtype)
    inputs = [spec.query, key, spec.value, _key_mask(spec, said.padding, rw), _sinks(spec, rw),
              _every_key(spec, rw)]
    # A row that sees no key: the mean of V where the original's softmax over finite fills was
    # uniform; zeros otherwise (torch's NaN guard; a NaN row of the original is undefined).
    attrs = attributes(plugin_ops.ATTENTION.name, scale=spec.scale, causal=said.causal,
                       window=said.window, softcap=spec.softcap or 0.0,
                       masked_row=int(spec.empty_row_output == "mean"),
                       use_key_mask=int(said.padding))
    rw.function(plugin_ops.function(plugin_ops.ATTENTION.name, body_opset(rw)))
    finish(spec, plugin_ops.ATTENTION.name, inputs, attrs, rw, domain=plugin_ops.DOMAIN)


def _key_mask(spec: AttentionSpec, padding: bool, rw: Rewrite) -> Tensor:
    """The key mask [B, Skv] (int32, 1 = valid); [1, 1] (unused) without padding.

    Read off the mask the graph computes, not off its padding input: key j is valid if some query
    row sees it. The proven class says a row sees key j iff j is valid and its position allows
    it, so where no row sees j the position hides it from every row anyway. (The graph may read
    only part of the input: BART's cross-attention takes the first Skv entries of a longer one.)"""
    if not padding:
        return rw.shared(("plugin_no_key_mask",),
                         lambda: rw.const("no_key_mask", np.ones((1, 1), np.int32)))
    mask = spec.mask
    identity = mask_identity(rw.graph, mask.tensor)
    seen = rw.shared(("plugin_key_mask", identity or id(mask.tensor), mask.kind),
                     lambda: _keys_seen(mask, rw))
    shape = rw.graph.shape(mask.tensor) or ()
    if len(shape) == 4 and same_dim(shape[0], spec.query.shape[0]) \
            and same_dim(shape[3], spec.value.shape[2]):
        return seen
    batch = rw.op("Shape", [spec.query], {"start": 0, "end": 1}, dtype=np.int64)
    keys = rw.op("Shape", [spec.value], {"start": 2, "end": 3}, dtype=np.int64)
    size = rw.op("Concat", [batch, keys], {"axis": 0}, dtype=np.int64)
    return rw.op("Expand", [seen, size], dtype=np.int32)


def _keys_seen(mask: MaskSpec, rw: Rewrite) -> Tensor:
    """[B | 1, Skv | 1] int32: 1 where some query row of some head sees the key."""
    tensor = mask.tensor
    if mask.kind == "additive":
        np_type = helper.tensor_dtype_to_np_dtype(onnx_dtype(tensor))
        threshold = rw.const("mask_threshold", np.array(HIDDEN_AT_OR_BELOW, np_type))
        visible = rw.op("Greater", [tensor, threshold], dtype=np.bool_)
    else:
        visible = tensor if mask.kind == "keep" else rw.op("Not", [tensor], dtype=np.bool_)
    rank = len(rw.graph.shape(tensor) or (0,) * 4)
    if rank < 4:  # broadcast from the front, as the scores see it
        axes = rw.const("mask_axes", np.arange(4 - rank, dtype=np.int64))
        visible = rw.op("Unsqueeze", [visible, axes], dtype=np.bool_)
    flags = rw.op("Cast", [visible], {"to": TensorProto.INT32}, dtype=np.int32)
    rows = rw.const("heads_and_queries", np.array([1, 2], np.int64))
    return rw.op("ReduceMax", [flags, rows], {"keepdims": 0}, dtype=np.int32)


def _sinks(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """The sink logit per query head [Nq]; -inf (no sink) for attention without."""
    if spec.sinks is not None:
        flat = rw.const("sinks_flat", np.array([-1], np.int64))
        return rw.op("Reshape", [spec.sinks, flat], dtype=spec.sinks.dtype)
    if isinstance(spec.q_heads, int):
        return rw.shared(("plugin_no_sinks", spec.q_heads),
                         lambda: rw.const("no_sinks", np.full(spec.q_heads, -np.inf, np.float32)))
    heads = rw.op("Shape", [spec.query], {"start": 1, "end": 2}, dtype=np.int64)
    return rw.op("ConstantOfShape", [heads],
                 {"value": helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [-np.inf])},
                 dtype=np.float32)


def _every_key(spec: AttentionSpec, rw: Rewrite) -> Tensor:
    """kv_lengths int32 [B] = Skv: every key is valid (padding is the key mask's business)."""
    keys = rw.op("Shape", [spec.value], {"start": 2, "end": 3}, dtype=np.int64)
    batch = rw.op("Shape", [spec.query], {"start": 0, "end": 1}, dtype=np.int64)
    every = rw.op("Expand", [keys, batch], dtype=np.int64)
    return rw.op("Cast", [every], {"to": TensorProto.INT32}, dtype=np.int32)


# --------------------------------------------------------------------------- RoPE, KV write


def fused_rotary(spec: RotarySpec, x: Tensor, rw: Rewrite, outputs: list | None) -> Tensor:
    """FusedRotary of 4-D x over the spec's tables (shared by every layer)."""
    tables = rotary_tables(spec, rw)
    if spec.form == "computed":  # per-token cos/sin [B, S, R/2]: one table row per token
        tables = rw.shared(("plugin_token_tables", id(tables[0]), id(tables[1])),
                           lambda: _token_tables(*tables, rw))
    rotary_dim = 0 if spec.rotary_dim == spec.head_size else spec.rotary_dim
    return plugin_op(plugin_ops.ROPE.name, [x, *tables], rw, outputs,
                     interleaved=int(spec.interleaved), rotary_dim=rotary_dim)


def _token_tables(cos: Tensor, sin: Tensor, rw: Rewrite) -> tuple[Tensor, Tensor, Tensor]:
    """[B, S, R/2] cos/sin as caches [B * S, R/2] and position ids b * S + s [B, S]."""
    rows = rw.op("Concat", [rw.const("rope_rows", np.array([-1], np.int64)),
                            rw.op("Shape", [cos], {"start": 2}, dtype=np.int64)], {"axis": 0},
                 dtype=np.int64)
    caches = [rw.op("Reshape", [t, rows], dtype=t.dtype) for t in (cos, sin)]
    count = rw.op("Squeeze", [rw.op("Shape", [caches[0]], {"start": 0, "end": 1}, dtype=np.int64)],
                  dtype=np.int64)
    tokens = rw.op("Range", [rw.const("rope_first", np.array(0, np.int64)), count,
                             rw.const("rope_step", np.array(1, np.int64))], dtype=np.int64)
    grid = rw.op("Shape", [cos], {"start": 0, "end": 2}, dtype=np.int64)
    return caches[0], caches[1], rw.op("Reshape", [tokens, grid], dtype=np.int64)


def emit_kv_cache_write(spec: KVCacheWriteSpec, rw: Rewrite) -> None:
    """FusedKVWrite at write_indices[b] = positions[0] (int64 [B], built once and shared); the
    plugin's output aliases the cache."""
    update = spec.update
    if spec.update_perm is not None:
        update = rw.op("Transpose", [update], {"perm": list(spec.update_perm)}, dtype=update.dtype)
    plugin_op(plugin_ops.KV_WRITE.name, [spec.past, update, shared_write_indices(spec, rw)], rw,
              [spec.output])


class TrtPluginTarget(Target):
    name = "trt-plugin"
    floor_opset = 18  # the lowest opset plugin_ops writes its function bodies at
    domains = {plugin_ops.DOMAIN: plugin_ops.DOMAIN_VERSION}
    proof = Proof("functions")
    static_cache = True  # its own form: trt_plugin_static.py
    emitters = {AttentionSpec: emit_attention, RotarySpec: partial(emit_rotary, rotation=fused_rotary),
                KVCacheWriteSpec: emit_kv_cache_write}

    def refusal(self, spec) -> str | None:
        reason = super().refusal(spec)
        if reason is None and isinstance(spec, AttentionSpec):
            try:
                masking(spec.mask)
            except Reject as refused:
                return str(refused)
        return reason

    def spec_opset(self, spec) -> int:
        return 0  # FusedKVWrite's body needs no TensorScatter

    def static_form(self):
        return TrtPluginStaticForm()

    def contract(self, model) -> list[dict]:
        """TensorRT's parser rules and the ops' own contract (trt_custom_ops.py), per plugin node."""
        return [{"node": v.node, "op": v.op, "problems": [f.message for f in v.findings]}
                for v in trt_contract.verdicts(model, LINT_VERSION) if v.op in _PLUGIN_OPS]
