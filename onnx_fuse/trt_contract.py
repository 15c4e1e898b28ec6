"""TensorRT's ONNX parser contract for transformer layers, checked statically, per version.

TensorRT cannot run here, so its documented contract (../shared/reference/tensorrt-onnx-contract.md
and the MHA fusion rules of tensorrt-working-with-transformers.txt) is checked on the model: every
node TensorRT's parser maps to a transformer layer gets a `Verdict`, the list of reasons it would
not parse, would not build, or would get no fused kernel:

- ONNX Attention, RotaryEmbedding, TensorScatter and TensorRT 11's TRT_Attention and
  TRT_KVCacheUpdate (trt_layers.py);
- custom ops, which the parser imports as plugins or as the built-in op their name collides
  with (trt_custom_ops.py);
- primitive MatMul → Softmax → MatMul attention, which TensorRT fuses itself (trt_mha.py).

`verdicts` is what `onnx-fuse lint` prints; `check_model` and `causal_form_problems` are the
targets' contracts (the report's `tensorrt` entries).
"""

from __future__ import annotations

import onnx

from .trt_facts import VERSIONS, Facts, Verdict
from .trt_layers import LAYERS, RULES, attention_notes, version_findings
from .trt_mha import CAUSAL_FORM_RULES, LAYER, primitive_attentions, primitive_findings
from .trt_custom_ops import is_plugin_node, plugin, plugin_layer

DEFAULT_VERSION = "10.15"  # the oldest version that maps every standard op the onnx target writes


def verdicts(model: onnx.ModelProto, version: str = DEFAULT_VERSION) -> list[Verdict]:
    """One verdict per node TensorRT's parser `version` maps to a transformer layer, in graph
    order, then one per primitive attention (named by its Softmax)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown TensorRT version {version!r} (known: {', '.join(VERSIONS)})")
    facts = Facts(model)
    found = []
    for node in facts.nodes:  # If/Loop/Scan bodies included
        if is_plugin_node(node):
            findings, notes = plugin(node, facts, version)
            found.append(Verdict(_name(node), f"{node.domain}::{node.op_type}", plugin_layer(node),
                                 findings, notes))
        elif node.op_type in RULES:  # the parser looks importers up by op_type, not domain
            findings = version_findings(node, version, facts) + RULES[node.op_type](node, facts, version)
            found.append(Verdict(_name(node), node.op_type, LAYERS[node.op_type][1], findings,
                                 attention_notes(node, facts)))
    for softmax, chain, matmul in primitive_attentions(facts, model):
        found.append(Verdict(_name(softmax), "Softmax", LAYER, primitive_findings(facts, chain, matmul, softmax)))
    return found


def check_model(model: onnx.ModelProto, version: str = DEFAULT_VERSION) -> list[dict]:
    """The contract of targets that emit fused ops: {node, op, problems} per fused-op node."""
    return [{"node": v.node, "op": v.op, "problems": [f.message for f in v.findings]}
            for v in verdicts(model, version) if v.op in LAYERS]


def causal_form_problems(model: onnx.ModelProto) -> list[dict]:
    """For each primitive attention: the reasons it is not in the form whose causal mask TensorRT
    can exploit (target primitive-trt's contract); an empty list means it is."""
    return [{"node": v.node, "problems": [f.message for f in v.findings if f.rule in CAUSAL_FORM_RULES]}
            for v in verdicts(model) if v.layer == LAYER]


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]
