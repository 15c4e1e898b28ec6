"""Q/DQ pairs as targets write them around the ops they emit for a quantized attention
(specs.AttentionQuant): the same scale, zero point and type as the source's pair, on the tensor
the target's kernel reads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..graph import Tensor
from ..rewrite import Rewrite
from ..specs import QuantSpec

_FLOAT8 = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


def fake_quantized(tensor: Tensor, pair: QuantSpec | None, rw: Rewrite) -> Tensor:
    """`tensor` through QuantizeLinear → DequantizeLinear with `pair`'s parameters; `tensor`
    itself where there is no pair."""
    if pair is None:
        return tensor
    scale = rw.const("qdq_scale", pair.scale)
    zero_point = rw.const("qdq_zero_point", pair.zero_point)
    attrs = {"saturate": 0} if pair.zero_point.dtype.name in _FLOAT8 and not pair.saturate else {}
    quantized = rw.op("QuantizeLinear", [tensor, scale, zero_point], attrs, dtype=pair.zero_point.dtype)
    return rw.op("DequantizeLinear", [quantized, scale, zero_point], dtype=pair.scale.dtype)


def rescaled(pair: QuantSpec | None, factor: float) -> QuantSpec | None:
    """The pair for the tensor multiplied by `factor` (> 0): the same integers, its scale times the
    factor (a constant factor moved into the quantized operand keeps what is rounded)."""
    if pair is None:
        return None
    return replace(pair, scale=np.asarray(pair.scale * factor, dtype=pair.scale.dtype))
