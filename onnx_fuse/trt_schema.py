"""TensorRT 11's custom ops for transformer layers, as data: the one place that says which inputs
and attributes TRT_Attention and TRT_KVCacheUpdate have (the trt11 target writes them, the lint
checks them, the function bodies compute them).

NVIDIA's documentation holds two schemas of TRT_Attention (../shared/reference/
tensorrt-onnx-contract.md):
  (A) attributes is_causal and scale, inputs Q, K, V, attn_mask, past_key, past_value,
      query_lengths (6), kv_lengths (7);
  (B) the newer one: attribute causal_kind ("none" | "upper_left" | "lower_right"), no scale (Q
      is scaled beforehand), inputs Q, K, V, attn_mask (3), query_lengths (4), kv_lengths (5).
We write and check (B): `TRT_ATTENTION` below. Which TensorRT release ships which is not
confirmed; a version that takes (A) would need a second table, nothing else.

TensorRT's parser finds these importers by op_type alone (the domain is ignored); onnxruntime,
which runs their function bodies in the check, needs node, function and opset import to agree
on one domain: `DOMAIN`.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "trt"  # the domain TensorRT-Edge-LLM declares these ops in (trt::TRT_Attention)
DOMAIN_VERSION = 1

CAUSAL_KINDS = ("none", "upper_left", "lower_right")
IO_FORMS = ("padded_bhnd", "packed_nhd")
NORMALIZATION_OPS = ("softmax", "none")

# What causal_kind="lower_right" aligns the last query to, when kv_lengths gives each row's valid
# keys: "kv_lengths" (query i of Sq sits at key position kv_lengths[b] - Sq + i, FlashAttention's
# bottom-right convention for variable lengths) or "padded" (at S_kv - Sq + i, the padded key
# length). TensorRT's documentation does not say (not confirmed); the function body computes the
# choice made here, so the check proves the rest of the model under it. For one new token per
# step over a prefix of valid keys both choices give the same result.
LOWER_RIGHT_ALIGNS_TO = "kv_lengths"


@dataclass(frozen=True)
class OpSchema:
    """A custom op's interface: input names by index and attributes with their ONNX types
    ("INT", "STRING") and defaults (None: no default)."""

    op_type: str
    inputs: tuple[str, ...]
    attributes: dict[str, tuple[str, object]]
    since: str  # the TensorRT version whose parser first imports it

    def index(self, name: str) -> int:
        return self.inputs.index(name)


TRT_ATTENTION = OpSchema(
    op_type="TRT_Attention",
    inputs=("Q", "K", "V", "attn_mask", "query_lengths", "kv_lengths"),
    attributes={
        "causal_kind": ("STRING", "none"),
        "query_form": ("STRING", "padded_bhnd"),
        "kv_form": ("STRING", "padded_bhnd"),
        "TRT_decomposable": ("INT", 0),
        "TRT_normalization_op": ("STRING", "softmax"),
        "nb_rank": ("INT", 1),
    },
    since="11",
)
SCHEMA_VERSION = "B"  # of TRT_ATTENTION, as named in the module docstring
# Attributes of schema (A) that (B) dropped: a node carrying them was written for the other one.
SCHEMA_A_ONLY = ("is_causal", "scale", "q_num_heads", "kv_num_heads")

TRT_KV_CACHE_UPDATE = OpSchema(
    op_type="TRT_KVCacheUpdate",
    inputs=("past_cache", "update", "write_indices", "update_lengths"),
    attributes={
        "update_form": ("STRING", "padded_bhnd"),
        "mode": ("STRING", "linear"),
        "axis": ("INT", -2),
    },
    since="11",
)

# TRT_QuantizedAttention (onnx-tensorrt's TRT_custom_ops.md; its importer builds an IAttention with
# setNormalizationQuantizeScale/ToType): Attention-23's inputs and attributes (Q is not scaled
# beforehand: `scale` applies, default 1/sqrt(head size); `is_causal` is upper-left), the Q/DQ
# pairs of Q, K and V in front of it, and the quantize of the softmax output as a scalar scale
# (input 4) and a type (an ONNX TensorProto type: FLOAT8E4M3FN, the default, or INT8). Its importer
# wants exactly 5 inputs (an absent mask is an empty name); the newer schema adds query_lengths
# and kv_lengths at 5 and 6, which are not written. None: no default.
TRT_QUANTIZED_ATTENTION = OpSchema(
    op_type="TRT_QuantizedAttention",
    inputs=("Q", "K", "V", "attn_mask", "normalization_quantize_scale"),
    attributes={
        "scale": ("FLOAT", None),
        "is_causal": ("INT", 0),
        "normalization_quantize_to_type": ("INT", 17),  # TensorProto.FLOAT8E4M3FN
        "TRT_decomposable": ("INT", 0),
        "TRT_normalization_op": ("STRING", "softmax"),
    },
    since="11",
)
NORMALIZATION_QUANTIZE_TYPES = (3, 17)  # TensorProto.INT8, TensorProto.FLOAT8E4M3FN

SCHEMAS = {s.op_type: s for s in (TRT_ATTENTION, TRT_KV_CACHE_UPDATE, TRT_QUANTIZED_ATTENTION)}

# TensorRT's multi-device (context-parallel) attention, nb_rank > 1: a preview feature.
MULTIDEVICE_PREVIEW_FLAG = "PreviewFeature::kMULTIDEVICE_RUNTIME_10_16"
MULTIDEVICE_REQUIREMENTS = ("FP16 or BF16 attention; Blackwell (SM 100) or later; an NCCL "
                            "communicator set with IExecutionContext::setCommunicator")
