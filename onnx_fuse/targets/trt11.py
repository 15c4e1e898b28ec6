"""Target "trt11": TensorRT 11's TRT_Attention and TRT_KVCacheUpdate, standard RotaryEmbedding.

TRT_Attention (schema and version: trt_schema.py) says "causal" without a mask tensor, aligned
to the top left (prefill) or to the end of the keys (decode), which lets TensorRT pick its
causal kernels and skip masked blocks; its lengths inputs say which keys of a row are valid. What
it is given follows from the mask class the pass proved (masks.py):

- none: nothing; causal upper-left: causal_kind "upper_left"; causal lower-right without
  padding: causal_kind "lower_right" (aligned to the key length);
- anything else keeps an explicit mask with the causal part in it, causal_kind "none": a sliding
  window (TensorRT has no window attribute, and a mask cannot be combined with a causal kind);
  a padding mask, because kv_lengths say "keys j < len are valid" (right padding) while a 0/1
  attention_mask input may hide any key (batched generation pads on the left); an arbitrary one.
  Fixed caches whose valid slots are a prefix (`--kv-cache static` for this target) get
  kv_lengths and no mask.

Attention with a softcap (Gemma 2), which TRT_Attention cannot express, is written as target
primitive-trt writes it: MatMul, the pointwise cap, one -inf Where of a Range-built causal mask,
Softmax, MatMul, which TensorRT's own MHA fusion takes (causal masks only).

Q is scaled before the op (TRT_Attention does not scale; TensorRT wants the scale on Q). Where
the original runs the softmax in float32 over float16 inputs, Q, K and V are cast up around the
op, the form TensorRT 11.3+ gives FP32 accumulation. Each emitted custom op carries its body in
standard ops (trt11_functions.py), which the check runs in onnxruntime.

Options: `cp_ranks` (nb_rank on every TRT_Attention: TensorRT's multi-device attention over N
GPUs, a preview feature, FP16/BF16 only) and `decomposable` (TRT_decomposable=1: a decomposed
fallback where no fused kernel fits, instead of a failed build).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto

from .. import trt_contract
from ..errors import BadInput
from ..graph import Tensor
from ..rewrite import Rewrite
from ..specs import AttentionSpec, KVCacheWriteSpec, RotarySpec
from ..trt_schema import (DOMAIN, DOMAIN_VERSION, MULTIDEVICE_PREVIEW_FLAG, MULTIDEVICE_REQUIREMENTS,
                          TRT_ATTENTION, TRT_KV_CACHE_UPDATE)
from . import primitive_trt, trt11_quantized
from .base import Proof, Target
from .onnx import attention_mask, emit_rotary, finish, scaled, shared_write_indices
from .trt11_functions import attention_function, kv_cache_update_function
from .trt11_static import Trt11StaticForm

_MULTIDEVICE_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_PRIMITIVE = primitive_trt.PrimitiveTrtTarget()  # for softcapped attention (see emit_attention)


@dataclass(frozen=True)
class Settings:
    """The user's options for this target."""

    cp_ranks: int = 1
    decomposable: bool = False


def emit_attention(spec: AttentionSpec, rw: Rewrite, settings: Settings) -> None:
    if spec.quant is not None:
        trt11_quantized.emit(spec, rw, settings.decomposable)
        return
    if spec.softcap:  # TRT_Attention has none: the primitive form TensorRT's MHA fusion takes
        primitive_trt.emit_attention(spec, rw)
        return
    compute = compute_dtype(spec)
    query, key, value = _operands(spec, rw, compute)
    causal_kind, mask = _masking(spec, rw, compute)
    attrs = {"causal_kind": causal_kind}
    if settings.decomposable:
        attrs["TRT_decomposable"] = 1
    if settings.cp_ranks > 1:
        attrs["nb_rank"] = settings.cp_ranks
    rw.function(attention_function(rw.graph.opsets.get("", Trt11Target.floor_opset)))
    inputs = [query, key, value] + ([mask] if mask is not None else [])
    finish(spec, TRT_ATTENTION.op_type, inputs, attrs, rw, domain=DOMAIN, dtype=compute)


def compute_dtype(spec: AttentionSpec) -> int:
    """The type TRT_Attention runs in: the softmax's where the original raised it (float32)."""
    return spec.softmax_dtype if spec.softmax_dtype is not None else spec.dtype


def _operands(spec: AttentionSpec, rw: Rewrite, compute: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q scaled, K as [B, N, S, H], V; all in the compute type."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(compute)
    key = spec.key
    if spec.key_perm is not None:
        key = rw.op("Transpose", [key], {"perm": list(spec.key_perm)}, dtype=key.dtype)
    operands = [spec.query, key, spec.value]
    if compute != spec.dtype:
        operands = [rw.op("Cast", [t], {"to": compute}, dtype=np_type) for t in operands]
    query, key, value = operands
    if spec.scale != 1.0:
        query = scaled(query, spec.scale, compute, rw)
    return query, key, value


def _masking(spec: AttentionSpec, rw: Rewrite, compute: int) -> tuple[str, Tensor | None]:
    """causal_kind and the explicit mask (None: none), from the proven mask class."""
    mask = spec.mask
    if mask is None or mask.hides_nothing:
        return "none", None
    if mask.upper_left_causal:
        return "upper_left", None
    if mask.bias is None and mask.klass is not None and mask.klass.kind == "causal_lower_right":
        return "lower_right", None  # no padding: aligned to the key length either way
    # A window, padding (which keys it hides is the input's business) or an arbitrary mask: the
    # original's mask, causal triangle included, as Attention takes it, in the compute type.
    return "none", attention_mask(replace(spec, dtype=compute), rw)


def emit_kv_cache_write(spec: KVCacheWriteSpec, rw: Rewrite) -> None:
    """TRT_KVCacheUpdate (TensorRT's IKVCacheUpdateLayer): the update written into the cache
    along axis -2 at write_indices[b] = positions[0] (int32 [B], built once and shared)."""
    wide = shared_write_indices(spec, rw)
    indices = rw.shared(("trt_write_indices", id(wide)),
                        lambda: rw.op("Cast", [wide], {"to": TensorProto.INT32}, dtype=np.int32))
    update = spec.update
    if spec.update_perm is not None:
        update = rw.op("Transpose", [update], {"perm": list(spec.update_perm)}, dtype=update.dtype)
    rw.function(kv_cache_update_function(rw.graph.opsets.get("", KVCacheWriteSpec.min_opset)))
    rw.op(TRT_KV_CACHE_UPDATE.op_type, [spec.past, update, indices], {"mode": "linear", "axis": -2},
          domain=DOMAIN, outputs=[spec.output])


class Trt11Target(Target):
    name = "trt11"
    floor_opset = 23  # the Attention in TRT_Attention's body; RotaryEmbedding
    domains = {DOMAIN: DOMAIN_VERSION}
    proof = Proof("functions")
    static_cache = True  # its own form: trt11_static.py
    keeps_quantization = True  # TRT_QuantizedAttention (trt11_quantized.py)

    def __init__(self, settings: Settings = Settings()):
        self.settings = settings
        self.emitters = {
            AttentionSpec: lambda spec, rw: emit_attention(spec, rw, settings),
            RotarySpec: emit_rotary,
            KVCacheWriteSpec: emit_kv_cache_write,
        }

    def configured(self, options: dict) -> Trt11Target:
        unknown = set(options) - {"cp_ranks", "decomposable"}
        if unknown:
            return super().configured({k: options[k] for k in unknown})
        cp_ranks = options.get("cp_ranks", 1)
        if not isinstance(cp_ranks, int) or cp_ranks < 1:
            raise BadInput(f"--cp-ranks must be a positive number of GPUs, got {cp_ranks}")
        return Trt11Target(Settings(cp_ranks, bool(options.get("decomposable", False))))

    def refusal(self, spec) -> str | None:
        reason = super().refusal(spec)
        if reason is not None or not isinstance(spec, AttentionSpec):
            return reason
        if spec.quant is not None:
            return trt11_quantized.refusal(spec, self.settings.cp_ranks)
        if spec.sinks is not None:
            return "TRT_Attention cannot express learned attention sinks (an extra logit per row)"
        if spec.softcap and (self.settings.cp_ranks > 1 or _PRIMITIVE.refusal(spec) is not None):
            return ("TRT_Attention has no softcap (c·tanh(s/c) on the scores), and the primitive "
                    "form TensorRT fuses itself is written for causal masks on one device only")
        if self.settings.cp_ranks > 1 and compute_dtype(spec) not in _MULTIDEVICE_TYPES:
            name = TensorProto.DataType.Name(compute_dtype(spec)).lower()
            return (f"--cp-ranks {self.settings.cp_ranks}: TensorRT's multi-device attention "
                    f"takes FP16 or BF16 only; this attention computes in {name}")
        return None

    def static_form(self):
        return Trt11StaticForm()

    def contract(self, model: onnx.ModelProto) -> list[dict]:
        return trt_contract.check_model(model, version="11")

    def notes(self) -> list[str]:
        if self.settings.cp_ranks == 1:
            return []
        return [f"nb_rank={self.settings.cp_ranks} on every TRT_Attention: TensorRT's multi-device "
                f"attention is a preview feature: enable {MULTIDEVICE_PREVIEW_FLAG} in the builder "
                f"config; it needs {MULTIDEVICE_REQUIREMENTS}"]
