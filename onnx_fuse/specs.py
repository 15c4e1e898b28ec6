"""What a match found, independent of what any target emits for it."""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Tensor

Dim = int | str | None


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
    dtype: int  # onnx dtype of Q, K, V
    q_heads: Dim
    kv_heads: Dim
    head_size: Dim

    def summary(self) -> dict:
        return {
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "head_size": self.head_size,
            "scale": round(self.scale, 8),
            "softcap": self.softcap,
            "mask": None if self.mask is None else self.mask.kind,
            "dtype": _dtype_name(self.dtype),
        }


def _dtype_name(onnx_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(onnx_type).lower()
