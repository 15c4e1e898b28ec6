"""What a match found, independent of what any target emits for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .graph import Tensor

Dim = int | str | None

# The one visibility rule of the tool: an additive mask value at or below this hides a key (its
# exp underflows to 0 in every float type), 0 shows it; anything between is a bias, not a mask.
# masks.py classifies by it, attention rules accept fills by it, emitters threshold by it.
HIDDEN_AT_OR_BELOW = -1e4


@dataclass(frozen=True)
class MaskClass:
    """What a mask computes, proven by evaluation (masks.py; its docstring gives the templates).

    kind:       "none", "padding", "causal_upper_left", "causal_lower_right", "causal_padding",
                "sliding_window" or "arbitrary".
    alignment:  "upper_left" | "lower_right" for the causal kinds and "sliding_window"; None
                otherwise. Query i of Sq sits at key position c = i + (Skv - Sq) when lower-right
                aligned (the query is the last Sq positions, as with a KV cache), c = i when
                upper-left aligned.
    window:     for "sliding_window": key j is visible from query i iff c - window < j <= c. A
                query sees the `window` most recent keys including itself; this is Hugging Face's
                convention (masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window,
                on top of kv_idx <= q_idx), so config.sliding_window = W gives window = W, and
                ONNX Attention (opset 25, p - left_window_size <= j <= p) needs
                left_window_size = window - 1.
    padding:    visibility also requires attention_mask[b, j] == 1 for the 0/1 graph input named
                by `padding_input` (the mask reads that input's values). Proven for 0/1 values,
                which is what such an input holds; token ids never qualify.
    reason:     for "arbitrary", why nothing fit; otherwise how it was proven (the sizes).
    empty_rows: some query row hides every key at some evaluated size.
    hides_with_minus_inf: the mask is additive and every hidden entry is -inf (an all-hidden
                row is then NaN after the softmax, not an average of the keys).
    padding_input: name of the graph input the padding condition reads (None if not padding).
    sizes:      the (batch, query, key) sizes it was proven at.
    """

    kind: str
    alignment: str | None = None
    window: int | None = None
    padding: bool = False
    reason: str = ""
    empty_rows: bool = False
    hides_with_minus_inf: bool = False  # an additive mask whose hidden entries are all -inf
    padding_input: str | None = None
    sizes: tuple = ()

    @property
    def causal(self) -> bool:
        return self.kind in ("causal_upper_left", "causal_lower_right", "causal_padding",
                             "sliding_window")


@dataclass
class MaskSpec:
    """How the scores are masked before the softmax.

    kind "additive": scores + tensor.
    kind "keep":     where(tensor, scores, fill)  (True = may attend)
    kind "drop":     where(tensor, fill, scores)  (True = masked out)
    """

    kind: str
    tensor: Tensor
    fill: float | None = None
    bias: Tensor | None = None  # a second additive term (scores + bias + tensor)
    klass: MaskClass | None = None  # what `tensor` computes, proven by evaluation (masks.py)

    @property
    def hides_nothing(self) -> bool:
        """Proven to hide no key anywhere (e.g. ViT's all-zero mask): it can be dropped."""
        return self.bias is None and self.klass is not None and self.klass.kind == "none"

    @property
    def upper_left_causal(self) -> bool:
        """Exactly Attention's is_causal (without past_key): the mask can be dropped."""
        return self.bias is None and self.klass is not None and self.klass.kind == "causal_upper_left"

    @property
    def boolean_exact(self) -> bool:
        """A proven mask (0 / hidden values) with no fully hidden query row, so a boolean mask
        computes exactly what the additive one did."""
        return (self.bias is None and self.klass is not None and self.klass.kind != "arbitrary"
                and not self.klass.empty_rows)


@dataclass(frozen=True)
class QuantSpec:
    """One QuantizeLinear → DequantizeLinear pair (fake quantization, as NVIDIA ModelOpt writes
    it) on one tensor: x ↦ (saturate(round(x / scale) + zero_point) - zero_point) · scale. Per
    tensor only: a per-tensor pair is elementwise, so it commutes with the head transposes and the
    GQA head repetition that targets move around it."""

    scale: np.ndarray  # scalar, of the dequantized float type
    zero_point: np.ndarray  # scalar, of the quantized type (int8, uint8, float8e4m3fn, ...)
    saturate: bool  # float8: out-of-range values clamp (1, the default) rather than become NaN/inf
    tensor: str  # the quantized tensor of the source model (the QuantizeLinear's input), for the report

    @property
    def dtype(self) -> int:
        """The quantized onnx type."""
        import onnx

        return onnx.helper.np_dtype_to_tensor_dtype(self.zero_point.dtype)

    def summary(self) -> dict:
        return {"dtype": _dtype_name(self.dtype), "scale": float(self.scale),
                "zero_point": float(self.zero_point), "tensor": self.tensor}


@dataclass(frozen=True)
class AttentionQuant:
    """Where an attention core is quantized: the Q/DQ pair on each operand of its two products
    (None: that operand is not quantized). Q and K are the Q·Kᵀ MatMul's inputs; `probs` is the
    softmax output multiplied with V (TensorRT's "normalization quantize")."""

    query: QuantSpec | None
    key: QuantSpec | None
    value: QuantSpec | None
    probs: QuantSpec | None

    def pairs(self) -> dict[str, QuantSpec]:
        named = {"query": self.query, "key": self.key, "value": self.value, "probs": self.probs}
        return {name: pair for name, pair in named.items() if pair is not None}

    def summary(self) -> dict:
        return {name: pair.summary() for name, pair in self.pairs().items()}


@dataclass
class AttentionSpec:
    """softmax(scale * Q Kᵀ (masked)) V over 4-D [batch, heads, seq, head_size] tensors."""

    query: Tensor  # [B, Nq, Sq, H]
    key: Tensor  # key_perm applied to it gives [B, Nkv, Skv, H]
    key_perm: tuple[int, ...] | None
    value: Tensor  # [B, Nkv, Skv, Hv]
    output: Tensor  # [B, Nq, Sq, Hv]: the fused op takes over this tensor
    scale: float
    softcap: float  # c in c · tanh(scores / c) before the mask; 0 for none
    mask: MaskSpec | None
    softmax_dtype: int | None  # onnx dtype the softmax runs in when it differs from Q's
    # What the original outputs for a query row whose keys are all hidden: "mean" of V (finite
    # fill: the softmax is uniform), "zero" (-inf fill and torch SDPA's NaN guard) or "nan".
    empty_row_output: str
    flat_output: bool  # the original output is [B*Nq, Sq, Hv]: reshape the 4-D result to it
    output_dtype: int  # the original output's type (float32 where the export raised V to it)
    dtype: int  # onnx dtype of Q, K, V
    q_heads: Dim
    kv_heads: Dim
    head_size: Dim  # of Q and K
    value_head_size: Dim = None  # of V where it differs from Q/K's (multi-head latent attention)
    # Learned attention sinks (GPT-OSS): one logit per query head [Nq], in Q's type, that joins
    # every row's softmax denominator and is dropped after: softmax over [scores, sink], then
    # the sink column removed. ONNX Attention cannot express it.
    sinks: Tensor | None = None
    # The Q/DQ pairs on its operands (a quantized model); `query`, `key` and `value` above are the
    # tensors those pairs quantize, and `scale` leaves out any factor applied inside a pair.
    quant: AttentionQuant | None = None
    # The fused op the source already computes this with (an exporter's ONNX "Attention"); None
    # for attention written in primitive ops. A target may decline to rewrite an op into itself.
    written_as: str | None = None
    # Tensors the source's op computes inside itself, which the tensors above stand in for (see
    # OperandViews); None when they are all the graph's own.
    views: "OperandViews | None" = None

    def summary(self) -> dict:
        return {
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "head_size": self.head_size,
            "scale": round(self.scale, 8),
            "softcap": self.softcap,
            "mask": None if self.mask is None else self.mask.kind,
            "mask_class": None if self.mask is None or self.mask.klass is None else self.mask.klass.kind,
            "window": None if self.mask is None or self.mask.klass is None else self.mask.klass.window,
            "is_causal": self.mask is not None and self.mask.upper_left_causal,
            "dtype": _dtype_name(self.dtype),
            **({"value_head_size": self.value_head_size} if self.value_head_size is not None else {}),
            **({"sinks": self.sinks.name} if self.sinks is not None else {}),
            **({"quantization": self.quant.summary()} if self.quant is not None else {}),
            **({"written_as": self.written_as} if self.written_as is not None else {}),
        }


@dataclass(frozen=True)
class OperandViews:
    """What an AttentionSpec's stand-in tensors are, when the source computes its operands inside
    one fused op and the graph holds no such tensor: ONNX Attention's 3-D form takes Q, K and V as
    [B, S, N·H] and splits the heads itself, and its is_causal=1 hides keys j > i with no mask
    tensor. The spec's query, key, value and output are then 4-D stand-ins [B, N, S, H] of the
    `packed` tensors, its mask tensor a stand-in boolean [Sq, Skv] for the causal triangle; every
    target computes them first (targets/views.py) and then emits as for primitive attention."""

    packed: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # Q, K, V and Y as the source has them
    causal_mask: bool = False  # mask.tensor stands for j <= i (upper left)


def _dtype_name(onnx_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(onnx_type).lower()


@dataclass
class RotarySpec:
    """Rotary position embedding with the semantics of ONNX RotaryEmbedding (opset 23): the first
    `rotary_dim` channels of each head rotate by the angle of their position, the rest pass
    through.

    form "table":    cos/sin_cache[max_positions, rotary_dim / 2] indexed by `positions`.
    form "computed": the graph computes cos/sin per token (nothing bounds the positions, or a
                     token's angles depend on the whole sequence, as LongRoPE's switch); `cos` and
                     `sin` are the graph's tensors multiplied with x, rank `table_rank`, each angle
                     repeated for both channels of its pair (proven at sample positions).
    """

    input: Tensor  # x, laid out as `layout` says
    output: Tensor  # the fused op takes over this tensor
    positions: Tensor  # integer positions, [seq] or [1 or batch, seq], as the graph computes them
    cos_cache: np.ndarray | None  # [max_positions, rotary_dim / 2], x's dtype (table form)
    sin_cache: np.ndarray | None
    cache_key: object  # specs with equal keys share one pair of caches (or per-token tables)
    interleaved: bool  # pairs (x0, x1), (x2, x3), ... rather than halves (x_i, x_{i + rotary_dim/2})
    rotary_dim: int
    head_size: int
    layout: str  # "bnsh" / "bsnh": 4-D after / before the head transpose; "bsh": 3-D, one head
    dtype: int  # onnx dtype of x
    form: str = "table"
    form_reason: str = ""
    cos: Tensor | None = None  # computed form: cos as multiplied with x ([.., seq, .., rotary_dim])
    sin: Tensor | None = None
    table_rank: int = 0  # rank of `cos`
    tables_halved: bool = False  # computed form: `cos`/`sin` hold one angle per pair already
    # x's channels go in de-interleaved (x[..., 0::2], then x[..., 1::2]): the output of a
    # rotation written on even and odd channels whose results are concatenated, not interleaved
    deinterleave: bool = False
    # The rotation's result is concatenated (on the last axis, in the same Concat) between these
    # tensors: `output` is that Concat's (MLA's q_nope and q_rope, merged by TorchScript)
    around: tuple[list, list] | None = None

    @property
    def max_positions(self) -> int | None:
        return None if self.cos_cache is None else int(self.cos_cache.shape[0])

    def summary(self) -> dict:
        return {
            "interleaved": self.interleaved,
            "rotary_dim": self.rotary_dim,
            "head_size": self.head_size,
            "form": self.form,
            "form_reason": self.form_reason,
            **({"deinterleave": True} if self.deinterleave else {}),
            "max_positions": self.max_positions,
            "layout": self.layout,
            "dtype": _dtype_name(self.dtype),
        }


@dataclass
class KVCacheWriteSpec:
    """A KV-cache write with the semantics of ONNX TensorScatter (opset 24, axis -2, linear): the
    S tokens of `update` are copied into `past` at slots start .. start + S - 1 of axis -2, start
    being positions[0] for every batch row; the rest of the cache passes through."""

    min_opset: ClassVar[int] = 24  # TensorScatter (fuse raises the model to the max its specs need)

    past: Tensor  # [B, N, L, H]: the cache before the write
    update: Tensor  # update_perm applied to it gives [B, N, S, H]: the new tokens' keys or values
    update_perm: tuple[int, ...] | None
    output: Tensor  # the updated cache [B, N, L, H]: the fused op takes over this tensor
    positions: Tensor  # 1-D integer [S]: the slot of each new token, contiguous
    contiguity: str  # why positions are contiguous: "range", "constant" or "assumed" (an input)
    form: str  # what was matched: "scatter_elements" or "scatter_nd"
    cache_len: Dim
    kv_heads: Dim
    head_size: Dim
    dtype: int

    def summary(self) -> dict:
        return {
            "form": self.form,
            "cache_len": self.cache_len,
            "kv_heads": self.kv_heads,
            "head_size": self.head_size,
            "positions": self.positions.name,
            "write_index": f"{self.positions.name}[0]",
            "contiguous": ("assumed: the input is arange(p, p + S)" if self.contiguity == "assumed"
                           else f"proven ({self.contiguity})"),
            "dtype": _dtype_name(self.dtype),
        }
