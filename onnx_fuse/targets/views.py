"""The stand-in tensors of an AttentionSpec computed where the source's fused op computed them
inside itself (specs.OperandViews): every target emits these first, so its emitter reads 4-D
Q, K, V and a mask tensor whatever the source looked like.

- 3-D ONNX Attention: Q, K, V [B, S, N·H] split into heads as the op defines it (Reshape to
  [B, S, N, H], Transpose to [B, N, S, H]), and the 4-D result merged back into Y [B, S, N·Hv].
- is_causal=1 without a mask: key j visible from query i iff j <= i, as a boolean [Sq, Skv]
  built from Range (what the op computes without past_key).
"""

from __future__ import annotations

import numpy as np

from ..graph import Tensor
from ..rewrite import Rewrite
from ..specs import AttentionSpec


def emit_views(spec: AttentionSpec, rw: Rewrite) -> None:
    """The nodes that compute `spec`'s stand-ins (its emitter then reads them as the graph's)."""
    views = spec.views
    if views.packed is not None:
        query, key, value, output = views.packed
        _split_heads(query, spec.query, spec.q_heads, spec.head_size, rw)
        _split_heads(key, spec.key, spec.kv_heads, spec.head_size, rw)
        _split_heads(value, spec.value, spec.kv_heads, spec.value_head_size or spec.head_size, rw)
        bsnh = rw.op("Transpose", [spec.output], {"perm": [0, 2, 1, 3]}, dtype=spec.output.dtype)
        merge = rw.const("merge_heads", np.array([0, 0, -1], np.int64))
        rw.op("Reshape", [bsnh, merge], outputs=[output])
    if views.causal_mask:
        _causal_triangle(spec, rw)


def _split_heads(packed: Tensor, heads: Tensor, count: int, size: int, rw: Rewrite) -> None:
    """`heads` [B, N, S, H] from `packed` [B, S, N·H]."""
    split = rw.const("split_heads", np.array([0, 0, count, size], np.int64))
    bsnh = rw.op("Reshape", [packed, split], dtype=packed.dtype)
    rw.op("Transpose", [bsnh], {"perm": [0, 2, 1, 3]}, outputs=[heads])


def _causal_triangle(spec: AttentionSpec, rw: Rewrite) -> None:
    """spec.mask.tensor: boolean [Sq, Skv], True where j <= i."""
    zero, one = (rw.const(name, np.array(v, np.int64)) for name, v in (("zero", 0), ("one", 1)))
    lengths = [rw.op("Squeeze", [rw.op("Shape", [t], {"start": 2, "end": 3}, dtype=np.int64)],
                     dtype=np.int64) for t in (spec.query, spec.value)]
    queries, keys = (rw.op("Range", [zero, length, one], dtype=np.int64) for length in lengths)
    rows = rw.op("Unsqueeze", [queries, rw.const("axis1", np.array([1], np.int64))], dtype=np.int64)
    rw.op("GreaterOrEqual", [rows, keys], outputs=[spec.mask.tensor])
