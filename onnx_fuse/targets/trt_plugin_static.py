"""`--kv-cache static` for target trt-plugin: fixed caches written in place by FusedKVWrite and
read by FusedAttention over every slot.

FusedAttention says the fixed cache's validity itself: kv_lengths = write_position + S (the slots
written so far, this step's included: trt11's form builds them), the key mask = the
attention_mask input over the slots (holes allowed, so both of kv_static's check scenarios
hold), causal 2 (lower-right, aligned to kv_lengths: new token t sits at slot
write_position + t) and the layer's window.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .. import plugin_ops
from ..kv_static import StandardForm
from .trt11_static import Trt11StaticForm

_KEY_MASK, _KV_LENGTHS = 3, 5  # FusedAttention's inputs


class TrtPluginStaticForm(Trt11StaticForm):
    """Made for one conversion (it builds the key mask and lengths once for all layers)."""

    attention_ops = (plugin_ops.ATTENTION.name,)
    write_op = plugin_ops.KV_WRITE.name
    scenarios = StandardForm.scenarios  # holes in the valid slots are the key mask's
    valid_slots = StandardForm.valid_slots

    def __init__(self):
        super().__init__()
        self._key_mask: gs.Variable | None = None

    def remask(self, conversion, attention: gs.Node, window: int | None) -> None:
        attention.inputs[_KEY_MASK] = self._slot_mask(conversion)
        attention.inputs[_KV_LENGTHS] = self._kv_lengths(conversion)
        attention.attrs.update(causal=2, window=window or 0, use_key_mask=1)

    def write(self, conversion, concat: gs.Node) -> None:
        concat.op, concat.domain = plugin_ops.KV_WRITE.name, plugin_ops.DOMAIN
        concat.attrs = plugin_ops.attributes(plugin_ops.KV_WRITE.name)
        concat.inputs.append(conversion.write)  # (past, new, write_position)

    def functions(self) -> list[onnx.FunctionProto]:
        return [plugin_ops.function(plugin_ops.KV_WRITE.name, 24)]  # kv_static writes opset 24

    def _slot_mask(self, conversion) -> gs.Variable:
        """INT32 [B, N]: the attention_mask input, 1 where a slot holds a valid token."""
        if self._key_mask is None:
            mask = conversion.tensors[conversion.layout.mask]
            self._key_mask = conversion.node("Cast", [mask], {"to": TensorProto.INT32}, np.int32,
                                             [conversion.layout.batch_dim, conversion.cache_len])
        return self._key_mask
