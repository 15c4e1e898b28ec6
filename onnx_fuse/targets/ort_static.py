"""`--kv-cache static` for target ort: each self-attention's GroupQueryAttention reads and writes
one shared buffer per cache, [B, N_kv, N, H], onnxruntime-genai's past_present_share_buffer.

The ort pass already turned each `Concat(past, new)` into GQA's past/present, so there is no
Concat left to write: GQA is this form's cache writer (StandardForm.cache_writers). Its remask
gives it, from kv_static's interface (write_position [B], attention_mask [B, N] over the slots):
- seqlens_k = write_position + S - 1, the slot of the row's last new token: GQA writes the S new
  tokens at slots seqlens_k + 1 - S .. seqlens_k and reads slots 0 .. seqlens_k, query t at slot
  write_position + t (lower-right causal). Not the mask's sum - 1: that is the slot of the last
  token only for rows without holes (a left-padded row would be written too early);
- total_sequence_length = N, attention_bias [B, 1, S, N] hiding the slots the mask says are not
  valid (holes allowed, so both of the check's scenarios hold);
- local_window_size = the layer's window: GQA hides slots at or before query - W, what the
  standard form's mask over the slots hides;
- RoPE folded into GQA keeps its cos/sin caches; kv_positions re-points its position_ids to
  write_position + t.
Attention that ort writes as ONNX Attention (MLA's V head size, an exporter's own Attention) takes
the standard form (TensorScatter and the mask over the slots); cross-attention (MultiHeadAttention)
stays as it is. A MultiHeadAttention that reads a cache is refused: the pass chose it where GQA did
not fit, and this form writes no MultiHeadAttention over a fixed cache.

What onnxruntime 1.32's CPU kernel does with such a buffer (tests/test_ort_static.py runs each):
- past longer than seqlens_k + 1: present has the past's length N; slots 0 .. seqlens_k are
  right (the past's copied, the new ones written), and with past and present separate buffers
  (a plain session run) the slots after them come back zero. Bound to one buffer (IO binding)
  every other slot keeps what it held. So the written model says in metadata_props that each
  present shares its past's buffer, and the multi-step check runs it so;
- total_sequence_length may be anything from the longest row's seqlens_k + 1 to N, but
  attention_bias's last dim must equal it: N, for the bias over the slots.
Sharing a buffer also means nothing else may read a past's values: the form refuses a model where
something does (it would read this step's writes or not, by node order).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from ..errors import BadInput
from ..graph import onnx_dtype
from ..kv_static import StandardForm
from .ort_attention import ATTENTION, GQA, MHA, hidden_score

_SEQLENS_K, _TOTAL_LENGTH, _ATTENTION_BIAS = 5, 6, 10  # GroupQueryAttention's inputs


class OrtStaticForm(StandardForm):
    """Made for one conversion (it builds the lengths and biases once for all layers)."""

    attention_ops = (GQA, MHA, ATTENTION)
    cache_writers = (GQA,)
    shares_buffer = True
    valid_slots = ("1 = the slot holds a valid token (this step's included); each present shares "
                   "its past's buffer")

    def __init__(self):
        self._lengths: tuple | None = None
        self._biases: dict = {}

    def old_masks(self, attention: gs.Node) -> list:
        if attention.op == GQA:
            return attention.inputs[_ATTENTION_BIAS:_ATTENTION_BIAS + 1]
        return super().old_masks(attention)

    def remask(self, conversion, attention: gs.Node, window: int | None) -> None:
        if attention.op == ATTENTION:
            super().remask(conversion, attention, window)
            return
        if attention.op == MHA:
            raise BadInput(f"{MHA} '{attention.name}' reads a cache: --kv-cache static for target ort "
                           f"writes {GQA} (or ONNX Attention) over a fixed cache, not {MHA}")
        seqlens, total = self._lengths_of(conversion)
        while len(attention.inputs) <= _ATTENTION_BIAS:
            attention.inputs.append(gs.Variable.empty())
        attention.inputs[_SEQLENS_K], attention.inputs[_TOTAL_LENGTH] = seqlens, total
        attention.inputs[_ATTENTION_BIAS] = self._slot_bias(conversion, attention.inputs[3]) \
            if conversion.layout.mask else gs.Variable.empty()
        attention.attrs.pop("local_window_size", None)
        if window is not None:
            attention.attrs["local_window_size"] = int(window)

    def finish(self, conversion) -> None:
        """Each past is read by value by the one op that writes it in place, nothing else."""
        for past, _ in conversion.layout.pairs:
            readers = [n for n in conversion.tensors[past].outputs if n.op not in ("Shape", "Size")]
            if len(readers) > 1:
                names = ", ".join(f"{n.op} '{n.name}'" for n in readers)
                raise BadInput(f"the cache '{past}' is read by {names}: in a buffer shared with its "
                               "present, all but the op that writes it would read this step's "
                               "writes or not, by node order")

    def _lengths_of(self, conversion) -> tuple:
        """seqlens_k INT32 [B] (write_position + S - 1) and total_sequence_length INT32 (N)."""
        if self._lengths is None:
            last = conversion.node("ReduceMax", [conversion.query, conversion.const("axis1", np.array([1]))],
                                   {"keepdims": 0}, np.int64, [conversion.layout.batch_dim])
            seqlens = conversion.node("Cast", [last], {"to": TensorProto.INT32}, np.int32,
                                      [conversion.layout.batch_dim])
            total = conversion.const("total_sequence_length", np.array(conversion.cache_len, np.int32))
            self._lengths = seqlens, total
        return self._lengths

    def _slot_bias(self, conversion, like: gs.Variable) -> gs.Variable:
        """attention_bias [B, 1, S, N] in the type of `like` (the past cache, the query's type):
        0 where attention_mask[b, j] is 1, hidden elsewhere (GQA takes no broadcast over S).
        Built in float32 and cast (numpy has no bfloat16 for the constants)."""
        onnx_type = onnx_dtype(like)
        if onnx_type not in self._biases:
            mask = conversion.tensors[conversion.layout.mask]
            valid = conversion.node("Cast", [mask], {"to": TensorProto.BOOL}, np.bool_)
            hidden = conversion.const("hidden", hidden_score(onnx_type).astype(np.float32))
            bias = conversion.node("Where", [valid, conversion.const("visible", np.float32(0)), hidden],
                                   dtype=np.float32)
            if onnx_type != TensorProto.FLOAT:
                bias = conversion.node("Cast", [bias], {"to": onnx_type}, like.dtype)
            bias = conversion.node("Unsqueeze", [bias, conversion.const("axes12", np.array([1, 2]))],
                                   dtype=like.dtype)
            new = conversion.node("Shape", [conversion.query], {"start": 1, "end": 2}, np.int64, [1])
            one = conversion.const("one1", np.ones(1, np.int64))
            slots = conversion.const("slots1", np.array([conversion.cache_len], np.int64))
            shape = conversion.node("Concat", [one, one, new, slots], {"axis": 0}, np.int64, [4])
            self._biases[onnx_type] = conversion.node(
                "Expand", [bias, shape], dtype=like.dtype,
                shape=[conversion.layout.batch_dim, 1, None, conversion.cache_len])
        return self._biases[onnx_type]
