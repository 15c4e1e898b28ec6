"""The rewritten graph as a model again."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .graph import Graph


def export(graph: Graph, template: onnx.ModelProto, domains: dict[str, int] | None = None) -> onnx.ModelProto:
    """The rewritten graph in a model that keeps the template's metadata, opsets and the
    doc strings and metadata of every node that survived; fused nodes say which rule made them.
    `domains`: the opset versions of the domains the target's nodes use (others get version 1);
    the model-local functions rewrites registered are added to the template's."""
    model = gs.export_onnx(graph.gs, do_type_check=False)
    _drop_body_value_info(model.graph)
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                 "doc_string"):
        setattr(model, name, getattr(template, name))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    exported_opsets = [(o.domain, o.version) for o in model.opset_import]
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    known = {o.domain for o in model.opset_import}
    for domain, version in exported_opsets:
        if domain not in known:
            model.opset_import.add(domain=domain, version=(domains or {}).get(domain, version))
    del model.functions[:]
    model.functions.extend(template.functions)
    present = {(f.domain, f.name) for f in template.functions}
    model.functions.extend(f for key, f in graph.functions.items() if key not in present)
    originals = {n.name: n for n in template.graph.node
                 if n.name and (n.doc_string or len(n.metadata_props))}
    for node in model.graph.node:
        rule = graph.fused_by.get(node.name)
        if rule is not None:
            node.doc_string = f"onnx-fuse rule: {rule}"
            entry = node.metadata_props.add()
            entry.key, entry.value = "onnx_fuse.rule", rule
        elif node.name in originals:
            node.doc_string = originals[node.name].doc_string
            node.metadata_props.extend(originals[node.name].metadata_props)
    return model


def _drop_body_value_info(graph: onnx.GraphProto) -> None:
    """Shape inference with data propagation (graph.py) can write wrong shapes into If/Loop/Scan
    bodies (onnx 1.23, optimum's merged decoder: a ConstantOfShape of a Shape given the shape of
    the tensor whose shape was taken), which onnxruntime then refuses to load; it infers the
    bodies' shapes itself, so their value_info is not written."""
    for node in graph.node:
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                del body.value_info[:]
                _drop_body_value_info(body)
