"""Target "ort": onnxruntime's fused contrib ops (domain com.microsoft), which its CPU, CUDA,
DirectML and WebGPU providers implement: GroupQueryAttention for causal self-attention (decoders,
with or without a KV cache; RoPE folded in where the CPU kernel takes it), MultiHeadAttention for
the rest with as many K/V heads as query heads (encoders, cross-attention, T5's biases), ONNX
Attention (opset 23) for what neither expresses (the report says why), and
com.microsoft.RotaryEmbedding for RoPE that is not folded. ort_attention.py and ort_rotary.py
give the facts each relies on.
"""

from __future__ import annotations

import onnx

from ..specs import AttentionSpec, KVCacheWriteSpec, RotarySpec
from . import onnx as standard
from .base import Target
from .ort_attention import ATTENTION, GQA, MHA, emit_attention, plan
from .ort_kernels import CONTRIB, providers, runs_on_cpu
from .ort_rotary import ROTARY, emit_rotary, fold_rotary
from .ort_static import OrtStaticForm


class OrtTarget(Target):
    name = "ort"
    floor_opset = 23  # ONNX Attention, for what the contrib ops cannot express
    domains = {CONTRIB: 1}
    contract_name = "onnxruntime"
    # StaticCache's scatters become TensorScatter (opset 24), which onnxruntime runs for every type
    emitters = {AttentionSpec: emit_attention, RotarySpec: emit_rotary,
                KVCacheWriteSpec: standard.emit_kv_cache_write}
    static_cache = True  # GroupQueryAttention over shared past/present buffers (ort_static.py)

    def static_form(self):
        return OrtStaticForm()

    def refusal(self, spec) -> str | None:
        if isinstance(spec, AttentionSpec):
            chosen = plan(spec, lambda t: t.shape)  # emit plans again with the refined shapes
            if chosen.op is None:
                return chosen.why
            if chosen.op == ATTENTION and spec.written_as == ATTENTION:  # no op into itself
                return f"stays the ONNX Attention the model has: {chosen.why}"
        return super().refusal(spec)

    def finish(self, graph, result) -> None:
        """Fold RoPE into GQA; say per attention fusion which op it became, why not a more
        specific one, whether it has sinks, and which providers implement its node."""
        fold_rotary(graph, result)
        ops = {n.name: n for n in graph.gs.nodes if n.name in graph.fused_by and n.op in (GQA, MHA, "Attention")}
        for fusion in result.fused:
            chosen = graph.memo.get(("ort plan", id(fusion.spec)))
            node = next((ops[n] for n in fusion.nodes if n in ops), None)
            if chosen is None or node is None:
                continue
            fusion.details.update({"op": chosen.op, **({"why": chosen.why} if chosen.why else {}),
                                   "sinks": fusion.spec.sinks is not None,
                                   "providers": providers(node.op, node.domain or "",
                                                          [t.name for t in node.inputs])})

    def contract(self, model: onnx.ModelProto) -> list[dict]:
        """Per emitted node: the providers that implement it, and as a problem a node the CPU
        provider (and so the check) cannot run."""
        types = _value_types(model)
        entries = []
        for node in model.graph.node:
            if (node.domain, node.op_type) not in _EMITTED:
                continue
            dtype = types.get(node.input[0])
            problems = []
            if dtype is not None and not runs_on_cpu(node.op_type, node.domain, dtype):
                problems.append(f"no CPU kernel for {onnx.TensorProto.DataType.Name(dtype).lower()}: "
                                "not checkable on onnxruntime's CPU provider")
            entries.append({"node": node.name, "op": node.op_type, "problems": problems,
                            **_attributes(node),
                            "providers": providers(node.op_type, node.domain, list(node.input))})
        return entries


_EMITTED = {(CONTRIB, GQA), (CONTRIB, MHA), (CONTRIB, ROTARY), ("", "Attention")}
_REPORTED = ("num_heads", "kv_num_heads", "local_window_size", "softcap", "do_rotary",
             "rotary_interleaved", "unidirectional", "scale", "interleaved", "rotary_embedding_dim")


def _attributes(node: onnx.NodeProto) -> dict:
    found = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in _REPORTED}
    if node.op_type == GQA:
        found["head_sink"] = len(node.input) > 11 and bool(node.input[11])
    return found


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor the graph declares or initializes."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types
