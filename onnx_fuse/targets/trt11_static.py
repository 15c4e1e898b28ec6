"""`--kv-cache static` for target trt11: fixed caches written by TRT_KVCacheUpdate and read by
TRT_Attention with kv_lengths and causal_kind "lower_right", no mask.

kv_lengths say "keys j < len are valid", so this form defines the interface so that they can:
row b's valid slots are 0 .. write_position[b] + S - 1 (a prefix; kv_static's "ragged" check
scenario drives exactly that), and kv_lengths = write_position + S. Holes in the valid slots
(a left-padded batch mirrored slot for slot) cannot be said this way; the check does not drive
them. A layer with a sliding window keeps an explicit mask over the slots (TensorRT has no
window attribute), built from the attention_mask input as in the standard form.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from ..kv_static import StandardForm
from ..trt_schema import DOMAIN, TRT_ATTENTION, TRT_KV_CACHE_UPDATE
from .trt11_functions import kv_cache_update_function


class Trt11StaticForm(StandardForm):
    """Made for one conversion (it builds the lengths and write indices once for all layers)."""

    attention_ops = (TRT_ATTENTION.op_type,)
    write_op = TRT_KV_CACHE_UPDATE.op_type
    scenarios = ("ragged",)
    valid_slots = ("1 = the slot holds a valid token (this step's included); a row's valid slots "
                   "must be 0 .. write_position + S - 1: layers without a sliding window read only "
                   "write_position (TRT_Attention's kv_lengths)")

    def __init__(self):
        self._lengths: gs.Variable | None = None
        self._indices: gs.Variable | None = None

    def remask(self, conversion, attention: gs.Node, window: int | None) -> None:
        if window is not None:  # an explicit mask, causal_kind "none"
            super().remask(conversion, attention, window)
            return
        while len(attention.inputs) > 3:  # the mask goes
            attention.inputs.pop()
        attention.inputs.extend([gs.Variable.empty(), gs.Variable.empty(), self._kv_lengths(conversion)])
        attention.attrs["causal_kind"] = "lower_right"

    def write(self, conversion, concat: gs.Node) -> None:
        concat.op, concat.domain = TRT_KV_CACHE_UPDATE.op_type, DOMAIN
        concat.attrs = {"mode": "linear", "axis": -2}
        concat.inputs.append(self._write_indices(conversion))  # (past, new, write_indices)

    def functions(self) -> list[onnx.FunctionProto]:
        return [kv_cache_update_function(24)]

    def _kv_lengths(self, conversion) -> gs.Variable:
        """INT32 [B]: write_position + S, the valid slots once this step's tokens are written."""
        if self._lengths is None:
            ids = conversion.tensors[conversion.layout.ids]
            seq = conversion.node("Shape", [ids], {"start": 1, "end": 2}, np.int64, [1])
            total = conversion.node("Add", [conversion.write, seq], dtype=np.int64)
            self._lengths = conversion.node("Cast", [total], {"to": TensorProto.INT32}, np.int32,
                                            [conversion.layout.batch_dim])
        return self._lengths

    def _write_indices(self, conversion) -> gs.Variable:
        """INT32 [B]: write_position, as TRT_KVCacheUpdate takes it."""
        if self._indices is None:
            self._indices = conversion.node("Cast", [conversion.write], {"to": TensorProto.INT32},
                                            np.int32, [conversion.layout.batch_dim])
        return self._indices
