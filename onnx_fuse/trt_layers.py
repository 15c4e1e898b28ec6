"""TensorRT's parser contract for the ops it maps to transformer layers: ONNX Attention,
RotaryEmbedding and TensorScatter, and TensorRT 11's TRT_Attention and TRT_KVCacheUpdate
(../shared/reference/tensorrt-onnx-contract.md; fused-kernel rules from the seed document
tensorrt-working-with-transformers.txt). Each rule returns the Findings for one node.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from . import trt_qdq
from .trt_facts import BUILD, FUSED_MHA_TYPES, KERNEL, PARSE, Facts, Finding, at_least, attributes, text, type_name
from .trt_schema import (CAUSAL_KINDS, IO_FORMS, MULTIDEVICE_PREVIEW_FLAG, NORMALIZATION_OPS, SCHEMA_A_ONLY,
                         TRT_ATTENTION, TRT_KV_CACHE_UPDATE)

# The TensorRT version whose parser first maps each op to its layer, and the layer.
LAYERS = {
    "Attention": ("10.14", "IAttention"),
    "RotaryEmbedding": ("10.15", "IRotaryEmbeddingLayer"),
    "TensorScatter": ("10.15", "IKVCacheUpdateLayer"),
    TRT_ATTENTION.op_type: (TRT_ATTENTION.since, "IAttention (v2)"),
    TRT_KV_CACHE_UPDATE.op_type: (TRT_KV_CACHE_UPDATE.since, "IKVCacheUpdateLayer"),
    "TRT_QuantizedAttention": ("11", "IAttention (quantized)"),
}
NB_RANKS_SINCE = "10.16"  # IAttention::setNbRanks; an Attention node's nbRanks field
_MULTIDEVICE_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_LAYOUT_OPS = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze"}
_STANDARD_UNSUPPORTED = {"softcap": 0.0, "softmax_precision": None, "qk_matmul_output_mode": 0}


def version_findings(node: onnx.NodeProto, version: str, facts: Facts) -> list[Finding]:
    since, _ = LAYERS[node.op_type]
    if at_least(version, since):
        return []
    fallback = (f"; it would inline the model-local function {node.op_type} instead (onnx-fuse's "
                "bodies are references for onnxruntime, not meant for TensorRT)"
                if node.op_type in facts.function_names else "")
    return [Finding("version", f"TensorRT {version} has no importer for {node.op_type} "
                               f"(since {since}){fallback}", PARSE)]


# --------------------------------------------------------------------------- attention


def standard_attention(node: onnx.NodeProto, facts: Facts, version: str) -> list[Finding]:
    inputs = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask, past_key, past_value, nonpad = inputs[:7]
    attrs = attributes(node)
    found = _qkv_ranks(facts, q, k, v, three_d_ok="q_num_heads" in attrs and "kv_num_heads" in attrs)
    found += _mask_findings(facts, q, mask)
    if past_key or past_value or nonpad:
        found.append(Finding("inputs", "past_key/past_value/nonpad_kv_seqlen inputs are unsupported", PARSE))
    if len([o for o in node.output if o]) != 1:
        found.append(Finding("outputs", "only one output (no present_key/present_value/"
                                        "qk_matmul_output) is supported", PARSE))
    for name, default in _STANDARD_UNSUPPORTED.items():
        if name in attrs and attrs[name][0] != default:
            found.append(Finding("attribute", f"attribute {name}={attrs[name][0]} is unsupported", PARSE))
    if attrs.get("is_causal", (0,))[0] and mask:
        found.append(Finding("mask", "is_causal and a mask cannot both be set", PARSE))
    found += _trt_attributes(attrs)
    found += _nb_ranks(facts, q, attrs, "nbRanks" if "nbRanks" in attrs else "nb_rank", version)
    found += _gqa(facts, q, k)
    return found + _kernel(facts, q, attrs)


def trt_attention(node: onnx.NodeProto, facts: Facts, version: str) -> list[Finding]:
    """TRT_Attention, schema (B) (trt_schema.py)."""
    inputs = list(node.input) + [""] * (len(TRT_ATTENTION.inputs) - len(node.input))
    q, k, v, mask, query_lengths, kv_lengths = inputs[:6]
    attrs = attributes(node)
    found = _schema_b(node, attrs)
    query_form, kv_form = (text(attrs.get(f, (IO_FORMS[0],))[0]) for f in ("query_form", "kv_form"))
    found += _ranks_for_form(facts, q, query_form, "Q") + _ranks_for_form(facts, k, kv_form, "K")
    found += _ranks_for_form(facts, v, kv_form, "V")
    found += _mask_findings(facts, q, mask, rank_must_match=False)
    if mask and text(attrs.get("causal_kind", ("none",))[0]) != "none":
        found.append(Finding("mask", "a mask cannot be combined with causal_kind "
                                     f"{text(attrs['causal_kind'][0])!r}: fold the causal part into it", PARSE))
    if mask and query_form == "packed_nhd":
        found.append(Finding("mask", "a mask is not supported with query_form packed_nhd", PARSE))
    for name in (query_lengths, kv_lengths):
        found += _int32_vector(facts, name, "lengths")
    found += _trt_attributes(attrs)
    found += _nb_ranks(facts, q, attrs, "nb_rank", version)
    if query_form == kv_form == "padded_bhnd":
        found += _gqa(facts, q, k)
    return found + _kernel(facts, q, attrs)


def quantized_attention(node: onnx.NodeProto, facts: Facts, version: str) -> list[Finding]:
    """TRT_QuantizedAttention (TRT_custom_ops.md): Attention-23's inputs and attributes, and a
    scalar normalization_quantize_scale at input 4 (fp32, fp16 or bf16)."""
    inputs = list(node.input) + [""] * (5 - len(node.input))
    q, k, v, mask, quantize_scale = inputs[:5]
    attrs = attributes(node)
    found = _qkv_ranks(facts, q, k, v, three_d_ok="q_num_heads" in attrs and "kv_num_heads" in attrs)
    found += _mask_findings(facts, q, mask) + _trt_attributes(attrs) + _gqa(facts, q, k)
    if attrs.get("is_causal", (0,))[0] and mask:
        found.append(Finding("mask", "is_causal and a mask cannot both be set", PARSE))
    found += _quantized_operands(facts, q, k, v, attrs)
    scale_type = facts.elem(quantize_scale) if quantize_scale else None
    if not quantize_scale or facts.rank(quantize_scale) not in (None, 0) or scale_type not in (
            None, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        found.append(Finding("inputs", "normalization_quantize_scale (input 4) must be a scalar of "
                                       "fp32, fp16 or bf16", PARSE))
    return found


def _quantized_operands(facts: Facts, q: str, k: str, v: str, attrs: dict) -> list[Finding]:
    """TRT_QuantizedAttention's Q, K and V each come from a Q/DQ pair of the normalization
    quantize type (trt_qdq.py)."""
    found, types = trt_qdq.operand_findings(facts, {"Q": q, "K": k, "V": v})
    wanted = attrs.get("normalization_quantize_to_type", (TensorProto.FLOAT8E4M3FN,))[0]
    if wanted not in trt_qdq.QUANTIZED_TYPES:
        found.append(Finding("attribute", f"normalization_quantize_to_type {wanted} is neither INT8 (3) nor "
                                          "FLOAT8E4M3FN (17)", PARSE))
    elif types and types != {wanted}:
        found.append(Finding(trt_qdq.RULE, f"normalization_quantize_to_type is {type_name(wanted)}; the Q/DQ "
                                           f"pairs quantize to {', '.join(sorted(type_name(t) for t in types))}",
                             KERNEL))
    return found


def _schema_b(node: onnx.NodeProto, attrs: dict) -> list[Finding]:
    """The node is written for schema (B): no (A)-only attributes or input positions."""
    found = [Finding("schema", f"attribute {name} belongs to TRT_Attention schema (A); schema (B) has "
                               "causal_kind and no scale (scale Q beforehand)", PARSE)
             for name in SCHEMA_A_ONLY if name in attrs]
    if len(node.input) > len(TRT_ATTENTION.inputs):
        found.append(Finding("schema", f"{len(node.input)} inputs: schema (B) takes at most "
                                       f"{len(TRT_ATTENTION.inputs)} (lengths at inputs 4 and 5, not 6 and 7)", PARSE))
    found += _enum(attrs, "causal_kind", CAUSAL_KINDS)
    found += _enum(attrs, "query_form", IO_FORMS) + _enum(attrs, "kv_form", IO_FORMS)
    known = set(TRT_ATTENTION.attributes) | set(SCHEMA_A_ONLY)
    found += [Finding("attribute", f"attribute {name} is not in TRT_Attention's schema", PARSE)
              for name in attrs if name not in known]
    return found


def _qkv_ranks(facts: Facts, q: str, k: str, v: str, three_d_ok: bool) -> list[Finding]:
    ranks = {facts.rank(name) for name in (q, k, v)}
    if ranks == {4} or (three_d_ok and ranks == {3}):
        return []
    return [Finding("rank", f"Q/K/V ranks {sorted(map(str, ranks))}: TensorRT documents 4-D inputs "
                            "(3-D only with q_num_heads and kv_num_heads)", PARSE)]


def _ranks_for_form(facts: Facts, name: str, form: str, what: str) -> list[Finding]:
    wanted = 4 if form == "padded_bhnd" else 3
    rank = facts.rank(name)
    if rank is None or rank == wanted:
        return []
    return [Finding("rank", f"{what} is {rank}-D; form {form} takes {wanted}-D", PARSE)]


def _mask_findings(facts: Facts, q: str, mask: str, rank_must_match: bool = True) -> list[Finding]:
    if not mask:
        return []
    found = []
    rank = facts.rank(mask)
    if rank is not None and (rank > 4 or rank_must_match and rank != facts.rank(q)):
        found.append(Finding("rank", "the mask's rank differs from Q's" if rank_must_match
                             else f"the mask is {rank}-D (at most 4)", PARSE))
    if facts.elem(mask) not in (None, TensorProto.BOOL, facts.elem(q)):
        found.append(Finding("dtype", "the mask is neither boolean nor in Q's type", PARSE))
    return found


def _trt_attributes(attrs: dict) -> list[Finding]:
    """The attributes TensorRT's attention importers read beside ONNX's."""
    found = _enum(attrs, "TRT_normalization_op", NORMALIZATION_OPS)
    if "TRT_decomposable" in attrs and (attrs["TRT_decomposable"][1] != "INT"
                                        or attrs["TRT_decomposable"][0] not in (0, 1)):
        found.append(Finding("attribute", "TRT_decomposable must be an INT 0 or 1", PARSE))
    return found


def _nb_ranks(facts: Facts, q: str, attrs: dict, name: str, version: str) -> list[Finding]:
    """Multi-device (context-parallel) attention: nb_rank > 1."""
    if name not in attrs:
        return []
    value, kind = attrs[name]
    if kind != "INT" or value < 1:
        return [Finding("attribute", f"{name} must be an INT of at least 1", PARSE)]
    if value == 1:
        return []
    if not at_least(version, NB_RANKS_SINCE):
        return [Finding("version", f"{name}={value}: multi-device attention needs TensorRT "
                                   f"{NB_RANKS_SINCE} or later", PARSE)]
    if facts.elem(q) not in (None, *_MULTIDEVICE_TYPES):
        return [Finding("dtype", f"{name}={value}: multi-device attention takes FP16 or BF16, not "
                                 f"{type_name(facts.elem(q))}", BUILD)]
    return []


def attention_notes(node: onnx.NodeProto, facts: Facts) -> list[str]:
    """What an attention node needs beyond the parser: a pre-scaled Q, multi-device settings."""
    notes = []
    if node.op_type == TRT_ATTENTION.op_type and not scaled_by_constant(facts, node.input[0]):
        notes.append("Q is not visibly scaled before TRT_Attention, which does not scale: the scale "
                     "must be in Q already (folded into its weights, or 1)")
    return notes + _multidevice_notes(node)


def _multidevice_notes(node: onnx.NodeProto) -> list[str]:
    attrs = attributes(node)
    ranks = attrs.get("nb_rank", attrs.get("nbRanks", (1, "INT")))[0]
    if not isinstance(ranks, int) or ranks <= 1:
        return []
    return [f"nb_rank={ranks}: a preview feature; enable {MULTIDEVICE_PREVIEW_FLAG}; Blackwell "
            "(SM 100) or later; set an NCCL communicator on the execution context"]


def _gqa(facts: Facts, q: str, k: str) -> list[Finding]:
    q_dims, k_dims = facts.dims(q), facts.dims(k)
    if not q_dims or not k_dims or len(q_dims) != 4 or len(k_dims) != 4:
        return []
    nq, nkv = q_dims[1], k_dims[1]
    if isinstance(nq, int) and isinstance(nkv, int) and nkv and nq % nkv:
        return [Finding("heads", f"{nq} query heads are not a multiple of {nkv} K/V heads", PARSE)]
    return []


def scaled_by_constant(facts: Facts, name: str) -> bool:
    """`name` is x·c or x/c for a constant c, behind layout ops, Casts and a Q/DQ pair (elementwise:
    the factor before it is on x)."""
    node = facts.producer.get(name)
    while node is not None and node.op_type in _LAYOUT_OPS | {"QuantizeLinear", "DequantizeLinear"}:
        node = facts.producer.get(node.input[0])
    if node is not None and node.op_type == "Mul":
        return any(i in facts.constants for i in node.input)
    return node is not None and node.op_type == "Div" and node.input[1] in facts.constants


def _kernel(facts: Facts, q: str, attrs: dict) -> list[Finding]:
    """A fused kernel exists for Q's type; without one the build fails unless TRT_decomposable=1."""
    dtype = facts.elem(q)
    if dtype in FUSED_MHA_TYPES or dtype is None:
        return []
    if attrs.get("TRT_decomposable", (0,))[0] == 1:
        return [Finding("dtype", f"no fused MHA kernel for {type_name(dtype)}: a decomposed "
                                 "attention runs (TRT_decomposable=1)", KERNEL)]
    return [Finding("dtype", f"no fused MHA kernel for {type_name(dtype)}: the build fails unless "
                             "TRT_decomposable=1 (the build needs a decomposable attention)", BUILD)]


# --------------------------------------------------------------------------- RoPE and caches


def rotary(node: onnx.NodeProto, facts: Facts, version: str) -> list[Finding]:
    found = []
    x_rank = facts.rank(node.input[0])
    if x_rank not in (None, 4):
        found.append(Finding("rank", "the input is not 4-D (B, N, S, H), the form TensorRT's layer "
                                     "takes (the 3-D form is not confirmed)", PARSE))
    positions = node.input[3] if len(node.input) > 3 else ""
    if positions and facts.elem(positions) not in (None, TensorProto.INT64):
        found.append(Finding("indices", "position_ids are not INT64", PARSE))
    wanted = 2 if positions else 3
    for cache in node.input[1:3]:
        if facts.rank(cache) not in (None, wanted):
            found.append(Finding("rank", f"cos/sin caches are {facts.rank(cache)}-D; with"
                                         f"{'' if positions else 'out'} position_ids they are {wanted}-D", PARSE))
    rotary_dim = attributes(node).get("rotary_embedding_dim", (0,))[0]
    if rotary_dim % 2:
        found.append(Finding("attribute", f"rotary_embedding_dim {rotary_dim} is odd", PARSE))
    return found


def tensor_scatter(node: onnx.NodeProto, facts: Facts, version: str) -> list[Finding]:
    attrs = attributes(node)
    found = []
    if facts.rank(node.input[0]) != 4 or facts.rank(node.input[1]) != 4:
        found.append(Finding("rank", "cache and update must be 4-D", PARSE))
    found += _linear_axis(attrs)
    indices = node.input[2] if len(node.input) > 2 else ""
    if not indices:
        found.append(Finding("indices", "no write indices (TensorRT takes write indices of shape [B])", PARSE))
    elif facts.rank(indices) not in (None, 1):
        found.append(Finding("indices", "write indices must have shape [B]", PARSE))
    return found + cache_aliasing(node, facts)


def trt_kv_cache_update(node: onnx.NodeProto, facts: Facts, version: str) -> list[Finding]:
    attrs = attributes(node)
    inputs = list(node.input) + [""] * (4 - len(node.input))
    cache, update, write_indices, update_lengths = inputs[:4]
    form = text(attrs.get("update_form", (IO_FORMS[0],))[0])
    found = _enum(attrs, "update_form", IO_FORMS) + _linear_axis(attrs)
    if facts.rank(cache) not in (None, 4):
        found.append(Finding("rank", "past_cache must be 4-D [B, N, S, H]", PARSE))
    found += _ranks_for_form(facts, update, form, "the update")
    found += _int32_vector(facts, write_indices, "write_indices")
    if update_lengths and form != "packed_nhd":
        found.append(Finding("inputs", "update_lengths are for update_form packed_nhd", PARSE))
    found += _int32_vector(facts, update_lengths, "update_lengths")
    known = set(TRT_KV_CACHE_UPDATE.attributes)
    found += [Finding("attribute", f"attribute {name} is not in TRT_KVCacheUpdate's schema", PARSE)
              for name in attrs if name not in known]
    return found + cache_aliasing(node, facts)


def _linear_axis(attrs: dict) -> list[Finding]:
    found = []
    if attrs.get("axis", (-2,))[0] != -2:
        found.append(Finding("attribute", f"axis {attrs['axis'][0]} (TensorRT takes -2)", PARSE))
    if text(attrs.get("mode", ("linear",))[0]) != "linear":
        found.append(Finding("attribute", "only linear mode is supported", PARSE))
    return found


def cache_aliasing(node: onnx.NodeProto, facts: Facts) -> list[Finding]:
    """TensorRT updates the cache in place: it is a network input with a static sequence length,
    the updated cache a network output bound to the same memory, one update per cache."""
    found = []
    cache, output = node.input[0], node.output[0]
    value = facts.graph_inputs.get(cache)
    if value is None:
        found.append(Finding("static_cache", "the cache is not a network input (TensorRT updates an "
                                             "input buffer in place)", PARSE))
    else:
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 4 or not dims[2].HasField("dim_value"):
            found.append(Finding("static_cache", "the cache's sequence length (axis -2) is not static", PARSE))
    if output not in facts.graph_outputs:
        found.append(Finding("aliasing", "the updated cache is not a network output (it must share "
                                         "the input's memory)", PARSE))
    writers = [n for n in facts.consumers.get(cache, []) if n.op_type in LAYERS
               and LAYERS[n.op_type][1] == "IKVCacheUpdateLayer" and n.input[0] == cache]
    if len(writers) > 1:
        found.append(Finding("aliasing", f"the cache '{cache}' is updated by {len(writers)} nodes; "
                                         "one output can share its memory", PARSE))
    return found


def _int32_vector(facts: Facts, name: str, what: str) -> list[Finding]:
    if not name:
        return []
    found = []
    if facts.elem(name) not in (None, TensorProto.INT32):
        found.append(Finding("indices", f"{what} are {type_name(facts.elem(name))}; TensorRT takes INT32", PARSE))
    if facts.rank(name) not in (None, 1):
        found.append(Finding("indices", f"{what} must be 1-D", PARSE))
    return found


def _enum(attrs: dict, name: str, allowed: tuple[str, ...]) -> list[Finding]:
    if name not in attrs:
        return []
    value, kind = attrs[name]
    if kind != "STRING" or text(value) not in allowed:
        return [Finding("attribute", f"{name}={text(value)!r}: one of {', '.join(allowed)} (a STRING)", PARSE)]
    return []


RULES = {
    "Attention": standard_attention,
    "RotaryEmbedding": rotary,
    "TensorScatter": tensor_scatter,
    TRT_ATTENTION.op_type: trt_attention,
    TRT_KV_CACHE_UPDATE.op_type: trt_kv_cache_update,
    "TRT_QuantizedAttention": quantized_attention,
}
