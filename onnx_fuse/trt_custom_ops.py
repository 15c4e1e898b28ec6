"""TensorRT's parser rules for custom ops, which it imports as plugins (or as the built-in op their
name collides with): ../shared/reference/tensorrt-onnx-contract.md sections 2 and 3.

How the parser picks an importer for a node: (1) a plugin, if the node has `plugin_namespace` (or
the plugin-override flag is set) and the plugin is registered; (2) the built-in importer of that
op_type, whatever the domain; (3) a model-local function of that name, inlined; (4) without
plugin_namespace, a plugin looked up with the domain as namespace; otherwise no importer.

The ops of target trt-plugin (plugin_ops.py) are also checked against their own contract: the
validation plugin_ops.make_node applies, the plugin's namespace and version, the input types its
plugins take and, for the cache write, the in-place cache pair.
"""

from __future__ import annotations

from functools import lru_cache

import onnx
from onnx import TensorProto

from . import plugin_ops
from .trt_facts import BUILD, KERNEL, PARSE, Facts, Finding, attributes, text, type_name
from .trt_layers import LAYERS, cache_aliasing

# Custom op types TensorRT 11 imports itself (TRT_custom_ops.md): not plugins.
TRT_BUILTIN_CUSTOM_OPS = {*[op for op in LAYERS if op.startswith("TRT_")], "TRT_MoE"}
_LIST_TYPES = {"INTS", "FLOATS", "STRINGS", "TENSOR", "TENSORS", "GRAPH", "GRAPHS"}
_INTEGERS = {TensorProto.INT32, TensorProto.INT64}
# The input types the project's plugins take (plugin_ops.py's docstring), by op and input.
_PROJECT_INPUT_TYPES = {
    plugin_ops.ATTENTION.name: {"key_mask": {TensorProto.BOOL, *_INTEGERS}, "kv_lengths": {TensorProto.INT32}},
    plugin_ops.ROPE.name: {"position_ids": {TensorProto.INT64}},
    plugin_ops.KV_WRITE.name: {"write_indices": _INTEGERS},
}


@lru_cache(maxsize=1)
def _standard_op_types() -> frozenset[str]:
    return frozenset(s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx"))


def is_plugin_node(node: onnx.NodeProto) -> bool:
    """A node the parser resolves by the plugin rules: a custom domain that is not one of
    TensorRT's own custom ops, or a plugin_namespace attribute."""
    if any(a.name == "plugin_namespace" for a in node.attribute):
        return True
    return node.domain not in ("", "ai.onnx") and node.op_type not in TRT_BUILTIN_CUSTOM_OPS


def plugin_layer(node: onnx.NodeProto) -> str:
    builtin = _builtin_name(node.op_type)
    return f"built-in {node.op_type}" if builtin and "plugin_namespace" not in attributes(node) else "plugin"


def plugin(node: onnx.NodeProto, facts: Facts, version: str) -> tuple[list[Finding], list[str]]:
    """Findings and notes for one custom-op node."""
    attrs = attributes(node)
    found, notes = _attribute_types(attrs), []
    namespace = text(attrs["plugin_namespace"][0]) if "plugin_namespace" in attrs else None
    plugin_version = text(attrs.get("plugin_version", ("1",))[0])
    builtin = _builtin_name(node.op_type)
    if builtin and namespace is None:
        found.append(Finding("plugin_name", f"op_type {node.op_type} is the name of TensorRT's built-in "
                                            f"{builtin} importer, which takes it whatever the domain: give the "
                                            "op its own name or a plugin_namespace", PARSE))
    elif builtin:
        notes.append(f"named like the built-in {builtin}: the plugin takes it only while it is registered")
    has_function = node.op_type in facts.function_names
    if namespace is not None:
        fallback = "; else its model-local function is inlined" if has_function else ""
        notes.append(f"needs plugin {namespace}::{node.op_type} version {plugin_version} registered at "
                     f"build time{fallback}")
    elif has_function:
        notes.append("no plugin_namespace: the parser inlines the model-local function "
                     f"{node.op_type}")
    elif not builtin and not _is_project_op(node):
        found.append(Finding("plugin_lookup", f"no plugin_namespace and no model-local function: it "
                                              f"parses only if a plugin {node.op_type} (version "
                                              f"{plugin_version}) is registered in namespace "
                                              f"'{node.domain}'", PARSE))
    if _is_project_op(node):
        found += _project_op(node, facts, attrs)
    return found, notes


def _is_project_op(node: onnx.NodeProto) -> bool:
    return node.domain == plugin_ops.DOMAIN and node.op_type in plugin_ops.OPS


def _project_op(node: onnx.NodeProto, facts: Facts, attrs: dict) -> list[Finding]:
    """One of target trt-plugin's ops against its contract (plugin_ops.py)."""
    spec = plugin_ops.OPS[node.op_type]
    found = []
    values = {name: value for name, (value, _) in attrs.items()
              if name not in ("plugin_namespace", "plugin_version")}
    try:
        plugin_ops.make_node(node.op_type, list(node.input), list(node.output), **values)
    except ValueError as exc:
        found.append(Finding("plugin_contract", f"{node.op_type}: {exc}", PARSE))
    for name, wanted in (("plugin_namespace", plugin_ops.PLUGIN_NAMESPACE),
                         ("plugin_version", plugin_ops.PLUGIN_VERSION)):
        given = text(attrs[name][0]) if name in attrs else None
        if given != wanted:
            found.append(Finding("plugin_contract", f"{name} {given!r}: onnx_fuse registers its plugins as "
                                                    f"{wanted!r}; another finds no plugin and inlines the "
                                                    "function", KERNEL))
    for index, input_name in enumerate(spec.inputs):
        wanted = _PROJECT_INPUT_TYPES[spec.name].get(input_name)
        tensor = node.input[index] if index < len(node.input) else ""
        if wanted and tensor and facts.elem(tensor) not in (None, *wanted):
            found.append(Finding("dtype", f"{input_name} is {type_name(facts.elem(tensor))}; the plugin "
                                          f"takes {', '.join(sorted(type_name(t) for t in wanted))}", BUILD))
    if spec is plugin_ops.KV_WRITE:
        found += cache_aliasing(node, facts)
    return found


def _attribute_types(attrs: dict) -> list[Finding]:
    found = []
    for name in ("plugin_namespace", "plugin_version"):
        if name in attrs and attrs[name][1] != "STRING":
            found.append(Finding("attribute", f"{name} must be a STRING, not {attrs[name][1]}", PARSE))
    if "aot" in attrs and attrs["aot"][1] != "INT":
        found.append(Finding("attribute", f"aot must be an INT (0 JIT, 1 AOT), not {attrs['aot'][1]}", PARSE))
    for name, (_, kind) in attrs.items():
        if kind in _LIST_TYPES:
            found.append(Finding("attribute", f"attribute {name} is {kind}: TensorRT's Python plugins take "
                                              "int, float, str, bool, bytes or 1-D arrays, not lists, "
                                              "tensors or graphs", PARSE))
    return found


def _builtin_name(op_type: str) -> str | None:
    """The built-in importer a node of this op_type goes to (the parser ignores the domain)."""
    if op_type in TRT_BUILTIN_CUSTOM_OPS or op_type in _standard_op_types():
        return op_type
    return None
